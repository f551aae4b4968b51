//! halt-poll's interval step: per-thread grows and shrinks between two
//! readings of the kernel's cumulative aggregates, and the window now. No
//! kernel needed.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::monitors::interval::fields_of;
use crate::monitors::ledger::{Change, Counters, since};
use crate::monitors::{Cell, Column, Figures, Part, Unit, VcpuFigures, VmRule};

/// One thread's halt-polling aggregates, cumulative or for one interval.
#[derive(Clone, Debug, Default)]
pub struct HaltPollTotals {
    /// Window grows.
    pub grows: u64,
    /// Window shrinks.
    pub shrinks: u64,
    /// The window after the last change, ns.
    pub window_ns: u64,
}

/// Grows and shrinks count up; the window is a setting, taken as read.
impl Counters for HaltPollTotals {
    fn delta(&self, prev: &HaltPollTotals) -> HaltPollTotals {
        HaltPollTotals {
            grows: since(self.grows, prev.grows),
            shrinks: since(self.shrinks, prev.shrinks),
            ..self.clone()
        }
    }

    fn zero(&self, _last_read_ns: u64) -> HaltPollTotals {
        HaltPollTotals::default()
    }
}

/// halt-poll's fields of a vCPU's interval record (`vcpu_interval`).
#[derive(Serialize)]
struct Fields {
    poll_grows: u64,
    poll_shrinks: u64,
    poll_window_ns: Option<u64>,
}

/// The names of [`Fields`], in order.
pub const FIELDS: &[&str] = &["poll_grows", "poll_shrinks", "poll_window_ns"];

/// One thread's changes in an interval and its window now.
struct Changes {
    grows: u64,
    shrinks: u64,
    /// None: no change seen since the start.
    window_ns: Option<u64>,
}

/// A thread whose window was not seen to change.
pub fn quiet() -> Box<dyn Figures> {
    Box::new(Changes {
        grows: 0,
        shrinks: 0,
        window_ns: None,
    })
}

/// halt-poll's column in `top`.
pub static COLUMNS: &[Column] = &[Column {
    title: "WINDOW",
    width: 7,
    help: "halt-polling window after its last change (a VM's: its largest)",
    unit: Unit::Nanoseconds,
    vm: VmRule::Max,
    idle: Cell::Blank,
}];

impl Figures for Changes {
    fn top_cells(&self, _interval_ns: u64) -> Vec<Cell> {
        vec![
            self.window_ns
                .map_or(Cell::Blank, |w| Cell::Value(w as f64)),
        ]
    }

    fn fields(&self) -> Map<String, Value> {
        fields_of(&Fields {
            poll_grows: self.grows,
            poll_shrinks: self.shrinks,
            poll_window_ns: self.window_ns,
        })
    }

    fn lines(&self, _interval_ns: u64) -> Vec<String> {
        let window = match self.window_ns {
            Some(w) => format!("window now {w} ns"),
            None => "no window change seen".to_string(),
        };
        vec![format!(
            "    halt-poll: {} grow, {} shrink, {window}",
            self.grows, self.shrinks
        )]
    }
}

/// The interval's part: the threads whose window changed, and the window
/// of every thread seen (shown for threads other monitors report).
pub fn part(changes: Vec<Change<HaltPollTotals>>) -> Part {
    let figures = |c: &Change<HaltPollTotals>, grows, shrinks| VcpuFigures {
        thread: c.who.clone(),
        figures: Box::new(Changes {
            grows,
            shrinks,
            window_ns: Some(c.total.window_ns),
        }),
    };
    Part {
        vcpus: changes
            .iter()
            .filter(|c| c.delta.grows + c.delta.shrinks > 0)
            .map(|c| figures(c, c.delta.grows, c.delta.shrinks))
            .collect(),
        annotations: changes.iter().map(|c| figures(c, 0, 0)).collect(),
        quiet: Some(quiet),
        ..Part::default()
    }
}

#[cfg(test)]
mod tests;
