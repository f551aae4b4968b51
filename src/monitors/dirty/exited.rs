//! The pages of VMs that exited, taken out of the kernel's maps so that
//! `--max-pages` is not filled by the dead: kept in user space for the
//! counts file (when there is one), forgotten otherwise.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use libbpf_rs::MapHandle;

use super::counts::PageCount;
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
        if !due.is_empty() {
            // One entry per page: the hash's and the dense storage's counts of
            // a page added up.
            let mut pages: HashMap<(u32, u32, u64), PageCount> = HashMap::new();
            let mut add = |p: PageCount| {
                pages
                    .entry((p.pid, p.slot, p.gfn))
                    .and_modify(|q| q.count += p.count)
                    .or_insert(p);
            };
            let keep = self.kept.is_some();
            if keep {
                read_pids_counts(counts, &due)?
                    .into_iter()
                    .for_each(&mut add);
            }
            for &pid in &due {
                if let Some(d) = dense.as_deref_mut() {
                    d.forget_pid(pid, keep)?.into_iter().for_each(&mut add);
                }
                forget_pid(slot_stats, counts, pid);
            }
            if let Some(kept) = &mut self.kept {
                kept.add(pages.into_values());
            }
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
