//! wakeup's interval step: per-thread differences of the kernel's
//! cumulative aggregates, and their lines in the summary. No kernel needed.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::bpf::types;
use crate::monitors::histogram::histogram_lines;
use crate::monitors::interval::fields_of;
use crate::monitors::ledger::{Change, Counters, since, since_each};
use crate::monitors::{Cell, Column, Figures, Part, Unit, VmRule, per_second, percent_of};

/// Number of log2 buckets of the in-kernel halt-duration histogram
/// (`HALT_HIST_SLOTS` in the shared header): bucket 0 counts halts under
/// 2 us, bucket i > 0 halts of [2^i, 2^(i+1)) us.
pub const HIST_SLOTS: usize = types::limits::HALT_HIST_SLOTS.0 as usize;

/// One thread's wake-up aggregates, cumulative since start or for one interval.
#[derive(Clone, Debug, Default)]
pub struct WakeupTotals {
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
    /// Halt durations: bucket 0 counts halts under 2 us, bucket i > 0 [2^i, 2^(i+1)) us.
    pub hist: Vec<u64>,
}

impl WakeupTotals {
    /// Wake-ups caught by halt polling.
    pub fn polled(&self) -> u64 {
        self.wakeups - self.waited
    }
}

/// A halt is charged to the intervals it spans: its time so far at each
/// reading, never more than the time between the readings (the ledger's
/// `hold_back`).
impl Counters for WakeupTotals {
    fn delta(&self, prev: &WakeupTotals) -> WakeupTotals {
        WakeupTotals {
            wakeups: since(self.wakeups, prev.wakeups),
            waited: since(self.waited, prev.waited),
            invalid: since(self.invalid, prev.invalid),
            halt_ns: since(self.halt_ns, prev.halt_ns),
            halted_ns: since(self.halted_ns, prev.halted_ns),
            hist: since_each(&self.hist, &prev.hist),
        }
    }

    fn zero(&self, _last_read_ns: u64) -> WakeupTotals {
        WakeupTotals::default()
    }

    /// A halt's end may add a little less than its time so far was charged.
    fn carry(&mut self, prev: &WakeupTotals) {
        self.halted_ns = self.halted_ns.max(prev.halted_ns);
    }

    /// A halt that ended between the reading's instant and the read adds
    /// time past the instant: the next interval's.
    fn hold_back(&mut self, delta: &mut WakeupTotals, span_ns: u64) {
        let excess = delta.halted_ns.saturating_sub(span_ns);
        delta.halted_ns -= excess;
        self.halted_ns -= excess;
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

/// The interval's part: the figures of threads woken or halted in it.
pub fn part(changes: Vec<Change<WakeupTotals>>) -> Part {
    let active = changes
        .into_iter()
        .filter(|c| c.delta.wakeups > 0 || c.delta.halted_ns > 0);
    Part::of(active.map(|c| (c.who, c.delta)))
}

#[cfg(test)]
mod tests;
