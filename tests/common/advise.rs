//! Helpers of the `advise` tests (tests/advise.rs, tests/advise_halt.rs):
//! `advise` on the synthetic guest, its JSON records, and KVM's own
//! halt-polling figures from the guest's stats fd.

use std::time::Duration;

use serde_json::Value;

use super::observe::{Spawned, watcher};
use super::{StatValue, Stats, VmProcess, VmReport, spawn_vm, stat};

/// These tests measure CPU time and waits: one at a time.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    super::one_at_a_time(&SERIAL)
}

pub fn ready() -> bool {
    super::require_root() && super::require_kvm() && super::require_bpf()
}

pub const T: Duration = Duration::from_secs(90);

/// `advise` on the synthetic guest started with `vm_args` (for
/// `guest_seconds`, then lingering), watching longer than the guest runs;
/// returns its JSON records and the guest's report.
pub fn advise_guest(vm_args: &[&str], advise_args: &[&str]) -> (Vec<Value>, VmReport) {
    advise_guest_with(vm_args, advise_args, |_| {})
}

pub fn advise_guest_with(
    vm_args: &[&str],
    advise_args: &[&str],
    before_start: impl FnOnce(&VmProcess),
) -> (Vec<Value>, VmReport) {
    let mut args = vm_args.to_vec();
    args.push("--linger");
    let vm = spawn_vm(&args);
    let pid = vm.ready.pid.to_string();
    let mut a = vec!["advise", "--json", "-p", &pid];
    a.extend_from_slice(advise_args);
    let adv: Spawned = watcher(&a);
    before_start(&vm);
    vm.start();
    let (status, stdout, stderr) = adv.wait(T);
    assert!(status.success(), "advise failed: {stderr}");
    vm.wait_lingering(T);
    vm.signal(libc::SIGUSR1);
    let report = vm.finish(T);
    let records = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (records, report)
}

pub fn findings<'a>(records: &'a [Value], rule: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["monitor"] == "advice" && r["rule"] == rule)
        .collect()
}

pub fn vm_record(records: &[Value]) -> &Value {
    records
        .iter()
        .find(|r| r["monitor"] == "advice_vm")
        .unwrap_or_else(|| panic!("no advice_vm record in {records:?}"))
}

pub fn within(predicted: f64, measured: f64, rel: f64, abs: f64) -> bool {
    (predicted - measured).abs() <= (rel * measured.abs()).max(abs)
}

/// The replay's prediction for `window` in an `advice_vm` record:
/// (polling CPU s/s, caught share) with the share of polls cut short that
/// the observation saw, and the same with none cut short.
pub fn predicted(vm: &Value, window: u64) -> [f64; 4] {
    let p = vm["halt_polling"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["window_ns"] == window)
        .unwrap_or_else(|| panic!("no prediction for window {window}: {vm}"));
    let f = |k: &str| p[k].as_f64().unwrap();
    [
        f("poll_cpu"),
        f("caught_share"),
        f("uncontended_poll_cpu"),
        f("uncontended_caught_share"),
    ]
}

/// Polls KVM cut short because another task wanted the CPU: failed polls
/// shorter than the shortest window KVM ever polls for
/// (`halt_poll_ns_grow_start`, 10 µs): the buckets of `halt_poll_fail_hist`
/// (log2 of ns: bucket i holds [2^(i-1), 2^i)) under 8192 ns.
pub fn cut_short(s: &Stats) -> u64 {
    match s.get("halt_poll_fail_hist") {
        Some(StatValue::Array(h)) => h.iter().take(14).sum(),
        other => panic!("halt_poll_fail_hist: {other:?}"),
    }
}

/// What KVM reported for the guest's one vCPU: polling CPU s/s and caught
/// share of its halts; then the same over the polls not cut short by other
/// tasks (CPU scaled up by the share cut short, catches counted among the
/// polls that ran); polls, halts, polls cut short.
pub fn measured(report: &VmReport) -> ([f64; 4], u64, u64, u64) {
    let s = report.vcpus[0].stats.as_ref().expect("KVM stats");
    let poll = stat(s, "halt_poll_success_ns") + stat(s, "halt_poll_fail_ns");
    let halts = stat(s, "halt_exits");
    let caught = stat(s, "halt_successful_poll");
    let attempted = stat(s, "halt_attempted_poll");
    let short = cut_short(s).min(attempted);
    let ran = (attempted - short) as f64 / attempted.max(1) as f64;
    let cpu = poll as f64 / 1e9 / report.seconds;
    let share = caught as f64 / halts.max(1) as f64;
    let free = |x: f64| if ran > 0.0 { x / ran } else { 0.0 };
    (
        [cpu, share, free(cpu), free(share)],
        attempted,
        halts,
        short,
    )
}
