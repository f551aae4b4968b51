//! Dense dirty storage (kernel half: src/bpf/dirty_dense.bpf.c), Linux
//! 5.12+: for each memslot place a bitmap (1 bit per page, taken word by
//! word with an atomic swap, so nothing set between read and reset is
//! lost), a count per page when the counts file is asked for, and per-CPU
//! write totals. Made here when a slot shows up in `dirty_slot_stats`;
//! pages the kernel counted in the hash before that are merged out of it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use super::counts::{PageCount, by_slot};
use super::read::{SlotReading, lookup_all};
use crate::bpf::{KvmWatcherSkel, read_record, types};

/// After a storage is entered, programs that looked it up before may still
/// count into the hash for a moment: its pages are merged only after this.
pub const GRACE: Duration = Duration::from_millis(20);

use super::bitmap::Bitmap;

/// One memslot place's storage.
pub(super) struct Store {
    pub(super) pid: u32,
    pub(super) slot: u32,
    pub(super) base_gfn: u64,
    pub(super) npages: u64,
    userspace_addr: u64,
    /// Index in the outer maps; its per-CPU writes belong to this store
    /// while `owns_sid`.
    sid: u32,
    owns_sid: bool,
    /// In the kernel's maps now (a moved slot's old place, or an exited
    /// VM's, is not).
    live: bool,
    bitmap_map: MapHandle,
    bitmap: Bitmap,
    pub(super) counts: Option<MapHandle>,
    /// Pages taken from the bitmap since the start (user space only).
    ever: Vec<u64>,
    published: Instant,
    /// The interval in progress when it was entered: a storage entered
    /// after an interval ended holds nothing of that interval.
    published_epoch: u32,
    /// Its pages in the hash were merged: its bitmap may be taken.
    merged: bool,
}

impl Store {
    pub(super) fn holds(&self, pid: u32, slot: u32, gfn: u64) -> bool {
        self.pid == pid
            && self.slot == slot
            && gfn >= self.base_gfn
            && gfn - self.base_gfn < self.npages
    }
}

/// The dense storages of a session or of the exporter.
pub struct Dense {
    sids: MapHandle,
    bitmaps: MapHandle,
    page_counts: MapHandle,
    writes: MapHandle,
    slow: MapHandle,
    keep_counts: bool,
    budget: u64,
    used: u64,
    free: VecDeque<u32>,
    pub(super) stores: Vec<Store>,
    last_slow: Option<u64>,
    /// The kernel's `epoch` (the interval in progress).
    epoch: u32,
    /// Pages merged out of the hash (counted there first).
    pub(super) early: Vec<PageCount>,
    /// Pages counted in an interval both by the hash and by a bitmap, per (pid, slot, epoch).
    twice: HashMap<(u32, u32, u32), u64>,
    /// Bits to set after the next take: (store, word, bits).
    later: Vec<(usize, usize, u64)>,
    /// Pages the hash counted as new in the interval that just ended, whose
    /// bit the next take must look at: (store, word, bit). The guest may
    /// write them into the bitmap between the merge and the take.
    ended_pages: Vec<(usize, usize, u64)>,
    /// Per (pid, slot): writes of stores whose sid went to another, and
    /// distinct pages first taken from a bitmap.
    retired_writes: HashMap<(u32, u32), u64>,
    distinct: HashMap<(u32, u32), u64>,
    ncpu: usize,
    warned_budget: bool,
}

fn create_opts() -> libbpf_rs::libbpf_sys::bpf_map_create_opts {
    // SAFETY: zeroed opts with `sz` set are valid.
    let mut o: libbpf_rs::libbpf_sys::bpf_map_create_opts = unsafe { std::mem::zeroed() };
    o.sz = std::mem::size_of_val(&o) as _;
    o.map_flags = libbpf_rs::libbpf_sys::BPF_F_MMAPABLE | libbpf_rs::libbpf_sys::BPF_F_INNER_MAP;
    o
}

fn array(name: &str, entries: u64) -> anyhow::Result<MapHandle> {
    let entries = u32::try_from(entries.max(1))?;
    MapHandle::create(MapType::Array, Some(name), 4, 8, entries, &create_opts())
        .map_err(|e| anyhow::anyhow!("cannot make dirty-page storage of {entries} entries: {e}"))
}

impl Dense {
    /// `keep_counts`: per-page counts (the counts file); `budget`: most
    /// pages in live storages (--max-pages).
    pub fn new(skel: &KvmWatcherSkel<'_>, keep_counts: bool, budget: u64) -> anyhow::Result<Dense> {
        Ok(Dense {
            sids: MapHandle::try_from(&skel.maps.dirty_slot_sids)?,
            bitmaps: MapHandle::try_from(&skel.maps.dirty_bitmaps)?,
            page_counts: MapHandle::try_from(&skel.maps.dirty_page_counts)?,
            writes: MapHandle::try_from(&skel.maps.dirty_sid_writes)?,
            slow: MapHandle::try_from(&skel.maps.dirty_slow)?,
            keep_counts,
            budget,
            used: 0,
            free: (0..types::limits::DIRTY_SIDS.0).collect(),
            stores: Vec::new(),
            last_slow: None,
            epoch: 1,
            early: Vec::new(),
            twice: HashMap::new(),
            later: Vec::new(),
            ended_pages: Vec::new(),
            retired_writes: HashMap::new(),
            distinct: HashMap::new(),
            ncpu: libbpf_rs::num_possible_cpus()?,
            warned_budget: false,
        })
    }

    /// Whether the kernel counted pages in the hash since the last call, or
    /// a storage waits for its merge: then `refresh` has work.
    pub fn wanted(&mut self) -> bool {
        let n = self
            .slow
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| read_record::<u64>(&v));
        let changed = n != self.last_slow;
        self.last_slow = n;
        changed || self.stores.iter().any(|s| s.live && !s.merged)
    }

    /// Makes storage for slots seen without it (retiring a moved slot's
    /// old place), then merges the hash's pages of storages past GRACE.
    /// `epoch` is the interval in progress; `closing`: an interval just
    /// ended (its bitmaps are taken next), so every storage is merged now,
    /// waiting out GRACE if need be.
    pub fn refresh(
        &mut self,
        slots: &[SlotReading],
        hash: &MapHandle,
        epoch: u32,
        closing: bool,
    ) -> anyhow::Result<()> {
        self.epoch = epoch;
        for s in slots {
            let st = &s.stats;
            if st.npages == 0 {
                continue;
            }
            let live = self
                .stores
                .iter()
                .position(|x| x.live && x.pid == s.pid && x.slot == s.slot);
            if let Some(i) = live {
                let x = &self.stores[i];
                if x.base_gfn == st.base_gfn
                    && x.npages == st.npages
                    && x.userspace_addr == st.userspace_addr
                {
                    continue;
                }
                self.merge(hash, closing, true, Some(i))?;
                self.retire(i)?;
            }
            let old = self.stores.iter().position(|x| {
                !x.live
                    && x.pid == s.pid
                    && x.slot == s.slot
                    && x.base_gfn == st.base_gfn
                    && x.npages == st.npages
                    && x.userspace_addr == st.userspace_addr
            });
            match old {
                Some(i) => self.publish(i, st.generation)?,
                None => self.create(s)?,
            }
        }
        self.merge(hash, closing, closing, None)
    }

    /// Merges every storage's hash pages now, waiting out GRACE.
    pub fn settle(&mut self, hash: &MapHandle) -> anyhow::Result<()> {
        self.merge(hash, false, true, None)
    }

    fn create(&mut self, s: &SlotReading) -> anyhow::Result<()> {
        let npages = s.stats.npages;
        if self.used + npages > self.budget {
            if !self.warned_budget {
                self.warned_budget = true;
                crate::output::warn(&format!(
                    "--max-pages ({}) cannot hold memslot {} of VM pid {} ({npages} pages): its pages are counted in the overflow map",
                    self.budget,
                    s.slot & 0xffff,
                    s.pid
                ));
            }
            return Ok(());
        }
        let words = npages.div_ceil(64);
        let bitmap_map = array("dirty_bits", words)?;
        let bitmap = Bitmap::map(&bitmap_map, words as usize)?;
        let counts = match self.keep_counts {
            true => Some(array("dirty_pcounts", npages)?),
            false => None,
        };
        self.stores.push(Store {
            pid: s.pid,
            slot: s.slot,
            base_gfn: s.stats.base_gfn,
            npages,
            userspace_addr: s.stats.userspace_addr,
            sid: 0,
            owns_sid: false,
            live: false,
            bitmap_map,
            bitmap,
            counts,
            ever: vec![0; words as usize],
            published: Instant::now(),
            published_epoch: self.epoch,
            merged: false,
        });
        self.publish(self.stores.len() - 1, s.stats.generation)
    }

    /// Enters store `i` in the kernel's maps under a free sid.
    fn publish(&mut self, i: usize, generation: u64) -> anyhow::Result<()> {
        let Some(sid) = self.free.pop_front() else {
            return Ok(()); // every sid in use: its pages stay in the hash
        };
        // The sid's last owner keeps its writes as retired.
        if let Some(j) = self.stores.iter().position(|x| x.owns_sid && x.sid == sid) {
            let w = self.sid_writes(sid)?;
            *self
                .retired_writes
                .entry((self.stores[j].pid, self.stores[j].slot))
                .or_default() += w;
            self.stores[j].owns_sid = false;
        }
        let key = sid.to_ne_bytes();
        let zeros = vec![vec![0u8; 8]; self.ncpu];
        self.writes.update_percpu(&key, &zeros, MapFlags::ANY)?;
        let x = &mut self.stores[i];
        if let Some(c) = &x.counts {
            let fd = c.as_fd().as_raw_fd().to_ne_bytes();
            self.page_counts.update(&key, &fd, MapFlags::ANY)?;
        }
        let fd = x.bitmap_map.as_fd().as_raw_fd().to_ne_bytes();
        self.bitmaps.update(&key, &fd, MapFlags::ANY)?;
        // Last: the kernel uses the storage once this entry is there.
        let entry = types::dirty_sid {
            base_gfn: x.base_gfn,
            npages: x.npages,
            generation,
            userspace_addr: x.userspace_addr,
            sid,
            pad: 0,
        };
        let skey = types::dirty_slot_key {
            pid: x.pid,
            slot: x.slot,
        };
        self.sids
            .update(as_bytes(&skey), as_bytes(&entry), MapFlags::ANY)?;
        x.sid = sid;
        x.owns_sid = true;
        x.live = true;
        x.published = Instant::now();
        x.published_epoch = self.epoch;
        x.merged = false;
        self.used += x.npages;
        Ok(())
    }

    /// Takes store `i` out of the kernel's maps; its figures stay.
    fn retire(&mut self, i: usize) -> anyhow::Result<()> {
        let x = &mut self.stores[i];
        if !x.live {
            return Ok(());
        }
        let skey = types::dirty_slot_key {
            pid: x.pid,
            slot: x.slot,
        };
        let _ = self.sids.delete(as_bytes(&skey));
        let key = x.sid.to_ne_bytes();
        let _ = self.bitmaps.delete(&key);
        let _ = self.page_counts.delete(&key);
        x.live = false;
        self.used -= x.npages;
        // Reused last, so late writers of this sid find it gone, not someone else's.
        self.free.push_back(x.sid);
        Ok(())
    }

    fn sid_writes(&self, sid: u32) -> anyhow::Result<u64> {
        let v = self
            .writes
            .lookup_percpu(&sid.to_ne_bytes(), MapFlags::ANY)?;
        Ok(v.unwrap_or_default()
            .iter()
            .filter_map(|c| read_record::<u64>(c))
            .sum())
    }

    /// Moves the hash's pages of live, unmerged storages (all of them if
    /// `wait`, sleeping out GRACE; else those past it; only store `only`
    /// if given) out of the hash. A page the hash counted as new in the
    /// interval in progress (or, `closing`, in the one that just ended) and
    /// that its bitmap also holds is noted, so the interval counts it once.
    fn merge(
        &mut self,
        hash: &MapHandle,
        closing: bool,
        wait: bool,
        only: Option<usize>,
    ) -> anyhow::Result<()> {
        let due: Vec<usize> = (0..self.stores.len())
            .filter(|&i| only.is_none_or(|o| o == i))
            .filter(|&i| self.stores[i].live && !self.stores[i].merged)
            .filter(|&i| wait || self.stores[i].published.elapsed() >= GRACE)
            .collect();
        let Some(latest) = due.iter().map(|&i| self.stores[i].published).max() else {
            return Ok(());
        };
        let left = GRACE.saturating_sub(latest.elapsed());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
        let (cur, ended) = (self.epoch, self.epoch.wrapping_sub(1));
        // Keys first: deleting while walking restarts the walk at every delete.
        let keys: Vec<Vec<u8>> = hash.keys().collect();
        for k in keys {
            let Some(key) = read_record::<types::dirty_key>(&k) else {
                continue;
            };
            let Some(&i) = due
                .iter()
                .find(|&&i| self.stores[i].holds(key.pid, key.slot, key.gfn))
            else {
                continue;
            };
            let Some(v) = hash
                .lookup(&k, MapFlags::ANY)?
                .and_then(|v| read_record::<types::dirty_count>(&v))
            else {
                continue;
            };
            let x = &mut self.stores[i];
            let rel = key.gfn - x.base_gfn;
            let (w, bit) = ((rel / 64) as usize, 1u64 << (rel % 64));
            x.ever[w] |= bit;
            let twice = if v.epoch == cur {
                // The bitmap counts it in this interval; at its start, only
                // after the take of the one that ended.
                match closing {
                    true => self.later.push((i, w, bit)),
                    false => {
                        x.bitmap.word(w).fetch_or(bit, Ordering::AcqRel);
                    }
                }
                Some(cur)
            } else {
                if closing && v.epoch == ended {
                    // Counted in the ended interval by the hash: if the take
                    // finds its bit, the bitmap counted it too.
                    self.ended_pages.push((i, w, bit));
                }
                None
            };
            if let Some(e) = twice {
                *self.twice.entry((key.pid, key.slot, e)).or_default() += 1;
            }
            self.early.push(PageCount {
                pid: key.pid,
                slot: key.slot,
                gfn: key.gfn,
                rel_gfn: rel,
                count: v.count,
            });
            let _ = hash.delete(&k);
        }
        for i in due {
            self.stores[i].merged = true;
        }
        Ok(())
    }

    /// Takes every merged storage's bitmap: the pages written since the
    /// last take, per (pid, slot), less those the hash counted already in
    /// interval `ended` (if given). A storage entered after `ended` closed
    /// holds only pages of the interval in progress: they are left to it.
    pub fn take(&mut self, ended: Option<u32>) -> HashMap<(u32, u32), u64> {
        let mut out: HashMap<(u32, u32), u64> = HashMap::new();
        let ended_pages = std::mem::take(&mut self.ended_pages);
        let mut watched: HashMap<(usize, usize), u64> =
            ended_pages.iter().map(|&(i, w, _)| ((i, w), 0)).collect();
        let late = |x: &Store| ended.is_some_and(|e| x.published_epoch > e);
        for (j, x) in self.stores.iter_mut().enumerate().filter(|(_, x)| x.merged) {
            let late = late(x);
            let (mut n, mut new) = (0u64, 0u64);
            for i in 0..x.ever.len() {
                let w = x.bitmap.word(i);
                if w.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let v = w.swap(0, Ordering::AcqRel);
                if let Some(seen) = watched.get_mut(&(j, i)) {
                    *seen = v;
                }
                if late {
                    // Counted by the next take instead.
                    self.later.push((j, i, v));
                }
                n += u64::from(v.count_ones());
                new += u64::from((v & !x.ever[i]).count_ones());
                x.ever[i] |= v;
            }
            if n > 0 && !late {
                *out.entry((x.pid, x.slot)).or_default() += n;
            }
            if new > 0 {
                *self.distinct.entry((x.pid, x.slot)).or_default() += new;
            }
        }
        for (i, w, bit) in std::mem::take(&mut self.later) {
            self.stores[i]
                .bitmap
                .word(w)
                .fetch_or(bit, Ordering::AcqRel);
        }
        if ended.is_some() {
            for (i, w, bit) in ended_pages {
                let x = &self.stores[i];
                if !late(x)
                    && watched.get(&(i, w)).is_some_and(|v| v & bit != 0)
                    && let Some(n) = out.get_mut(&(x.pid, x.slot))
                {
                    *n = n.saturating_sub(1);
                }
            }
        }
        if let Some(e) = ended {
            for (&(pid, slot, ep), &t) in &self.twice {
                if ep == e
                    && let Some(n) = out.get_mut(&(pid, slot))
                {
                    *n = n.saturating_sub(t);
                }
            }
            self.twice.retain(|k, _| k.2 > e);
        }
        out
    }

    /// Adds the writes and distinct pages kept here to the slots' figures.
    pub fn patch(&self, slots: &mut [SlotReading]) -> anyhow::Result<()> {
        let mut writes: HashMap<(u32, u32), u64> = self.retired_writes.clone();
        for x in self.stores.iter().filter(|x| x.owns_sid) {
            *writes.entry((x.pid, x.slot)).or_default() += self.sid_writes(x.sid)?;
        }
        for s in slots {
            let k = (s.pid, s.slot);
            s.stats.writes += writes.get(&k).copied().unwrap_or(0);
            s.stats.distinct_total += self.distinct.get(&k).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Distinct pages counted here (not in the hash).
    pub fn pages(&self) -> u64 {
        self.distinct.values().sum::<u64>() + self.early.len() as u64
    }

    /// An exited VM: its storages leave the kernel and are closed. With
    /// `keep`, its pages go to `sink` one memslot at a time (every place a
    /// moved slot held together), one entry per page: those merged out of
    /// the hash, the storages' per-page counts,
    /// and `hashed` (its pages still in the hash). A memslot at a time, so
    /// that memory holds one slot's pages (32 bytes each), not the VM's:
    /// a hash of a VM's 2^19 pages made the watch's RSS peak at 130 MiB.
    pub fn forget_pid(
        &mut self,
        pid: u32,
        keep: bool,
        mut hashed: Vec<PageCount>,
        sink: &mut dyn FnMut(Vec<PageCount>),
    ) -> anyhow::Result<()> {
        for i in 0..self.stores.len() {
            if self.stores[i].pid == pid {
                self.retire(i)?;
            }
        }
        for (i, w, bit) in std::mem::take(&mut self.later) {
            self.stores[i]
                .bitmap
                .word(w)
                .fetch_or(bit, Ordering::AcqRel);
        }
        let (gone, stay): (Vec<PageCount>, Vec<PageCount>) =
            self.early.drain(..).partition(|p| p.pid == pid);
        self.early = stay;
        hashed.extend(gone);
        if keep {
            let slots: Vec<u32> = self
                .stores
                .iter()
                .filter(|x| x.pid == pid && x.counts.is_some())
                .map(|x| x.slot)
                .collect();
            let stores = &self.stores;
            by_slot(
                &slots,
                hashed,
                &mut |slot, pages| {
                    // Every place the slot held (a moved slot had two).
                    for x in stores.iter().filter(|x| x.pid == pid && x.slot == slot) {
                        let Some(map) = &x.counts else { continue };
                        // Sized for every page of the place up front.
                        pages.reserve(x.npages as usize);
                        lookup_all(map, &mut |k: &[u8], v: &[u8]| {
                            if let (Some(rel), Some(count)) =
                                (read_record::<u32>(k), read_record::<u64>(v))
                                && count > 0
                            {
                                pages.push(PageCount {
                                    pid,
                                    slot,
                                    gfn: x.base_gfn + u64::from(rel),
                                    rel_gfn: u64::from(rel),
                                    count,
                                });
                            }
                        })?;
                    }
                    Ok(())
                },
                sink,
            )?;
        }
        self.ended_pages.clear();
        // Its maps are closed and its figures forgotten: what the counts
        // file needs of it is in the pages returned.
        self.stores.retain(|x| x.pid != pid);
        self.retired_writes.retain(|k, _| k.0 != pid);
        self.distinct.retain(|k, _| k.0 != pid);
        self.twice.retain(|k, _| k.0 != pid);
        Ok(())
    }
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: the skeleton's plain-old-data types, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

#[cfg(test)]
#[path = "dense_tests.rs"]
mod tests;
