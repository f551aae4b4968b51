//! wakeup's interval step: per-thread differences of the kernel's
//! cumulative aggregates, and their lines in the summary. No kernel needed.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::bpf::types;
use crate::monitors::histogram::histogram_lines;
use crate::monitors::interval::fields_of;
use crate::monitors::{
    Cell, Column, Figures, Thread, Unit, VcpuFigures, VmRule, per_second, percent_of,
};

/// Number of log2 buckets of the in-kernel halt-duration histogram
/// (`HALT_HIST_SLOTS` in the shared header): bucket 0 counts halts under
/// 2 us, bucket i > 0 halts of [2^i, 2^(i+1)) us.
pub const HIST_SLOTS: usize = types::limits::HALT_HIST_SLOTS.0 as usize;

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
    /// Sum of the durations of the halts that ended, ns.
    pub halt_ns: u64,
    /// Time halted: `halt_ns` plus the halt in progress so far, ns.
    /// Cumulative, it never goes back (but by a few microseconds of polling
    /// before a halt's sleep, which its end adds); for an interval, the time
    /// halted within it, at most its length.
    pub halted_ns: u64,
    /// CLOCK_MONOTONIC of the reading.
    #[serde(skip)]
    pub read_at: u64,
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
            halted_ns: self
                .halted_ns
                .saturating_sub(prev.halted_ns)
                .min(self.read_at.saturating_sub(prev.read_at)),
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

/// Turns cumulative totals into per-interval figures.
#[derive(Default)]
pub struct WakeupTracker {
    seen: std::collections::HashMap<u32, WakeupTotals>,
    /// When the last reading was taken (0: none yet).
    last_read: u64,
}

impl WakeupTracker {
    /// The interval's figures per thread (threads neither woken nor halted
    /// left out). A halt is charged to the intervals it spans: its time so
    /// far at each reading, never more than the interval.
    pub fn tick(&mut self, now: Vec<WakeupTotals>) -> Vec<WakeupTotals> {
        let mut out = Vec::new();
        let present: std::collections::HashSet<u32> = now.iter().map(|t| t.tid).collect();
        let since = self.last_read;
        for t in now {
            self.last_read = self.last_read.max(t.read_at);
            let delta = match self.seen.get(&t.tid) {
                Some(prev) if prev.pid == t.pid => t.minus(prev),
                // New since the last reading: what it has is of this interval.
                _ => WakeupTotals {
                    halted_ns: match since {
                        0 => t.halted_ns,
                        _ => t.halted_ns.min(t.read_at.saturating_sub(since)),
                    },
                    ..t.clone()
                },
            };
            self.seen.insert(t.tid, t);
            if delta.wakeups > 0 || delta.halted_ns > 0 {
                out.push(delta);
            }
        }
        // Threads that left the kernel's table and exited: forget them,
        // or a long watch of VMs that come and go grows without end.
        self.seen
            .retain(|tid, t| present.contains(tid) || crate::monitors::threads::alive(t.pid, *tid));
        out
    }

    /// Threads remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.len()
    }
}

impl WakeupTotals {
    /// The thread these figures are of.
    pub fn thread(&self) -> Thread {
        Thread {
            pid: self.pid,
            tid: self.tid,
            comm: self.comm.clone(),
            vcpu_id: self.vcpu_id,
        }
    }
}

/// wakeup's fields of a vCPU's interval record (`vcpu_interval`).
#[derive(Serialize)]
struct Fields<'a> {
    wakeups: u64,
    polled: u64,
    waited: u64,
    invalid: u64,
    halt_ns: u64,
    halted_ns: u64,
    halt_hist: &'a [u64],
}

/// The names of [`Fields`], in order.
pub const FIELDS: &[&str] = &[
    "wakeups",
    "polled",
    "waited",
    "invalid",
    "halt_ns",
    "halted_ns",
    "halt_hist",
];

/// wakeup's columns in `top`.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "WAKE/s",
        width: 7,
        help: "wake-ups per second (a VM's: its vCPUs' added up)",
        unit: Unit::PerSecond,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "HALT%",
        width: 6,
        help: "time halted in the interval, a halt in progress included (a VM's: its vCPUs' mean)",
        unit: Unit::Percent,
        vm: VmRule::Mean,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "POLL%",
        width: 6,
        help: "wake-ups caught by halt polling, of all wake-ups",
        unit: Unit::Percent,
        vm: VmRule::Sum,
        idle: Cell::Blank,
    },
];

impl Figures for WakeupTotals {
    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        vec![
            Cell::Value(per_second(self.wakeups, interval_ns)),
            Cell::Value(percent_of(self.halted_ns, interval_ns)),
            Cell::Share {
                part: self.polled() as f64,
                whole: self.wakeups as f64,
            },
        ]
    }

    fn fields(&self) -> Map<String, Value> {
        fields_of(&Fields {
            wakeups: self.wakeups,
            polled: self.polled(),
            waited: self.waited,
            invalid: self.invalid,
            halt_ns: self.halt_ns,
            halted_ns: self.halted_ns,
            halt_hist: &self.hist,
        })
    }

    fn lines(&self, interval_ns: u64) -> Vec<String> {
        let mean = self.halt_ns as f64 / self.wakeups.max(1) as f64 / 1e6;
        let mut lines = vec![format!(
            "    halted {:.1}% of the interval; wake-ups {}: polled {}, slept {}, invalid {}; \
             mean halt {mean:.3} ms",
            percent_of(self.halted_ns, interval_ns),
            self.wakeups,
            self.polled(),
            self.waited,
            self.invalid
        )];
        lines.extend(
            histogram_lines("halt duration (us)", &self.hist)
                .into_iter()
                .map(|l| format!("    {l}")),
        );
        lines
    }
}

/// The interval's figures as parts of the vCPUs' records.
pub fn vcpu_figures(deltas: Vec<WakeupTotals>) -> Vec<VcpuFigures> {
    deltas
        .into_iter()
        .map(|d| VcpuFigures {
            thread: d.thread(),
            figures: Box::new(d),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exited_threads_are_forgotten_live_ones_kept() {
        let mut tracker = WakeupTracker::default();
        let me = std::process::id();
        let at = |pid, tid| WakeupTotals {
            pid,
            tid,
            wakeups: 3,
            hist: vec![3],
            ..Default::default()
        };
        // pid 1 has no thread 2; this test's main thread exists.
        tracker.tick(vec![at(1, 2), at(me, me)]);
        assert_eq!(tracker.remembered(), 2);
        tracker.tick(Vec::new());
        assert_eq!(tracker.remembered(), 1, "the exited thread is forgotten");
        assert!(
            tracker.tick(vec![at(me, me)]).is_empty(),
            "the live one keeps its totals"
        );
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

    #[test]
    fn a_reused_thread_id_in_another_process_starts_from_zero() {
        let mut tracker = WakeupTracker::default();
        let at = |pid, wakeups| WakeupTotals {
            pid,
            tid: 2,
            wakeups,
            hist: vec![wakeups],
            ..Default::default()
        };
        tracker.tick(vec![at(1, 50)]);
        assert_eq!(tracker.tick(vec![at(9, 3)])[0].wakeups, 3);
    }

    #[test]
    fn summary_fields_and_lines_of_an_interval() {
        let mut hist = vec![0; HIST_SLOTS];
        hist[8] = 3;
        let t = WakeupTotals {
            pid: 1,
            tid: 2,
            wakeups: 4,
            waited: 3,
            invalid: 1,
            halt_ns: 1_200_000,
            halted_ns: 250_000_000,
            hist,
            ..Default::default()
        };
        let f = t.fields();
        assert_eq!(f.keys().map(String::as_str).collect::<Vec<_>>(), FIELDS);
        assert_eq!(
            (f["polled"].clone(), f["waited"].clone()),
            (1.into(), 3.into())
        );
        assert_eq!(f["halt_hist"].as_array().map(Vec::len), Some(HIST_SLOTS));
        let lines = t.lines(1_000_000_000);
        assert_eq!(
            lines[0],
            "    halted 25.0% of the interval; wake-ups 4: polled 1, slept 3, invalid 1; \
             mean halt 0.300 ms"
        );
        assert!(lines[1].contains("halt duration (us)"));
        assert!(lines[2].contains("256 -> 511") && lines[2].contains("|****"));
    }

    #[test]
    fn top_cells_are_rates_and_shares_of_the_interval() {
        let t = WakeupTotals {
            wakeups: 400,
            waited: 300,
            halt_ns: 150_000_000,
            halted_ns: 150_000_000,
            ..Default::default()
        };
        let cells = t.top_cells(500_000_000);
        assert_eq!(cells.len(), COLUMNS.len());
        assert_eq!(cells[0], Cell::Value(800.0), "400 in half a second");
        assert_eq!(cells[1], Cell::Value(30.0));
        assert_eq!(cells[2].number(), Some(25.0), "100 of 400 polled");
    }

    #[test]
    fn a_long_halt_is_charged_to_each_interval_it_spans() {
        let mut tracker = WakeupTracker::default();
        // One halt sleeps from 0.2 s to 1.7 s (after 10 us of polling);
        // readings every 0.5 s from 0.5 s.
        let at = |read_at: u64, ended: u64, halted: u64, wakeups| WakeupTotals {
            pid: 1,
            tid: 2,
            wakeups,
            halt_ns: ended,
            halted_ns: halted,
            read_at,
            hist: vec![wakeups],
            ..Default::default()
        };
        let ms = 1_000_000;
        let first = tracker.tick(vec![at(500 * ms, 0, 300 * ms, 0)]);
        assert_eq!(first[0].halted_ns, 300 * ms, "halted since 0.2 s");
        let second = tracker.tick(vec![at(1000 * ms, 0, 800 * ms, 0)]);
        assert_eq!(second[0].halted_ns, 500 * ms, "the whole interval");
        assert_eq!(second[0].wakeups, 0);
        let third = tracker.tick(vec![at(1500 * ms, 0, 1300 * ms, 0)]);
        assert_eq!(third[0].halted_ns, 500 * ms);
        // It ended at 1.7 s: its full duration (polling included) replaces
        // its time so far, and the interval is charged what was left.
        let fourth = tracker.tick(vec![at(2000 * ms, 1510 * ms, 1510 * ms, 1)]);
        assert_eq!(
            (fourth[0].halted_ns, fourth[0].wakeups),
            (210 * ms, 1),
            "1.5 to 1.7 s, and the 10 us of polling"
        );
        assert!(
            tracker
                .tick(vec![at(2500 * ms, 1510 * ms, 1510 * ms, 1)])
                .is_empty(),
            "running: neither woken nor halted"
        );
    }

    #[test]
    fn a_thread_new_since_the_last_reading_is_charged_at_most_the_interval() {
        let mut tracker = WakeupTracker::default();
        let at = |tid, read_at: u64, halted: u64| WakeupTotals {
            pid: 1,
            tid,
            halted_ns: halted,
            read_at,
            ..Default::default()
        };
        tracker.tick(vec![at(2, 1_000, 0)]);
        // Thread 3 appears with more halted time than the interval is long
        // (its halt began before the thread was first read).
        let got = tracker.tick(vec![at(2, 1_500, 0), at(3, 1_500, 4_000)]);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].tid, got[0].halted_ns), (3, 500));
    }
}
