use super::*;
use crate::monitors::ledger::{Ledger, interval, thread};

/// A session's use of the ledger: readings by thread id, taken at `at`
/// (CLOCK_MONOTONIC; 0: not known), in; the interval's figures out. (What
/// the ledger does with exits and reused thread ids is tested with it.)
#[derive(Default)]
struct WakeupTracker {
    ledger: Ledger<WakeupTotals>,
}

impl WakeupTracker {
    fn tick(&mut self, at: u64, now: Vec<(u32, WakeupTotals)>) -> Vec<WakeupTotals> {
        let rows = now.into_iter().map(|(tid, t)| (thread(tid), t)).collect();
        interval(&mut self.ledger, at, rows, &[])
            .into_iter()
            .filter(|c| c.delta.wakeups > 0 || c.delta.halted_ns > 0)
            .map(|c| c.delta)
            .collect()
    }
}

#[test]
fn intervals_are_differences_of_cumulative_totals() {
    let mut tracker = WakeupTracker::default();
    let at = |wakeups, waited| WakeupTotals {
        wakeups,
        waited,
        hist: vec![wakeups],
        ..Default::default()
    };
    assert_eq!(tracker.tick(0, vec![(2, at(5, 3))])[0].wakeups, 5);
    let second = tracker.tick(0, vec![(2, at(12, 4))]);
    assert_eq!(
        (second[0].wakeups, second[0].waited, second[0].hist[0]),
        (7, 1, 7)
    );
    assert!(
        tracker.tick(0, vec![(2, at(12, 4))]).is_empty(),
        "no wake-ups, no row"
    );
}

#[test]
fn summary_fields_and_lines_of_an_interval() {
    let mut hist = vec![0; HIST_SLOTS];
    hist[8] = 3;
    let t = WakeupTotals {
        wakeups: 4,
        waited: 3,
        invalid: 1,
        halt_ns: 1_200_000,
        halted_ns: 250_000_000,
        hist,
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
    let at = |ended: u64, halted: u64, wakeups| WakeupTotals {
        wakeups,
        halt_ns: ended,
        halted_ns: halted,
        hist: vec![wakeups],
        ..Default::default()
    };
    let ms = 1_000_000;
    let first = tracker.tick(500 * ms, vec![(2, at(0, 300 * ms, 0))]);
    assert_eq!(first[0].halted_ns, 300 * ms, "halted since 0.2 s");
    let second = tracker.tick(1000 * ms, vec![(2, at(0, 800 * ms, 0))]);
    assert_eq!(second[0].halted_ns, 500 * ms, "the whole interval");
    assert_eq!(second[0].wakeups, 0);
    let third = tracker.tick(1500 * ms, vec![(2, at(0, 1300 * ms, 0))]);
    assert_eq!(third[0].halted_ns, 500 * ms);
    // It ended at 1.7 s: its full duration (polling included) replaces
    // its time so far, and the interval is charged what was left.
    let fourth = tracker.tick(2000 * ms, vec![(2, at(1510 * ms, 1510 * ms, 1))]);
    assert_eq!(
        (fourth[0].halted_ns, fourth[0].wakeups),
        (210 * ms, 1),
        "1.5 to 1.7 s, and the 10 us of polling"
    );
    assert!(
        tracker
            .tick(2500 * ms, vec![(2, at(1510 * ms, 1510 * ms, 1))])
            .is_empty(),
        "running: neither woken nor halted"
    );
}

#[test]
fn a_thread_new_since_the_last_reading_is_charged_at_most_the_interval() {
    let mut tracker = WakeupTracker::default();
    let at = |tid, halted: u64| {
        let t = WakeupTotals {
            halted_ns: halted,
            ..Default::default()
        };
        (tid, t)
    };
    tracker.tick(1_000, vec![at(2, 0)]);
    // Thread 3 appears with more halted time than the interval is long
    // (its halt began before the thread was first read).
    let got = tracker.tick(1_500, vec![at(2, 0), at(3, 4_000)]);
    assert_eq!(got.len(), 1, "thread 2 neither woke nor halted");
    assert_eq!(got[0].halted_ns, 500);
}

#[test]
fn a_halt_that_ended_after_a_reading_s_instant_goes_to_the_next_interval() {
    let mut tracker = WakeupTracker::default();
    let ms = 1_000_000;
    let at = |ended: u64, halted: u64, wakeups| {
        let t = WakeupTotals {
            wakeups,
            halt_ns: ended,
            halted_ns: halted,
            hist: vec![wakeups],
            ..Default::default()
        };
        vec![(2, t)]
    };
    tracker.tick(500 * ms, at(0, 0, 0));
    // Halted from 0.7 s; the interval ending at 2 s is read at 2.05 s,
    // after the halt ended there: 1.05 s of it since the reading at 1 s.
    let first = tracker.tick(1000 * ms, at(0, 300 * ms, 0));
    let second = tracker.tick(2000 * ms, at(1350 * ms, 1350 * ms, 1));
    let third = tracker.tick(3000 * ms, at(1350 * ms, 1350 * ms, 1));
    let halted: Vec<Option<u64>> = [first, second, third]
        .iter()
        .map(|r| r.first().map(|r| r.halted_ns))
        .collect();
    assert_eq!(
        halted,
        [Some(300 * ms), Some(1000 * ms), Some(50 * ms)],
        "all 1.35 s, none past an interval's length"
    );
}
