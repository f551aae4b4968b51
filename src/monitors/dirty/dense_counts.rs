//! The counts file from dense storage: the storages' per-page counts and
//! the pages counted elsewhere, added up per page and sorted in 12 bytes a
//! page.

use std::collections::HashMap;
use std::path::Path;

use super::counts::{PageCount, write_counts_iter};
use super::dense::{Dense, Store};
use super::read::lookup_all;
use super::spill::merge;
use crate::bpf::read_record;

impl Dense {
    /// Writes the counts file `path`: the storages' counts plus `others`
    /// (pages of the hash, merged ones), a page in both added up, merged
    /// with `exited` (exited VMs' pages, in counts-file order). Holds 12
    /// bytes per live page while sorting.
    pub fn write_counts(
        &self,
        path: &Path,
        others: Vec<PageCount>,
        exited: impl Iterator<Item = std::io::Result<PageCount>>,
    ) -> anyhow::Result<()> {
        let stores: Vec<&Store> = self.stores.iter().filter(|x| x.counts.is_some()).collect();
        let mut extra: HashMap<(u32, u64), u64> = HashMap::new();
        let mut alone: HashMap<(u32, u32, u64), PageCount> = HashMap::new();
        for p in others.into_iter().chain(self.early.iter().copied()) {
            match stores.iter().position(|x| x.holds(p.pid, p.slot, p.gfn)) {
                Some(i) => *extra.entry((i as u32, p.rel_gfn)).or_default() += p.count,
                None => {
                    alone
                        .entry((p.pid, p.slot, p.gfn))
                        .and_modify(|a| a.count += p.count)
                        .or_insert(p);
                }
            }
        }
        // (count, store, rel); a store index past the stores is an `alone` page.
        // (count, store, rel), 12 bytes a page; a store index past the
        // stores is an `alone` page; a count of u32::MAX or more is in `big`.
        let mut pages: Vec<(u32, u32, u32)> = Vec::new();
        let mut big: HashMap<(u32, u32), u64> = HashMap::new();
        let mut push = |c: u64, i: u32, rel: u32| {
            if c >= u64::from(u32::MAX) {
                big.insert((i, rel), c);
            }
            pages.push((u32::try_from(c).unwrap_or(u32::MAX), i, rel));
        };
        for (i, x) in stores.iter().enumerate() {
            let Some(map) = &x.counts else { continue };
            lookup_all(map, &mut |k: &[u8], v: &[u8]| {
                let (Some(rel), Some(c)) = (read_record::<u32>(k), read_record::<u64>(v)) else {
                    return;
                };
                let c = c + extra.remove(&(i as u32, u64::from(rel))).unwrap_or(0);
                if c > 0 {
                    push(c, i as u32, rel);
                }
            })?;
        }
        for ((i, rel), c) in extra {
            push(c, i, rel as u32);
        }
        let alone: Vec<PageCount> = alone.into_values().collect();
        let n = stores.len() as u32;
        for (j, p) in alone.iter().enumerate() {
            push(p.count, n + j as u32, 0);
        }
        let page = |&(c, i, rel): &(u32, u32, u32)| match stores.get(i as usize) {
            Some(x) => PageCount {
                pid: x.pid,
                slot: x.slot,
                gfn: x.base_gfn + u64::from(rel),
                rel_gfn: u64::from(rel),
                count: match c {
                    u32::MAX => big.get(&(i, rel)).copied().unwrap_or(u64::from(c)),
                    c => u64::from(c),
                },
            },
            None => alone[(i - n) as usize],
        };
        pages.sort_unstable_by(|a, b| {
            let (pa, pb) = (page(a), page(b));
            pb.count
                .cmp(&pa.count)
                .then(pa.pid.cmp(&pb.pid))
                .then(pa.slot.cmp(&pb.slot))
                .then(pa.gfn.cmp(&pb.gfn))
        });
        write_counts_iter(path, merge(pages.iter().map(page).map(Ok), exited))
    }
}
