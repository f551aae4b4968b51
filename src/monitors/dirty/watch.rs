//! dirty during a session: summaries from the kernel's per-slot figures,
//! the counts file, warnings about VMs the backend cannot see.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libbpf_rs::MapHandle;
use serde_json::Value;

use super::counts::write_counts_iter;
use super::dense::{Dense, GRACE};
use super::exited::Exited;
use super::spill::merge;
use super::{SlotSummary, read, read_counts, read_slots};
use crate::bpf::types;
use crate::monitors::{Part, Tick, Watching, threads};
use crate::output::warn;

/// dirty during a session.
pub(super) struct Watch {
    /// Dense per-slot storage (Linux 5.12+).
    pub(super) dense: Option<Dense>,
    /// The kernel's `epoch`: the interval in progress.
    pub(super) epoch: u32,
    pub(super) counts: MapHandle,
    pub(super) slot_stats: MapHandle,
    pub(super) epoch_pages: MapHandle,
    pub(super) threads: MapHandle,
    /// Summary mode: per-slot intervals.
    pub(super) summary: Option<SlotSummary>,
    pub(super) counts_file: Option<PathBuf>,
    pub(super) counts_every: Option<Duration>,
    pub(super) next_counts: Option<Instant>,
    /// The last periodic rewrite of the counts file failed (warned once).
    pub(super) counts_failing: bool,
    /// The backend sees only VMs with a dirty ring: warn about the others.
    pub(super) ring_only: bool,
    pub(super) warned: Vec<u32>,
    pub(super) next_bitmap_check: Instant,
    pub(super) max_pages: u64,
    /// Exited VMs, taken out of the kernel's maps.
    pub(super) exited: Exited,
    /// Without summaries: when to look for exited VMs next.
    pub(super) next_exit_sweep: Instant,
    /// Descriptors held back so that the counts file can be written even
    /// when the process ran out of them (closed before the last write).
    pub(super) fd_reserve: Vec<std::fs::File>,
    /// The session's counters, and dirty's `map_full` at the last interval:
    /// pages went uncounted in an interval where it grew.
    pub(super) counters: MapHandle,
    pub(super) map_full: u64,
}

impl Watch {
    fn write_counts(&mut self) -> anyhow::Result<()> {
        let Some(path) = &self.counts_file else {
            return Ok(());
        };
        match &self.dense {
            Some(dense) => {
                let others = read::read_counts_unsorted(&self.counts)?;
                dense.write_counts(path, others, self.exited.kept()?)
            }
            None => {
                let live = read_counts(&self.counts)?;
                let pages = merge(live.into_iter().map(Ok), self.exited.kept()?);
                write_counts_iter(path, pages)
            }
        }
    }

    /// New slots get dense storage, and pages counted in the hash before
    /// are merged out of it (`closing`: an interval just ended).
    fn refresh_dense(&mut self, closing: bool) -> anyhow::Result<()> {
        if let Some(dense) = &mut self.dense
            && (closing || dense.wanted())
        {
            dense.refresh(
                &read_slots(&self.slot_stats)?,
                &self.counts,
                self.epoch,
                closing,
            )?;
        }
        Ok(())
    }

    /// Warns once per VM that logs dirty pages with the bitmap while only
    /// the dirty-ring tracepoint is available.
    fn warn_bitmap_vms(&mut self) {
        for e in threads::read_all(&self.threads).unwrap_or_default() {
            let t = e.thread;
            if t.dirty_ring_size == 0 && !self.warned.contains(&t.pid) {
                self.warned.push(t.pid);
                warn(&format!(
                    "VM pid {} has no dirty ring: dirty pages it logs with the bitmap (e.g. during migration) are invisible to the tracepoint backend, which is all this kernel allows (see `kvm-watcher doctor`)",
                    t.pid
                ));
            }
        }
    }
}

impl Watching for Watch {
    fn interval(&mut self, tick: &Tick) -> anyhow::Result<Part> {
        if self.summary.is_none() {
            return Ok(Part::default());
        }
        self.epoch = tick.ended.wrapping_add(1);
        if self.dense.is_some() {
            self.refresh_dense(true)?;
        }
        let Some(summary) = &mut self.summary else {
            return Ok(Part::default());
        };
        let mut distinct = if summary.tracks_distinct() {
            read::take_distinct(&self.epoch_pages, tick.ended)?
        } else {
            Default::default()
        };
        let mut slots = read_slots(&self.slot_stats)?;
        if let Some(dense) = &mut self.dense {
            for (k, n) in dense.take(Some(tick.ended)) {
                *distinct.entry(k).or_default() += n;
            }
            dense.patch(&mut slots)?;
        }
        let mut rows = summary.tick(&slots, &distinct, tick);
        let full = crate::bpf::read_counters(&self.counters)
            .get(types::monitor_kind::MONITOR_DIRTY.0 as usize)
            .map_or(0, |c| c.map_full);
        if full > self.map_full {
            for r in &mut rows {
                r.distinct_pages_lower_bound = true;
            }
        }
        self.map_full = full;
        // After the interval's reading: an exited VM's last writes are in it.
        self.exited
            .sweep(&self.slot_stats, &self.counts, self.dense.as_mut())?;
        Ok(Part {
            vm_rows: rows
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn crate::monitors::VmRow>)
                .collect(),
            vm_title: "  dirty pages:",
            ..Part::default()
        })
    }

    fn poll(&mut self, now: Instant, pruning: bool) -> anyhow::Result<Option<Instant>> {
        self.refresh_dense(false)?;
        if let (Some(next), Some(every)) = (self.next_counts, self.counts_every)
            && now >= next
        {
            // A full disk or the like: keep monitoring, say so once, retry
            // at every period; the final write at exit reports a failure.
            match self.write_counts() {
                Ok(()) if self.counts_failing => {
                    self.counts_failing = false;
                    eprintln!("kvm-watcher: the counts file is written again");
                }
                Ok(()) => {}
                Err(e) if !self.counts_failing => {
                    self.counts_failing = true;
                    warn(&format!(
                        "{e:#}; monitoring goes on, retrying every {} s",
                        every.as_secs_f64()
                    ));
                }
                Err(_) => {}
            }
            self.next_counts = Some(next + every);
        }
        if self.summary.is_none() && now >= self.next_exit_sweep {
            if let Some(dense) = &mut self.dense {
                dense.take(None);
            }
            self.exited
                .sweep(&self.slot_stats, &self.counts, self.dense.as_mut())?;
            self.next_exit_sweep = now + Duration::from_secs(1);
        }
        if self.ring_only && (now >= self.next_bitmap_check || pruning) {
            // A scan of the thread table: once a second is soon enough to
            // warn, and always before exited threads are forgotten.
            self.warn_bitmap_vms();
            self.next_bitmap_check = now + Duration::from_secs(1);
        }
        // New slots get their storage soon: until then their pages fill the hash.
        let dense = self.dense.as_ref().map(|_| Instant::now() + GRACE);
        Ok(match (self.next_counts, dense) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if self.ring_only {
            // A VM seen since the last scan still deserves its warning.
            self.warn_bitmap_vms();
        }
        // Whatever failed before (or fails here), the counts file is written:
        // pages not merged yet are still in the hash, which it reads too.
        let settled = match &mut self.dense {
            Some(dense) => {
                // Detached: whatever waits for a merge or a take is final now.
                let settled = read_slots(&self.slot_stats)
                    .and_then(|slots| dense.refresh(&slots, &self.counts, self.epoch, false))
                    .and_then(|()| dense.settle(&self.counts));
                dense.take(None);
                settled
            }
            None => Ok(()),
        };
        // Descriptors for the file and its directory, even when they ran out.
        self.fd_reserve.clear();
        let written = self.write_counts();
        if let (Err(e), Ok(_)) = (&settled, &written) {
            warn(&format!("{e:#}"));
        }
        written
    }

    fn summary(&self, counters: &types::monitor_counters) -> Vec<(&'static str, Value)> {
        if counters.map_full > 0 {
            warn(&format!(
                "{} dirty-page writes were not counted per page because --max-pages ({}) was reached; raise it",
                counters.map_full, self.max_pages
            ));
        }
        vec![
            ("dirty_map_full", counters.map_full.into()),
            (
                "dirty_distinct_pages",
                (read::count_pages(&self.counts)
                    + self.exited.pages()
                    + self.dense.as_ref().map_or(0, Dense::pages))
                .into(),
            ),
        ]
    }
}
