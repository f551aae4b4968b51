//! dirty's interval step, with no kernel: per-slot writes between two
//! readings of the kernel's cumulative figures, distinct pages per interval,
//! and their rows and lines in the summary.

use crate::monitors::ledger::since;
use std::collections::HashMap;

use serde::Serialize;

use super::read::SlotReading;
use crate::monitors::{Cell, Column, Tick, Unit, VmRow, VmRule, per_second};
use crate::output::{Clock, Output, Row};

/// Per-interval figures of one memslot in `--summary` mode.
#[derive(Clone, Debug, Serialize)]
pub struct SlotSummaryRow {
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// VMM process.
    pub pid: u32,
    /// Always null: a slot summary spans all threads.
    pub tid: Option<u32>,
    /// Always null.
    pub comm: Option<String>,
    /// Always null: a slot summary spans all vCPUs.
    pub vcpu_id: Option<u32>,
    /// VM name.
    pub vm: Option<String>,
    /// Memslot id.
    pub slot_id: u32,
    /// Address space.
    pub as_id: u32,
    /// First gfn of the slot.
    pub base_gfn: u64,
    /// Pages in the slot.
    pub npages: u64,
    /// Host virtual address of the slot.
    pub userspace_addr: u64,
    /// Interval length, ns.
    pub interval_ns: u64,
    /// Logged writes in the interval.
    pub writes: u64,
    /// Distinct pages written in the interval (null on kernels before 5.12,
    /// which lack the BPF cmpxchg this needs).
    pub distinct_pages: Option<u64>,
    /// `--max-pages` was full in the interval: pages went uncounted, so
    /// `distinct_pages` is only a lower bound.
    pub distinct_pages_lower_bound: bool,
}

impl Row for SlotSummaryRow {
    fn monitor(&self) -> &'static str {
        "dirty_summary"
    }

    fn header(&self) -> String {
        format!(
            "{:<15} {:>8} {:>7} {:>12} {:>10} {:>12} {:>14} {:>12}",
            "TIME",
            "PID",
            "SLOT_ID",
            "BASE_GFN",
            "NPAGES",
            "WRITES",
            "DISTINCT_PAGES",
            "DIRTY(MiB/s)"
        )
    }

    fn row(&self, clock: &Clock) -> String {
        let at_least = if self.distinct_pages_lower_bound {
            ">="
        } else {
            ""
        };
        let (distinct, mib_s) = match self.distinct_pages {
            Some(d) => (
                format!("{at_least}{d}"),
                format!("{at_least}{:.2}", dirty_mib_s(d, self.interval_ns)),
            ),
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        format!(
            "{:<15} {:>8} {:>7} {:>12x} {:>10} {:>12} {:>14} {:>12}",
            clock.format(self.time_ns),
            self.pid,
            self.slot_id,
            self.base_gfn,
            self.npages,
            self.writes,
            distinct,
            mib_s
        )
    }
}

/// MiB/s of `pages` distinct 4 KiB pages dirtied over `interval_ns`.
pub fn dirty_mib_s(pages: u64, interval_ns: u64) -> f64 {
    pages as f64 * 4096.0 / f64::from(1u32 << 20) / (interval_ns.max(1) as f64 / 1e9)
}
/// Turns the in-kernel per-slot counters into per-interval rows.
pub struct SlotSummary {
    prev_writes: HashMap<(u32, u32), u64>,
    tracks_distinct: bool,
}

impl SlotSummary {
    /// A summary; `tracks_distinct` says whether the kernel counts distinct
    /// pages per interval (`dirty_summary`).
    pub fn new(tracks_distinct: bool) -> Self {
        SlotSummary {
            prev_writes: HashMap::new(),
            tracks_distinct,
        }
    }

    /// Whether the kernel counts distinct pages per interval.
    pub fn tracks_distinct(&self) -> bool {
        self.tracks_distinct
    }

    /// Rows for the interval `tick`, from the slots' cumulative figures and
    /// the distinct pages per (pid, slot) of that interval.
    pub fn tick(
        &mut self,
        slots: &[SlotReading],
        distinct: &HashMap<(u32, u32), u64>,
        tick: &Tick,
    ) -> Vec<SlotSummaryRow> {
        let mut rows = Vec::new();
        for s in slots {
            let key = (s.pid, s.slot);
            let prev = self.prev_writes.insert(key, s.stats.writes).unwrap_or(0);
            let writes = since(s.stats.writes, prev);
            let distinct_pages = self
                .tracks_distinct
                .then(|| distinct.get(&key).copied().unwrap_or(0));
            if writes == 0 && distinct_pages.unwrap_or(0) == 0 {
                continue;
            }
            rows.push(SlotSummaryRow {
                time_ns: tick.now_ns,
                pid: s.pid,
                tid: None,
                comm: None,
                vcpu_id: None,
                vm: None,
                slot_id: s.slot & 0xffff,
                as_id: s.slot >> 16,
                base_gfn: s.stats.base_gfn,
                npages: s.stats.npages,
                userspace_addr: s.stats.userspace_addr,
                interval_ns: tick.interval_ns,
                writes,
                distinct_pages,
                distinct_pages_lower_bound: false,
            });
        }
        rows.sort_by_key(|r| (r.pid, r.as_id, r.slot_id));
        // Slots of exited VMs are taken out of the kernel's map: forget them too.
        let present: std::collections::HashSet<(u32, u32)> =
            slots.iter().map(|s| (s.pid, s.slot)).collect();
        self.prev_writes.retain(|k, _| present.contains(k));
        rows
    }
}

/// dirty's columns in `top`: a VM's figures, added up over its memslots.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "DIRTY/s",
        width: 8,
        help: "guest writes KVM logged as dirty, per second",
        unit: Unit::PerSecond,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
    Column {
        title: "PAGES",
        width: 7,
        help: "distinct pages dirtied in the interval (Linux 5.12+)",
        unit: Unit::Count,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
    Column {
        title: "MiB/s",
        width: 7,
        help: "distinct dirtied pages, in MiB per second",
        unit: Unit::MibPerSecond,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
];

impl VmRow for SlotSummaryRow {
    fn top_cells(&self) -> Vec<Cell> {
        let distinct = |f: &dyn Fn(u64) -> f64| {
            self.distinct_pages
                .map_or(Cell::Blank, |d| Cell::Value(f(d)))
        };
        vec![
            Cell::Value(per_second(self.writes, self.interval_ns)),
            distinct(&|d| d as f64),
            distinct(&|d| dirty_mib_s(d, self.interval_ns)),
        ]
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn set_vm(&mut self, name: Option<String>) {
        self.vm = name;
    }

    fn record(&self, out: &mut Output) {
        out.record(self);
    }

    fn line(&self) -> String {
        let distinct = match self.distinct_pages {
            Some(d) => format!(
                "{d} distinct pages, {:.2} MiB/s",
                dirty_mib_s(d, self.interval_ns)
            ),
            None => "distinct pages n/a (Linux 5.12+)".to_string(),
        };
        format!(
            "    slot {} (gfn {:#x}, {} pages): {} writes, {distinct}",
            self.slot_id, self.base_gfn, self.npages, self.writes
        )
    }
}

#[cfg(test)]
mod tests;
