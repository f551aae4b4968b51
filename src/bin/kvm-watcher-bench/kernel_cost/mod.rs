//! Part 1: kernel cost per event of each monitor (BPF statistics:
//! run_time_ns / run_cnt) against the empty programs on the same hooks and
//! against bpftrace doing the same job, all attached in the same trial.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use libbpf_rs::Link;
use serde::Serialize;

use crate::env::Env;
use crate::process::{Proc, stop_all};
use crate::procfs::{prog_stats, raw_tp_links};
use crate::stats::{Spread, shuffle, spread};
use crate::workload::{Workload, run_vm};

mod cases;
mod floors;

use cases::{CASES, Candidate, DIRTY_CANDIDATES, EXITS_CANDIDATES, HALT_CANDIDATES, Who};
pub use floors::Floors;

/// One trial's attached candidate.
struct Attached {
    label: &'static str,
    pid: u32,
    /// prog id -> hook ("*" for all of bpftrace's programs).
    progs: HashMap<u32, String>,
    proc_: Option<Proc>,
    _links: Vec<Link>,
}

fn attach_candidate(
    env: &Env,
    floors: &Floors,
    c: &Candidate,
    raw_hooks: &[&str],
    tp_hooks: &[&str],
) -> Result<Attached> {
    let me = std::process::id();
    Ok(match c.who {
        Who::FloorRaw | Who::FloorTp => {
            let (kind, hooks) = if matches!(c.who, Who::FloorRaw) {
                ("raw", raw_hooks)
            } else {
                ("tp", tp_hooks)
            };
            let (links, progs) = floors.attach(kind, hooks)?;
            Attached {
                label: c.label,
                pid: me,
                progs,
                proc_: None,
                _links: links,
            }
        }
        Who::Kw(args) => {
            let p = env.start_kw(c.label, args)?;
            let progs = raw_tp_links(p.pid());
            Attached {
                label: c.label,
                pid: p.pid(),
                progs,
                proc_: Some(p),
                _links: Vec::new(),
            }
        }
        Who::Bt(script) => {
            let p = env.start_bt(c.label, script)?;
            let progs = prog_stats(p.pid())
                .into_keys()
                .map(|id| (id, "*".to_string()))
                .collect();
            Attached {
                label: c.label,
                pid: p.pid(),
                progs,
                proc_: Some(p),
                _links: Vec::new(),
            }
        }
    })
}

/// label -> hook -> (run_time_ns, run_cnt)
type Snapshot = HashMap<&'static str, HashMap<String, (u64, u64)>>;

fn snapshot(att: &[Attached]) -> Snapshot {
    let mut s = Snapshot::new();
    for a in att {
        let stats = prog_stats(a.pid);
        let per = s.entry(a.label).or_default();
        for (id, hook) in &a.progs {
            if let Some((t, c)) = stats.get(id) {
                let e = per.entry(hook.clone()).or_default();
                e.0 += t;
                e.1 += c;
            }
        }
    }
    s
}

fn delta(a: &Snapshot, b: &Snapshot) -> Snapshot {
    let mut d = Snapshot::new();
    for (label, hooks) in b {
        for (hook, (t, c)) in hooks {
            let (t0, c0) = a
                .get(label)
                .and_then(|h| h.get(hook))
                .copied()
                .unwrap_or((0, 0));
            d.entry(label)
                .or_default()
                .insert(hook.clone(), (t.saturating_sub(t0), c.saturating_sub(c0)));
        }
    }
    d
}

/// One kernel-cost trial: every candidate attached (in `order`), the VM run, stats deltas.
fn kernel_trial(
    env: &Env,
    floors: &Floors,
    w: Workload,
    cands: &[Candidate],
    order_seed: u64,
    seconds: f64,
) -> Result<(Snapshot, f64)> {
    let (raw_hooks, tp_hooks): (&[&str], &[&str]) = match w {
        Workload::Dirty => (
            &["kvm_dirty_ring_push", "kvm_fpu", "sched_process_exit"],
            &["kvm_dirty_ring_push"],
        ),
        Workload::Halt => (
            &[
                "kvm_vcpu_wakeup",
                "kvm_halt_poll_ns",
                "kvm_fpu",
                "kvm_userspace_exit",
                "sched_switch",
                "sched_wakeup",
                "sched_wakeup_new",
                "sched_process_exit",
            ],
            &[
                "kvm_vcpu_wakeup",
                "kvm_halt_poll_ns",
                "kvm_fpu",
                "kvm_userspace_exit",
                "sched_switch",
                "sched_wakeup",
                "sched_wakeup_new",
            ],
        ),
        Workload::Exits => (
            &[
                "kvm_exit",
                "kvm_entry",
                "kvm_userspace_exit",
                "kvm_pio",
                "kvm_mmio",
                "sys_enter",
                "sched_process_exit",
            ],
            &[
                "kvm_exit",
                "kvm_entry",
                "kvm_userspace_exit",
                "kvm_pio",
                "kvm_mmio",
                "sys_enter",
            ],
        ),
    };
    let mut order: Vec<&Candidate> = cands.iter().collect();
    shuffle(&mut order, order_seed);
    let mut before = Snapshot::new();
    let (report, att) = run_vm(env, w, seconds, || {
        let mut att = Vec::new();
        for c in &order {
            att.push(attach_candidate(env, floors, c, raw_hooks, tp_hooks)?);
        }
        std::thread::sleep(Duration::from_millis(200));
        before = snapshot(&att);
        Ok(att)
    })?;
    let after = snapshot(&att);
    stop_all(att.into_iter().filter_map(|a| a.proc_).collect())?;
    Ok((delta(&before, &after), w.rate(&report)?))
}

#[derive(Serialize, Clone)]
pub struct CaseResult {
    pub monitor: &'static str,
    pub mode: &'static str,
    pub hooks: &'static [&'static str],
    pub bpftrace_job: &'static str,
    pub events_per_trial: Spread,
    pub floor_raw_tp_ns: Spread,
    pub floor_classic_tp_ns: Spread,
    pub kvm_watcher_ns: Spread,
    pub bpftrace_ns: Spread,
    pub ratio_to_floor: Spread,
    pub ratio_to_classic_floor: Spread,
    pub bpftrace_over_kvm_watcher: Spread,
}

#[derive(Serialize, Clone)]
pub struct ProgramResult {
    pub candidate: &'static str,
    pub hook: String,
    pub ns_per_run: Spread,
    pub runs_per_trial: Spread,
}

fn per_event(d: &Snapshot, label: &str, hooks: &[&str], events: u64) -> f64 {
    let Some(h) = d.get(label) else {
        return f64::NAN;
    };
    let t: u64 = h
        .iter()
        .filter(|(k, _)| k.as_str() == "*" || hooks.contains(&k.as_str()))
        .map(|(_, v)| v.0)
        .sum();
    if events == 0 {
        f64::NAN
    } else {
        t as f64 / events as f64
    }
}

fn events_on(d: &Snapshot, label: &str, hooks: &[&str]) -> u64 {
    d.get(label)
        .map(|h| {
            h.iter()
                .filter(|(k, _)| hooks.contains(&k.as_str()))
                .map(|(_, v)| v.1)
                .sum()
        })
        .unwrap_or(0)
}

pub fn measure(env: &Env, floors: &Floors) -> Result<(Vec<CaseResult>, Vec<ProgramResult>)> {
    let seconds = if env.quick { 0.3 } else { 3.0 };
    let mut trials: Vec<(Workload, Snapshot)> = Vec::new();
    for r in 0..env.rounds {
        let mut ws = [Workload::Dirty, Workload::Halt, Workload::Exits];
        shuffle(&mut ws, r as u64 + 11);
        for w in ws {
            let cands = match w {
                Workload::Dirty => DIRTY_CANDIDATES,
                Workload::Halt => HALT_CANDIDATES,
                Workload::Exits => EXITS_CANDIDATES,
            };
            eprintln!(
                "  kernel cost: round {}/{}, {} workload",
                r + 1,
                env.rounds,
                w.name()
            );
            let (d, _) = kernel_trial(env, floors, w, cands, r as u64 * 7 + 3, seconds)?;
            trials.push((w, d));
        }
    }
    let mut cases = Vec::new();
    for c in CASES {
        let mut v: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (_, d) in trials.iter().filter(|(_, d)| d.contains_key(c.kw)) {
            let per: Vec<&str> = c.per.map_or_else(|| c.hooks.to_vec(), |p| vec![p]);
            let events = events_on(d, "floor_raw", &per);
            let floor = per_event(d, "floor_raw", c.hooks, events);
            let ctp = per_event(d, "floor_tp", c.hooks, events);
            let kw = per_event(d, c.kw, c.hooks, events);
            let bt = per_event(d, c.bt, c.hooks, events);
            v.entry("events").or_default().push(events as f64);
            v.entry("floor").or_default().push(floor);
            v.entry("ctp").or_default().push(ctp);
            v.entry("kw").or_default().push(kw);
            v.entry("bt").or_default().push(bt);
            v.entry("r_floor").or_default().push(kw / floor);
            v.entry("r_ctp").or_default().push(kw / ctp);
            v.entry("r_bt").or_default().push(bt / kw);
        }
        let s = |k: &str| spread(v.get(k).map(Vec::as_slice).unwrap_or(&[]));
        cases.push(CaseResult {
            monitor: c.monitor,
            mode: c.mode,
            hooks: c.hooks,
            bpftrace_job: c.bt_what,
            events_per_trial: s("events"),
            floor_raw_tp_ns: s("floor"),
            floor_classic_tp_ns: s("ctp"),
            kvm_watcher_ns: s("kw"),
            bpftrace_ns: s("bt"),
            ratio_to_floor: s("r_floor"),
            ratio_to_classic_floor: s("r_ctp"),
            bpftrace_over_kvm_watcher: s("r_bt"),
        });
    }
    // Every program of every candidate, per hook.
    // (candidate, hook) -> (ns per run, runs) per trial
    type PerProgram = BTreeMap<(&'static str, String), (Vec<f64>, Vec<f64>)>;
    let mut progs = PerProgram::new();
    for (_, d) in &trials {
        for (label, hooks) in d {
            for (hook, (t, c)) in hooks {
                let e = progs.entry((label, hook.clone())).or_default();
                if *c > 0 {
                    e.0.push(*t as f64 / *c as f64);
                }
                e.1.push(*c as f64);
            }
        }
    }
    let programs = progs
        .into_iter()
        .map(|((candidate, hook), (ns, runs))| ProgramResult {
            candidate,
            hook,
            ns_per_run: spread(&ns),
            runs_per_trial: spread(&runs),
        })
        .collect();
    Ok((cases, programs))
}
