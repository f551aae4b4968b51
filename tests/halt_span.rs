//! A halt is charged to the intervals it spans: against KVM's own record of
//! every halt (`kvm:kvm_vcpu_wakeup` gives each halt's end and duration),
//! seen by bpftrace, a vCPU's halted time in each interval of `watch` is the
//! overlap of its halts with that interval, for halts longer than the
//! interval and for a halt that began before the watcher attached.

mod common;

use std::time::Duration;

use common::observe::{have_bpftrace, observer, observer_maps, of, records, u, watcher};
use serde_json::Value;

fn ready() -> bool {
    common::require_bpf() && common::require_kvm() && have_bpftrace()
}

/// Each halt of thread `tid` as KVM reported it: `[start, end]`, CLOCK_MONOTONIC ns.
fn halts_of(maps: &common::observe::ObserverMaps, tid: u32) -> Vec<(u64, u64)> {
    let mut halts: Vec<(u64, u64)> = maps
        .get("h")
        .map(|m| {
            m.keys()
                .filter(|k| k[0] == i64::from(tid))
                .map(|k| ((k[1] - k[2]) as u64, k[1] as u64))
                .collect()
        })
        .unwrap_or_default();
    halts.sort_unstable();
    halts
}

/// Time of `halts` within `[from, to]`.
fn overlap(halts: &[(u64, u64)], from: u64, to: u64) -> u64 {
    halts
        .iter()
        .map(|&(s, e)| e.min(to).saturating_sub(s.max(from)))
        .sum()
}

/// The reading of an interval may come after the interval's end by the
/// time the read takes (a halt that ends in between is charged to it, the
/// next interval then gets that much less): a scheduling delay at most.
const READ_SLACK_NS: u64 = 5_000_000;

/// Runs a one-vCPU guest halting `pattern`; the watcher (`watch -w -i 0.5`)
/// attaches `late` after the guest starts. Checks every interval against
/// KVM's halts and returns how many intervals were checked.
fn check_intervals(pattern: &str, seconds: &str, late: Duration) -> usize {
    let vm = common::spawn_vm(&[
        "--vcpus",
        "1",
        "--halt-pattern",
        pattern,
        "--seconds",
        seconds,
        "--halt-poll-ns",
        "0",
    ]);
    let pid = vm.ready.pid.to_string();
    let tid = vm.ready.tids[0];
    let obs = observer(&format!(
        "tracepoint:kvm:kvm_vcpu_wakeup /pid == {pid}/ {{ @h[tid, nsecs, args->ns] = count(); }}"
    ));
    let args = ["watch", "-w", "-i", "0.5", "-p", &pid, "--output", "json"];
    let (w, report) = if late.is_zero() {
        let w = watcher(&args);
        vm.start();
        (w, vm.finish(Duration::from_secs(60)))
    } else {
        vm.start();
        std::thread::sleep(late);
        let w = watcher(&args);
        (w, vm.finish(Duration::from_secs(60)))
    };
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "kvm-watcher failed ({status}): {err}");
    let maps = observer_maps(obs);
    let halts = halts_of(&maps, tid);
    assert!(
        halts.len() >= 2,
        "KVM reported {} halts of the vCPU: {maps:?}",
        halts.len()
    );
    assert_eq!(report.vcpus[0].tid, tid);
    let rows: Vec<Value> = of(&records(&out), "vcpu_interval")
        .into_iter()
        .filter(|r| u(&r["tid"]) == u64::from(tid))
        .collect();
    let (first, last) = (halts[0].0, halts[halts.len() - 1].1);
    let mut checked = 0;
    for r in &rows {
        let (end, len) = (u(&r["time_ns"]), u(&r["interval_ns"]));
        let start = end - len;
        let truth = overlap(&halts, start, end);
        let got = u(&r["halted_ns"]);
        println!(
            "interval {:.3}..{:.3} s: halted {got} ns, KVM's halts {truth} ns",
            start.saturating_sub(first) as f64 / 1e9,
            end.saturating_sub(first) as f64 / 1e9
        );
        assert!(got <= len, "more halted than the interval: {r}");
        assert!(
            got.abs_diff(truth) <= READ_SLACK_NS,
            "interval ending {end}: halted {got} ns, KVM's halts cover {truth} ns of it: {r}\nhalts {halts:?}"
        );
        if start >= first && end <= last {
            checked += 1;
        }
    }
    checked
}

#[test]
fn a_halt_longer_than_the_interval_is_charged_to_each_interval_it_spans() {
    if !ready() {
        return;
    }
    // 1.2 s halts, 0.5 s intervals: each halt spans three intervals; under
    // the old accounting they read 0 %, 0 % and 240 %.
    let checked = check_intervals("1200ms", "5", Duration::ZERO);
    assert!(checked >= 6, "only {checked} intervals inside the run");
}

#[test]
fn a_vcpu_halted_before_the_watcher_attached_reads_halted_from_the_first_interval() {
    if !ready() {
        return;
    }
    // 3 s halts; the watcher attaches 1 s into the first: its first
    // intervals are wholly halted (without the seed at attach: 0 %).
    let checked = check_intervals("3000ms", "5", Duration::from_secs(1));
    assert!(checked >= 4, "only {checked} intervals inside the run");
}
