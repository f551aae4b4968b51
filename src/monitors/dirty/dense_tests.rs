//! Dense storage against real BPF maps (no programs, no VM; needs root):
//! the kernel's part is played by writing the maps as its programs would.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::{Dense, as_bytes};
use crate::bpf::{KvmWatcherSkelBuilder, types};
use crate::monitors::dirty::read::SlotReading;

const PID: u32 = 4242;
const SLOT: u32 = 1;
const BASE: u64 = 0x100;

/// Loads the object's maps only (every program left out), or says why not.
fn maps(
    storage: &mut MaybeUninit<libbpf_rs::OpenObject>,
) -> Option<crate::bpf::KvmWatcherSkel<'_>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "dense storage tests need root (BPF maps) and must not be skipped in CI"
        );
        eprintln!("SKIP dense storage tests: need root (BPF maps)");
        return None;
    }
    let mut open = KvmWatcherSkelBuilder::default()
        .open(storage)
        .expect("opening the object");
    for mut p in open.open_object_mut().progs_mut() {
        p.set_autoload(false);
    }
    Some(open.load().expect("loading the object's maps"))
}

fn slot(npages: u64) -> SlotReading {
    SlotReading {
        pid: PID,
        slot: SLOT,
        stats: types::dirty_slot_stats {
            writes: 0,
            distinct_total: 0,
            npages,
            base_gfn: BASE,
            userspace_addr: 0x7f00_0000_0000,
            generation: 1,
        },
    }
}

/// The hash's entry for page `rel`, last counted as new in interval `epoch`.
fn hash_page(hash: &MapHandle, rel: u64, epoch: u32) {
    let key = types::dirty_key {
        pid: PID,
        slot: SLOT,
        gfn: BASE + rel,
    };
    let v = types::dirty_count {
        count: 3,
        rel_gfn: rel,
        epoch,
        pad: 0,
    };
    hash.update(as_bytes(&key), as_bytes(&v), MapFlags::ANY)
        .expect("writing the page hash");
}

/// Distinct pages a take gave the slot.
fn counted(out: &std::collections::HashMap<(u32, u32), u64>) -> u64 {
    out.get(&(PID, SLOT)).copied().unwrap_or(0)
}

/// What the kernel does for a write to page `rel` of the slot's storage.
fn write(dense: &Dense, rel: u64) {
    let x = dense
        .stores
        .iter()
        .find(|x| x.live)
        .expect("a live storage");
    x.bitmap
        .word((rel / 64) as usize)
        .fetch_or(1 << (rel % 64), Ordering::AcqRel);
}

/// A slot whose storage is merged as interval 1 ends: its pages counted by
/// the hash in interval 1 and written again after the merge, before the
/// take, are counted once in interval 1 (the hash's count), not twice.
#[test]
fn a_page_counted_by_the_hash_is_not_counted_again_by_a_later_bitmap_bit() {
    let mut storage = MaybeUninit::uninit();
    let Some(skel) = maps(&mut storage) else {
        return;
    };
    let hash = MapHandle::try_from(&skel.maps.dirty_counts).unwrap();
    let mut dense = Dense::new(&skel, false, 1 << 20).unwrap();
    // Pages 0..8 new in interval 1 (the hash counted them there); page 9
    // last written in an earlier interval.
    for rel in 0..8 {
        hash_page(&hash, rel, 1);
    }
    hash_page(&hash, 9, 0);
    // The storage is made late in interval 1; the interval ends before its
    // grace is over, so it is merged then.
    dense.refresh(&[slot(64)], &hash, 1, false).unwrap();
    assert_eq!(hash.keys().count(), 9, "merged only after the grace");
    dense.refresh(&[slot(64)], &hash, 2, true).unwrap();
    assert_eq!(hash.keys().count(), 0, "the hash's pages are merged out");
    // Pages 0..4 before the merge would have been seen by it; these are
    // written between the merge and the take.
    for rel in [0, 1, 2, 3, 9, 20] {
        write(&dense, rel);
    }
    let out = dense.take(Some(1));
    // Pages 0..3 were counted by the hash in interval 1; 9 and 20 were not.
    assert_eq!(counted(&out), 2, "{out:?}");
    // Interval 2: the bitmap alone.
    for rel in [0, 30] {
        write(&dense, rel);
    }
    let out = dense.take(Some(2));
    assert_eq!(counted(&out), 2, "{out:?}");
}

/// Pages the hash counted in the interval in progress when the merge runs
/// are counted once in it, whether the bitmap saw them before the merge or not.
#[test]
fn pages_merged_within_an_interval_are_counted_once() {
    let mut storage = MaybeUninit::uninit();
    let Some(skel) = maps(&mut storage) else {
        return;
    };
    let hash = MapHandle::try_from(&skel.maps.dirty_counts).unwrap();
    let mut dense = Dense::new(&skel, false, 1 << 20).unwrap();
    for rel in 0..8 {
        hash_page(&hash, rel, 3);
    }
    // Interval 3 in progress: the storage is made, the guest writes pages
    // 0, 1 and 40 into it, then the merge.
    dense.refresh(&[slot(64)], &hash, 3, false).unwrap();
    for rel in [0, 1, 40] {
        write(&dense, rel);
    }
    dense.settle(&hash).unwrap();
    write(&dense, 2);
    let out = dense.take(Some(3));
    // The hash counted 0..8; the bitmap adds page 40 only.
    assert_eq!(counted(&out), 1, "{out:?}");
}

/// A storage made after interval 1 ended holds only writes of interval 2:
/// they count there, once, and not in interval 1.
#[test]
fn a_storage_made_after_an_interval_ended_counts_in_the_next_one() {
    let mut storage = MaybeUninit::uninit();
    let Some(skel) = maps(&mut storage) else {
        return;
    };
    let hash = MapHandle::try_from(&skel.maps.dirty_counts).unwrap();
    let mut dense = Dense::new(&skel, false, 1 << 20).unwrap();
    // Pages 0..4 counted new by the hash in interval 1 only; 4..8 in
    // interval 1 and again in interval 2 (written after it began, before
    // the storage was there).
    for rel in 0..4 {
        hash_page(&hash, rel, 1);
    }
    for rel in 4..8 {
        hash_page(&hash, rel, 2);
    }
    // As interval 1 ends, the slot is new: storage made, entered, merged.
    dense.refresh(&[slot(64)], &hash, 2, true).unwrap();
    // Writes of interval 2 before the take of interval 1.
    for rel in [0, 4, 50] {
        write(&dense, rel);
    }
    let out = dense.take(Some(1));
    assert_eq!(counted(&out), 0, "interval 1: {out:?}");
    // Interval 2: 0 (the hash counted it in 1 only) and 50 are new to it;
    // 4..8 the hash counted in 2 already.
    let out = dense.take(Some(2));
    assert_eq!(counted(&out), 2, "interval 2: {out:?}");
}
