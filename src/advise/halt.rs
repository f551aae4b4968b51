//! The halt-polling rule: the observed halts replayed under KVM's policy
//! for candidate maximum windows, and the window to use.

use serde::Serialize;

use super::input::{Vcpu, Vm};
use super::replay::{Halt, Outcome, Policy, replay};
use super::{Change, Finding};

/// Candidate maximum windows, ns (the current one is added).
pub const CANDIDATES: [u64; 6] = [0, 10_000, 50_000, 100_000, 200_000, 500_000];

/// Polling CPU under which the current window is not worth a finding, s/s
/// for the whole VM.
pub const MIN_CPU: f64 = 0.02;
/// Share of the polling CPU spent in polls that failed from which polling
/// is wasted.
pub const MIN_FAILED_SHARE: f64 = 0.5;
/// A smaller window must keep this share of the wake-ups polling catches now...
pub const KEEP_CAUGHT: f64 = 0.9;
/// ... unless the catches it loses are at most this share of all wake-ups:
/// a catch spares one wake-up a few microseconds, and a window that catches
/// a handful of thousands by chance is still wasted.
pub const NEGLIGIBLE_CATCHES: f64 = 0.01;

/// The halts of a histogram, in a steady order: each bucket's halts at one
/// duration (the bucket's geometric middle, scaled so that all of them add
/// up to the observed total where that keeps them inside their buckets),
/// interleaved so that every stretch of the sequence has the same mix;
/// `invalid` of them spread evenly as wake-ups without a cause.
pub fn halts_of(hist: &[u64], halt_ns: u64, invalid: u64) -> Vec<Halt> {
    let bounds = |i: usize| -> (f64, f64) {
        if i == 0 {
            (0.0, 2_000.0)
        } else {
            ((1u64 << i) as f64 * 1e3, (1u64 << (i + 1)) as f64 * 1e3)
        }
    };
    let mid = |i: usize| -> f64 {
        let (lo, hi) = bounds(i);
        if i == 0 { 1_000.0 } else { (lo * hi).sqrt() }
    };
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let guessed: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f64 * mid(i))
        .sum();
    let scale = if guessed > 0.0 && halt_ns > 0 {
        halt_ns as f64 / guessed
    } else {
        1.0
    };
    let value: Vec<u64> = (0..hist.len())
        .map(|i| {
            let (lo, hi) = bounds(i);
            (mid(i) * scale).clamp(lo, hi - 1.0) as u64
        })
        .collect();
    // Smooth weighted round robin: each step takes the bucket furthest
    // behind its share.
    let mut credit = vec![0i64; hist.len()];
    let mut left = hist.to_vec();
    let mut out = Vec::with_capacity(total as usize);
    let every = (invalid > 0).then(|| total / invalid.min(total));
    for n in 0..total {
        for (c, &h) in credit.iter_mut().zip(hist) {
            *c += h as i64;
        }
        let pick = (0..hist.len())
            .filter(|&i| left[i] > 0)
            .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        credit[pick] -= total as i64;
        left[pick] = left[pick].saturating_sub(1);
        let invalid_here = every.is_some_and(|k| k > 0 && (n + 1) % k == 0);
        out.push(Halt {
            ns: value[pick],
            valid: !invalid_here,
        });
    }
    out
}

/// One candidate window's prediction for a VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// The maximum window, ns.
    pub window_ns: u64,
    /// Host CPU spent polling, s/s, all vCPUs.
    pub poll_cpu: f64,
    /// Of which in polls that failed.
    pub failed_cpu: f64,
    /// Share of the wake-ups polling catches.
    pub caught_share: f64,
    /// Share of polls assumed cut short because other tasks wanted the
    /// CPU, as observed under the current window (see [`aborted_share`]).
    pub aborted_share: f64,
    /// Polling CPU, s/s, with no poll cut short (the replay alone).
    pub uncontended_poll_cpu: f64,
    /// Caught share with no poll cut short.
    pub uncontended_caught_share: f64,
    /// The replay's totals.
    #[serde(skip)]
    pub outcome: Outcome,
}

fn predict_vcpu(v: &Vcpu, policy: &Policy) -> Outcome {
    replay(policy, 0, halts_of(&v.halt_hist, v.halt_ns, v.invalid))
}

/// Replayed catches under the current window from which the observed
/// ones say how many polls were cut short.
pub const MIN_CATCHES_FOR_ABORTS: u64 = 50;

/// The share of polls KVM cut short on `v` (another task wanted the CPU:
/// `kvm_vcpu_can_poll()` stops at once when the CPU's run queue holds more
/// than the vCPU): 1 - observed catches / replayed catches under the
/// current window; 0 when the replay catches too few to tell.
pub fn aborted_share(v: &Vcpu, current: &Policy) -> f64 {
    aborted_of(v.polled, predict_vcpu(v, current).caught)
}

/// [`aborted_share`] from the observed and the replayed catches.
fn aborted_of(polled: u64, replayed: u64) -> f64 {
    if replayed < MIN_CATCHES_FOR_ABORTS || polled >= replayed {
        return 0.0;
    }
    1.0 - polled as f64 / replayed as f64
}

/// `o` with a share `aborted` of its polls cut short at once: neither
/// their catches nor their polling time remain.
fn with_aborts(o: Outcome, aborted: f64) -> Outcome {
    let keep = |x: u64| (x as f64 * (1.0 - aborted)).round() as u64;
    Outcome {
        caught: keep(o.caught),
        success_ns: keep(o.success_ns),
        fail_ns: keep(o.fail_ns),
        ..o
    }
}

/// Predicts every candidate window for `vm` under `policy` (whose maximum
/// is the current window).
pub fn predictions(vm: &Vm, policy: &Policy) -> Vec<Prediction> {
    let mut windows: Vec<u64> = CANDIDATES.to_vec();
    windows.push(policy.max_ns);
    windows.sort_unstable();
    windows.dedup();
    let seconds = vm.observed_ns() as f64 / 1e9;
    // Each vCPU's halts, and the share of its polls cut short, once.
    let vcpus: Vec<(Vec<Halt>, f64)> = vm
        .vcpus
        .values()
        .map(|v| {
            let halts = halts_of(&v.halt_hist, v.halt_ns, v.invalid);
            let caught = replay(policy, 0, halts.iter().copied()).caught;
            (halts, aborted_of(v.polled, caught))
        })
        .collect();
    windows
        .into_iter()
        .map(|w| {
            let mut sum = Outcome::default();
            let mut aborted_weighted = 0.0;
            let (mut free_poll_ns, mut free_caught) = (0, 0);
            for (halts, aborted) in &vcpus {
                aborted_weighted += aborted * halts.len() as f64;
                let free = replay(&policy.with_max(w), 0, halts.iter().copied());
                free_poll_ns += free.poll_ns();
                free_caught += free.caught;
                let o = with_aborts(free, *aborted);
                sum.halts += o.halts;
                sum.attempted += o.attempted;
                sum.caught += o.caught;
                sum.success_ns += o.success_ns;
                sum.fail_ns += o.fail_ns;
                sum.grows += o.grows;
                sum.shrinks += o.shrinks;
            }
            let per_s = |ns: u64| {
                if seconds > 0.0 {
                    ns as f64 / 1e9 / seconds
                } else {
                    0.0
                }
            };
            Prediction {
                window_ns: w,
                poll_cpu: per_s(sum.poll_ns()),
                failed_cpu: per_s(sum.fail_ns),
                caught_share: sum.caught_share(),
                aborted_share: aborted_weighted / sum.halts.max(1) as f64,
                uncontended_poll_cpu: per_s(free_poll_ns),
                uncontended_caught_share: free_caught as f64 / sum.halts.max(1) as f64,
                outcome: sum,
            }
        })
        .collect()
}

/// The window to recommend instead of `current`, if polling is wasted:
/// the one with the least polling CPU that keeps [`KEEP_CAUGHT`] of the
/// wake-ups caught now, or loses at most [`NEGLIGIBLE_CATCHES`] of them all.
pub fn choose(preds: &[Prediction], current_ns: u64) -> Option<&Prediction> {
    let cur = preds.iter().find(|p| p.window_ns == current_ns)?;
    if cur.poll_cpu < MIN_CPU || cur.failed_cpu < MIN_FAILED_SHARE * cur.poll_cpu {
        return None;
    }
    let caught = cur.outcome.caught;
    let negligible = (cur.outcome.halts as f64 * NEGLIGIBLE_CATCHES).floor() as u64;
    let keep =
        ((caught as f64 * KEEP_CAUGHT).floor() as u64).min(caught.saturating_sub(negligible));
    let best = preds
        .iter()
        .filter(|p| p.outcome.caught >= keep)
        .min_by(|a, b| a.poll_cpu.total_cmp(&b.poll_cpu))?;
    (cur.poll_cpu - best.poll_cpu >= MIN_CPU / 2.0).then_some(best)
}

fn us(ns: u64) -> String {
    format!("{} µs", ns as f64 / 1e3)
}

/// The halt-polling finding for `vm`, or a line saying why there is none.
pub fn rule(vm: &Vm, policy: &Policy) -> Result<Finding, String> {
    rule_with(vm, policy, &predictions(vm, policy))
}

/// [`rule`] with the VM's [`predictions`] made already.
pub fn rule_with(vm: &Vm, policy: &Policy, preds: &[Prediction]) -> Result<Finding, String> {
    let halts: u64 = vm.vcpus.values().map(|v| v.wakeups).sum();
    if halts == 0 {
        return Err("halt polling: no halts seen".into());
    }
    let Some(cur) = preds.iter().find(|p| p.window_ns == policy.max_ns) else {
        return Err("halt polling: no prediction".into());
    };
    let summary = format!(
        "halt polling: the {} window polls {:.3} s/s and catches {:.1} % of {} wake-ups (replayed); nothing to change",
        us(policy.max_ns),
        cur.poll_cpu,
        cur.caught_share * 100.0,
        halts
    );
    let measured = vm.kvm.map(|(k, seconds)| {
        format!(
            "KVM's own figures (debugfs) over {seconds:.1} s: polling {:.3} s/s ({:.3} failed), {} of {} polls caught, {} halts",
            (k.success_ns + k.fail_ns) as f64 / 1e9 / seconds.max(1e-9),
            k.fail_ns as f64 / 1e9 / seconds.max(1e-9),
            k.successful,
            k.attempted,
            k.halts
        )
    });
    let Some(best) = choose(preds, policy.max_ns) else {
        return Err(match &measured {
            Some(m) => format!("{summary}; {m}"),
            None => summary,
        });
    };
    let mut evidence: Vec<String> = vm
        .vcpus
        .values()
        .map(|v| {
            let o = predict_vcpu(v, policy);
            format!(
                "vCPU {}: {} halts, mean {:.1} µs, {} caught by polling as observed; replayed at {}: {} polls, {} caught, {:.1} ms polling of which {:.1} ms failed",
                v.vcpu_id.map_or("?".into(), |i| i.to_string()),
                v.wakeups,
                v.halt_ns as f64 / v.wakeups.max(1) as f64 / 1e3,
                v.polled,
                us(policy.max_ns),
                o.attempted,
                o.caught,
                o.poll_ns() as f64 / 1e6,
                o.fail_ns as f64 / 1e6
            )
        })
        .collect();
    evidence.extend(measured);
    for p in preds {
        evidence.push(format!(
            "window {:>9}: polling {:.3} s/s ({:.3} failed), catches {:.1} %",
            us(p.window_ns),
            p.poll_cpu,
            p.failed_cpu,
            p.caught_share * 100.0
        ));
    }
    let (setting, scope) = if best.window_ns == 0 {
        (
            "echo 0 > /sys/module/kvm/parameters/halt_poll_ns (host-wide; kvm.halt_poll_ns=0 on the kernel command line to keep it), or KVM_CAP_HALT_POLL 0 for this VM where its VMM sets it, or guest-side haltpoll (cpuidle-haltpoll), which turns host polling off for that guest".to_string(),
            "host or VM".to_string(),
        )
    } else {
        (
            format!(
                "echo {} > /sys/module/kvm/parameters/halt_poll_ns (host-wide), or KVM_CAP_HALT_POLL {} for this VM where its VMM sets it",
                best.window_ns, best.window_ns
            ),
            "host or VM".to_string(),
        )
    };
    Ok(Finding {
        rule: "halt_polling",
        problem: format!(
            "halt polling burns {:.3} s/s of host CPU, {:.0} % of it in polls that fail, and catches {:.1} % of wake-ups",
            cur.poll_cpu,
            cur.failed_cpu / cur.poll_cpu * 100.0,
            cur.caught_share * 100.0
        ),
        evidence,
        cost_cpu: cur.poll_cpu,
        guest_time_lost: 0.0,
        change: Change { setting, scope },
        predicted: format!(
            "a {} window: polling {:.3} s/s (saves {:.3} s/s), catches {:.1} % of wake-ups",
            us(best.window_ns),
            best.poll_cpu,
            cur.poll_cpu - best.poll_cpu,
            best.caught_share * 100.0
        ),
        figures: serde_json::json!({
            "current_window_ns": policy.max_ns,
            "recommended_window_ns": best.window_ns,
            "policy": policy,
            "windows": preds,
            "kvm": vm.kvm.map(|(k, seconds)| serde_json::json!({"seconds": seconds, "stats": k})),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::input::Vcpu;

    fn vm_of(hist: Vec<u64>, halt_ns: u64, seconds: u64) -> Vm {
        let wakeups = hist.iter().sum();
        let mut vm = Vm::default();
        vm.vcpus.insert(
            1,
            Vcpu {
                tid: 1,
                vcpu_id: Some(0),
                observed_ns: seconds * 1_000_000_000,
                wakeups,
                halt_ns,
                halt_hist: hist,
                ..Vcpu::default()
            },
        );
        vm
    }

    #[test]
    fn a_single_bucket_gives_the_observed_mean() {
        let mut hist = vec![0; 12];
        hist[4] = 10; // [16, 32) µs
        let h = halts_of(&hist, 10 * 20_000, 0);
        assert_eq!(h.len(), 10);
        assert!(h.iter().all(|h| h.ns == 20_000 && h.valid));
        // A mean outside the bucket is held at its edge.
        let h = halts_of(&hist, 10 * 90_000, 0);
        assert!(h.iter().all(|h| h.ns == 31_999));
    }

    #[test]
    fn buckets_are_interleaved_and_invalid_spread() {
        let mut hist = vec![0; 12];
        hist[4] = 3;
        hist[10] = 1;
        let h = halts_of(&hist, 0, 2);
        assert_eq!(h.len(), 4);
        assert_eq!(h.iter().filter(|h| h.ns >= 1_024_000).count(), 1);
        assert!(h[0].ns < 32_000 && h[1].ns < 32_000, "{h:?}");
        assert_eq!(h.iter().filter(|h| !h.valid).count(), 2);
    }

    /// A VM whose halts alternate short (about 10 µs: the window grows) and
    /// longer than the maximum (about 300 µs: it fails, and shrinks to 0),
    /// at 2500 pairs/s: every poll fails.
    fn wasteful() -> Vm {
        let mut hist = vec![0; 12];
        hist[3] = 2500; // [8, 16) µs
        hist[8] = 2500; // [256, 512) µs
        vm_of(hist, 2500 * (12_000 + 300_000), 1)
    }

    #[test]
    fn polling_that_fails_gets_a_smaller_window() {
        let vm = wasteful();
        let f = rule(&vm, &Policy::DEFAULT).expect("a finding");
        // Each pair: a 10 µs poll that fails; nothing is ever caught.
        assert_eq!(f.figures["recommended_window_ns"], 0);
        assert!((f.cost_cpu - 0.025).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn polling_that_pays_is_kept() {
        let mut hist = vec![0; 12];
        hist[4] = 20_000; // 20 µs halts, 20000/s: caught, cheap
        let vm = vm_of(hist, 20_000 * 20_000, 1);
        let msg = rule(&vm, &Policy::DEFAULT).expect_err("no finding");
        assert!(msg.contains("nothing to change"), "{msg}");
        // Long halts: KVM's window stays at 0, polling costs nothing.
        let mut hist = vec![0; 12];
        hist[10] = 500;
        let vm = vm_of(hist, 500 * 2_000_000, 1);
        let msg = rule(&vm, &Policy::DEFAULT).expect_err("no finding");
        assert!(msg.contains("polls 0.000 s/s"), "{msg}");
    }

    /// The halt pattern of tests/advise_halt.rs (`vm --halt-pattern
    /// 300us,90us,40us,300us,90us,300us` under a 200 µs window) as KVM sees
    /// it: every halt sleeps (the window stays at 10-20 µs, under all of
    /// them), so each lasts its timer plus the host's wake-up `lat`, with
    /// 40 µs of guest work between halts. For wake-ups from 5 to 45 µs the
    /// histogram's replay is KVM's own sequence at 200 µs and 0, and the
    /// finding recommends 0 with a clear saving.
    #[test]
    fn a_pattern_that_grows_and_burns_the_window_is_wasted() {
        let pattern = [300_000u64, 90_000, 40_000, 300_000, 90_000, 300_000];
        for lat in [5_000, 20_000, 45_000] {
            let cycles = 2_000;
            let seq: Vec<Halt> = (0..cycles)
                .flat_map(|_| {
                    pattern.iter().map(|&ns| Halt {
                        ns: ns + lat,
                        valid: true,
                    })
                })
                .collect();
            let mut hist = vec![0; 40];
            for h in &seq {
                hist[(h.ns / 1_000).max(1).ilog2() as usize] += 1;
            }
            let halt_ns: u64 = seq.iter().map(|h| h.ns).sum();
            let seconds_ns = halt_ns + seq.len() as u64 * 40_000;
            let mut vm = vm_of(hist, halt_ns, 1);
            vm.vcpus.get_mut(&1).unwrap().observed_ns = seconds_ns;
            let truth = replay(&Policy::DEFAULT, 0, seq.iter().copied());
            assert_eq!(truth.caught, 0);
            let preds = predictions(&vm, &Policy::DEFAULT);
            let at = |w: u64| preds.iter().find(|p| p.window_ns == w).unwrap();
            let cpu = truth.poll_ns() as f64 / seconds_ns as f64;
            assert!(
                (at(200_000).poll_cpu - cpu).abs() < 1e-3 && cpu > 0.035,
                "lat {lat}: {} vs {cpu}",
                at(200_000).poll_cpu
            );
            let f = rule(&vm, &Policy::DEFAULT).expect("a finding");
            assert_eq!(f.figures["recommended_window_ns"], 0, "lat {lat}");
            assert_eq!(at(0).poll_cpu, 0.0);
        }
    }

    #[test]
    fn thresholds_edges() {
        let cur = |poll: f64, failed: f64, caught: u64| Prediction {
            window_ns: 200_000,
            poll_cpu: poll,
            failed_cpu: failed,
            caught_share: 0.0,
            aborted_share: 0.0,
            uncontended_poll_cpu: poll,
            uncontended_caught_share: 0.0,
            outcome: Outcome {
                caught,
                ..Outcome::default()
            },
        };
        let zero = Prediction {
            window_ns: 0,
            ..cur(0.0, 0.0, 0)
        };
        // Just under the CPU floor: nothing.
        assert!(choose(&[zero.clone(), cur(MIN_CPU - 1e-6, MIN_CPU, 0)], 200_000).is_none());
        // At the floor, failing half: window 0.
        let c = cur(MIN_CPU, MIN_CPU * MIN_FAILED_SHARE, 0);
        assert_eq!(
            choose(&[zero.clone(), c], 200_000).map(|p| p.window_ns),
            Some(0)
        );
        // Failing just under half: nothing.
        let c = cur(MIN_CPU, MIN_CPU * MIN_FAILED_SHARE - 1e-6, 0);
        assert!(choose(&[zero.clone(), c], 200_000).is_none());
        // A window that loses more than a tenth of the catches is not chosen.
        let c = cur(0.5, 0.4, 100);
        assert!(choose(&[zero.clone(), c.clone()], 200_000).is_none());
        // Unless they are at most a hundredth of the wake-ups: 5 caught by
        // chance among 17,854 (one run of a wasted pattern) block nothing.
        let of = |c: &Prediction, halts: u64| {
            let mut c = c.clone();
            c.outcome.halts = halts;
            c
        };
        let c = of(&cur(0.035, 0.035, 5), 17_854);
        assert_eq!(
            choose(&[zero.clone(), c], 200_000).map(|p| p.window_ns),
            Some(0)
        );
        // The edge: 100 caught of 10,000 wake-ups may all go; of 9,999 not.
        let c = of(&cur(0.5, 0.4, 100), 10_000);
        assert!(choose(&[zero.clone(), c], 200_000).is_some());
        let c = of(&cur(0.5, 0.4, 100), 9_999);
        assert!(choose(&[zero, c], 200_000).is_none());
    }
}
