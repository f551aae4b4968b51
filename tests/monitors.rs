//! The four monitors against ground truth: the synthetic guest's own report
//! (`kvm-watcher vm --json`), KVM's statistics, and an independent observer
//! (bpftrace on the same tracepoints, started before the guest runs).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::time::Duration;

use common::observe::{
    ObserverMaps, have_bpftrace, observer, observer_maps, of, records, summary, u, watcher,
};
use serde_json::Value;

fn ready() -> bool {
    common::require_bpf() && common::require_kvm() && have_bpftrace()
}

/// Runs a VM with `vm_args` while `kvm-watcher <watch_args> -p <vm>` and the
/// bpftrace `script` (with `$PID` replaced) watch it from before its first
/// instruction until it exits. Returns the VM report, the watcher's records
/// and the observer's maps.
fn watch_vm(vm_args: &[&str], watch_args: &[&str], script: &str) -> Watched {
    let vm = common::spawn_vm(vm_args);
    let pid = vm.ready.pid.to_string();
    let obs = observer(&script.replace("$PID", &pid));
    let mut args: Vec<&str> = watch_args.to_vec();
    args.extend(["-p", &pid, "--output", "json"]);
    let w = watcher(&args);
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    // The watcher ends by itself when the VM it watches exits.
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "kvm-watcher failed ({status}): {err}");
    let maps = observer_maps(obs);
    (report, records(&out), maps, err)
}

/// What [`watch_vm`] returns: the VM report, the watcher's records, the
/// observer's maps and the watcher's stderr.
type Watched = (common::VmReport, Vec<Value>, ObserverMaps, String);

#[test]
fn wakeup_rows_match_the_guest_and_an_independent_observer() {
    if !ready() {
        return;
    }
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--first-vcpu-id",
            "3",
            "--halt-hz",
            "1000",
            "--seconds",
            "1",
        ],
        &["wakeup"],
        "tracepoint:kvm:kvm_vcpu_wakeup /pid == $PID/ { @w[tid, args->waited, args->valid] = count(); }",
    );
    let rows = of(&recs, "wakeup");
    let tid_to_vcpu = common::vcpu_of_tid(&report);
    let mut ours: BTreeMap<Vec<i64>, i64> = BTreeMap::new();
    for r in &rows {
        assert_eq!(u(&r["pid"]), report.pid as u64, "pid of {r}");
        let tid = u(&r["tid"]);
        let vcpu = tid_to_vcpu
            .get(&tid)
            .unwrap_or_else(|| panic!("row from a non-vCPU thread: {r}"));
        assert_eq!(u(&r["vcpu_id"]), *vcpu, "vcpu_id of {r}");
        let comm = r["comm"].as_str().unwrap();
        assert!(
            comm.starts_with("CPU ") && comm.ends_with("/KVM"),
            "comm of {r}"
        );
        assert!(u(&r["halt_ns"]) > 0, "halt_ns of {r}");
        let key = vec![
            tid as i64,
            r["waited"].as_bool().unwrap() as i64,
            r["valid"].as_bool().unwrap() as i64,
        ];
        *ours.entry(key).or_default() += 1;
    }
    let theirs = maps
        .get("@w")
        .or(maps.get("w"))
        .cloned()
        .unwrap_or_default();
    assert!(!rows.is_empty(), "no wakeup rows at all");
    assert_eq!(
        ours, theirs,
        "per (tid, waited, valid) counts differ from bpftrace"
    );
    // KVM's own statistics: every wake-up after sleeping lands in
    // halt_wait_hist, every one caught by polling in halt_successful_poll.
    for v in &report.vcpus {
        let stats = v.stats.as_ref().expect("this kernel has the KVM stats fd");
        let count = |waited: i64| -> u64 {
            ours.iter()
                .filter(|(k, _)| k[0] == v.tid as i64 && k[1] == waited)
                .map(|(_, c)| *c as u64)
                .sum()
        };
        assert_eq!(
            count(1),
            common::stat(stats, "halt_wait_hist"),
            "vCPU {}: waited wake-ups vs KVM's halt_wait_hist",
            v.vcpu_id
        );
        assert!(
            count(0) >= common::stat(stats, "halt_successful_poll"),
            "vCPU {}: polled wake-ups below KVM's halt_successful_poll",
            v.vcpu_id
        );
    }
    // The guest took about 1000 interrupts per vCPU per second, each after a HLT.
    for v in &report.vcpus {
        let n: i64 = ours
            .iter()
            .filter(|(k, _)| k[0] == v.tid as i64)
            .map(|(_, c)| c)
            .sum();
        assert!(
            n > 0 && n as u64 <= v.halts,
            "vCPU {}: {n} wake-ups for {} halts",
            v.vcpu_id,
            v.halts
        );
    }
    let s = summary(&recs);
    assert_eq!(u(&s["events"]["wakeup"]), rows.len() as u64);
    assert_eq!(u(&s["lost"]["wakeup"]), 0);
    assert_eq!(
        u(&s["unknown_vcpu"]["wakeup"]),
        0,
        "every wake-up has its vCPU"
    );
}

/// `wakeup --summary` with one interval longer than the VM's life: every
/// figure is read after the vCPU threads exited, so it is what the kernel
/// kept for exited threads (with task storage, the entry the exit hook
/// moved to the hash before the task went away), and it must still equal
/// the observer's count per thread.
#[test]
fn wakeup_summary_keeps_threads_that_exited_before_the_reading() {
    if !ready() {
        return;
    }
    let (report, recs, maps, err) = watch_vm(
        &["--vcpus", "2", "--halt-hz", "1000", "--seconds", "1"],
        &["wakeup", "--summary", "-i", "60"],
        "tracepoint:kvm:kvm_vcpu_wakeup /pid == $PID/ { @w[tid] = count(); }",
    );
    let rows = of(&recs, "vcpu_interval");
    let theirs = maps.get("w").cloned().unwrap_or_default();
    assert_eq!(
        rows.len(),
        report.vcpus.len(),
        "one row per vCPU: {rows:?}\n{err}"
    );
    for v in &report.vcpus {
        let row = rows
            .iter()
            .find(|r| u(&r["tid"]) == v.tid as u64)
            .unwrap_or_else(|| panic!("no row for vCPU {}: {rows:?}", v.vcpu_id));
        let observed = theirs.get(&vec![v.tid as i64]).copied().unwrap_or(0) as u64;
        assert!(
            observed > 0,
            "the observer saw no wake-up of vCPU {}",
            v.vcpu_id
        );
        assert_eq!(
            u(&row["wakeups"]),
            observed,
            "vCPU {}: summary vs bpftrace",
            v.vcpu_id
        );
        assert_eq!(u(&row["vcpu_id"]), v.vcpu_id as u64, "vcpu_id of {row}");
    }
}

#[test]
fn halt_poll_rows_match_an_independent_observer() {
    if !ready() {
        return;
    }
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--first-vcpu-id",
            "5",
            "--halt-hz",
            "3000",
            "--halt-poll-ns",
            "100000",
            "--seconds",
            "1.5",
        ],
        &["halt-poll"],
        "tracepoint:kvm:kvm_halt_poll_ns /pid == $PID/ { @h[tid, args->vcpu_id, args->grow, args->old, args->new] = count(); }",
    );
    let rows = of(&recs, "halt_poll");
    let tid_to_vcpu = common::vcpu_of_tid(&report);
    let mut ours: BTreeMap<Vec<i64>, i64> = BTreeMap::new();
    for r in &rows {
        assert_eq!(u(&r["pid"]), report.pid as u64);
        let tid = u(&r["tid"]);
        assert_eq!(
            Some(&u(&r["vcpu_id"])),
            tid_to_vcpu.get(&tid),
            "vcpu_id of {r}"
        );
        let grow = r["grow"].as_bool().unwrap();
        let (old, new) = (u(&r["old_ns"]), u(&r["new_ns"]));
        assert_eq!(grow, new > old, "grow flag vs old/new in {r}");
        let key = vec![
            tid as i64,
            u(&r["vcpu_id"]) as i64,
            grow as i64,
            old as i64,
            new as i64,
        ];
        *ours.entry(key).or_default() += 1;
    }
    let theirs = maps.get("h").cloned().unwrap_or_default();
    assert!(
        !rows.is_empty(),
        "no halt-poll rows: the workload should grow and shrink the window"
    );
    assert_eq!(
        ours, theirs,
        "halt-poll rows differ from bpftrace as a multiset"
    );
}

/// Dirty pages of a dirty-ring VM against the guest's harvested set, its
/// memslots and bpftrace's count of kvm_dirty_ring_push.
#[test]
fn dirty_rows_match_the_harvested_set_memslots_and_observer() {
    if !ready() {
        return;
    }
    let dir = tempdir();
    let counts = dir.join("counts.txt");
    let counts_s = counts.to_str().unwrap().to_string();
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--first-vcpu-id",
            "1",
            "--slots",
            "3",
            "--dirty-pages",
            "300",
            "--dirty-log",
            "ring",
            "--passes",
            "4",
        ],
        &["dirty", "--counts-file", &counts_s],
        "tracepoint:kvm:kvm_dirty_ring_push /pid == $PID/ { @p = count(); }",
    );
    let rows = of(&recs, "dirty");
    let observed = maps
        .get("p")
        .and_then(|m| m.get(&vec![]))
        .copied()
        .unwrap_or(0);
    assert!(observed > 0, "bpftrace saw no kvm_dirty_ring_push");
    assert_eq!(
        rows.len() as i64,
        observed,
        "rows vs bpftrace kvm_dirty_ring_push count"
    );

    let slots: HashMap<u64, &kvm_watcher::vm::report::MemslotReport> =
        report.memslots.iter().map(|m| (m.slot as u64, m)).collect();
    let tid_to_vcpu = common::vcpu_of_tid(&report);
    let mut set = BTreeSet::new();
    for r in &rows {
        let slot = slots
            .get(&u(&r["slot_id"]))
            .unwrap_or_else(|| panic!("unknown slot in {r}"));
        assert_eq!(
            u(&r["gfn"]),
            slot.base_gfn + u(&r["rel_gfn"]),
            "gfn = base_gfn + rel_gfn in {r}"
        );
        assert_eq!(u(&r["npages"]), slot.npages, "npages in {r}");
        assert_eq!(
            u(&r["userspace_addr"]),
            slot.userspace_addr,
            "userspace_addr in {r}"
        );
        assert_eq!(
            Some(&u(&r["vcpu_id"])),
            tid_to_vcpu.get(&u(&r["tid"])),
            "vcpu_id in {r}"
        );
        set.insert((u(&r["slot_id"]) as u32, u(&r["rel_gfn"])));
    }
    let harvested: BTreeSet<(u32, u64)> = report.dirty.pages.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(
        set, harvested,
        "dirtied (slot, rel_gfn) set vs the VM's harvested set"
    );
    assert_eq!(set.len(), 600, "2 vCPUs x 300 distinct pages");

    // The counts file: exact per-page counts that sum to the rows, mode 0600.
    let meta = std::fs::metadata(&counts).expect("counts file written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&counts).unwrap();
    // The parser requires the `PID GFN REL_GFN SLOT_ID COUNTS` header.
    let pages = kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
    let mut sum = 0u64;
    let mut prev = u64::MAX;
    for p in &pages {
        assert_eq!(p.pid, report.pid);
        assert!(
            p.count <= prev,
            "counts file not sorted by count descending"
        );
        prev = p.count;
        sum += p.count;
        let slot = slots[&(p.slot as u64)];
        assert_eq!(p.gfn, slot.base_gfn + p.rel_gfn);
    }
    assert_eq!(sum, rows.len() as u64, "counts file sums to the row count");
    let s = summary(&recs);
    assert_eq!(u(&s["dirty_distinct_pages"]), 600);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn vcpu_load_counts_match_pairs_derived_by_an_observer() {
    if !ready() {
        return;
    }
    // Loaded while inside KVM_RUN and on a CPU: put at ioctl exit, and at a
    // switch-out while KVM's preempt notifier is registered (the vCPU is
    // loaded), whether or not its switch-in fired a sched_switch.
    let script = r#"
tracepoint:raw_syscalls:sys_enter /pid == $PID && args->id == 16 && args->args[1] == 0xae80/ { @in[tid] = 1; @on[tid] = 1; }
tracepoint:raw_syscalls:sys_exit /pid == $PID && args->id == 16 && @in[tid] == 1/ { if (@on[tid] == 1) { @pairs[tid] = count(); } @in[tid] = 0; @on[tid] = 0; }
tracepoint:sched:sched_switch {
  if (@in[args->prev_pid] == 1 && curtask->preempt_notifiers.first != 0) { @pairs[args->prev_pid] = count(); @on[args->prev_pid] = 0; }
  if (@in[args->next_pid] == 1) { @on[args->next_pid] = 1; }
}
END { clear(@in); clear(@on); }
"#;
    let interval = 0.3;
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--first-vcpu-id",
            "2",
            "--halt-hz",
            "500",
            "--seconds",
            "1.2",
        ],
        &["vcpu-load", "-i", "0.3"],
        script,
    );
    let rows = of(&recs, "vcpu_load");
    let pairs = maps.get("pairs").cloned().unwrap_or_default();
    let ncpu = std::thread::available_parallelism().unwrap().get() as u64;
    for v in &report.vcpus {
        let mine: Vec<&Value> = rows
            .iter()
            .filter(|r| u(&r["tid"]) == v.tid as u64)
            .collect();
        assert!(!mine.is_empty(), "no vcpu_load rows for vCPU {}", v.vcpu_id);
        let count: u64 = mine.iter().map(|r| u(&r["count"])).sum();
        let theirs = pairs.get(&vec![v.tid as i64]).copied().unwrap_or(0) as u64;
        assert_eq!(count, theirs, "load/put pairs of tid {} vs bpftrace", v.tid);
        for r in mine {
            assert_eq!(u(&r["vcpu_id"]), v.vcpu_id as u64);
            assert_eq!(u(&r["pid"]), report.pid as u64);
            let interval_ns = u(&r["interval_ns"]);
            assert!(
                interval_ns > 0 && (interval_ns as f64) < interval * 1e9 * 1.5 + 5e7,
                "interval_ns {interval_ns}"
            );
            assert!(
                u(&r["total_ns"]) <= interval_ns,
                "total_ns exceeds the interval: {r}"
            );
            if u(&r["count"]) > 0 {
                assert!(u(&r["min_ns"]) <= u(&r["max_ns"]), "{r}");
            }
            assert!(u(&r["pcpu"]) < ncpu, "pcpu is not a real CPU: {r}");
            let split: u64 = r["pcpus"].as_object().unwrap().values().map(u).sum();
            assert_eq!(split, u(&r["total_ns"]), "per-CPU split vs total: {r}");
        }
    }
}

/// A deliberately small ring buffer overflows; lost events are counted and
/// events + lost equals what the observer saw. Per-page counts stay complete.
#[test]
fn ring_buffer_overflow_is_counted_not_silent() {
    if !ready() {
        return;
    }
    let dir = tempdir();
    let counts = dir.join("counts.txt");
    let counts_s = counts.to_str().unwrap().to_string();
    let (_report, recs, maps, err) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--dirty-pages",
            "4096",
            "--dirty-log",
            "ring",
            "--memory",
            "128",
            "--passes",
            "6",
        ],
        &["dirty", "--ringbuf-size", "4", "--counts-file", &counts_s],
        "tracepoint:kvm:kvm_dirty_ring_push /pid == $PID/ { @p = count(); }",
    );
    let observed = maps
        .get("p")
        .and_then(|m| m.get(&vec![]))
        .copied()
        .unwrap_or(0) as u64;
    let s = summary(&recs);
    let (events, lost) = (u(&s["events"]["dirty"]), u(&s["lost"]["dirty"]));
    assert!(
        lost > 0,
        "a 4 KiB ring buffer should overflow (events {events}, observed {observed})"
    );
    assert_eq!(
        events,
        of(&recs, "dirty").len() as u64,
        "events = rows written"
    );
    assert_eq!(events + lost, observed, "events + lost vs bpftrace");
    assert!(
        err.contains("lost"),
        "no warning about lost events on stderr: {err}"
    );
    let sum = counts_file_sum(&counts);
    assert_eq!(
        sum, observed,
        "per-page counts are complete despite the overflow"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// BPF programs with one of `names` that no live process holds (by a
/// program or link file descriptor): what a watcher that exited would have
/// left behind. Programs of other watchers running meanwhile are held by them.
fn orphan_programs(names: &[&str]) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let held = held_program_ids();
    progs
        .iter()
        .filter(|p| names.iter().any(|n| p["name"] == *n))
        .filter(|p| !held.contains(&u(&p["id"])))
        .map(|p| p.to_string())
        .collect()
}

/// Program ids referenced by any process's file descriptors (fdinfo `prog_id:`).
fn held_program_ids() -> std::collections::HashSet<u64> {
    let mut ids = std::collections::HashSet::new();
    for proc_entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(info) = std::fs::read_to_string(fd.path()) {
                ids.extend(info.lines().filter_map(|l| {
                    l.strip_prefix("prog_id:")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                }));
            }
        }
    }
    ids
}

/// Program ids the process `pid` holds.
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(info) = std::fs::read_to_string(fd.path()) {
            ids.extend(info.lines().filter_map(|l| {
                l.strip_prefix("prog_id:")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            }));
        }
    }
    ids
}

/// Whether a BPF program with this id still exists.
fn program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Program names of kvm_watcher.bpf.c as the kernel shows them (15 chars).
const OUR_PROGRAMS: &[&str] = &[
    "tp_dirty_ring_p",
    "tp_vcpu_wakeup",
    "tp_halt_poll_ns",
    "tp_kvm_fpu",
    "tp_sys_enter",
    "tp_vcpu_run_exi",
    "tp_sched_switch",
    "tp_process_exit",
    "tp_btf_vcpu_wak",
    "tp_btf_halt_pol",
    "tp_btf_wakeup_e",
    "tp_btf_sched_sw",
    "iter_wakeup_tas",
    "iter_halt_poll_",
];

fn signal_ends_cleanly(sig: i32) {
    let dir = tempdir();
    let counts = dir.join("counts.txt");
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--dirty-pages",
        "256",
        "--dirty-log",
        "ring",
        "--halt-hz",
        "200",
        "--seconds",
        "30",
    ]);
    let pid = vm.ready.pid.to_string();
    let w = watcher(&[
        "dirty",
        "-p",
        &pid,
        "--output",
        "json",
        "--counts-file",
        counts.to_str().unwrap(),
        "--counts-every",
        "0.3",
    ]);
    let ours = programs_of(w.pid());
    assert!(!ours.is_empty(), "programs should be loaded while watching");
    vm.start();
    std::thread::sleep(Duration::from_millis(800));
    // --counts-every writes the file while the run goes on (allow for a busy machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !counts.exists() || counts_file_sum(&counts) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no periodic counts file before the signal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    w.signal(sig);
    let (status, out, err) = w.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status after signal {sig}: {status}; {err}"
    );
    let recs = records(&out);
    let s = summary(&recs);
    let (events, lost) = (u(&s["events"]["dirty"]), u(&s["lost"]["dirty"]));
    assert!(events > 0);
    let sum = counts_file_sum(&counts);
    // kvm-watcher detaches before its last drain: the file counts exactly the
    // streamed and lost events.
    assert_eq!(
        sum,
        events + lost,
        "counts file sum vs events {events} + lost {lost}"
    );
    // The kernel frees a program that uses map-in-map maps (dirty's dense
    // storage) after an RCU grace period, a few hundred ms on a busy host:
    // gone within 3 s means not held, not leaked.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let left = loop {
        let left: Vec<u64> = ours
            .iter()
            .copied()
            .filter(|id| program_exists(*id))
            .collect();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(left.is_empty(), "BPF programs left after exit: {left:?}");
    vm.signal(libc::SIGTERM);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn ending_signals_exit_0_with_counts_and_nothing_attached() {
    if !ready() {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        signal_ends_cleanly(sig);
    }
}

#[test]
fn counts_file_symlink_is_left_alone() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir();
    let target = dir.join("victim");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.join("counts.txt");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = common::run_cli(
        &[
            "dirty",
            "-t",
            "0.5",
            "--counts-file",
            link.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn forcing_an_unavailable_backend_fails_with_one_line_and_leaves_nothing() {
    if !common::require_bpf() {
        return;
    }
    let doctor = common::run_cli(&["doctor", "--json"], Duration::from_secs(60));
    let d: Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let fentry_ok = d["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["attach"] == "fentry" && h["available"] == true);
    if fentry_ok {
        eprintln!("fentry works here; nothing to refuse");
        return;
    }
    let out = common::run_cli(
        &["vcpu-load", "--backend", "fentry", "-t", "1"],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("fentry"), "{err}");
    let orphans = orphan_programs(OUR_PROGRAMS);
    assert!(orphans.is_empty(), "programs left behind: {orphans:?}");
}

/// The dirty-ring tracepoint never fires for a VM that logs with the bitmap:
/// on that backend such a VM yields no rows and must be named in a warning,
/// even when it appears after the watcher's first pass and is gone within a
/// second.
#[test]
fn bitmap_vm_on_the_tracepoint_backend_is_named_in_a_warning() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--dirty-pages",
        "200",
        "--dirty-log",
        "bitmap",
        "--seconds",
        "0.3",
    ]);
    let pid = vm.ready.pid.to_string();
    let obs = observer(&format!(
        "tracepoint:kvm:kvm_dirty_ring_push /pid == {pid}/ {{ @p = count(); }}"
    ));
    let w = watcher(&[
        "dirty",
        "--backend",
        "tracepoint",
        "-p",
        &pid,
        "--output",
        "json",
    ]);
    // Past the watcher's first pass over its loop, so the VM's vCPU threads
    // first show up in between its periodic looks.
    std::thread::sleep(Duration::from_millis(400));
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "kvm-watcher failed ({status}): {err}");
    let maps = observer_maps(obs);

    // Ground truth: KVM's dirty log saw the pages, the tracepoint did not.
    assert_eq!(report.dirty.mode, "bitmap");
    assert_eq!(report.dirty.pages.len(), 200, "pages in the VM's dirty log");
    assert!(
        maps.get("p").is_none_or(|m| m.values().all(|&n| n == 0)),
        "bpftrace saw kvm_dirty_ring_push from a bitmap VM: {maps:?}"
    );
    assert!(
        of(&records(&out), "dirty").is_empty(),
        "dirty rows from a bitmap VM"
    );
    let named = format!("VM pid {pid} has no dirty ring");
    assert!(err.contains(&named), "no warning naming the VM: {err}");
}

/// A VMM that deletes memslots and reuses their ids elsewhere (QEMU does) gets
/// new pages: the counts file keeps each (slot, gfn) apart, in summary mode
/// (which skips the memslot walk for known pages) and in rows mode, exactly
/// as the guest's dirty ring reported them, and the last summary shows the
/// slots at their new places.
#[test]
fn reused_slot_ids_count_each_page_where_it_was() {
    if !ready() {
        return;
    }
    let dir = tempdir();
    let summary_file = dir.join("summary-counts.txt");
    let rows_file = dir.join("rows-counts.txt");
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--dirty-pages",
        "40",
        "--dirty-log",
        "ring",
        "--halt-hz",
        "200",
        "--seconds",
        "1",
        "--swap-slots-at",
        "0.5",
    ]);
    let pid = vm.ready.pid.to_string();
    let summary_w = watcher(&[
        "dirty",
        "--summary",
        "-i",
        "0.3",
        "--counts-file",
        summary_file.to_str().unwrap(),
        "-p",
        &pid,
        "--output",
        "json",
    ]);
    let rows_w = watcher(&[
        "dirty",
        "--counts-file",
        rows_file.to_str().unwrap(),
        "-p",
        &pid,
        "--output",
        "json",
    ]);
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    let mut summaries = Vec::new();
    for w in [summary_w, rows_w] {
        let (status, out, err) = w.wait(Duration::from_secs(30));
        assert!(status.success(), "kvm-watcher failed ({status}): {err}");
        summaries.push(records(&out));
    }

    let swap = report
        .swapped
        .as_ref()
        .expect("the guest swapped its slots");
    let truth: BTreeMap<(u64, u64), u64> = report
        .dirty
        .page_counts
        .as_ref()
        .expect("per-gfn ground truth")
        .iter()
        .map(|&(slot, gfn, n)| ((slot as u64, gfn), n))
        .collect();
    // Every page of slots 1 and 2 was written at both places.
    let moved: BTreeSet<u64> = truth.keys().map(|k| k.0).collect();
    assert_eq!(moved, BTreeSet::from([1, 2]), "slots in the ground truth");
    assert_eq!(
        truth.len() as u64,
        2 * report.dirty.distinct_pages,
        "each (slot, offset) at two places"
    );
    for (name, file) in [("summary", &summary_file), ("rows", &rows_file)] {
        let text = std::fs::read_to_string(file).expect("counts file written");
        let mut seen = BTreeMap::new();
        for c in kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap() {
            let place = report
                .slot_holding(c.slot, c.gfn)
                .unwrap_or_else(|| panic!("{name}: gfn of {c:?} is in no place of its slot"));
            assert_eq!(
                c.rel_gfn,
                c.gfn - place.base_gfn,
                "{name}: rel_gfn of {c:?}"
            );
            seen.insert((c.slot as u64, c.gfn), c.count);
        }
        assert_eq!(
            seen, truth,
            "{name}: counts per (slot, gfn) vs the dirty ring"
        );
    }
    // The last interval shows each slot where it is now.
    let last: HashMap<u64, u64> = of(&summaries[0], "dirty_summary")
        .iter()
        .map(|r| (u(&r["slot_id"]), u(&r["base_gfn"])))
        .collect();
    for m in swap.memslots.iter().filter(|m| m.slot == 1 || m.slot == 2) {
        assert_eq!(
            last.get(&(m.slot as u64)),
            Some(&m.base_gfn),
            "slot {} in the last summary",
            m.slot
        );
    }
}

/// The sum of the COUNTS column of a counts file.
fn counts_file_sum(path: &std::path::Path) -> u64 {
    common::counts_file(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|c| c.count)
        .sum()
}

fn tempdir() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "kvm-watcher-test-{}-{}",
        std::process::id(),
        common::test_name().replace("::", "-")
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `dirty --summary`: no rows, per-interval writes that add up to what the
/// observer saw per slot, and distinct pages that match the guest's set.
#[test]
fn dirty_summary_counts_in_the_kernel_per_interval() {
    if !ready() {
        return;
    }
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--slots",
            "3",
            "--dirty-pages",
            "90",
            "--dirty-log",
            "ring",
            "--halt-hz",
            "10",
            "--passes",
            "12",
        ],
        &["dirty", "--summary", "-i", "0.35"],
        "tracepoint:kvm:kvm_dirty_ring_push /pid == $PID/ { @s[args->slot] = count(); }",
    );
    assert!(
        of(&recs, "dirty").is_empty(),
        "--summary must not stream rows"
    );
    let rows = of(&recs, "dirty_summary");
    assert!(rows.len() >= 3, "expected several intervals: {rows:?}");
    let observed = maps.get("s").cloned().unwrap_or_default();
    let per_slot_truth: HashMap<u64, u64> = report
        .dirty
        .per_slot
        .iter()
        .map(|s| (s.slot as u64, s.distinct))
        .collect();
    let mut writes: BTreeMap<Vec<i64>, i64> = BTreeMap::new();
    let mut max_distinct: HashMap<u64, u64> = HashMap::new();
    for r in &rows {
        let slot = u(&r["slot_id"]);
        *writes.entry(vec![slot as i64]).or_default() += u(&r["writes"]) as i64;
        let d = u(&r["distinct_pages"]);
        assert!(d <= u(&r["writes"]), "{r}");
        assert!(
            d <= per_slot_truth[&slot],
            "more distinct pages than the slot had: {r}"
        );
        let m = max_distinct.entry(slot).or_default();
        *m = (*m).max(d);
    }
    assert_eq!(
        writes, observed,
        "per-slot writes vs bpftrace kvm_dirty_ring_push"
    );
    // An interval of 0.35 s spans several 0.1 s passes, each writing every page.
    for (slot, distinct) in &per_slot_truth {
        assert_eq!(
            max_distinct.get(slot),
            Some(distinct),
            "slot {slot}: a full interval sees every page"
        );
    }
}

/// --vcpu is applied in the kernel: only that vCPU's events are counted as
/// events at all, and they are all there.
#[test]
fn vcpu_filter_applies_in_the_kernel() {
    if !ready() {
        return;
    }
    let (report, recs, maps, _) = watch_vm(
        &[
            "--vcpus",
            "2",
            "--first-vcpu-id",
            "3",
            "--halt-hz",
            "500",
            "--seconds",
            "0.6",
        ],
        &["wakeup", "--vcpu", "4"],
        "tracepoint:kvm:kvm_vcpu_wakeup /pid == $PID/ { @w[tid] = count(); }",
    );
    let rows = of(&recs, "wakeup");
    let tid4 = report.vcpus.iter().find(|v| v.vcpu_id == 4).unwrap().tid as i64;
    let observed = maps.get("w").cloned().unwrap_or_default();
    assert!(
        rows.iter().all(|r| u(&r["vcpu_id"]) == 4),
        "a row of another vCPU"
    );
    assert_eq!(rows.len() as i64, observed[&vec![tid4]]);
    assert_eq!(u(&summary(&recs)["events"]["wakeup"]), rows.len() as u64);
}
