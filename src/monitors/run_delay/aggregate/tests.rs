//! run-delay's interval step from recorded readings.

use super::*;
use crate::monitors::ledger::{Ledger, Reading};
use std::time::Instant;

/// A session's use of the ledger: readings at the end of `tick` in, the
/// interval's figures out.
#[derive(Default)]
struct RunDelayTracker {
    ledger: Ledger<Waits>,
}

impl RunDelayTracker {
    fn tick(
        &mut self,
        totals: Vec<RunDelayTotals>,
        culprits: &[CulpritReading],
        tick: &Tick,
    ) -> Vec<RunDelayInterval> {
        let rows = Waits::join(totals, culprits.to_vec())
            .into_iter()
            .map(|w| Reading {
                who: w.totals.thread(),
                counters: w,
                exited: false,
            })
            .collect();
        intervals(
            self.ledger.step(Instant::now(), tick.now_ns, rows).changes,
            tick,
        )
    }
}

const MS: u64 = 1_000_000;

fn totals(tid: u32, waits: u64, delay_ms: u64) -> RunDelayTotals {
    let mut hist = vec![0; 40];
    hist[10] = waits; // 1-2 ms each
    RunDelayTotals {
        pid: 100,
        tid,
        comm: format!("CPU {tid}/KVM"),
        vcpu_id: Some(tid - 10),
        switch_ins: waits + 1,
        waits,
        delay_ns: delay_ms * MS,
        cause_waits: [waits, 0],
        cause_ns: [delay_ms * MS, 0],
        hist,
        ..Default::default()
    }
}

fn tick(ended: u32) -> Tick {
    Tick {
        ended,
        now_ns: ended as u64 * 1000 * MS,
        interval_ns: 1000 * MS,
    }
}

fn culprit(waiter: u32, tid: u32, pid: u32, comm: &str, ms: u64) -> CulpritReading {
    CulpritReading {
        waiter,
        tid,
        pid,
        comm: comm.into(),
        ns: ms * MS,
    }
}

#[test]
fn intervals_are_differences_split_by_cause_with_the_longest_wait() {
    let mut tr = RunDelayTracker::default();
    let mut first = totals(11, 4, 6);
    first.epoch = [1, 0];
    first.max_ns = [3 * MS, 0];
    let rows = tr.tick(vec![first], &[], &tick(1));
    assert_eq!(
        (rows[0].waits, rows[0].delay_ns, rows[0].max_ns),
        (4, 6 * MS, Some(3 * MS))
    );

    let mut second = totals(11, 10, 20);
    second.cause_waits = [7, 3];
    second.cause_ns = [9 * MS, 11 * MS];
    second.epoch = [1, 2];
    second.max_ns = [3 * MS, 5 * MS];
    second.hist[10] = 10;
    let rows = tr.tick(vec![second], &[], &tick(2));
    let r = &rows[0];
    assert_eq!((r.waits, r.delay_ns), (6, 14 * MS));
    assert_eq!(r.woken, (3, 3 * MS), "7 - 4 woken waits, 9 - 6 ms");
    assert_eq!(r.preempted, (3, 11 * MS));
    assert_eq!(r.max_ns, Some(5 * MS), "only this interval's slot");
    assert_eq!(r.hist[10], 6);
    assert_eq!(r.switch_ins, 6);
}

#[test]
fn threads_without_switch_ins_have_no_row_and_a_reused_tid_starts_over() {
    let mut tr = RunDelayTracker::default();
    tr.tick(vec![totals(11, 4, 6)], &[], &tick(1));
    assert!(tr.tick(vec![totals(11, 4, 6)], &[], &tick(2)).is_empty());
    let other_vm = RunDelayTotals {
        pid: 200,
        ..totals(11, 2, 1)
    };
    let rows = tr.tick(vec![other_vm], &[], &tick(3));
    assert_eq!((rows[0].waits, rows[0].thread.pid), (2, 200));
}

#[test]
fn culprits_are_the_intervals_time_ranked_with_their_share_and_vcpus_named() {
    let mut tr = RunDelayTracker::default();
    // vCPU 11 waits 10 ms: a hog ran 6 ms, vCPU 12 (tid 12) 3 ms, a kworker 1 ms.
    let first = [
        culprit(11, 900, 900, "hog", 6),
        culprit(11, 12, 100, "CPU 2/KVM", 3),
        culprit(11, 50, 50, "kworker/0:1", 1),
    ];
    let rows = tr.tick(vec![totals(11, 5, 10), totals(12, 1, 1)], &first, &tick(1));
    let c = &rows[0].culprits;
    assert_eq!(c.iter().map(|c| c.tid).collect::<Vec<_>>(), [900, 12, 50]);
    assert!((c[0].share - 0.6).abs() < 1e-9);
    assert_eq!(c[1].vcpu_id, Some(2), "a vCPU thread is named as one");
    assert_eq!(c[0].vcpu_id, None);

    // Next interval: only the hog ran more (4 ms of 4 ms waited).
    let second = [
        culprit(11, 900, 900, "hog", 10),
        culprit(11, 12, 100, "CPU 2/KVM", 3),
        culprit(11, 50, 50, "kworker/0:1", 1),
    ];
    let rows = tr.tick(vec![totals(11, 7, 14), totals(12, 1, 1)], &second, &tick(2));
    assert_eq!(rows[0].culprits.len(), 1);
    assert_eq!(rows[0].culprits[0].ns, 4 * MS);
    assert!((rows[0].culprits[0].share - 1.0).abs() < 1e-9);
}

#[test]
fn at_most_the_top_culprits_are_kept() {
    let mut tr = RunDelayTracker::default();
    let many: Vec<CulpritReading> = (0..8)
        .map(|i| culprit(11, 1000 + i, 1000 + i, "t", 1 + i as u64))
        .collect();
    let rows = tr.tick(vec![totals(11, 8, 36)], &many, &tick(1));
    assert_eq!(rows[0].culprits.len(), TOP_CULPRITS);
    assert_eq!(rows[0].culprits[0].tid, 1007, "the largest first");
}

#[test]
fn fields_follow_the_documented_order_and_lines_name_the_culprits() {
    let mut tr = RunDelayTracker::default();
    let mut rows = tr.tick(
        vec![totals(11, 4, 8)],
        &[culprit(11, 900, 900, "hog\x1b[2J", 6)],
        &tick(1),
    );
    rows[0].culprits[0].vm = None;
    let f = rows[0].fields();
    assert_eq!(f.keys().map(String::as_str).collect::<Vec<_>>(), FIELDS);
    assert_eq!(f["run_delay_culprits"][0]["pid"], 900);
    let lines = rows[0].lines(1000 * MS);
    assert_eq!(
        lines[0],
        "    run delay: 8.000 ms (0.8% of the interval) in 4 waits, mean 2.000 ms, max 0.000 ms; woken 4 (8.000 ms), preempted 0 (0.000 ms)"
    );
    let last = lines.last().unwrap();
    assert_eq!(
        last, "    ran instead: hog\\u{1b}[2J (pid 900) 75%",
        "names are escaped"
    );
}

#[test]
fn top_shows_the_share_waited_the_longest_wait_and_the_main_culprit() {
    let mut tr = RunDelayTracker::default();
    let first = [
        culprit(11, 900, 900, "hog", 6),
        culprit(11, 50, 50, "kworker/0:1", 1),
    ];
    let rows = tr.tick(vec![totals(11, 5, 10)], &first, &tick(1));
    // 10 ms waited in a 200 ms interval.
    let cells = rows[0].top_cells(200 * MS);
    assert_eq!(cells.len(), COLUMNS.len());
    assert_eq!(cells[0], Cell::Value(5.0));
    assert_eq!(cells[2], Cell::Text("hog".into()));
    // No culprit and no maximum: blank, not zero.
    let mut quiet = rows[0].clone();
    quiet.culprits.clear();
    quiet.max_ns = None;
    let cells = quiet.top_cells(200 * MS);
    assert_eq!((&cells[1], &cells[2]), (&Cell::Blank, &Cell::Blank));
    // Another VM's vCPU is named with its VM.
    let mut other = rows[0].clone();
    other.culprits[0].vm = Some("db".into());
    other.culprits[0].vcpu_id = Some(0);
    other.culprits[0].comm = "CPU 0/KVM".into();
    assert_eq!(other.top_cells(200 * MS)[2], Cell::Text("db vCPU 0".into()));
    other.culprits[0].vm = None;
    assert_eq!(
        other.top_cells(200 * MS)[2],
        Cell::Text("vCPU 0 pid 900".into())
    );
}
