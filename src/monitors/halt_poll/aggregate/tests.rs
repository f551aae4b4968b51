use super::*;
use crate::monitors::ledger::{Ledger, interval, thread};

/// A session's use of the ledger: readings by thread id in, the changed
/// threads out. (What the ledger does with exits and reused ids is tested
/// with it.)
#[derive(Default)]
struct HaltPollTracker {
    ledger: Ledger<HaltPollTotals>,
}

impl HaltPollTracker {
    fn tick(&mut self, now: Vec<(u32, HaltPollTotals)>) -> Vec<HaltPollTotals> {
        let rows = now.into_iter().map(|(tid, t)| (thread(tid), t)).collect();
        interval(&mut self.ledger, 0, rows, &[])
            .into_iter()
            .filter(|c| c.delta.grows + c.delta.shrinks > 0)
            .map(|c| c.delta)
            .collect()
    }
}

fn at(tid: u32, grows: u64, shrinks: u64, window_ns: u64) -> (u32, HaltPollTotals) {
    let t = HaltPollTotals {
        grows,
        shrinks,
        window_ns,
    };
    (tid, t)
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
fn windows_are_shown_for_every_thread_changes_only_for_those_that_changed() {
    let change = |(tid, delta), (_, total)| Change {
        who: thread(tid),
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
