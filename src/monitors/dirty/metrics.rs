//! dirty's metric families: logged writes and distinct pages per memslot.

use std::collections::BTreeMap;
use std::time::Instant;

use libbpf_rs::MapHandle;
use prometheus_client::encoding::DescriptorEncoder;

use super::dense::Dense;
use super::read::{forget_pid, read_slots};
use crate::monitors::metrics::{Family, LOGGED_WRITES, Labeler, Labels, Metrics, Refresh, with};

/// One memslot's cumulative figures.
#[derive(Clone, Debug, Default)]
struct SlotFigures {
    writes: u64,
    distinct: u64,
    /// When its VM was first seen gone.
    exited: Option<Instant>,
}

pub struct DirtyMetrics {
    slot_stats: MapHandle,
    dirty_counts: MapHandle,
    dense: Option<Dense>,
    slots: BTreeMap<(u32, u32), SlotFigures>,
}

impl DirtyMetrics {
    pub fn new(slot_stats: MapHandle, dirty_counts: MapHandle, dense: Option<Dense>) -> Self {
        DirtyMetrics {
            slot_stats,
            dirty_counts,
            dense,
            slots: BTreeMap::new(),
        }
    }
}

fn slot_labels(labels: &Labeler, pid: u32, slot: u32) -> Labels {
    with(
        with(labels.vm(pid), "slot", slot & 0xffff),
        "as",
        slot >> 16,
    )
}

impl DirtyMetrics {
    /// A slot the kernel started counting in the hash gets its dense
    /// storage (and the hash's pages of storages past GRACE are merged):
    /// until then each of its page writes takes the hash, about twice
    /// the kernel time of a dense one.
    fn storage_for_new_slots(&mut self) -> anyhow::Result<()> {
        if let Some(dense) = &mut self.dense
            && dense.wanted()
        {
            dense.refresh(&read_slots(&self.slot_stats)?, &self.dirty_counts, 1, false)?;
        }
        Ok(())
    }
}

impl Metrics for DirtyMetrics {
    fn keeps_up(&self) -> bool {
        self.dense.is_some()
    }

    /// As `watch` does at every poll: a VM's new slot leaves the hash
    /// within milliseconds, not at the next refresh.
    fn keep_up(&mut self) -> anyhow::Result<()> {
        self.storage_for_new_slots()
    }

    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        self.storage_for_new_slots()?;
        let mut slots = read_slots(&self.slot_stats)?;
        if let Some(dense) = &mut self.dense {
            dense.take(None);
            dense.patch(&mut slots)?;
        }
        for s in slots {
            cx.shared.add(LOGGED_WRITES, s.pid, s.stats.writes);
            let f = self.slots.entry((s.pid, s.slot)).or_default();
            f.writes = s.stats.writes;
            f.distinct = s.stats.distinct_total;
            cx.pids.insert(s.pid);
        }
        // VMs that exited: keep their last figures, free their kernel entries.
        let mut gone = Vec::new();
        for ((pid, _), f) in self.slots.iter_mut() {
            if f.exited.is_none() && !crate::procfs::process_alive(*pid) {
                f.exited = Some(cx.now);
                gone.push(*pid);
            }
        }
        gone.dedup();
        for pid in gone {
            if let Some(dense) = &mut self.dense {
                dense.forget_pid(pid, false, Vec::new(), &mut |_| {})?;
            }
            forget_pid(&self.slot_stats, &self.dirty_counts, pid);
        }
        let (now, retain) = (cx.now, cx.retain);
        self.slots
            .retain(|_, f| f.exited.is_none_or(|t| now.duration_since(t) < retain));
        Ok(())
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        let (mut writes, mut distinct) = (Family::default(), Family::default());
        for ((pid, slot), f) in &self.slots {
            let l = slot_labels(labels, *pid, *slot);
            writes.add(l.clone(), f.writes);
            // A restarted VM's slot: the live one's pages.
            if f.exited.is_none() || !distinct.series.contains_key(&l) {
                distinct.series.insert(l, f.distinct);
            }
        }
        labels.counters(
            encoder,
            (
                "dirty_page_writes",
                "Guest page writes KVM logged as dirty, per memslot",
                None,
            ),
            &writes,
        )?;
        labels.gauges(
            encoder,
            (
                "dirty_distinct_pages",
                "Distinct guest pages dirtied since kvm-watcher started, per memslot",
                None,
            ),
            &distinct,
        )
    }
}
