//! A watch under pressure: a reader that stops reading, and more pages than
//! `--max-pages` over a run in which VMs come and go.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::observe::{of, records, summary, u, watcher};

fn ready() -> bool {
    common::require_bpf() && common::require_kvm()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-robust-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// True while thread `pid` is in write(1, ...): its stdout is full.
fn blocked_writing_stdout(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| s.starts_with("1 0x1 "))
}

/// SIGTERM ends a watch whose stdout nobody reads (`... | sleep 25`) at
/// once, with its counts file written, instead of when the reader goes.
#[test]
fn sigterm_ends_a_watch_whose_stdout_is_not_read() {
    if !ready() {
        return;
    }
    let dir = tempdir("blocked");
    let counts = dir.join("c.txt");
    let vm = common::spawn_vm(&[
        "--dirty-pages",
        "256",
        "--dirty-log",
        "ring",
        "--seconds",
        "60",
    ]);
    let pid = vm.ready.pid.to_string();
    let mut w = Command::new(common::bin())
        .args(["dirty", "-p", &pid, "--counts-file"])
        .arg(&counts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = w.stdout.take();
    let mut err = BufReader::new(w.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("watching") {}
    vm.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !blocked_writing_stdout(w.id()) {
        assert!(
            Instant::now() < deadline,
            "the watcher never filled its stdout"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = w.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = w.kill();
            let _ = w.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(vm);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let status = status.expect("SIGTERM did not end the watch while its stdout was blocked");
    assert!(status.success(), "{status}: {rest}");
    let text = std::fs::read_to_string(&counts).expect("no counts file");
    let pages = kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
    assert!(!pages.is_empty(), "the counts file counts nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pages of a VM that exited leave `--max-pages`: a live VM started after a
/// dead one filled the map gets its distinct pages counted, and the counts
/// file still has every page of both, as each guest dirtied them.
#[test]
fn pages_of_exited_vms_leave_room_for_live_ones() {
    if !ready() {
        return;
    }
    let dir = tempdir("max-pages");
    let counts = dir.join("c.txt");
    let vm = |pages: &str| {
        common::spawn_vm(&[
            "--dirty-pages",
            pages,
            "--dirty-log",
            "ring",
            "--seconds",
            "0.4",
        ])
    };
    let (first, second) = (vm("64"), vm("16"));
    let (pid1, pid2) = (first.ready.pid, second.ready.pid);
    let w = watcher(&[
        "dirty",
        "--summary",
        "-p",
        &pid1.to_string(),
        "-p",
        &pid2.to_string(),
        "--max-pages",
        "64",
        "--output",
        "json",
        "-i",
        "0.3",
        "--counts-file",
        counts.to_str().unwrap(),
    ]);
    first.start();
    let r1 = first.finish(Duration::from_secs(60));
    assert_eq!(
        r1.dirty.distinct_pages, 64,
        "the first VM should fill the map"
    );
    // Two intervals after its exit, its pages are out of the kernel's map.
    std::thread::sleep(Duration::from_secs(2));
    second.start();
    let r2 = second.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let recs = records(&out);
    let s = summary(&recs);
    assert_eq!(u(&s["dirty_map_full"]), 0, "pages were not counted: {s}");
    let mut distinct: BTreeMap<u64, u64> = BTreeMap::new();
    for r in of(&recs, "dirty_summary")
        .iter()
        .filter(|r| u(&r["pid"]) == pid2 as u64)
    {
        // The guest writes all its pages many times an interval.
        let m = distinct.entry(u(&r["slot_id"])).or_default();
        *m = (*m).max(u(&r["distinct_pages"]));
    }
    let truth: BTreeMap<u64, u64> = r2
        .dirty
        .per_slot
        .iter()
        .filter(|s| s.distinct > 0)
        .map(|s| (s.slot as u64, s.distinct))
        .collect();
    assert_eq!(distinct, truth, "distinct pages of the VM that came second");
    let text = std::fs::read_to_string(&counts).unwrap();
    let pages = kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
    for (pid, report) in [(pid1, &r1), (pid2, &r2)] {
        let mut mine: Vec<(u32, u64)> = pages
            .iter()
            .filter(|p| p.pid == pid)
            .map(|p| (p.slot, p.rel_gfn))
            .collect();
        mine.sort_unstable();
        assert_eq!(mine, report.dirty.pages, "counts file pages of pid {pid}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Lowers the open-file limit of running process `pid` to `n`.
fn limit_fds(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on our own child with a valid rlimit and no old value.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// VMs that come and go one after another under a low fd limit: the
/// storage of each exited VM is closed (its pages kept in user space), so
/// the watch runs on, and its counts file holds every page each guest says
/// it dirtied.
#[test]
fn counts_file_survives_vms_coming_and_going_under_a_low_fd_limit() {
    if !ready() {
        return;
    }
    let dir = tempdir("fd-limit");
    let counts = dir.join("c.txt");
    const GUESTS: usize = 12;
    // 12 x 1024 pages: past the 8 Ki exited pages kept in memory, so some
    // go to disk (a scratch file) on the way.
    let vms: Vec<_> = (0..GUESTS)
        .map(|_| {
            common::spawn_vm(&[
                "--dirty-pages",
                "1024",
                "--dirty-log",
                "ring",
                "--memory",
                "8",
                "--seconds",
                "0.2",
            ])
        })
        .collect();
    let pids: Vec<String> = vms.iter().map(|v| v.ready.pid.to_string()).collect();
    let mut args = vec![
        "watch",
        "-d",
        "-i",
        "0.3",
        "--output",
        "json",
        "--counts-file",
    ];
    args.push(counts.to_str().unwrap());
    for p in &pids {
        args.extend(["-p", p]);
    }
    let w = watcher(&args);
    // Room for two live VMs' storage (4 descriptors each) and some slack,
    // not for the storage of every VM that came before.
    let fds = open_fds(w.pid());
    limit_fds(w.pid(), fds + 16);
    let mut reports = Vec::new();
    for vm in vms {
        let pid = vm.ready.pid;
        vm.start();
        reports.push((pid, vm.finish(Duration::from_secs(60))));
        // Two intervals: the exited VM is taken out of the kernel's maps.
        std::thread::sleep(Duration::from_millis(900));
    }
    let (status, _out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}: {err}");
    let pages = common::counts_file(&counts).unwrap_or_else(|e| panic!("{e}; stderr: {err}"));
    for (pid, report) in &reports {
        let mut mine: Vec<(u32, u64)> = pages
            .iter()
            .filter(|p| p.pid == *pid)
            .map(|p| (p.slot, p.rel_gfn))
            .collect();
        mine.sort_unstable();
        assert_eq!(mine, report.dirty.pages, "counts file pages of pid {pid}");
        assert_eq!(mine, common::expected_dirty_pages(report, 1024));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// When `--max-pages` runs out, an interval row that counted fewer
/// distinct pages than the guest wrote says its figure is a lower bound.
#[test]
fn rows_short_of_pages_say_they_are_a_lower_bound() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--dirty-pages",
        "256",
        "--dirty-log",
        "ring",
        "--seconds",
        "1.5",
    ]);
    let pid = vm.ready.pid.to_string();
    let w = watcher(&[
        "dirty",
        "--summary",
        "-p",
        &pid,
        "--max-pages",
        "50",
        "--output",
        "json",
        "-i",
        "0.3",
    ]);
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let truth: BTreeMap<u64, u64> = report
        .dirty
        .per_slot
        .iter()
        .map(|s| (s.slot as u64, s.distinct))
        .collect();
    let rows = of(&records(&out), "dirty_summary");
    let short: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| u(&r["distinct_pages"]) < truth[&u(&r["slot_id"])])
        .collect();
    assert!(
        !short.is_empty(),
        "no row fell short of {truth:?}: {rows:?}"
    );
    for r in &short {
        assert_eq!(
            r["distinct_pages_lower_bound"], true,
            "a row short of the guest's {truth:?} pages is not marked: {r}"
        );
    }
}
