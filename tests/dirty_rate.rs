//! dirty-rate against what the guest itself did: synthetic guests that
//! sweep through their pages (`vm --sweep C --halt-hz HZ` changes C x HZ
//! distinct pages a second, each write a new pass number), one that writes
//! the same content it finds (`--same-content`), one that writes nothing, and
//! one whose memslots trade places while it is sampled (`--swap-slots-at`).
//!
//! The truth of a window is what the guest wrote within it, by its own
//! count: `vm --timeline` notes its page writes so far every 5 ms, so a
//! guest slowed down by a busy host is measured against what it did, not
//! against its average. Plus up to a few pages of the guest's own counters
//! and stack, which change all the time. Each window's 95 % interval is one
//! trial: over all of them the interval must hold the truth in about 95 % of
//! the trials (at least 85 %, so that the test fails on a biased estimate,
//! not on bad luck: with a true 95 %, 85 % or less in 60+ trials happens less
//! than once in a thousand runs), and at each rate no fewer than a true 95 %
//! gives once in 10,000 runs.

mod common;

use std::time::Duration;

use common::VmReport;
use common::observe::{of, records, u, watcher};
use common::windows::{SYSTEM_PAGES, Trial, binomial_cdf, f, meets, trials, truth};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

fn ready() -> bool {
    common::require_root() && common::require_kvm() && common::require_bpf()
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The guest's rate of changed pages: its page writes over its run time.
fn rate_of(report: &VmReport) -> f64 {
    let written: u64 = report.vcpus.iter().map(|v| v.pages_written).sum();
    written as f64 / report.seconds
}

/// A 1 GiB guest halting at 1000 Hz for `seconds` that changes `sweep`
/// distinct pages per pass (none if empty: it writes no page), then `extra`.
fn sweeper<'a>(seconds: &'a str, sweep: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--memory",
        "1024",
        "--seconds",
        seconds,
        "--halt-hz",
        "1000",
        "--timeline",
        "5",
    ];
    if !sweep.is_empty() {
        a.extend(["--dirty-pages", "48000", "--sweep", sweep]);
    }
    a.extend_from_slice(extra);
    a
}

/// Writes store what the page holds, under a dirty ring.
const SAME_CONTENT: &[&str] = &["--same-content", "--dirty-log", "ring"];

/// Whether trial `t`'s interval meets the truth: between `rate` pages/s over
/// its window and that plus the system pages.
fn holds(t: &Trial, rate: f64) -> bool {
    let low = rate * t.elapsed_s / t.pages;
    let high = (rate * t.elapsed_s + SYSTEM_PAGES) / t.pages;
    t.share.1 <= high && t.share.2 >= low
}

/// Guests of `vm_args` each, watched together by `dirty-rate <watch>`.
fn run(vms: &[Vec<&str>], watch: &[&str]) -> (Vec<VmReport>, Vec<Value>, String, (u64, u64)) {
    let spawned: Vec<_> = vms.iter().map(|a| common::spawn_vm(a)).collect();
    let pids: Vec<String> = spawned.iter().map(|v| v.ready.pid.to_string()).collect();
    let mut args: Vec<&str> = watch.to_vec();
    args.extend(["--output", "json", "-i", "1"]);
    for p in &pids {
        args.extend(["-p", p]);
    }
    let w = watcher(&args);
    // Let the first rounds start before the guests do, so that no window
    // of the run is missed and the first ones are left out below.
    std::thread::sleep(Duration::from_millis(1500));
    let start = mono_ns();
    for v in &spawned {
        v.start();
    }
    let reports: Vec<VmReport> = spawned.into_iter().map(|v| v.finish(T)).collect();
    let end = mono_ns();
    w.signal(libc::SIGINT);
    let (status, stdout, stderr) = w.wait(T);
    assert!(status.success(), "dirty-rate failed: {stderr}");
    (reports, records(&stdout), stderr, (start, end))
}

/// Trials wholly inside the guest's run.
fn inside(ts: Vec<Trial>, run: (u64, u64)) -> Vec<Trial> {
    ts.into_iter()
        .filter(|t| {
            let began = t.ended_ns.saturating_sub((t.elapsed_s * 1e9) as u64);
            began > run.0 + 200_000_000 && t.ended_ns + 200_000_000 < run.1
        })
        .collect()
}

#[test]
fn the_interval_holds_the_guests_rate_at_three_rates_and_at_none() {
    if !ready() {
        return;
    }
    let guest = |sweep| sweeper("14", sweep, &[]);
    let (reports, recs, _, span) = run(
        &[guest("1"), guest("4"), guest("16"), guest("")],
        &[
            "dirty-rate",
            "--sample-pages",
            "4096",
            "--max-read-rate",
            "1024",
        ],
    );
    let (mut held, mut all) = (0, 0);
    let mut table = Vec::new();
    let mut per_rate = Vec::new();
    for r in &reports {
        let rate = rate_of(r);
        assert!(r.timeline.len() > 100, "pid {}: no timeline", r.pid);
        // Every window of 0.1 and 1 s that overlaps the run: the first
        // ones too, which began before the guest did.
        let ts: Vec<Trial> = trials(&recs, r.pid)
            .into_iter()
            .filter(|t| t.window_s < 5.0 && t.ended_ns > span.0)
            .collect();
        assert!(
            ts.len() >= 16,
            "pid {}: {} windows of 0.1 and 1 s in the run: {ts:?}",
            r.pid,
            ts.len()
        );
        let mut mine = 0;
        for t in &ts {
            let (low, high) = truth(t, &r.timeline, f64::INFINITY);
            let ok = meets(t, (low, high));
            mine += usize::from(ok);
            table.push(format!(
                "pid {} ({rate:.0} pages/s on average), window {:.3} s ending at {:+.3} s of the run: \
                 truth {low:.0}..{high:.0} pages, estimate {:.0} ({:.0}..{:.0}){}",
                r.pid,
                t.elapsed_s,
                (t.ended_ns as f64 - span.0 as f64) / 1e9,
                t.share.0 * t.pages,
                t.share.1 * t.pages,
                t.share.2 * t.pages,
                if ok { "" } else { "  MISSED" }
            ));
        }
        held += mine;
        all += ts.len();
        per_rate.push((rate, mine, ts.len()));
        // The rate rows: the 1 s estimate, pooled, near the truth.
        let rows: Vec<&Value> = recs
            .iter()
            .filter(|x| x["monitor"] == "dirty_rate" && u(&x["pid"]) as u32 == r.pid)
            .filter(|x| x["slot"].is_null() && !x["rate_pages_per_s"].is_null())
            .collect();
        assert!(!rows.is_empty(), "no rate of pid {}", r.pid);
        let (sum, n) = rows.iter().fold((0.0, 0.0), |(s, n), x| {
            (s + f(&x["rate_pages_per_s"]["estimate"]), n + 1.0)
        });
        let mean = sum / n;
        if rate > 0.0 {
            assert!(
                (mean - rate).abs() < 0.25 * rate,
                "pid {}: mean estimate {mean:.0} pages/s, truth {rate:.0}",
                r.pid
            );
        } else {
            // Writes nothing but its own counters (a few pages a second): a
            // window that drew one of them estimates some 60 pages/s (its
            // interval held above; it is one of the trials), the mean stays
            // low.
            assert!(
                mean < 50.0,
                "pid {}: mean estimate {mean:.0} pages/s",
                r.pid
            );
        }
    }
    eprintln!("{}", table.join("\n"));
    let coverage = held as f64 / all as f64;
    for (rate, h, n) in &per_rate {
        eprintln!(
            "coverage at {rate:.0} pages/s: {h} of {n} ({:.1} %)",
            100.0 * *h as f64 / *n as f64
        );
    }
    eprintln!(
        "coverage: {held} of {all} intervals hold the truth ({:.1} %)",
        coverage * 100.0
    );
    assert!(all >= 64, "only {all} trials");
    assert!(
        coverage >= 0.85,
        "{held} of {all} intervals hold the truth:\n{}",
        table.join("\n")
    );
    for (rate, h, n) in per_rate {
        assert!(
            binomial_cdf(h, n, 0.95) >= 1e-4,
            "at {rate:.0} pages/s only {h} of {n} intervals hold the truth:\n{}",
            table.join("\n")
        );
    }
}

#[test]
fn same_content_writes_are_logged_writes_but_no_change() {
    if !ready() {
        return;
    }
    let (reports, recs, _, span) = run(
        &[sweeper("8", "8", SAME_CONTENT)],
        &[
            "watch",
            "--dirty",
            "--dirty-rate",
            "--sample-pages",
            "4096",
            "--max-read-rate",
            "1024",
        ],
    );
    let r = &reports[0];
    let written: u64 = r.vcpus.iter().map(|v| v.pages_written).sum();
    assert!(written > 20_000, "the guest wrote {written} pages");
    // The dirty monitor counts the writes KVM logged...
    let logged: u64 = of(&recs, "dirty_summary")
        .iter()
        .filter(|x| u(&x["pid"]) as u32 == r.pid)
        .map(|x| u(&x["writes"]))
        .sum();
    assert!(
        logged as f64 >= 0.9 * r.dirty.harvested as f64 && logged <= r.dirty.harvested,
        "logged {logged}, KVM's dirty log {}",
        r.dirty.harvested
    );
    // ...while no content changed but the guest's own counters.
    let ts = inside(trials(&recs, r.pid), span);
    assert!(ts.len() >= 10, "{ts:?}");
    let held = ts.iter().filter(|t| holds(t, 0.0)).count();
    assert!(
        held as f64 >= 0.85 * ts.len() as f64,
        "{held} of {}: {ts:?}",
        ts.len()
    );
    let changed: f64 = ts.iter().map(|t| t.share.0 * t.pages).sum::<f64>() / ts.len() as f64;
    assert!(
        changed < 50.0,
        "on average {changed:.0} pages changed per window: {ts:?}"
    );
    // The VM's slots show dirty logging on.
    let logging = of(&recs, "dirty_rate")
        .iter()
        .any(|x| u(&x["pid"]) as u32 == r.pid && x["slot"].is_null() && x["logging"] == true);
    assert!(logging, "dirty logging not seen");
}

#[test]
fn memslots_that_trade_places_are_dropped_not_kept_stale() {
    if !ready() {
        return;
    }
    let (reports, recs, stderr, span) = run(
        &[vec![
            "--memory",
            "256",
            "--slots",
            "2",
            "--seconds",
            "8",
            "--swap-slots-at",
            "3",
            "--dirty-log",
            "ring",
            "--halt-hz",
            "500",
            "--dirty-pages",
            "4000",
            "--sweep",
            "4",
        ]],
        &[
            "dirty-rate",
            "--sample-pages",
            "8192",
            "--max-read-rate",
            "1024",
        ],
    );
    let r = &reports[0];
    let swap = r.swapped.as_ref().expect("the slots were swapped");
    let swap_ns = span.0 + (swap.at_seconds * 1e9) as u64;
    let gfn_of = |slots: &[kvm_watcher::vm::report::MemslotReport], id: u64| {
        slots
            .iter()
            .find(|s| s.slot as u64 == id)
            .map(|s| s.base_gfn)
    };
    let mut after = 0;
    for x in of(&recs, "dirty_rate")
        .iter()
        .filter(|x| u(&x["pid"]) as u32 == r.pid && !x["slot"].is_null())
    {
        let (id, gfn, t) = (u(&x["slot"]), u(&x["base_gfn"]), u(&x["time_ns"]));
        let before = gfn_of(&r.memslots, id);
        let now = gfn_of(&swap.memslots, id);
        // A row shows the slots of windows that began at most 1 s before it
        // and lasted: those before the swap, then (once a window begun after
        // it has ended) those after it.
        if t < swap_ns {
            assert_eq!(Some(gfn), before, "slot {id} before the swap: {x}");
        } else if t > swap_ns + 2_200_000_000 && t + 200_000_000 < span.1 {
            assert_eq!(Some(gfn), now, "slot {id} after the swap: {x}");
            after += 1;
        }
    }
    assert!(after >= 2, "no row after the swap");
    assert!(
        stderr.contains("memslots changed during a window"),
        "the swap was not noted: {stderr}"
    );
}

#[test]
fn serve_exports_the_rate_with_its_interval_and_the_working_set() {
    if !ready() {
        return;
    }
    use common::exporter::{Exporter, metrics, sum_of};
    let vm = common::spawn_vm(&sweeper("8", "4", &[]));
    // And one that writes what its pages hold, under dirty logging: the
    // dirty monitor's writes are its logged rate, its sampled rate is nil.
    let same = common::spawn_vm(&sweeper("8", "8", SAME_CONTENT));
    let pid = vm.ready.pid.to_string();
    let same_pid = same.ready.pid.to_string();
    let e = Exporter::start(
        1024,
        &[
            "--dirty-rate",
            "--metrics.pid-labels",
            "-p",
            &pid,
            "-p",
            &same_pid,
            "--sample-pages",
            "4096",
            "--max-read-rate",
            "1024",
        ],
    );
    vm.start();
    same.start();
    // One scrape a second, from the third second on: each shows the latest 1 s window.
    std::thread::sleep(Duration::from_secs(2));
    let mut scrapes = Vec::new();
    for _ in 0..5 {
        scrapes.push(metrics(&e));
        std::thread::sleep(Duration::from_millis(1000));
    }
    let report = vm.finish(T);
    let same_report = same.finish(T);
    let truth = rate_of(&report) * 4096.0;
    let written = rate_of(&same_report) * 4096.0;
    let logging = [
        format!("pid=\"{same_pid}\""),
        "method=\"logging\"".to_string(),
    ];
    let sampled = [
        format!("pid=\"{same_pid}\""),
        "method=\"sampling\"".to_string(),
    ];
    let (mut logged, mut lows) = (Vec::new(), Vec::new());
    for text in &scrapes {
        let rate = sum_of(text, "kvm_watcher_vm_dirty_rate_bytes_per_second", &logging)
            .unwrap_or_else(|| panic!("no logged rate of pid {same_pid}:\n{text}"));
        logged.push(rate);
        let low = sum_of(
            text,
            "kvm_watcher_vm_dirty_rate_low_bytes_per_second",
            &sampled,
        )
        .unwrap_or_else(|| panic!("no sampled rate of pid {same_pid}:\n{text}"));
        lows.push(low);
    }
    // Nothing changes but the guest's own counters: a window that drew one
    // of them has its interval above 0 (about one in twenty), the others not.
    let unchanged = lows.iter().filter(|l| **l <= SYSTEM_PAGES * 4096.0).count();
    assert!(
        unchanged >= 3,
        "same content, sampled lower bounds {lows:?} B/s"
    );
    let mean = logged.iter().sum::<f64>() / logged.len() as f64;
    eprintln!("same content: written {written:.0} B/s, logged {logged:?}");
    assert!(
        (mean - written).abs() < 0.25 * written,
        "logged {mean:.0} B/s on average, the guest wrote {written:.0} B/s: {logged:?}"
    );
    assert!(
        sum_of(
            &scrapes[0],
            "kvm_watcher_vm_dirty_rate_bytes_per_second",
            &[format!("pid=\"{pid}\""), "method=\"logging\"".to_string()]
        )
        .is_none(),
        "a VM without dirty logging has no logged rate"
    );
    let labels = |extra: &str| vec![format!("pid=\"{pid}\""), extra.to_string()];
    let sampling = labels("method=\"sampling\"");
    let mut held = 0;
    let mut seen = Vec::new();
    for text in &scrapes {
        let get = |family: &str| sum_of(text, family, &sampling);
        let (Some(est), Some(low), Some(high)) = (
            get("kvm_watcher_vm_dirty_rate_bytes_per_second"),
            get("kvm_watcher_vm_dirty_rate_low_bytes_per_second"),
            get("kvm_watcher_vm_dirty_rate_high_bytes_per_second"),
        ) else {
            panic!("no dirty rate of pid {pid}:\n{text}");
        };
        assert!(low <= est && est <= high, "{low} {est} {high}");
        held += usize::from(low <= truth + SYSTEM_PAGES * 4096.0 && truth <= high);
        seen.push((low, est, high));
        let ws = sum_of(
            text,
            "kvm_watcher_vm_writable_working_set_ratio",
            &labels("window=\"1\""),
        )
        .unwrap_or_else(|| panic!("no 1 s working set:\n{text}"));
        let memory = sum_of(
            text,
            "kvm_watcher_vm_sampled_memory_bytes",
            &[format!("pid=\"{pid}\"")],
        )
        .unwrap_or_else(|| panic!("no sampled memory:\n{text}"));
        // Changed within 1 s: the rate's bytes over the memory's.
        let expected = truth / memory;
        assert!(
            (ws - expected).abs() < 0.5 * expected,
            "1 s working set {ws}, expected about {expected}"
        );
        assert!(
            text.contains("kvm_watcher_dirty_rate_read_bytes_total "),
            "{text}"
        );
    }
    eprintln!("truth {truth:.0} B/s; scrapes (low, estimate, high): {seen:?}");
    assert!(
        held >= 3,
        "{held} of 5 scrapes hold the truth {truth:.0} B/s: {seen:?}"
    );
}

#[test]
fn top_shows_the_rate_of_changed_memory() {
    if !ready() || !common::tmux::have_tmux() {
        return;
    }
    use common::screen::{next_refresh, table, vm_rows};
    let name = format!("dr-top-{}", std::process::id());
    let vm = common::spawn_vm(&sweeper("9", "4", &["--name", &name]));
    let script = format!(
        "{} top --dirty-rate -p {} -i 1 --sample-pages 4096 --max-read-rate 1024",
        common::bin(),
        vm.ready.pid
    );
    let t = common::tmux::Tmux::start(220, 30, &script);
    let mut screen = t.wait_for("the VM's row", |s| s.contains(&name));
    vm.start();
    std::thread::sleep(Duration::from_secs(2));
    let mut shown = Vec::new();
    for _ in 0..5 {
        screen = next_refresh(&t, &screen);
        let (heading, rows) = table(&screen);
        assert!(heading.iter().any(|h| h == "CHANGED"), "{screen}");
        if let Some((v, _)) = vm_rows(&rows, &name)
            && !v.get("CHANGED").is_empty()
        {
            shown.push(v.num("CHANGED"));
        }
    }
    let report = vm.finish(T);
    let truth = rate_of(&report) * 4096.0 / 1048576.0;
    assert!(shown.len() >= 4, "{shown:?}\n{screen}");
    let mean = shown.iter().sum::<f64>() / shown.len() as f64;
    eprintln!("top: {shown:?} MiB/s, the guest changed {truth:.2} MiB/s");
    assert!(
        (mean - truth).abs() < 0.3 * truth,
        "top showed {shown:?} MiB/s, the guest changed {truth:.2} MiB/s"
    );
}
