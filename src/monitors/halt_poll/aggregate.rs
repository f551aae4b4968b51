//! halt-poll's interval step: per-thread grows and shrinks between two
//! readings of the kernel's cumulative aggregates, and the window now. No
//! kernel needed.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::monitors::interval::fields_of;
use crate::monitors::{Cell, Column, Figures, Thread, Unit, VcpuFigures, VmRule};

/// One thread's halt-polling aggregates, cumulative or for one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HaltPollTotals {
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// Window grows.
    pub grows: u64,
    /// Window shrinks.
    pub shrinks: u64,
    /// The window after the last change, ns.
    pub window_ns: u64,
}

/// Turns cumulative totals into per-interval figures.
#[derive(Default)]
pub struct HaltPollTracker {
    seen: std::collections::HashMap<u32, HaltPollTotals>,
}

impl HaltPollTracker {
    /// The interval's grows and shrinks per thread, with the current window
    /// (threads without changes in the interval left out).
    pub fn tick(&mut self, now: Vec<HaltPollTotals>) -> Vec<HaltPollTotals> {
        let mut out = Vec::new();
        let present: std::collections::HashSet<u32> = now.iter().map(|t| t.tid).collect();
        for t in now {
            let (g, s) = match self.seen.get(&t.tid) {
                Some(prev) if prev.pid == t.pid => (
                    t.grows.saturating_sub(prev.grows),
                    t.shrinks.saturating_sub(prev.shrinks),
                ),
                _ => (t.grows, t.shrinks),
            };
            if g + s > 0 {
                out.push(HaltPollTotals {
                    grows: g,
                    shrinks: s,
                    ..t.clone()
                });
            }
            self.seen.insert(t.tid, t);
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

impl HaltPollTotals {
    fn thread(&self) -> Thread {
        Thread {
            pid: self.pid,
            tid: self.tid,
            comm: self.comm.clone(),
            vcpu_id: self.vcpu_id,
        }
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

/// The interval's figures: the threads whose window changed, and the window
/// of every thread seen (shown for threads other monitors report).
pub fn vcpu_figures(
    changes: Vec<HaltPollTotals>,
    totals: &[HaltPollTotals],
) -> (Vec<VcpuFigures>, Vec<VcpuFigures>) {
    let figures = |t: &HaltPollTotals, grows, shrinks| VcpuFigures {
        thread: t.thread(),
        figures: Box::new(Changes {
            grows,
            shrinks,
            window_ns: Some(t.window_ns),
        }),
    };
    let changed = changes
        .iter()
        .map(|t| figures(t, t.grows, t.shrinks))
        .collect();
    let windows = totals.iter().map(|t| figures(t, 0, 0)).collect();
    (changed, windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tid: u32, grows: u64, shrinks: u64, window_ns: u64) -> HaltPollTotals {
        HaltPollTotals {
            pid: 1,
            tid,
            grows,
            shrinks,
            window_ns,
            ..Default::default()
        }
    }

    #[test]
    fn exited_threads_are_forgotten_live_ones_kept() {
        let mut tracker = HaltPollTracker::default();
        let me = std::process::id();
        let live = HaltPollTotals {
            pid: me,
            ..at(me, 4, 0, 0)
        };
        // pid 1 has no thread 2; this test's main thread exists.
        tracker.tick(vec![at(2, 1, 1, 0), live.clone()]);
        assert_eq!(tracker.remembered(), 2);
        tracker.tick(Vec::new());
        assert_eq!(tracker.remembered(), 1, "the exited thread is forgotten");
        assert!(
            tracker.tick(vec![live]).is_empty(),
            "the live one keeps its totals"
        );
    }

    #[test]
    fn intervals_count_the_changes_since_the_last_reading() {
        let mut tracker = HaltPollTracker::default();
        let first = tracker.tick(vec![at(2, 3, 1, 4000), at(3, 0, 0, 0)]);
        assert_eq!(first.len(), 1, "a thread without changes has no row");
        assert_eq!((first[0].grows, first[0].shrinks), (3, 1));
        let second = tracker.tick(vec![at(2, 5, 4, 0), at(3, 0, 0, 0)]);
        assert_eq!(
            (second[0].grows, second[0].shrinks, second[0].window_ns),
            (2, 3, 0)
        );
        assert!(tracker.tick(vec![at(2, 5, 4, 0)]).is_empty());
    }

    #[test]
    fn a_reused_thread_id_in_another_process_starts_from_zero() {
        let mut tracker = HaltPollTracker::default();
        tracker.tick(vec![at(2, 10, 10, 0)]);
        let reused = HaltPollTotals {
            pid: 9,
            ..at(2, 1, 0, 500)
        };
        assert_eq!(tracker.tick(vec![reused])[0].grows, 1);
    }

    #[test]
    fn windows_are_shown_for_every_thread_changes_only_for_those_that_changed() {
        let totals = vec![at(2, 5, 4, 8000), at(3, 0, 0, 2000)];
        let changes = vec![at(2, 2, 0, 8000)];
        let (changed, windows) = vcpu_figures(changes, &totals);
        assert_eq!(changed.len(), 1);
        let f = changed[0].figures.fields();
        assert_eq!(f["poll_grows"], 2);
        assert_eq!(f["poll_window_ns"], 8000);
        assert_eq!(windows.len(), 2);
        let w = windows[1].figures.fields();
        assert_eq!(
            (w["poll_grows"].clone(), w["poll_window_ns"].clone()),
            (0.into(), 2000.into())
        );
        assert_eq!(
            f.keys().map(String::as_str).collect::<Vec<_>>(),
            FIELDS,
            "fields in the documented order"
        );
        assert_eq!(
            windows[1].figures.lines(0),
            ["    halt-poll: 0 grow, 0 shrink, window now 2000 ns"]
        );
        assert_eq!(windows[1].figures.top_cells(1), [Cell::Value(2000.0)]);
        assert_eq!(COLUMNS.len(), 1);
    }
}
