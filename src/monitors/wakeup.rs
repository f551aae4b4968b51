//! wakeup: one row per vCPU wake-up (kernel half: src/bpf/wakeup.bpf.c).

use serde::Serialize;

use super::{common_of, vcpu_cell};
use crate::bpf::{read_record, types};
use crate::output::{Clock, Common, Row};

/// One `kvm:kvm_vcpu_wakeup`.
#[derive(Clone, Debug, Serialize)]
pub struct WakeupRow {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// How long the halt lasted (polling plus blocking), ns.
    pub halt_ns: u64,
    /// The thread really slept (false: polling caught the wake-up).
    pub waited: bool,
    /// The wake-up was a real one.
    pub valid: bool,
}

/// Decodes a `struct wakeup_event`.
pub fn decode(bytes: &[u8]) -> Option<WakeupRow> {
    let e: types::wakeup_event = read_record(bytes)?;
    Some(WakeupRow {
        common: common_of(&e.hdr),
        halt_ns: e.halt_ns,
        waited: e.waited != 0,
        valid: e.valid != 0,
    })
}

impl Row for WakeupRow {
    fn monitor(&self) -> &'static str {
        "wakeup"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:<15} {:>13} {:<16} {:>15} {:>7} {:<9} {:<7}",
            "TIME", "DUR_HALT(ms)", "COMM", "PID/TID", "VCPU_ID", "WAIT/POLL", "VALID"
        );
        format!("{base} VM")
    }

    fn row(&self, clock: &Clock) -> String {
        let base = format!(
            "{:<15} {:>13.6} {:<16} {:>15} {:>7} {:<9} {:<7}",
            clock.format(self.common.time_ns),
            self.halt_ns as f64 / 1e6,
            self.common.comm,
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            if self.waited { "wait" } else { "poll" },
            if self.valid { "valid" } else { "invalid" },
        );
        format!("{base} {}", self.common.vm.as_deref().unwrap_or("-"))
    }
}

/// Number of log2 buckets of the in-kernel halt-duration histogram
/// (`HALT_HIST_SLOTS`): bucket 0 counts halts under 2 us, bucket i > 0 halts
/// of [2^i, 2^(i+1)) us.
pub const HIST_SLOTS: usize = 40;

/// One thread's wake-up aggregates, cumulative since start or for one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WakeupTotals {
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// Wake-ups.
    pub wakeups: u64,
    /// Wake-ups after the thread slept.
    pub waited: u64,
    /// Wake-ups without a real cause.
    pub invalid: u64,
    /// Sum of halt durations, ns.
    pub halt_ns: u64,
    /// Halt durations: bucket 0 counts halts under 2 us, bucket i > 0 [2^i, 2^(i+1)) us.
    pub hist: Vec<u64>,
}

impl WakeupTotals {
    /// Wake-ups caught by halt polling.
    pub fn polled(&self) -> u64 {
        self.wakeups - self.waited
    }

    fn minus(&self, prev: &WakeupTotals) -> WakeupTotals {
        WakeupTotals {
            wakeups: self.wakeups.saturating_sub(prev.wakeups),
            waited: self.waited.saturating_sub(prev.waited),
            invalid: self.invalid.saturating_sub(prev.invalid),
            halt_ns: self.halt_ns.saturating_sub(prev.halt_ns),
            hist: self
                .hist
                .iter()
                .zip(prev.hist.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            ..self.clone()
        }
    }
}

/// Reads the kernel's cumulative per-thread wake-up aggregates (`wakeup_stats`).
pub fn read_totals(map: &libbpf_rs::MapHandle) -> anyhow::Result<Vec<WakeupTotals>> {
    use libbpf_rs::{MapCore, MapFlags};
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(s) = read_record::<types::wakeup_stats>(&v) else {
            continue;
        };
        out.push(WakeupTotals {
            pid: s.pid,
            tid,
            comm: crate::bpf::comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            wakeups: s.wakeups,
            waited: s.waited,
            invalid: s.invalid,
            halt_ns: s.halt_ns,
            hist: s.hist.to_vec(),
        });
    }
    Ok(out)
}

/// Turns cumulative totals into per-interval figures.
#[derive(Default)]
pub struct WakeupTracker {
    seen: std::collections::HashMap<u32, WakeupTotals>,
}

impl WakeupTracker {
    /// The interval's figures per thread (threads without wake-ups left out).
    pub fn tick(&mut self, now: Vec<WakeupTotals>) -> Vec<WakeupTotals> {
        let mut out = Vec::new();
        for t in now {
            let delta = match self.seen.get(&t.tid) {
                Some(prev) if prev.pid == t.pid => t.minus(prev),
                _ => t.clone(),
            };
            self.seen.insert(t.tid, t);
            if delta.wakeups > 0 {
                out.push(delta);
            }
        }
        out
    }
}

/// A bcc-style bar histogram of halt durations, in microseconds.
pub fn histogram_lines(hist: &[u64]) -> Vec<String> {
    let Some(first) = hist.iter().position(|&c| c > 0) else {
        return Vec::new();
    };
    let last = hist.iter().rposition(|&c| c > 0).unwrap_or(first);
    let max = hist.iter().copied().max().unwrap_or(1).max(1);
    let mut lines = vec![format!(
        "{:>26} : {:<8} {}",
        "halt duration (us)", "count", "distribution"
    )];
    for (i, &count) in hist.iter().enumerate().take(last + 1).skip(first) {
        let lo: u64 = if i == 0 { 0 } else { 1 << i };
        let hi: u64 = (1u64 << (i + 1)) - 1;
        let bar = "*".repeat(((count * 40).div_ceil(max)) as usize);
        lines.push(format!("{lo:>12} -> {hi:<10} : {count:<8} |{bar:<40}|"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_shows_the_occupied_range_with_scaled_bars() {
        let mut hist = vec![0; HIST_SLOTS];
        hist[0] = 1; // under 2 us
        hist[8] = 40; // 256..511 us
        let lines = histogram_lines(&hist);
        assert!(lines[0].contains("halt duration (us)"));
        assert_eq!(lines.len(), 1 + 9, "buckets 0..=8, the empty ones included");
        assert!(lines[1].contains("0 -> 1") && lines[1].contains("|*  "));
        assert!(lines[9].contains("256 -> 511") && lines[9].contains(&"*".repeat(40)));
        assert!(histogram_lines(&[0; HIST_SLOTS]).is_empty());
    }

    #[test]
    fn intervals_are_differences_of_cumulative_totals() {
        let mut tracker = WakeupTracker::default();
        let at = |wakeups, waited| WakeupTotals {
            pid: 1,
            tid: 2,
            wakeups,
            waited,
            hist: vec![wakeups],
            ..Default::default()
        };
        assert_eq!(tracker.tick(vec![at(5, 3)])[0].wakeups, 5);
        let second = tracker.tick(vec![at(12, 4)]);
        assert_eq!(
            (second[0].wakeups, second[0].waited, second[0].hist[0]),
            (7, 1, 7)
        );
        assert!(
            tracker.tick(vec![at(12, 4)]).is_empty(),
            "no wake-ups, no row"
        );
    }
}
