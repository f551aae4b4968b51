//! Tests of the synthetic guest `kvm-watcher vm`, the ground truth of every other test.

mod common;

use std::time::Duration;

use common::{VmReport, require_kvm, run_vm, spawn_vm, stat};

const T: Duration = Duration::from_secs(60);

fn assert_guest_stopped_itself(r: &VmReport) {
    for v in &r.vcpus {
        assert_eq!(
            v.exit, "guest",
            "vCPU {} was kicked instead of stopping on its own: {v:?}",
            v.index
        );
    }
}

/// Guest-side invariants and KVM halt stats for a run with --halt-hz.
///
/// The guest keeps IF=0 except in `sti; hlt` (the STI shadow covers the HLT), and
/// its timer handler jumps back to the loop, so every HLT is ended by exactly one
/// timer interrupt and every interrupt ends exactly one HLT: interrupts == halts ==
/// passes, exactly (the run ends through the guest's own stop check after a wake-up,
/// never inside a HLT).
///
/// KVM side (virt/kvm/kvm_main.c, arch/x86/kvm/x86.c):
/// - `halt_exits` is incremented once per HLT the guest executes (__kvm_emulate_halt):
///   exactly the guest's halt count.
/// - Each halt then either ends while polling (`halt_successful_poll`), or blocks and
///   is counted in `halt_wait_hist` (one bucket increment per halt that slept), or -
///   rarely - finds the interrupt already pending without polling and is counted in
///   neither. So successful_poll + sum(halt_wait_hist) <= halt_exits, and we allow it
///   to be short by 2: a timer that expires while the vCPU thread is between the HLT
///   exit and kvm_vcpu_block (e.g. preempted on a busy 2-CPU machine) is inherent.
/// - `halt_wakeup` counts kvm_vcpu_wake_up() of a thread sitting on the vCPU's wait
///   queue. Every halt that slept was woken that way (no signals are sent here), so
///   halt_wakeup >= halts that slept; it can exceed it by a wake-up that arrives after
///   prepare_to_rcuwait but before the thread schedules out (on this host we see +1 at
///   1000 Hz), so we allow +2.
fn check_halt_stats(r: &VmReport, polling: bool) {
    assert_guest_stopped_itself(r);
    for v in &r.vcpus {
        assert!(v.halts > 0, "vCPU {} never halted: {v:?}", v.index);
        assert_eq!(
            v.interrupts, v.halts,
            "vCPU {}: every HLT must be ended by one interrupt",
            v.index
        );
        assert_eq!(v.passes, v.halts, "vCPU {}: one HLT per pass", v.index);
        let Some(s) = &v.stats else {
            common::skip("this kernel has no KVM_GET_STATS_FD (Linux < 5.14)");
            return;
        };
        let exits = stat(s, "halt_exits");
        let polled = stat(s, "halt_successful_poll");
        let attempted = stat(s, "halt_attempted_poll");
        let waited = stat(s, "halt_wait_hist");
        let wakeups = stat(s, "halt_wakeup");
        let ctx = format!(
            "vCPU {}: guest interrupts={} halts={}, KVM halt_exits={exits} halt_successful_poll={polled} \
             halt_attempted_poll={attempted} sum(halt_wait_hist)={waited} halt_wakeup={wakeups}",
            v.index, v.interrupts, v.halts
        );
        assert_eq!(exits, v.halts, "{ctx}");
        assert!(
            polled + waited <= exits && polled + waited + 2 >= exits,
            "{ctx}"
        );
        assert!(wakeups >= waited && wakeups <= waited + 2, "{ctx}");
        assert!(attempted <= exits && polled <= attempted, "{ctx}");
        if polling {
            assert!(polled > 0, "halt polling never caught a wake-up: {ctx}");
        } else {
            assert_eq!(attempted, 0, "--halt-poll-ns 0 must disable polling: {ctx}");
            assert_eq!(polled, 0, "{ctx}");
        }
    }
}

#[test]
fn halt_hz_interrupts_match_kvm_halt_stats_without_polling() {
    if !require_kvm() {
        return;
    }
    let r = run_vm(
        &[
            "--vcpus",
            "2",
            "--halt-hz",
            "1000",
            "--passes",
            "500",
            "--halt-poll-ns",
            "0",
        ],
        T,
    );
    assert_eq!(r.vcpus.len(), 2);
    for v in &r.vcpus {
        assert_eq!(v.passes, 500);
    }
    check_halt_stats(&r, false);
}

#[test]
fn halt_hz_interrupts_match_kvm_halt_stats_with_polling() {
    if !require_kvm() {
        return;
    }
    // 2 kHz = 500 us between interrupts; a 1 ms window lets KVM grow its per-vCPU
    // window until polling catches the timer.
    let r = run_vm(
        &[
            "--vcpus",
            "1",
            "--halt-hz",
            "2000",
            "--passes",
            "1000",
            "--halt-poll-ns",
            "1000000",
        ],
        T,
    );
    check_halt_stats(&r, true);
    assert!(
        r.seconds >= 0.45,
        "1000 timer periods of 500 us took only {} s",
        r.seconds
    );
}

fn check_dirty(r: &VmReport, mode: &str, n: u64) {
    assert_guest_stopped_itself(r);
    assert_eq!(r.dirty.mode, mode);
    for v in &r.vcpus {
        assert!(v.passes > 0, "vCPU {} did not run: {v:?}", v.index);
        assert_eq!(v.pages_written, v.passes * n, "vCPU {}", v.index);
    }
    let expected = common::expected_dirty_pages(r, n);
    assert_eq!(expected.len() as u64, n * r.vcpus.len() as u64);
    // The whole point: KVM reported exactly the pages the guest wrote, nothing from
    // the (unlogged) code/stack slot, nothing missing.
    if r.dirty.pages != expected {
        let got: std::collections::BTreeSet<_> = r.dirty.pages.iter().copied().collect();
        let want: std::collections::BTreeSet<_> = expected.iter().copied().collect();
        let missing: Vec<_> = want.difference(&got).take(10).collect();
        let extra: Vec<_> = got.difference(&want).take(10).collect();
        panic!(
            "{mode}: KVM reported {} pages, guest wrote {}; missing (first 10) {missing:?}, extra {extra:?}",
            got.len(),
            want.len()
        );
    }
    assert_eq!(r.dirty.distinct_pages, expected.len() as u64);
    assert!(r.dirty.harvested >= r.dirty.distinct_pages);
    let per_slot_distinct: u64 = r.dirty.per_slot.iter().map(|s| s.distinct).sum();
    let per_slot_harvested: u64 = r.dirty.per_slot.iter().map(|s| s.harvested).sum();
    assert_eq!(per_slot_distinct, r.dirty.distinct_pages);
    assert_eq!(per_slot_harvested, r.dirty.harvested);
    // Every data slot is logged and got some of the pages.
    for m in r.memslots.iter().filter(|m| m.role == "data") {
        assert_eq!(m.flags & 1, 1, "data slot {} not dirty-logged", m.slot);
        let s = r
            .dirty
            .per_slot
            .iter()
            .find(|s| s.slot == m.slot)
            .expect("per_slot row");
        assert!(s.distinct > 0, "slot {} got no pages", m.slot);
    }
    for m in r.memslots.iter().filter(|m| m.role == "system") {
        assert_eq!(m.flags, 0, "the system slot must not be logged");
    }
}

#[test]
fn dirty_bitmap_reports_exactly_the_pages_written() {
    if !require_kvm() {
        return;
    }
    let n = 300;
    let r = run_vm(
        &[
            "--vcpus",
            "2",
            "--memory",
            "16",
            "--slots",
            "3",
            "--dirty-pages",
            "300",
            "--dirty-log",
            "bitmap",
            "--halt-hz",
            "100",
            "--passes",
            "30",
        ],
        T,
    );
    check_dirty(&r, "bitmap", n);
    // 30 passes at 100 Hz = 0.3 s: several 100 ms collections, and pages dirtied again
    // after a collection show up again.
    assert!(
        r.dirty.collections >= 3,
        "only {} collections",
        r.dirty.collections
    );
    assert!(
        r.dirty.harvested > r.dirty.distinct_pages,
        "no page was seen in two collections: {:?}",
        r.dirty.per_slot
    );
    assert_eq!(r.memslots.iter().filter(|m| m.role == "data").count(), 3);
}

#[test]
fn dirty_ring_reports_exactly_the_pages_written() {
    if !require_kvm() {
        return;
    }
    let n = 1000;
    // 256 entries < 1000 pages per pass: the vCPUs must stop on KVM_EXIT_DIRTY_RING_FULL.
    let r = run_vm(
        &[
            "--vcpus",
            "2",
            "--dirty-pages",
            "1000",
            "--dirty-log",
            "ring",
            "--dirty-ring-entries",
            "256",
            "--passes",
            "10",
        ],
        T,
    );
    check_dirty(&r, "ring", n);
    assert!(
        r.dirty.ring_full_exits > 0,
        "the 256-entry rings never filled up"
    );
}

#[test]
fn vcpu_threads_are_named_like_qemu_and_ids_follow_first_vcpu_id() {
    if !require_kvm() {
        return;
    }
    let vm = spawn_vm(&["--vcpus", "2", "--first-vcpu-id", "3", "--seconds", "0.2"]);
    let ready = vm.ready.clone();
    assert_eq!(ready.pid, vm_pid(&vm));
    assert_eq!(ready.vcpu_ids, vec![3, 4]);
    assert_eq!(ready.tids.len(), 2);
    // Before SIGUSR1: every ready tid is a thread of the process with the QEMU-style
    // name, and they are the only `/KVM` threads.
    for (i, tid) in ready.tids.iter().enumerate() {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", ready.pid))
            .unwrap_or_else(|e| panic!("tid {tid} is not a thread of pid {}: {e}", ready.pid));
        assert_eq!(comm.trim_end(), format!("CPU {i}/KVM"));
    }
    let mut kvm_threads: Vec<u32> = std::fs::read_dir(format!("/proc/{}/task", ready.pid))
        .unwrap()
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm =
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", ready.pid)).ok()?;
            comm.trim_end().ends_with("/KVM").then_some(tid)
        })
        .collect();
    kvm_threads.sort();
    let mut want = ready.tids.clone();
    want.sort();
    assert_eq!(kvm_threads, want);
    // Waiting for the signal means the guest has not started: give it time, then check
    // the run lasted ~0.2 s from the signal on.
    std::thread::sleep(Duration::from_millis(300));
    vm.start();
    let r = vm.finish(T);
    assert_eq!(r.pid, ready.pid);
    assert!(
        r.seconds >= 0.2 && r.seconds < 1.5,
        "seconds = {}",
        r.seconds
    );
    for (i, v) in r.vcpus.iter().enumerate() {
        assert_eq!(v.index, i as u32);
        assert_eq!(v.vcpu_id, 3 + i as u32);
        assert_eq!(v.tid, ready.tids[i]);
        assert_eq!(v.comm, format!("CPU {i}/KVM"));
        assert!(v.passes > 0, "vCPU {i} never ran");
    }
}

fn vm_pid(vm: &common::VmProcess) -> u32 {
    // The ready line's pid must be the process we spawned (not a helper).
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.ready.pid)).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Name:") && l.contains("kvm-watcher")),
        "{status}"
    );
    vm.ready.pid
}

#[test]
fn sigterm_stops_early_and_still_reports() {
    if !require_kvm() {
        return;
    }
    let vm = spawn_vm(&["--vcpus", "2", "--halt-hz", "100", "--seconds", "60"]);
    vm.start();
    std::thread::sleep(Duration::from_millis(300));
    vm.signal(libc::SIGTERM);
    let r = vm.finish(Duration::from_secs(10));
    assert!(
        r.seconds > 0.2 && r.seconds < 5.0,
        "seconds = {}",
        r.seconds
    );
    for v in &r.vcpus {
        assert!(v.interrupts > 10, "{v:?}");
    }
}

/// `--halt-pattern 100us,300us` without polling: the guest's invariants
/// (one interrupt per HLT, KVM's `halt_exits` its halts), and KVM's own
/// `halt_wait_hist` (log2 ns; bucket i holds [2^(i-1), 2^i)) shows the two
/// populations: no halt shorter than 65.5 µs, half below 262 µs and half in
/// [262, 524) µs.
///
/// A halt ends when the host's timer fires and the vCPU thread runs again,
/// so KVM's figure is the asked time plus the host's wake-up latency: on a
/// KVM host that is itself a VM, the 100 µs halts took 105 to 190 µs
/// (bpftrace on `kvm:kvm_vcpu_wakeup`, mode 120-125 µs, 10-20 % past 131 µs
/// on an idle machine and most of them under load). The short ones may
/// therefore be up to 162 µs late, the long ones up to 224 µs.
///
/// A halt can also be short: the guest arms its one-shot timer with an MSR
/// write (an exit) right before its HLT, and a vCPU thread that loses its
/// CPU at that exit comes back with less of the timer left (one halt under
/// 65.5 µs in a CI-mode run on a busy machine, where schedstat counted 5
/// switch-ins beyond the 1000 halts' wake-ups). So a short halt needs a
/// switch-in that was no halt's wake-up: at most as many as those.
#[test]
fn halt_pattern_halts_as_long_as_it_says() {
    if !require_kvm() {
        return;
    }
    let r = run_vm(
        &[
            "--halt-pattern",
            "100us,300us",
            "--passes",
            "1000",
            "--halt-poll-ns",
            "0",
        ],
        T,
    );
    check_halt_stats(&r, false);
    let v = &r.vcpus[0];
    let Some(s) = &v.stats else {
        return;
    };
    let Some(common::StatValue::Array(h)) = s.get("halt_wait_hist") else {
        panic!("no halt_wait_hist: {s:?}");
    };
    let too_short: u64 = h[..17].iter().sum();
    let (short, long) = (h[17] + h[18], h[19]);
    println!(
        "halts {}: {too_short} under 65.5 µs, {short} of [65.5, 262) µs, {long} of [262, 524) µs; \
         hist {h:?}; sched {:?}",
        v.halts, v.sched
    );
    // Switch-ins that were no halt's wake-up (every halt here slept).
    let preempted = v
        .sched
        .as_ref()
        .map_or(0, |s| s.switch_ins.saturating_sub(v.halts));
    assert!(
        too_short <= preempted && short >= 480 && long >= 480 && short + long <= v.halts,
        "{too_short} too short ({preempted} switch-ins that were no halt's wake-up), \
         {short} short, {long} long of {} halts: {h:?}",
        v.halts
    );
}

#[test]
fn bad_options_are_usage_errors() {
    // Checked before /dev/kvm is opened: no KVM needed.
    let sixty_five = vec!["10us"; 65].join(",");
    let cases: &[&[&str]] = &[
        &["--vcpus", "0"],
        &["--vcpus", "100000"],
        &["--memory", "0"],
        &["--memory", "100000"],
        &["--slots", "0"],
        &["--seconds=0"],
        &["--seconds=-1"],
        &["--passes", "0"],
        &["--halt-hz", "0"],
        &["--halt-hz", "100000"],
        &["--halt-pattern", "300"],
        &["--halt-pattern", "0us"],
        &["--halt-pattern", "2s"],
        &["--halt-hz", "100", "--halt-pattern", "1ms"],
        &["--halt-pattern", sixty_five.as_str()],
        &["--memory", "1", "--dirty-pages", "257"],
        &["--memory", "4", "--vcpus", "2", "--dirty-pages", "513"],
        &["--dirty-log", "ring", "--dirty-ring-entries", "1000"],
        // Powers of two below a page of entries, which KVM refuses with EINVAL.
        &["--dirty-log", "ring", "--dirty-ring-entries", "64"],
        &["--dirty-log", "ring", "--dirty-ring-entries", "128"],
        &["--halt-poll-ns", "99999999999"],
        &["--timeline", "0"],
        &["--timeline", "1001"],
        &["--swap-slots-at", "0.5"],
        &[
            "--swap-slots-at",
            "0.5",
            "--dirty-log",
            "ring",
            "--slots",
            "1",
        ],
        &["--swap-slots-at", "-1", "--dirty-log", "ring"],
    ];
    for args in cases {
        let mut full = vec!["vm"];
        full.extend_from_slice(args);
        let out = common::run_cli(&full, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {:?}, stderr: {stderr}",
            out.status
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: want one line on stderr, got:\n{stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: stdout not empty");
    }
}

#[test]
fn ready_line_parses() {
    let r = common::parse_ready("kvm-watcher vm: ready pid=12 tids=13,14 vcpu_ids=3,4").unwrap();
    assert_eq!(
        r,
        common::Ready {
            pid: 12,
            tids: vec![13, 14],
            vcpu_ids: vec![3, 4]
        }
    );
    assert!(common::parse_ready("kvm-watcher vm: ready pid=x tids=1 vcpu_ids=0").is_none());
    assert!(common::parse_ready("something else").is_none());
}

/// The first field of /proc/PID/task/TID/schedstat: time on a CPU, ns.
fn cpu_ns_of(pid: u32, tid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// The vCPU's CPU time in the report is its thread's schedstat over the
/// guest run: read from outside before the start and while it lingers, the
/// same thread's schedstat gives the same time; and a vCPU that never halts is on a CPU or waiting for one the
/// whole run.
#[test]
fn vcpu_cpu_time_is_the_threads_schedstat_over_the_run() {
    if !require_kvm() {
        return;
    }
    let vm = spawn_vm(&[
        "--vcpus",
        "1",
        "--io-exits",
        "64",
        "--seconds",
        "0.5",
        "--linger",
    ]);
    let (pid, tid) = (vm.ready.pid, vm.ready.tids[0]);
    let before = cpu_ns_of(pid, tid);
    vm.start();
    vm.wait_lingering(T);
    let outside = cpu_ns_of(pid, tid) - before;
    vm.start();
    let r = vm.finish(T);
    let v = &r.vcpus[0];
    let sched = v.sched.expect("schedstat");
    // The two readings differ by the steps between them: the thread's own
    // reads of its schedstat and its wake-ups for the start and the release.
    assert!(
        sched.cpu_ns.abs_diff(outside) < 2_000_000,
        "report {} ns, schedstat read outside {outside} ns",
        sched.cpu_ns
    );
    let run_ns = r.seconds * 1e9;
    let busy = (sched.cpu_ns + sched.run_delay_ns) as f64;
    assert!(
        busy > 0.9 * run_ns && busy < run_ns + 10e6,
        "on a CPU {} ns + waiting {} ns over a run of {run_ns} ns",
        sched.cpu_ns,
        sched.run_delay_ns
    );
    assert!(v.exits_made.io > 0, "{v:?}");
}
