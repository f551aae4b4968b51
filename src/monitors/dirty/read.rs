//! The only code that reads dirty's maps: per-page counts (`dirty_counts`),
//! per-slot figures (`dirty_slot_stats`) and distinct pages per interval
//! (`dirty_epoch_pages`).

use std::collections::HashMap;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::counts::PageCount;
use crate::bpf::{read_record, types};

/// Calls `f(key, value)` for every entry of `map` with batched lookups. Returns
/// false if the kernel has no batch lookups for this map (nothing was read).
///
/// Not libbpf-rs's `lookup_batch` iterator: it takes a short batch for the
/// last one, but a hash map's batch ends at a bucket boundary and is often
/// short long before the end (a 262,144-page map came back as 65,535 pages).
/// The end is ENOENT.
pub(super) fn lookup_all(
    map: &MapHandle,
    f: &mut impl FnMut(&[u8], &[u8]),
) -> anyhow::Result<bool> {
    use std::os::fd::{AsFd, AsRawFd};
    const BATCH: u32 = 4096;
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    let mut keys = vec![0u8; ks * BATCH as usize];
    let mut values = vec![0u8; vs * BATCH as usize];
    // Opaque position tokens (a bucket index for hash maps); key-sized is always enough.
    let mut token = vec![0u8; ks.max(8)];
    let mut next = vec![0u8; ks.max(8)];
    let mut first = true;
    loop {
        let mut count = BATCH;
        // SAFETY: zeroed opts with `sz` set are valid.
        let mut opts: libbpf_rs::libbpf_sys::bpf_map_batch_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of_val(&opts) as _;
        // SAFETY: the buffers hold `count` keys and values and a token each.
        let r = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                if first {
                    std::ptr::null_mut()
                } else {
                    token.as_mut_ptr().cast()
                },
                next.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let count = (count as usize).min(BATCH as usize);
        if r == 0 || r == -libc::ENOENT {
            for i in 0..count {
                f(&keys[i * ks..(i + 1) * ks], &values[i * vs..(i + 1) * vs]);
            }
        }
        match r {
            0 => {}
            r if r == -libc::ENOENT => return Ok(true),
            r if first && (r == -libc::EINVAL || r == -libc::ENOTSUP || r == -524) => {
                return Ok(false); // no batch ops for this map type (ENOTSUPP is 524)
            }
            r => anyhow::bail!(
                "cannot read the dirty-page counts: {}",
                std::io::Error::from_raw_os_error(-r)
            ),
        }
        std::mem::swap(&mut token, &mut next);
        first = false;
    }
}

/// Reads every page count from `dirty_counts`, most dirtied first.
pub fn read_counts(map: &MapHandle) -> anyhow::Result<Vec<PageCount>> {
    read_counts_of(map, |_| true)
}

/// The page counts of the VMs `pids` (unsorted).
pub fn read_pids_counts(
    map: &MapHandle,
    pids: &std::collections::BTreeSet<u32>,
) -> anyhow::Result<Vec<PageCount>> {
    read_counts_of(map, |pid| pids.contains(&pid))
}

/// Every page count of `dirty_counts`, in no order.
pub fn read_counts_unsorted(map: &MapHandle) -> anyhow::Result<Vec<PageCount>> {
    read_counts_unsorted_of(map, |_| true)
}

fn read_counts_of(map: &MapHandle, wanted: impl Fn(u32) -> bool) -> anyhow::Result<Vec<PageCount>> {
    let mut out = read_counts_unsorted_of(map, wanted)?;
    sort_counts(&mut out);
    Ok(out)
}

fn read_counts_unsorted_of(
    map: &MapHandle,
    wanted: impl Fn(u32) -> bool,
) -> anyhow::Result<Vec<PageCount>> {
    // Count first and allocate once: growing by doubling briefly holds the old
    // and the new buffer (peak RSS 61 MiB instead of 46 at 2^20 pages).
    let mut n = 0usize;
    lookup_all(map, &mut |_: &[u8], _: &[u8]| n += 1)?;
    let mut out = Vec::with_capacity(n + n / 16);
    let mut push = |k: &[u8], v: &[u8]| {
        if let (Some(key), Some(val)) = (
            read_record::<types::dirty_key>(k),
            read_record::<types::dirty_count>(v),
        ) && wanted(key.pid)
        {
            out.push(PageCount {
                pid: key.pid,
                slot: key.slot,
                gfn: key.gfn,
                rel_gfn: val.rel_gfn,
                count: val.count,
            });
        }
    };
    let batch = lookup_all(map, &mut push);
    match batch {
        Ok(true) => {}
        Err(e) => return Err(e),
        Ok(false) => {
            // Kernels without batch lookups on this map type: one key at a time.
            for k in map.keys() {
                if let Some(v) = map.lookup(&k, MapFlags::ANY)? {
                    push(&k, &v);
                }
            }
        }
    }
    Ok(out)
}

/// Counts-file order: most dirtied first, then by pid, slot and gfn.
pub fn sort_counts(counts: &mut [PageCount]) {
    // In place: sort_by would allocate half the vector again (16 MiB at 1M pages).
    // The order is total (pid, slot, gfn are unique), so stability is moot.
    counts.sort_unstable_by(counts_order);
}

/// The counts file's order: most dirtied first, then by pid, slot and gfn.
pub fn counts_order(a: &PageCount, b: &PageCount) -> std::cmp::Ordering {
    b.count
        .cmp(&a.count)
        .then(a.pid.cmp(&b.pid))
        .then(a.slot.cmp(&b.slot))
        .then(a.gfn.cmp(&b.gfn))
}

/// One memslot's cumulative figures (`dirty_slot_stats`).
#[derive(Clone, Copy, Debug)]
pub struct SlotReading {
    /// VMM process.
    pub pid: u32,
    /// KVM's slot encoding: address space << 16 | slot id.
    pub slot: u32,
    /// Its figures.
    pub stats: types::dirty_slot_stats,
}

/// Every memslot's cumulative figures.
pub fn read_slots(slot_stats: &MapHandle) -> anyhow::Result<Vec<SlotReading>> {
    let mut out = Vec::new();
    for k in slot_stats.keys() {
        let (Some(key), Some(v)) = (
            read_record::<types::dirty_slot_key>(&k),
            slot_stats.lookup(&k, MapFlags::ANY)?,
        ) else {
            continue;
        };
        if let Some(stats) = read_record::<types::dirty_slot_stats>(&v) {
            out.push(SlotReading {
                pid: key.pid,
                slot: key.slot,
                stats,
            });
        }
    }
    Ok(out)
}

/// Distinct pages per (pid, slot) first written in interval `ended` (already
/// closed by bumping `epoch`); deletes the entries of that interval and
/// older ones.
pub fn take_distinct(
    epoch_pages: &MapHandle,
    ended: u32,
) -> anyhow::Result<HashMap<(u32, u32), u64>> {
    let mut distinct = HashMap::new();
    let mut stale = Vec::new();
    for k in epoch_pages.keys() {
        let Some(key) = read_record::<types::dirty_epoch_key>(&k) else {
            continue;
        };
        if key.epoch == ended
            && let Some(v) = epoch_pages.lookup(&k, MapFlags::ANY)?
        {
            distinct.insert((key.pid, key.slot), read_record::<u64>(&v).unwrap_or(0));
        }
        if key.epoch <= ended {
            stale.push(k);
        }
    }
    for k in stale {
        let _ = epoch_pages.delete(&k);
    }
    Ok(distinct)
}

/// Pages in the per-page counts.
pub fn count_pages(dirty_counts: &MapHandle) -> u64 {
    dirty_counts.keys().count() as u64
}

/// Deletes an exited VM's per-slot and per-page entries from the kernel.
pub fn forget_pid(slot_stats: &MapHandle, dirty_counts: &MapHandle, pid: u32) {
    for k in slot_stats.keys() {
        if read_record::<types::dirty_slot_key>(&k).is_some_and(|s| s.pid == pid) {
            let _ = slot_stats.delete(&k);
        }
    }
    let stale: Vec<Vec<u8>> = dirty_counts
        .keys()
        .filter(|k| read_record::<types::dirty_key>(k).is_some_and(|d| d.pid == pid))
        .collect();
    for k in stale {
        let _ = dirty_counts.delete(&k);
    }
}
