//! The ledger: per monitor and thread, the last cumulative reading of the
//! kernel's counters and who they belong to. It alone turns two readings
//! into what happened between them, decides once that a thread exited
//! (the kernel's exited flag, or one liveness check before a reading, so
//! the reading after has everything the thread did), says which kernel
//! entries may be deleted, and forgets what exited after `--retain`.
//! An exited thread is one more entry until then, not a special case.
//! No kernel needed: the liveness check is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::monitors::Thread;

/// A monitor's cumulative per-thread figures, as the kernel counts them.
pub trait Counters: Clone + Send + 'static {
    /// What happened between the reading `prev` and this one, of the same
    /// thread (see [`since`] for counters that went back).
    fn delta(&self, prev: &Self) -> Self;

    /// The reading a thread is taken to have had before it was first seen:
    /// zero. `last_read_ns` is when the ledger's previous reading was taken
    /// (0: none), for figures of time that must not charge a new thread
    /// with more than the interval.
    fn zero(&self, last_read_ns: u64) -> Self;

    /// Keeps what a counter of this reading must not lose against the
    /// previous one (e.g. a halt's time so far, which its end may round
    /// down by a few microseconds). Nothing by default.
    fn carry(&mut self, _prev: &Self) {}

    /// Takes off `delta`, and off this reading, what `delta` holds beyond
    /// `span_ns` (the time since the previous reading) where a figure of
    /// time cannot exceed it: that is time after the reading's instant (a
    /// vCPU's pair that ended between the instant and the read), which
    /// the next reading then charges to its interval instead of losing it.
    /// Of a thread first seen, what is beyond the span came before the
    /// previous reading and is dropped instead. Nothing by default; only
    /// between readings with known instants.
    fn hold_back(&mut self, _delta: &mut Self, _span_ns: u64) {}
}

/// A counter's increase from `prev` to `now`: `now` itself when it went
/// back, because a counter only goes back when its kernel entry was made
/// anew (a reset), and everything it holds then is new.
pub fn since(now: u64, prev: u64) -> u64 {
    if now >= prev { now - prev } else { now }
}

/// [`since`] of each bucket of a histogram (a missing previous bucket is 0).
pub fn since_each(now: &[u64], prev: &[u64]) -> Vec<u64> {
    now.iter()
        .zip(prev.iter().chain(std::iter::repeat(&0)))
        .map(|(a, b)| since(*a, *b))
        .collect()
}

/// One thread's figures in a reading of the kernel's maps.
#[derive(Clone, Debug)]
pub struct Reading<C> {
    /// The thread.
    pub who: Thread,
    /// Its cumulative figures.
    pub counters: C,
    /// The kernel saw it exit: this reading is its last.
    pub exited: bool,
}

impl<C> Reading<C> {
    /// The same thread's figures, `f` of these.
    pub fn map<D>(self, f: impl FnOnce(C) -> D) -> Reading<D> {
        Reading {
            who: self.who,
            counters: f(self.counters),
            exited: self.exited,
        }
    }

    /// The figures of each thread `who` names, none seen exit by the kernel.
    pub fn all(rows: Vec<C>, who: impl Fn(&C) -> Thread) -> Vec<Reading<C>> {
        rows.into_iter()
            .map(|counters| Reading {
                who: who(&counters),
                counters,
                exited: false,
            })
            .collect()
    }
}

/// What one thread did between two readings.
#[derive(Clone, Debug)]
pub struct Change<C> {
    /// The thread.
    pub who: Thread,
    /// What happened since the previous reading.
    pub delta: C,
    /// Its cumulative figures now.
    pub total: C,
}

/// What a reading gave.
#[derive(Debug)]
pub struct Step<C> {
    /// Per thread in the reading, what it did since the last one.
    pub changes: Vec<Change<C>>,
    /// Threads whose last figures this reading had (they exited): their
    /// kernel entries may be deleted. Each is listed once.
    pub ended: Vec<Thread>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    /// Seen gone before the last reading: the next one is its last.
    Gone,
    /// Its last reading was taken at this instant.
    Exited(Instant),
}

#[derive(Clone, Debug)]
struct Entry<C> {
    who: Thread,
    last: C,
    state: State,
}

/// Per thread (VMM pid, thread id: a thread id reused by another process
/// is another thread), the last reading.
#[derive(Clone, Debug)]
pub struct Ledger<C> {
    entries: BTreeMap<(u32, u32), Entry<C>>,
    last_read_ns: u64,
}

impl<C> Default for Ledger<C> {
    fn default() -> Self {
        Ledger {
            entries: BTreeMap::new(),
            last_read_ns: 0,
        }
    }
}

impl<C: Counters> Ledger<C> {
    /// Call right before a reading: threads that `alive` says are gone will
    /// have their last figures in it.
    pub fn check_exits(&mut self, alive: impl Fn(u32, u32) -> bool) {
        for ((pid, tid), e) in &mut self.entries {
            if e.state == State::Live && !alive(*pid, *tid) {
                e.state = State::Gone;
            }
        }
    }

    /// Takes the first reading: what happened before it is not reported.
    pub fn seed(&mut self, at_ns: u64, rows: Vec<Reading<C>>) {
        self.step(Instant::now(), at_ns, rows);
    }

    /// Takes a reading made at `at_ns` (CLOCK_MONOTONIC) and `now`.
    pub fn step(&mut self, now: Instant, at_ns: u64, rows: Vec<Reading<C>>) -> Step<C> {
        let mut changes = Vec::with_capacity(rows.len());
        for r in rows {
            let key = (r.who.pid, r.who.tid);
            let prev = match self.entries.get(&key) {
                Some(e) if !matches!(e.state, State::Exited(_)) => Some(&e.last),
                // New, or a thread id that came back after its exit: anew.
                _ => None,
            };
            let mut total = r.counters;
            let delta = match prev {
                Some(p) => {
                    total.carry(p);
                    let mut delta = total.delta(p);
                    if self.last_read_ns > 0 && at_ns > self.last_read_ns {
                        total.hold_back(&mut delta, at_ns - self.last_read_ns);
                    }
                    delta
                }
                None => {
                    let mut delta = total.delta(&total.zero(self.last_read_ns));
                    // A new thread's time beyond the span came before the
                    // last reading: no interval's, so it is dropped (and
                    // the reading kept whole).
                    if self.last_read_ns > 0 && at_ns > self.last_read_ns {
                        total
                            .clone()
                            .hold_back(&mut delta, at_ns - self.last_read_ns);
                    }
                    delta
                }
            };
            let state = match self.entries.get(&key) {
                _ if r.exited => State::Gone,
                Some(e) if e.state == State::Gone => State::Gone,
                _ => State::Live,
            };
            self.entries.insert(
                key,
                Entry {
                    who: r.who.clone(),
                    last: total.clone(),
                    state,
                },
            );
            changes.push(Change {
                who: r.who,
                delta,
                total,
            });
        }
        self.last_read_ns = self.last_read_ns.max(at_ns);
        let mut ended = Vec::new();
        for e in self.entries.values_mut() {
            if e.state == State::Gone {
                e.state = State::Exited(now);
                ended.push(e.who.clone());
            }
        }
        Step { changes, ended }
    }

    /// Forgets threads whose last reading is at least `retain` old.
    pub fn expire(&mut self, now: Instant, retain: Duration) {
        self.entries.retain(|_, e| match e.state {
            State::Exited(at) => now.duration_since(at) < retain,
            _ => true,
        });
    }

    /// Every thread remembered (those that exited less than `--retain`
    /// ago included) with its last cumulative figures.
    pub fn totals(&self) -> impl Iterator<Item = (&Thread, &C)> + Clone {
        self.entries.values().map(|e| (&e.who, &e.last))
    }

    /// Threads remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A session's use of a ledger, for monitors' tests: exits checked
/// (threads `gone` have exited), `rows` read at `at_ns`, the changes
/// returned and what exited forgotten.
#[cfg(test)]
pub fn interval<C: Counters>(
    ledger: &mut Ledger<C>,
    at_ns: u64,
    rows: Vec<(Thread, C)>,
    gone: &[u32],
) -> Vec<Change<C>> {
    ledger.check_exits(|_, tid| !gone.contains(&tid));
    let rows = rows
        .into_iter()
        .map(|(who, counters)| Reading {
            who,
            counters,
            exited: false,
        })
        .collect();
    let step = ledger.step(Instant::now(), at_ns, rows);
    ledger.expire(Instant::now(), Duration::ZERO);
    step.changes
}

/// Thread `tid` of process 1, for monitors' tests.
#[cfg(test)]
pub fn thread(tid: u32) -> Thread {
    Thread {
        pid: 1,
        tid,
        comm: format!("CPU {tid}/KVM"),
        vcpu_id: Some(tid),
    }
}

#[cfg(test)]
#[path = "ledger_tests.rs"]
mod tests;
