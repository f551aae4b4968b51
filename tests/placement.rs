//! vCPU placement's moving vCPUs against the kernel's own count of a
//! thread's moves between CPUs (`se.nr_migrations` in
//! /proc/PID/task/TID/sched, which set_task_cpu() counts): a busy vCPU that
//! a helper thread moves between two CPUs, next to a control VM whose vCPU
//! stays pinned to one CPU.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::observe::watcher;
use common::sched::{nr_migrations, pin};
use common::spawn_vm;
use kvm_watcher::procfs::thread_schedstat;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn ready() -> bool {
    common::require_root() && common::require_kvm() && common::require_bpf()
}

/// One test at a time: each pins its VMs and helpers to the host's first and
/// last CPU and measures what the scheduler does there. Run side by side
/// (as `--test-threads=2` does), each one's VMs wait behind the other's:
/// the finding test saw its vCPU wait 61 % of the time (a run-delay
/// finding instead of the placement one) in 2 of 4 runs next to the other
/// test's workload, and in a CI-mode run the move test made 612 moves
/// (about 1,000 alone) and counted 2 more than the kernel.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    common::one_at_a_time(&ONE)
}

/// Moves thread `tid` of process `pid` (now on CPU `from`) to `to`, back,
/// and so on until `stop`. Each move waits until the kernel has moved the
/// thread (its `se.nr_migrations` grew) and it has been switched in since
/// just before the move, and then `dwell`: a thread moved twice before it
/// ran again changed CPU twice for the kernel and never for an observer of
/// its runs. Both are needed: a thread asleep when its affinity changes
/// moves only when it wakes, and one that woke, ran and slept again between
/// the count read and the move has a new switch-in before it moved (in a
/// CI run the helper then moved it back before it woke: 1,000 moves made,
/// 998 for the kernel). The helper keeps itself off the thread's CPU, so
/// its polling does not preempt it. Returns the moves made.
fn mover(
    pid: u32,
    tid: u32,
    from: usize,
    to: usize,
    dwell: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        nice(unsafe { libc::gettid() } as u32);
        let (mut here, mut there) = (from, to);
        let mut moves = 0;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: gettid has no preconditions.
            pin(unsafe { libc::gettid() } as u32, here);
            // Switch-ins counted before the move: the one on the new CPU
            // often comes before sched_setaffinity() returns.
            let (Some(before), Some(migrated)) = (
                thread_schedstat(tid).map(|s| s.timeslices),
                nr_migrations(pid, tid),
            ) else {
                break;
            };
            pin(tid, there);
            moves += 1;
            let settled = || {
                thread_schedstat(tid).is_none_or(|s| s.timeslices != before)
                    && nr_migrations(pid, tid).is_none_or(|n| n != migrated)
            };
            while !stop.load(Ordering::Relaxed) && !settled() {
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(dwell);
            std::mem::swap(&mut here, &mut there);
        }
        moves
    })
}

/// Gives thread `tid` the highest priority of the fair class (nice -20):
/// on this shared host other tasks would otherwise turn the moved vCPU's
/// runs into time slices (switch-ins without a move) and delay the helper.
fn nice(tid: u32) {
    // SAFETY: plain setpriority on a thread id.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -20) };
    assert_eq!(
        r,
        0,
        "cannot renice thread {tid}: {}",
        std::io::Error::last_os_error()
    );
}

/// Per thread over a `--record` file's `vcpu_interval` records: moves,
/// loads, the kernel's switch-ins.
fn recorded(path: &std::path::Path, tid: u32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(path).expect("the recording");
    let mut sum = (0, 0, 0);
    for r in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        if r["monitor"] == "vcpu_interval" && r["tid"] == tid {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            sum.0 += n("cpu_migrations");
            sum.1 += n("load_count");
            sum.2 += n("run_delay_switch_ins");
        }
    }
    sum
}

/// A vCPU moved between CPUs 0 and 1 for 5 s of a 6 s watch: advise names
/// it with a placement finding, and its moves are the kernel's; the control
/// VM pinned to one CPU has no placement finding and no move.
#[test]
fn a_vcpu_moved_between_cpus_is_a_placement_finding_with_the_kernel_s_moves() {
    if !ready() {
        return;
    }
    let _one = serial();
    let (a, b) = (0, common::sched::last_cpu());
    assert!(a != b, "needs two CPUs");
    // The control halts on a 100 Hz timer: busy on its CPU, it would take
    // half of the moved vCPU's time there and turn its runs into time slices.
    // They outlive the watch (attaching takes a while on a busy host) and
    // are stopped with SIGINT once the kernel's figures are read.
    let moving = spawn_vm(&["--dirty-pages", "256", "--seconds", "60"]);
    let control = spawn_vm(&["--halt-hz", "100", "--seconds", "60"]);
    let (mt, ct) = (moving.ready.tids[0], control.ready.tids[0]);
    let (mp, cp) = (moving.ready.pid, control.ready.pid);
    pin(mt, a);
    pin(ct, b);
    nice(mt);
    moving.start();
    control.start();
    std::thread::sleep(Duration::from_millis(300));

    let file = std::env::temp_dir().join(format!("placement-rec-{}.json", std::process::id()));
    let before = (
        nr_migrations(mp, mt).unwrap(),
        nr_migrations(cp, ct).unwrap(),
    );
    let (mps, cps) = (mp.to_string(), cp.to_string());
    let adv = watcher(&[
        "advise",
        "--json",
        "-t",
        "6",
        "-p",
        &mps,
        "-p",
        &cps,
        "--record",
        file.to_str().unwrap(),
    ]);
    // Attached and counting (the line above waited for that).
    let stop = Arc::new(AtomicBool::new(false));
    let helper = mover(mp, mt, a, b, Duration::from_micros(200), stop.clone());
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let made = helper.join().unwrap();
    let moved_for = began.elapsed();
    let (status, stdout, stderr) = adv.wait(T);
    let after = (
        nr_migrations(mp, mt).unwrap(),
        nr_migrations(cp, ct).unwrap(),
    );
    assert!(status.success(), "advise failed: {stderr}");
    let (moves, loads, switch_ins) = recorded(&file, mt);
    let (c_moves, ..) = recorded(&file, ct);
    let _ = std::fs::remove_file(&file);
    moving.signal(libc::SIGINT);
    control.signal(libc::SIGINT);
    moving.finish(T);
    control.finish(T);

    let kernel = after.0 - before.0;
    // Switch-ins the kernel counted and vcpu-load saw no load for (a
    // sched_switch event that did not fire): each can hide at most two
    // moves (there and back), and nothing else can hide one, because the
    // helper lets the thread run after each move.
    let unseen = switch_ins.saturating_sub(loads);
    println!(
        "moving vCPU (tid {mt}): {made} moves made in {:.2} s; kvm-watcher {moves} moves in {loads} loads, {switch_ins} switch-ins ({unseen} without a load); kernel se.nr_migrations {} -> {} (+{kernel})",
        moved_for.as_secs_f64(),
        before.0,
        after.0
    );
    println!(
        "pinned control (tid {ct}): kvm-watcher {c_moves} moves; kernel +{}",
        after.1 - before.1
    );
    assert!(
        moves <= kernel,
        "{moves} moves, more than the kernel's {kernel}"
    );
    assert!(
        moves + 2 * unseen >= kernel,
        "{moves} moves (+ 2 x {unseen} unseen switch-ins) of the kernel's {kernel}"
    );
    assert_eq!((c_moves, after.1 - before.1), (0, 0), "the control stays");

    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let placement = |pid: u32| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["monitor"] == "advice" && r["rule"] == "placement" && r["pid"] == pid)
            .collect()
    };
    let found = placement(mp);
    assert_eq!(found.len(), 1, "one placement finding: {records:#?}");
    let f = found[0];
    assert_eq!(f["figures"]["kind"], "moves", "{f}");
    let v = &f["figures"]["vcpus"][0];
    assert_eq!(v["tid"], mt, "{f}");
    assert_eq!(v["cpu_migrations"], moves, "{f}");
    println!(
        "finding: {} | {} | {}",
        f["problem"], f["evidence"][0], f["change"]["setting"]
    );
    assert!(
        f["change"]["setting"]
            .as_str()
            .unwrap()
            .contains(&format!("taskset -pc {} {mt}", v["pin_cpu"])),
        "{f}"
    );
    assert!(placement(cp).is_empty(), "the pinned control: {records:#?}");
}

/// What a move costs the synthetic guest here, printed for docs/advise.md:
/// its work (passes writing 1 MiB each) per second on a CPU when moved after
/// every run, against the same guest pinned; and the helper's moves are the
/// kernel's, one each (what the test above rests on).
#[test]
fn what_a_move_costs_the_synthetic_guest() {
    if !ready() {
        return;
    }
    let _one = serial();
    let (a, b) = (0, common::sched::last_cpu());
    let args = ["--dirty-pages", "256", "--seconds", "4", "--linger"];
    let moving = spawn_vm(&args);
    let control = spawn_vm(&args);
    let (mt, ct) = (moving.ready.tids[0], control.ready.tids[0]);
    let mp = moving.ready.pid;
    pin(mt, a);
    pin(ct, b);
    nice(mt);
    nice(ct);
    let on_cpu = |tid| thread_schedstat(tid).unwrap().run_ns;
    let before = (on_cpu(mt), on_cpu(ct), nr_migrations(mp, mt).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    moving.start();
    control.start();
    let helper = mover(mp, mt, a, b, Duration::from_micros(500), stop.clone());
    moving.wait_lingering(T);
    stop.store(true, Ordering::Relaxed);
    let made = helper.join().unwrap();
    control.wait_lingering(T);
    let after = (on_cpu(mt), on_cpu(ct), nr_migrations(mp, mt).unwrap());
    moving.signal(libc::SIGUSR1);
    control.signal(libc::SIGUSR1);
    let (rm, rc) = (moving.finish(T), control.finish(T));
    let (cpu_m, cpu_c) = (after.0 - before.0, after.1 - before.1);
    let (pm, pc) = (rm.vcpus[0].passes, rc.vcpus[0].passes);
    let ns_per_pass = cpu_c as f64 / pc.max(1) as f64;
    let lost_ns = cpu_m as f64 - pm as f64 * ns_per_pass;
    let kernel = after.2 - before.2;
    println!(
        "moved: {pm} passes in {:.3} s on a CPU ({:.0} ns each), {made} moves (kernel: {kernel}); pinned: {pc} passes in {:.3} s ({ns_per_pass:.0} ns each); a move cost {:.1} µs of CPU",
        cpu_m as f64 / 1e9,
        cpu_m as f64 / pm.max(1) as f64,
        cpu_c as f64 / 1e9,
        lost_ns / made.max(1) as f64 / 1e3
    );
    // The last move may wait for the thread's wake-up after the linger.
    assert!(
        made > 500 && kernel.abs_diff(made) <= 1,
        "{made} moves made, the kernel counted {kernel}"
    );
}
