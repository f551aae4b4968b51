use super::*;
use crate::monitors::ledger::{Ledger, interval};

/// A session's use of the ledger: readings in, the changed threads out.
#[derive(Default)]
struct HaltPollTracker {
    ledger: Ledger<HaltPollTotals>,
    /// Threads that have exited.
    gone: Vec<u32>,
}

impl HaltPollTracker {
    fn tick(&mut self, now: Vec<HaltPollTotals>) -> Vec<HaltPollTotals> {
        let rows = now.into_iter().map(|t| (t.thread(), t)).collect();
        interval(&mut self.ledger, 0, rows, &self.gone)
            .into_iter()
            .filter(|c| c.delta.grows + c.delta.shrinks > 0)
            .map(|c| c.delta)
            .collect()
    }

    fn remembered(&self) -> usize {
        self.ledger.len()
    }
}

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
    tracker.tick(vec![at(2, 1, 1, 0), live.clone()]);
    assert_eq!(tracker.remembered(), 2);
    tracker.gone.push(2);
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
    let change = |delta: HaltPollTotals, total: HaltPollTotals| Change {
        who: total.thread(),
        delta,
        total,
    };
    let part = part(vec![
        change(at(2, 2, 0, 8000), at(2, 5, 4, 8000)),
        change(at(3, 0, 0, 2000), at(3, 0, 0, 2000)),
    ]);
    let (changed, windows) = (part.vcpus, part.annotations);
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
