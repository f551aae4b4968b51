//! dirty-rate's working-set windows as trials of its 95 % interval
//! (tests/dirty_rate.rs, tests/dirty_rate_qemu.rs): each window's interval
//! either holds what the guest changed within it or not.

use std::time::Duration;

use serde_json::Value;

use super::observe::{of, records, u, watcher};

/// The VM rows of `pid` from `dirty-rate -p PID -i 1 -t SECONDS
/// --sample-pages N --max-read-rate MIB [extra]`, run to its end.
pub fn vm_rows(
    pid: u32,
    seconds: u64,
    (sample_pages, max_read_rate): (u64, u64),
    extra: &[&str],
) -> Vec<Value> {
    let args = [
        "dirty-rate".to_string(),
        "-p".into(),
        pid.to_string(),
        "--output".into(),
        "json".into(),
        "-i".into(),
        "1".into(),
        "-t".into(),
        seconds.to_string(),
        "--sample-pages".into(),
        sample_pages.to_string(),
        "--max-read-rate".into(),
        max_read_rate.to_string(),
    ];
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let (status, stdout, stderr) = watcher(&args).wait(Duration::from_secs(seconds + 30));
    assert!(status.success(), "dirty-rate failed: {stderr}");
    of(&records(&stdout), "dirty_rate")
        .into_iter()
        .filter(|r| u(&r["pid"]) as u32 == pid && r["slot"].is_null())
        .collect()
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// One window of one VM: (window asked, seconds measured, share with its
/// bounds, pages, ended at).
#[derive(Debug, Clone)]
pub struct Trial {
    pub window_s: f64,
    pub elapsed_s: f64,
    pub share: (f64, f64, f64),
    pub pages: f64,
    pub ended_ns: u64,
    /// Pages compared.
    pub samples: u64,
}

/// One working-set entry `w` of a VM of `pages` pages as a trial.
pub fn trial(w: &Value, pages: f64) -> Trial {
    Trial {
        window_s: f(&w["window_s"]),
        elapsed_s: f(&w["elapsed_s"]),
        share: (
            f(&w["share"]["estimate"]),
            f(&w["share"]["low"]),
            f(&w["share"]["high"]),
        ),
        pages,
        ended_ns: u(&w["ended_ns"]),
        samples: u(&w["samples"]),
    }
}

/// Every distinct working-set window (0.1, 1 and 10 s) in the VM rows of `pid`.
pub fn trials(recs: &[Value], pid: u32) -> Vec<Trial> {
    let mut out: Vec<Trial> = Vec::new();
    for r in of(recs, "dirty_rate") {
        if u(&r["pid"]) as u32 != pid || !r["slot"].is_null() {
            continue;
        }
        for w in r["working_set"].as_array().unwrap() {
            let t = trial(w, u(&r["pages"]) as f64);
            // A working set stays in the rows until the next one of its window ends.
            if !out
                .iter()
                .any(|o| o.ended_ns == t.ended_ns && o.window_s == t.window_s)
            {
                out.push(t);
            }
        }
    }
    out
}

/// Whether trial `t`'s interval meets the pages it should have seen change.
pub fn meets(t: &Trial, (low, high): (f64, f64)) -> bool {
    t.share.1 * t.pages <= high && t.share.2 * t.pages >= low
}

/// P(X <= k) for X ~ Binomial(n, p).
pub fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    use statrs::distribution::{Binomial, DiscreteCDF};
    Binomial::new(p, n as u64).unwrap().cdf(k as u64)
}

/// Pages of the synthetic guest's system slot that change while it runs:
/// the control block page, the vCPUs' areas page, one stack page per vCPU.
pub const SYSTEM_PAGES: f64 = 3.0;

/// Page writes the guest had made by `at_ns` (CLOCK_MONOTONIC), from its
/// timeline (`vm --timeline`): linear between two notes, none before the
/// first, all after the last.
pub fn written_by(timeline: &[[u64; 2]], at_ns: u64) -> f64 {
    let i = timeline.partition_point(|p| p[0] <= at_ns);
    match (i.checked_sub(1).map(|j| timeline[j]), timeline.get(i)) {
        (None, _) => 0.0,
        (Some(a), None) => a[1] as f64,
        (Some(a), Some(b)) => {
            let f = (at_ns - a[0]) as f64 / (b[0] - a[0]).max(1) as f64;
            a[1] as f64 + f * (b[1] as f64 - a[1] as f64)
        }
    }
}

/// How long before its reported end a window's pages may have been read:
/// they are read one after another, and the end is noted after the count.
pub const READ_SLACK_NS: u64 = 10_000_000;

/// The pages trial `t` should have seen change, lowest and highest: the
/// guest's page writes within its window, at most `cycle` (the pages its
/// sweep goes round: a window longer than the round sees each page once),
/// for any placement of the window that ends within `READ_SLACK_NS` before
/// its reported end, plus the system pages.
pub fn truth(t: &Trial, timeline: &[[u64; 2]], cycle: f64) -> (f64, f64) {
    let len = (t.elapsed_s * 1e9) as u64;
    let within = |end: u64| {
        (written_by(timeline, end) - written_by(timeline, end.saturating_sub(len))).min(cycle)
    };
    let ends = [t.ended_ns.saturating_sub(READ_SLACK_NS), t.ended_ns];
    let (a, b) = (within(ends[0]), within(ends[1]));
    (a.min(b), a.max(b) + SYSTEM_PAGES)
}

/// Whether trial `t`'s count of changed pages is one that sampling could
/// draw from memory where `pages` (lowest, highest) changed, at false-alarm
/// rate `alpha`: neither tail of the binomial beyond it holds less than
/// `alpha / 2`.
pub fn drawn_from(t: &Trial, (low, high): (f64, f64), alpha: f64) -> bool {
    let n = t.samples as usize;
    let k = (t.share.0 * t.samples as f64).round() as usize;
    let p = |pages: f64| (pages / t.pages).clamp(0.0, 1.0);
    let below = binomial_cdf(k, n, p(low));
    let above = if k == 0 {
        1.0
    } else {
        1.0 - binomial_cdf(k - 1, n, p(high))
    };
    below >= alpha / 2.0 && above >= alpha / 2.0
}
