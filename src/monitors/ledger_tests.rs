use super::*;

/// A count, a histogram, a gauge and a time capped by the interval.
#[derive(Clone, Debug, Default, PartialEq)]
struct C {
    n: u64,
    hist: Vec<u64>,
    window: u64,
    busy_ns: u64,
    read_at: u64,
}

impl Counters for C {
    fn delta(&self, prev: &Self) -> Self {
        C {
            n: since(self.n, prev.n),
            hist: since_each(&self.hist, &prev.hist),
            window: self.window,
            busy_ns: since(self.busy_ns, prev.busy_ns).min(self.read_at - prev.read_at),
            read_at: self.read_at,
        }
    }
    fn zero(&self, last_read_ns: u64) -> Self {
        C {
            read_at: if last_read_ns == 0 { 0 } else { last_read_ns },
            ..C::default()
        }
    }
    fn carry(&mut self, prev: &Self) {
        self.busy_ns = self.busy_ns.max(prev.busy_ns);
    }
}

fn who(pid: u32, tid: u32) -> Thread {
    Thread { pid, ..thread(tid) }
}

fn row(pid: u32, tid: u32, n: u64, at: u64) -> Reading<C> {
    Reading {
        who: who(pid, tid),
        counters: C {
            n,
            hist: vec![n, 1],
            window: n.saturating_mul(10),
            busy_ns: 0,
            read_at: at,
        },
        exited: false,
    }
}

fn deltas(s: &Step<C>) -> Vec<(u32, u32, u64)> {
    s.changes
        .iter()
        .map(|c| (c.who.pid, c.who.tid, c.delta.n))
        .collect()
}

#[test]
fn deltas_are_differences_of_readings_and_gauges_are_current() {
    let mut l = Ledger::default();
    let t = Instant::now();
    let s = l.step(t, 100, vec![row(1, 2, 5, 100)]);
    assert_eq!(deltas(&s), vec![(1, 2, 5)], "a new thread: all it has");
    let s = l.step(t, 200, vec![row(1, 2, 12, 200)]);
    assert_eq!(deltas(&s), vec![(1, 2, 7)]);
    assert_eq!(s.changes[0].delta.hist, vec![7, 0]);
    assert_eq!(s.changes[0].delta.window, 120);
    assert_eq!(s.changes[0].total.n, 12);
}

#[test]
fn the_seeded_first_reading_is_not_reported() {
    let mut l = Ledger::default();
    l.seed(100, vec![row(1, 2, 50, 100)]);
    let s = l.step(Instant::now(), 200, vec![row(1, 2, 53, 200)]);
    assert_eq!(deltas(&s), vec![(1, 2, 3)]);
}

#[test]
fn a_new_thread_is_charged_time_since_the_last_reading_only() {
    let mut l = Ledger::default();
    let t = Instant::now();
    l.step(t, 1_000, vec![row(1, 2, 1, 1_000)]);
    let mut r = row(1, 3, 1, 1_500);
    r.counters.busy_ns = 5_000; // a halt that began before the interval
    let s = l.step(t, 1_500, vec![row(1, 2, 1, 1_500), r]);
    assert_eq!(s.changes[1].delta.busy_ns, 500);
}

#[test]
fn a_thread_id_reused_by_another_process_starts_from_zero() {
    let mut l = Ledger::default();
    let t = Instant::now();
    l.step(t, 1, vec![row(1, 7, 100, 1)]);
    let s = l.step(t, 2, vec![row(2, 7, 3, 2)]);
    assert_eq!(deltas(&s), vec![(2, 7, 3)]);
    assert_eq!(l.len(), 2, "the old process's thread is another entry");
}

#[test]
fn a_counter_that_went_back_was_reset_and_counts_from_zero() {
    let mut l = Ledger::default();
    let t = Instant::now();
    l.step(t, 1, vec![row(1, 2, u64::MAX - 1, 1)]);
    let s = l.step(t, 2, vec![row(1, 2, 4, 2)]);
    assert_eq!(deltas(&s), vec![(1, 2, 4)]);
    assert_eq!(since(u64::MAX, u64::MAX - 3), 3);
}

#[test]
fn carry_keeps_a_figure_from_going_back() {
    let mut l = Ledger::default();
    let t = Instant::now();
    let mut a = row(1, 2, 1, 100);
    a.counters.busy_ns = 90;
    l.step(t, 100, vec![a]);
    let mut b = row(1, 2, 1, 200);
    b.counters.busy_ns = 88;
    let s = l.step(t, 200, vec![b]);
    assert_eq!(s.changes[0].delta.busy_ns, 0);
    assert_eq!(s.changes[0].total.busy_ns, 90);
}

#[test]
fn an_exit_is_reported_once_after_its_last_reading_then_forgotten() {
    let mut l = Ledger::default();
    let t0 = Instant::now();
    l.step(t0, 1, vec![row(1, 2, 1, 1), row(1, 3, 1, 1)]);
    // Thread 3 is found gone before the reading: the reading is its last.
    l.check_exits(|_, tid| tid != 3);
    let s = l.step(t0, 2, vec![row(1, 2, 2, 2), row(1, 3, 4, 2)]);
    assert_eq!(deltas(&s), vec![(1, 2, 1), (1, 3, 3)]);
    assert_eq!(s.ended, vec![who(1, 3)]);
    // Reported once.
    l.check_exits(|_, tid| tid != 3);
    let s = l.step(t0, 3, vec![row(1, 2, 2, 3)]);
    assert!(s.ended.is_empty());
    // Kept for --retain, with its last figures, then forgotten.
    l.expire(t0 + Duration::from_secs(29), Duration::from_secs(30));
    assert_eq!(
        l.totals().map(|(w, c)| (w.tid, c.n)).collect::<Vec<_>>(),
        vec![(2, 2), (3, 4)]
    );
    l.expire(t0 + Duration::from_secs(30), Duration::from_secs(30));
    assert_eq!(l.len(), 1);
}

#[test]
fn the_kernels_exited_flag_ends_a_thread_without_a_liveness_check() {
    let mut l = Ledger::default();
    let t = Instant::now();
    let mut r = row(1, 2, 9, 1);
    r.exited = true;
    let s = l.step(t, 1, vec![r]);
    assert_eq!(deltas(&s), vec![(1, 2, 9)]);
    assert_eq!(s.ended, vec![who(1, 2)]);
    l.expire(t, Duration::ZERO);
    assert!(l.is_empty());
}

#[test]
fn a_thread_gone_from_the_readings_still_ends_once() {
    let mut l = Ledger::default();
    let t = Instant::now();
    l.step(t, 1, vec![row(1, 2, 1, 1)]);
    l.check_exits(|_, _| false);
    let s = l.step(t, 2, vec![]);
    assert_eq!(s.ended, vec![who(1, 2)]);
    assert!(s.changes.is_empty());
}
