//! `kvm-watcher advise` against ground truth: the kernel's schedstat for
//! the wait behind a hog, the VMM's own time for an I/O port storm, and the
//! findings of a recording against those of the live run
//! (halt polling against KVM's own figures: tests/advise_halt.rs).

mod common;

use std::time::Duration;

use common::advise::{
    T, advise_guest, advise_guest_with, findings, ready, serial, vm_record, within,
};
use common::observe::{u, watcher};
use common::spawn_vm;
use common::windows::{Trial, drawn_from, f, trial, truth};
use serde_json::Value;

/// A busy guest pinned with a busy loop on one CPU: advise names the loop
/// and the CPU, and its wait is schedstat's.
#[test]
fn a_hog_is_named_with_its_cpu_and_wait() {
    if !ready() {
        return;
    }
    let _g = serial();
    let cpu = common::sched::last_cpu();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hog = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("advise-hog".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                common::sched::pin(tid, cpu);
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                tid
            })
            .unwrap()
    };
    let (records, report) = advise_guest_with(&["--seconds", "3"], &["-t", "5"], |vm| {
        common::sched::pin(vm.ready.tids[0], cpu)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let hog_tid = hog.join().unwrap();
    let f = findings(&records, "run_delay");
    assert_eq!(f.len(), 1, "one waiting finding: {records:?}");
    let f = f[0];
    let setting = f["change"]["setting"].as_str().unwrap();
    assert!(
        setting.contains("advise-hog") && setting.contains(&format!("off CPU {cpu}")),
        "names the hog and its CPU: {setting}"
    );
    let v = &f["figures"]["vcpus"][0];
    assert!(
        v["culprits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tid"] == hog_tid),
        "{v}"
    );
    let wait = v["run_delay_ns"].as_u64().unwrap();
    let truth = report.vcpus[0].sched.expect("schedstat").run_delay_ns;
    println!(
        "hog on CPU {cpu}: advise's wait {:.4} s, schedstat's {:.4} s",
        wait as f64 / 1e9,
        truth as f64 / 1e9
    );
    assert!(
        within(wait as f64, truth as f64, 0.05, 0.0),
        "{wait} vs {truth}"
    );
}

/// The synthetic guest halting at 100 Hz without polling: nothing to change.
/// (The guest outlives the watch in these tests where rates matter, as a
/// VM in production does: a rate is over the intervals a vCPU was seen in.)
#[test]
fn a_quiet_guest_has_no_findings() {
    if !ready() {
        return;
    }
    let _g = serial();
    let (records, _) = advise_guest(
        &["--halt-hz", "100", "--halt-poll-ns", "0", "--seconds", "2"],
        &["-t", "3", "--halt-poll-ns", "0"],
    );
    let vm = vm_record(&records);
    assert_eq!(vm["findings"], 0, "{records:?}");
    let text = common::run_cli(&["advise", "-t", "1", "-p", "1"], T);
    // pid 1 is no VMM: a usage error before anything is watched.
    assert_eq!(text.status.code(), Some(2));
}

/// Idle SeaBIOS under QEMU: no findings, and the text says so.
#[test]
fn idle_seabios_has_no_findings() {
    if !ready() {
        return;
    }
    let _g = serial();
    let Some(mut qemu) = common::qemu::Qemu::start("advise-idle", 1) else {
        return;
    };
    qemu.wait_until_halting(Duration::from_secs(1), 10);
    let pid = qemu.pid().to_string();
    let out = common::run_cli(&["advise", "-t", "3", "-p", &pid], T);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no findings: nothing to change"), "{text}");
}

/// The rules and targets of the findings, for comparing two analyses.
fn kinds(records: &[Value]) -> Vec<(String, String)> {
    let mut k: Vec<_> = records
        .iter()
        .filter(|r| r["monitor"] == "advice")
        .map(|r| (r["rule"].to_string(), r["figures"]["addr"].to_string()))
        .collect();
    k.sort();
    k
}

/// The time and accesses of port `port` in a `watch --output json` recording.
fn port_in_recording(stdout: &str, port: u64) -> (u64, u64) {
    let mut ns = 0;
    let mut count = 0;
    for r in common::observe::records(stdout) {
        for t in r["exits_targets"].as_array().into_iter().flatten() {
            if t["kind"] == "pio" && t["addr"] == port {
                ns += t["vmm_ns"].as_u64().unwrap();
                count += t["count"].as_u64().unwrap();
            }
        }
    }
    (ns, count)
}

/// An I/O port storm, with the exits monitor (`watch -e`) watching
/// alongside: advise names the port; its accesses are the guest's own
/// count, its time the exits monitor's; and what advise recorded
/// (`--record`), analysed again with --from, gives the same findings.
#[test]
fn an_io_port_storm_is_named_and_a_recording_agrees() {
    if !ready() {
        return;
    }
    let _g = serial();
    let file = std::env::temp_dir().join(format!("advise-rec-{}.json", std::process::id()));
    let path = file.to_str().unwrap().to_string();
    let mut recorder = None;
    let (live, report) = advise_guest_with(
        &["--halt-hz", "1000", "--io-exits", "100", "--seconds", "3"],
        &["-t", "5", "--record", &path],
        |vm| {
            let pid = vm.ready.pid.to_string();
            recorder = Some(watcher(&[
                "watch", "-e", "--output", "json", "-t", "5", "-p", &pid,
            ]));
        },
    );
    let (status, stdout, stderr) = recorder.unwrap().wait(T);
    assert!(status.success(), "{stderr}");
    let f = findings(&live, "exits");
    assert_eq!(f.len(), 1, "one exits finding: {live:?}");
    let f = f[0];
    assert_eq!(f["figures"]["addr"], 0x504, "{f}");
    assert!(f["problem"].as_str().unwrap().contains("0x504"));
    let v = &f["figures"]["vcpus"][0];
    let (ns, count) = (v["vmm_ns"].as_u64().unwrap(), v["count"].as_u64().unwrap());
    let guest = report.vcpus[0].exits_made;
    let (rec_ns, rec_count) = port_in_recording(&stdout, 0x504);
    println!(
        "port 0x504: advise {count} accesses, {:.4} s in the VMM ({:.2} % of {:.2} s); guest's own count {}; exits monitor {rec_count} accesses, {:.4} s",
        ns as f64 / 1e9,
        v["share"].as_f64().unwrap() * 100.0,
        v["observed_ns"].as_u64().unwrap() as f64 / 1e9,
        guest.io,
        rec_ns as f64 / 1e9
    );
    assert_eq!(count, guest.io, "every access the guest made");
    assert!(
        within(ns as f64, rec_ns as f64, 0.05, 0.0),
        "{ns} vs {rec_ns}"
    );

    let out = common::run_cli(&["advise", "--json", "--from", &path], T);
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!kinds(&live).is_empty());
    assert_eq!(live, from, "the recording gives the live run's findings");
}

/// Two busy vCPUs of one guest pinned to one CPU: a placement finding
/// naming that CPU and both threads; their waits are schedstat's.
#[test]
fn two_vcpus_on_one_cpu_are_a_placement_finding() {
    if !ready() {
        return;
    }
    let _g = serial();
    let cpu = common::sched::last_cpu();
    let (records, report) =
        advise_guest_with(&["--vcpus", "2", "--seconds", "3"], &["-t", "5"], |vm| {
            for &tid in &vm.ready.tids {
                common::sched::pin(tid, cpu);
            }
        });
    let f = findings(&records, "placement");
    assert_eq!(f.len(), 1, "one placement finding: {records:?}");
    let f = f[0];
    assert_eq!(f["figures"]["cpu"], cpu as u64, "{f}");
    let mut tids: Vec<u64> = f["figures"]["tids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    tids.sort_unstable();
    let mut guest: Vec<u64> = report.vcpus.iter().map(|v| v.tid as u64).collect();
    guest.sort_unstable();
    assert_eq!(tids, guest);
    let wait: u64 = f["figures"]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["run_delay_ns"].as_u64().unwrap())
        .sum();
    let truth: u64 = report
        .vcpus
        .iter()
        .map(|v| v.sched.expect("schedstat").run_delay_ns)
        .sum();
    let mutual = f["figures"]["mutual_wait_ns"].as_u64().unwrap();
    println!(
        "two vCPUs on CPU {cpu}: advise's wait {:.4} s ({:.4} s behind each other), schedstat's {:.4} s",
        wait as f64 / 1e9,
        mutual as f64 / 1e9,
        truth as f64 / 1e9
    );
    assert!(
        within(wait as f64, truth as f64, 0.05, 0.0),
        "{wait} vs {truth}"
    );
    // How much of it was behind each other depends on what else this
    // shared host runs on that CPU: only that it is part of the wait.
    assert!(mutual > 0 && mutual <= wait, "{mutual} of {wait}");
}

/// `advise --json` output, one object a line.
fn lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The rate window's round of a `dirty_rate` VM record (or of a migration
/// finding's figures, which carry the same fields): its 1 s working set.
/// Where the record's rate rests on that round alone, the rate is the
/// round's share of the pages per second of it.
fn rate_window(r: &Value) -> Trial {
    let pages = u(&r["pages"]) as f64;
    let w = r["working_set"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["window_s"] == 1.0))
        .unwrap_or_else(|| panic!("no 1 s window: {r}"));
    let t = trial(w, pages);
    if u(&r["samples"]) == t.samples {
        let rate = f(&r["rate_pages_per_s"]["estimate"]);
        let of_round = t.share.0 * pages / t.elapsed_s;
        assert!(
            (rate - of_round).abs() <= 1e-6 * rate,
            "rate {rate} is not its round's {of_round}: {r}"
        );
    }
    t
}

/// A guest changing 128 MiB of its 256 MiB over and over (2,048 pages a
/// pass, 20 passes a second if the host keeps up), watched over a 32 MiB/s
/// link by `advise --link` and, at the same time, by `dirty-rate --link`:
/// the same verdict, and each one's rate window holds what the guest
/// changed within it by its own count (`vm --timeline`); over a link far
/// above, no finding.
///
/// A window samples some 130 of the VM's 66,000 pages, so its rate is known
/// to about ±19 % (95 %), and the two sample independently. Each is judged
/// against the guest at a false-alarm rate of 1 in 10,000
/// (`windows::drawn_from`), not against the other: two 95 % intervals of
/// independent samples of the same rate miss each other about once in 180
/// runs with nothing wrong.
#[test]
fn a_migration_that_does_not_converge_is_a_finding_as_dirty_rate_says() {
    if !ready() {
        return;
    }
    let _g = serial();
    const PAGES: &str = "32768";
    let vm = spawn_vm(&[
        "--memory",
        "256",
        "--dirty-pages",
        PAGES,
        "--sweep",
        "2048",
        "--halt-hz",
        "20",
        "--seconds",
        "30",
        "--timeline",
        "5",
    ]);
    let pid = vm.ready.pid.to_string();
    vm.start();
    let slow = ["--link", "32", "--max-downtime", "0.3"];
    let mut a = vec!["advise", "--json", "-t", "8", "-p", &pid];
    a.extend(slow);
    let adv = watcher(&a);
    let mut d = vec![
        "dirty-rate",
        "--output",
        "json",
        "-i",
        "1",
        "-t",
        "9",
        "-p",
        &pid,
    ];
    d.extend(slow);
    let dr = watcher(&d);
    let (status, stdout, stderr) = adv.wait(T);
    assert!(status.success(), "advise failed: {stderr}");
    let (dstatus, dout, derr) = dr.wait(T);
    assert!(dstatus.success(), "dirty-rate failed: {derr}");
    let records = lines(&stdout);
    let found = findings(&records, "migration");
    assert_eq!(found.len(), 1, "{records:#?}");
    let fig = &found[0]["figures"];
    let t = fig["time_ns"].as_u64().unwrap();
    // dirty-rate's VM row with advice nearest in time to the one advise used.
    let theirs = common::observe::records(&dout)
        .into_iter()
        .filter(|r| r["monitor"] == "dirty_rate" && r["slot"].is_null())
        .filter(|r| r["migration"].is_object())
        .min_by_key(|r| r["time_ns"].as_u64().unwrap_or(0).abs_diff(t))
        .unwrap_or_else(|| panic!("no dirty-rate advice: {dout}"));
    for (who, r) in [("advise", fig), ("dirty-rate", &theirs)] {
        eprintln!("{who}: {}", r["migration"]["text"]);
        assert_eq!(r["migration"]["converges"], false, "{who}: {r}");
    }
    let m = &fig["migration"];
    assert!(m["throttle_percent"].is_u64() || m["throttle_percent"].is_null());
    let setting = found[0]["change"]["setting"].as_str().unwrap();
    assert!(setting.contains("dirty limit"), "{setting}");

    // A link far above the rate: nothing to change, and it says it converges.
    let out = common::run_cli(
        &[
            "advise", "--json", "-t", "6", "-p", &pid, "--link", "100000",
        ],
        T,
    );
    let records = lines(&String::from_utf8_lossy(&out.stdout));
    assert!(findings(&records, "migration").is_empty(), "{records:#?}");
    let checked = vm_record(&records)["checked"].to_string();
    assert!(checked.contains("migration: converges"), "{checked}");
    let report = vm.finish(T);

    // Each rate window against the pages the guest changed within it.
    let cycle: f64 = PAGES.parse().unwrap();
    for (who, r) in [("advise", fig), ("dirty-rate", &theirs)] {
        let w = rate_window(r);
        let (low, high) = truth(&w, &report.timeline, cycle);
        let seen = w.share.0 * w.pages;
        eprintln!(
            "{who}: {:.0} pages changed in {:.3} s ({:.0}..{:.0}, {} of {} samples), the guest's {low:.0}..{high:.0}",
            seen,
            w.elapsed_s,
            w.share.1 * w.pages,
            w.share.2 * w.pages,
            (w.share.0 * w.samples as f64).round(),
            w.samples
        );
        assert!(
            drawn_from(&w, (low, high), 1e-4),
            "{who}: {seen:.0} pages changed in its window, the guest changed {low:.0}..{high:.0}"
        );
    }
}
