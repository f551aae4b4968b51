//! vcpu-load's interval step from recorded readings.

use super::*;
use crate::bpf::types;
use crate::monitors::ledger::Ledger;
use crate::monitors::vcpu_load::read::Reading;
use std::time::{Duration, Instant};

/// A session's use of the ledger: readings at the end of `tick` in, the
/// interval's rows out, and the threads whose last figures they are.
#[derive(Default)]
struct LoadTracker {
    ledger: Ledger<Load>,
}

impl LoadTracker {
    fn tick(&mut self, readings: &[Reading], tick: &Tick) -> (Vec<VcpuLoadRow>, Vec<u32>) {
        let rows = readings
            .iter()
            .map(|r| {
                let (who, counters, exited) = Load::of(r, tick.now_ns);
                crate::monitors::ledger::Reading {
                    who,
                    counters,
                    exited,
                }
            })
            .collect();
        let step = self.ledger.step(Instant::now(), tick.now_ns, rows);
        self.ledger.expire(Instant::now(), Duration::ZERO);
        let exited = step.ended.iter().map(|t| t.tid).collect();
        (rows_of(step.changes, tick), exited)
    }
}

const MS: u64 = 1_000_000;

fn rows_of(changes: Vec<Change<Load>>, tick: &Tick) -> Vec<VcpuLoadRow> {
    rows(changes, tick)
}

fn thread(count: u64, total_ns: u64) -> types::vcpu_thread {
    types::vcpu_thread {
        pid: 10,
        vcpu_id: 3,
        count,
        total_ns,
        ..Default::default()
    }
}

fn tick(ended: u32, now_ns: u64, interval_ns: u64) -> Tick {
    Tick {
        ended,
        now_ns,
        interval_ns,
    }
}

#[test]
fn the_per_cpu_split_adds_up_to_the_total_and_counts_the_open_pair_where_it_runs() {
    let mut tracker = LoadTracker::default();
    // Interval 1 ends at 1000 ms: 300 ms completed on CPU 0, 100 ms on CPU 1,
    // and a pair open since 900 ms on CPU 1.
    let mut t = thread(4, 400 * MS);
    t.loaded_at = 900 * MS;
    t.loaded_cpu = 1;
    t.epoch = [1, 0];
    t.max_ns = [200 * MS, 0];
    t.min_ns = [50 * MS, 0];
    let first = Reading {
        tid: 7,
        thread: t,
        cpus: vec![(0, 300 * MS), (1, 100 * MS)],
    };
    let (rows, exited) = tracker.tick(&[first], &tick(1, 1000 * MS, 1000 * MS));
    assert!(exited.is_empty());
    let r = &rows[0];
    assert_eq!(
        r.total_ns,
        500 * MS,
        "400 ms completed + 100 ms of the open pair"
    );
    assert_eq!(r.pcpus[&0], 300 * MS);
    assert_eq!(r.pcpus[&1], 200 * MS, "the open pair counts on its CPU");
    assert_eq!(r.pcpus.values().sum::<u64>(), r.total_ns);
    assert_eq!(
        (r.max_ns, r.min_ns, r.count),
        (Some(200 * MS), Some(50 * MS), 4)
    );
    assert_eq!(r.pcpu, Some(0));

    // Interval 2 ends at 2000 ms: the open pair closed at 1500 ms (600 ms
    // long, in slot 0 of epoch 2) and nothing else ran.
    let mut t = thread(5, 1000 * MS);
    t.epoch = [2, 1];
    t.max_ns = [600 * MS, 200 * MS];
    t.min_ns = [600 * MS, 50 * MS];
    let second = Reading {
        tid: 7,
        thread: t,
        cpus: vec![(0, 300 * MS), (1, 700 * MS)],
    };
    let (rows, _) = tracker.tick(&[second], &tick(2, 2000 * MS, 1000 * MS));
    let r = &rows[0];
    assert_eq!(
        r.total_ns,
        500 * MS,
        "the rest of the pair: 900..1500 ms minus 100 ms seen"
    );
    assert_eq!(r.pcpus.len(), 1, "nothing new on CPU 0");
    assert_eq!(r.pcpus[&1], 500 * MS);
    assert_eq!(
        (r.count, r.max_ns, r.min_ns),
        (1, Some(600 * MS), Some(600 * MS))
    );
}

#[test]
fn an_interval_never_holds_more_than_its_length() {
    let mut tracker = LoadTracker::default();
    let mut t = thread(0, 0);
    t.loaded_at = 1;
    t.loaded_cpu = 0;
    let r = Reading {
        tid: 7,
        thread: t,
        cpus: vec![],
    };
    let (rows, _) = tracker.tick(&[r], &tick(1, 5000 * MS, 1000 * MS));
    assert_eq!(rows[0].total_ns, 1000 * MS);
    assert_eq!(
        (rows[0].count, rows[0].max_ns),
        (0, None),
        "no completed pair"
    );
}

#[test]
fn time_loaded_after_a_reading_s_instant_goes_to_the_next_interval() {
    let mut tracker = LoadTracker::default();
    let at = |count, total_ns, loaded_at| {
        let mut t = thread(count, total_ns);
        t.loaded_at = loaded_at;
        let cpus = if total_ns > 0 {
            vec![(0, total_ns)]
        } else {
            vec![]
        };
        Reading {
            tid: 7,
            thread: t,
            cpus,
        }
    };
    // Loaded from 0.9 s; the interval ending at 2 s is read at 2.05 s,
    // after the pair ended there: 1.05 s of it since the reading at 1 s.
    let (first, _) = tracker.tick(&[at(0, 0, 900 * MS)], &tick(1, 1000 * MS, 1000 * MS));
    let (second, _) = tracker.tick(&[at(1, 1150 * MS, 0)], &tick(2, 2000 * MS, 1000 * MS));
    let (third, _) = tracker.tick(&[at(1, 1150 * MS, 0)], &tick(3, 3000 * MS, 1000 * MS));
    let loaded: Vec<Option<(u64, u64)>> = [first, second, third]
        .iter()
        .map(|r| r.first().map(|r| (r.total_ns, r.pcpus[&0])))
        .collect();
    let ms = |a: u64| Some((a * MS, a * MS));
    assert_eq!(
        loaded,
        [ms(100), ms(1000), ms(50)],
        "all 1.15 s, none past an interval's length"
    );
}

#[test]
fn idle_threads_have_no_row_and_exited_ones_are_reported_once_then_forgotten() {
    let mut tracker = LoadTracker::default();
    let busy = Reading {
        tid: 7,
        thread: thread(2, 10 * MS),
        cpus: vec![(0, 10 * MS)],
    };
    tracker.tick(std::slice::from_ref(&busy), &tick(1, 1000 * MS, 1000 * MS));
    let (rows, _) = tracker.tick(std::slice::from_ref(&busy), &tick(2, 2000 * MS, 1000 * MS));
    assert!(rows.is_empty(), "no change, no row");

    let mut gone = busy.clone();
    gone.thread.count = 3;
    gone.thread.total_ns = 15 * MS;
    gone.thread.exited = 1;
    gone.cpus = vec![(0, 15 * MS)];
    let (rows, exited) = tracker.tick(&[gone], &tick(3, 3000 * MS, 1000 * MS));
    assert_eq!(
        (rows[0].count, rows[0].total_ns),
        (1, 5 * MS),
        "its last figures"
    );
    assert_eq!(exited, [7]);
    // A new thread with the same id starts from zero.
    let (rows, _) = tracker.tick(&[busy], &tick(4, 4000 * MS, 1000 * MS));
    assert_eq!((rows[0].count, rows[0].total_ns), (2, 10 * MS));
}

#[test]
fn summary_fields_and_line_follow_the_row() {
    let mut tracker = LoadTracker::default();
    let r = Reading {
        tid: 7,
        thread: thread(3, 150 * MS),
        cpus: vec![(0, 50 * MS), (1, 100 * MS)],
    };
    let (rows, _) = tracker.tick(&[r], &tick(1, 1000 * MS, 1000 * MS));
    let f = rows[0].fields();
    assert_eq!(f.keys().map(String::as_str).collect::<Vec<_>>(), FIELDS);
    assert_eq!(f["run_ns"], 150 * MS);
    assert_eq!(f["pcpus"]["1"], 100 * MS);
    assert_eq!(
        rows[0].lines(1000 * MS),
        ["    run: 150.000 ms (15.0% of the interval) in 3 load/put pairs; cpu1 67%, cpu0 33%"]
    );
}

#[test]
fn moves_are_the_interval_s_difference_and_start_over_with_a_new_thread() {
    let mut tracker = LoadTracker::default();
    let reading = |moves: u64, count: u64, exited: u32| {
        let mut t = thread(count, count * MS);
        t.cpu_migrations = moves;
        t.exited = exited;
        Reading {
            tid: 7,
            thread: t,
            cpus: vec![(0, count * MS / 2), (1, count * MS / 2)],
        }
    };
    let (rows, _) = tracker.tick(&[reading(4, 10, 0)], &tick(1, 1000 * MS, 1000 * MS));
    assert_eq!(
        rows[0].cpu_migrations, 4,
        "what the kernel counted since attach"
    );
    let (rows, _) = tracker.tick(&[reading(10, 20, 1)], &tick(2, 2000 * MS, 1000 * MS));
    assert_eq!(rows[0].cpu_migrations, 6);
    assert_eq!(rows[0].fields()["cpu_migrations"], 6);
    assert_eq!(
        rows[0].lines(1000 * MS),
        [
            "    run: 10.000 ms (1.0% of the interval) in 10 load/put pairs (6 moved to another CPU); cpu0 50%, cpu1 50%"
        ]
    );
    // The thread exited; a new one with its id counts from its own zero.
    let (rows, _) = tracker.tick(&[reading(2, 4, 0)], &tick(3, 3000 * MS, 1000 * MS));
    assert_eq!(rows[0].cpu_migrations, 2);
}

#[test]
fn top_cells_are_the_share_of_the_interval_and_the_main_cpu() {
    let mut tracker = LoadTracker::default();
    let r = Reading {
        tid: 7,
        thread: thread(3, 150 * MS),
        cpus: vec![(0, 50 * MS), (1, 100 * MS)],
    };
    let (rows, _) = tracker.tick(&[r], &tick(1, 1000 * MS, 1000 * MS));
    let cells = rows[0].top_cells(500 * MS);
    assert_eq!(cells.len(), COLUMNS.len());
    assert_eq!(cells, [Cell::Value(30.0), Cell::Value(1.0)]);
}
