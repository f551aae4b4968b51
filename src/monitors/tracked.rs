//! A monitor whose figures are per-thread cumulative counters needs only
//! to say how to read them, how to delete a thread's kernel entries, how
//! an interval's changes make its part of the summary, and which metric
//! families it has ([`Table`]). [`Tracked`] is its user-space half for
//! `watch`, `top` and `serve` alike, over one [`Ledger`].

use std::cell::RefCell;
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;

use super::families::{self, Chosen, Family};
use super::ledger::{Change, Counters, Ledger, Reading};
use crate::monitors::metrics::{Labeler, Metrics, Refresh};
use crate::monitors::{Begun, Mode, Part, Thread, Tick, Watching};
use crate::output::Output;
use crate::procfs::VmNames;

/// What only the monitor knows.
pub trait Table: Send + 'static {
    /// Its cumulative figures of one thread.
    type Counters: Counters;

    /// Its metric families.
    const FAMILIES: &'static [Family<Self::Counters>];

    /// Whether the kernel keeps counting in the rows mode too: then what
    /// exited is read once more and its entries deleted as the session prunes.
    const PRUNES_ROWS: bool = false;

    /// Reads the kernel's cumulative figures, one per thread; `at_ns`
    /// (CLOCK_MONOTONIC) is the reading's time, given in a session.
    fn read(&mut self, at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<Self::Counters>>>;

    /// Deletes the kernel entries of threads whose last figures were read.
    fn forget(&mut self, gone: &[Thread]);

    /// Its part of the interval `tick`, from every thread's changes (a pure
    /// step of its `aggregate.rs`, plus what it looks up, such as VM names).
    fn aggregate(&mut self, changes: Vec<Change<Self::Counters>>, tick: &Tick) -> Part;

    /// Whether it writes a report of every interval in the rows mode too.
    const ROWS_EVERY_INTERVAL: bool = false;

    /// Rows mode: writes its report of the interval `tick` (with
    /// [`Table::ROWS_EVERY_INTERVAL`]).
    fn write_rows(
        &mut self,
        _changes: Vec<Change<Self::Counters>>,
        _tick: &Tick,
        _out: &mut Output,
        _names: &mut VmNames,
    ) {
    }
}

/// A [`Table`] monitor's user-space half.
pub struct Tracked<T: Table> {
    table: T,
    ledger: Ledger<T::Counters>,
    /// It reads the kernel's figures in this session (summaries or
    /// reports every interval).
    reads: bool,
    summary: bool,
    /// The keys of its keyed families that have series.
    chosen: RefCell<Chosen>,
}

impl<T: Table> Tracked<T> {
    /// Its half for mode `mode`. In a session that reads, `begin` takes the
    /// first reading, so the first interval holds nothing from before it.
    pub fn new(table: T, mode: Mode) -> Self {
        Tracked {
            table,
            ledger: Ledger::default(),
            reads: mode == Mode::Summary || T::ROWS_EVERY_INTERVAL,
            summary: mode == Mode::Summary,
            chosen: RefCell::default(),
        }
    }

    /// One reading: exits checked first, so it holds the last figures of
    /// whatever is found gone; their kernel entries are deleted after it.
    fn step(&mut self, at_ns: Option<u64>) -> anyhow::Result<Vec<Change<T::Counters>>> {
        self.ledger.check_exits(crate::procfs::thread_alive);
        let rows = self.table.read(at_ns)?;
        let step = self
            .ledger
            .step(Instant::now(), at_ns.unwrap_or_default(), rows);
        self.table.forget(&step.ended);
        Ok(step.changes)
    }
}

impl<T: Table> Tracked<T> {
    /// The interval's changes; their last figures reported, exited
    /// threads are forgotten at once.
    fn interval_changes(&mut self, tick: &Tick) -> anyhow::Result<Vec<Change<T::Counters>>> {
        let changes = self.step(Some(tick.now_ns))?;
        self.ledger.expire(Instant::now(), Duration::ZERO);
        Ok(changes)
    }
}

impl<T: Table> Watching for Tracked<T> {
    fn begin(&mut self, start_ns: u64) -> anyhow::Result<Begun> {
        if self.reads {
            let rows = self.table.read(Some(start_ns))?;
            self.ledger.seed(start_ns, rows);
        }
        Ok(Begun {
            rows_every_interval: T::ROWS_EVERY_INTERVAL,
        })
    }

    fn interval(&mut self, tick: &Tick) -> anyhow::Result<Part> {
        if !self.summary {
            return Ok(Part::default());
        }
        let changes = self.interval_changes(tick)?;
        Ok(self.table.aggregate(changes, tick))
    }

    fn poll(&mut self, now: Instant, pruning: bool) -> anyhow::Result<Option<Instant>> {
        // Rows carry the events: only exited threads' kernel entries need
        // forgetting, after one more reading.
        if !self.reads && pruning && T::PRUNES_ROWS {
            self.step(None)?;
            self.ledger.expire(now, Duration::ZERO);
        }
        Ok(None)
    }

    fn interval_rows(
        &mut self,
        tick: &Tick,
        out: &mut Output,
        names: &mut VmNames,
    ) -> anyhow::Result<()> {
        if T::ROWS_EVERY_INTERVAL {
            let changes = self.interval_changes(tick)?;
            self.table.write_rows(changes, tick, out, names);
        }
        Ok(())
    }
}

impl<T: Table> Metrics for Tracked<T> {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for c in self.step(None)? {
            cx.saw(c.who.tid, c.who.pid, c.who.vcpu_id);
        }
        self.ledger.expire(cx.now, cx.retain);
        Ok(())
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        let chosen = &mut self.chosen.borrow_mut();
        families::encode(T::FAMILIES, self.ledger.totals(), encoder, labels, chosen)
    }
}
