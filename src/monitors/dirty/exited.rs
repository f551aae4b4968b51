//! The pages of VMs that exited, taken out of the kernel's maps so that
//! `--max-pages` is not filled by the dead: kept in user space for the
//! counts file (when there is one), forgotten otherwise.

use std::collections::BTreeSet;
use std::path::PathBuf;

use libbpf_rs::MapHandle;

use super::counts::{PageCount, one_per_page};
use super::dense::Dense;
use super::read::{forget_pid, read_pids_counts, read_slots};
use super::spill::Spill;

/// VMs found gone, and what was kept of them.
pub struct Exited {
    /// Pids found gone at the last sweep: their last writes may not have been
    /// reported yet, so they are taken out at the next one.
    gone: BTreeSet<u32>,
    /// Their pages, for the counts file (when there is one).
    kept: Option<Spill>,
}

impl Exited {
    /// With a counts file, the pages of exited VMs go to it.
    pub fn new(counts_file: Option<PathBuf>) -> Self {
        Exited {
            gone: BTreeSet::new(),
            kept: counts_file.map(Spill::new),
        }
    }

    /// Takes the VMs found gone at the previous sweep out of the kernel's
    /// maps (their pages kept if asked), and notes the ones gone now. Call it
    /// after the figures of an interval were read, so every write of an
    /// exited VM is reported before its entries go.
    pub fn sweep(
        &mut self,
        slot_stats: &MapHandle,
        counts: &MapHandle,
        mut dense: Option<&mut Dense>,
    ) -> anyhow::Result<()> {
        let pids: BTreeSet<u32> = read_slots(slot_stats)?.iter().map(|s| s.pid).collect();
        let gone_now: BTreeSet<u32> = pids
            .into_iter()
            .filter(|p| !crate::procfs::process_alive(*p))
            .collect();
        let due: BTreeSet<u32> = gone_now.intersection(&self.gone).copied().collect();
        let keep = self.kept.is_some();
        // One VM, and with dense storage one memslot, at a time (see
        // Dense::forget_pid): memory holds that slot's pages only.
        for &pid in &due {
            let hashed = match keep {
                true => read_pids_counts(counts, &BTreeSet::from([pid]))?,
                false => Vec::new(),
            };
            let mut sink = |pages: Vec<PageCount>| {
                if let Some(kept) = &mut self.kept {
                    kept.add(pages);
                }
            };
            match dense.as_deref_mut() {
                Some(d) => d.forget_pid(pid, keep, hashed, &mut sink)?,
                None if !hashed.is_empty() => sink(one_per_page(hashed)),
                None => {}
            }
            forget_pid(slot_stats, counts, pid);
        }
        self.gone = gone_now.difference(&due).copied().collect();
        Ok(())
    }

    /// Pages kept of exited VMs.
    pub fn pages(&self) -> u64 {
        self.kept.as_ref().map_or(0, Spill::len)
    }

    /// The pages kept of exited VMs, in counts-file order.
    pub fn kept(
        &mut self,
    ) -> anyhow::Result<Box<dyn Iterator<Item = std::io::Result<PageCount>> + '_>> {
        Ok(match &mut self.kept {
            Some(k) => Box::new(k.pages()?),
            None => Box::new(std::iter::empty()),
        })
    }
}
