//! Dirty-page collection: KVM_GET_DIRTY_LOG bitmaps or the per-vCPU dirty rings.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::VmFd;

use super::report::{DirtyReport, SlotDirty};

/// `KVM_RESET_DIRTY_RINGS` = `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xae_c7;
/// Entry flag: KVM pushed this entry.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// Entry flag: userspace harvested it; KVM_RESET_DIRTY_RINGS may recycle it.
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// One data slot to collect.
#[derive(Debug, Clone, Copy)]
pub struct LoggedSlot {
    /// Slot id.
    pub slot: u32,
    /// Size in bytes.
    pub size: u64,
}

/// What all collections found so far.
#[derive(Default)]
pub struct Collected {
    pages: BTreeSet<(u32, u64)>,
    harvested: BTreeMap<u32, u64>,
    collections: u64,
    /// KVM_EXIT_DIRTY_RING_FULL exits.
    pub ring_full_exits: u64,
    /// Set with `--swap-slots-at`: pages by gfn as well.
    pub by_gfn: Option<ByGfn>,
}

/// Pages by (slot, gfn), for a VM whose slots move.
#[derive(Default)]
pub struct ByGfn {
    /// Each slot's base gfn now; the main thread updates it when slots move.
    pub bases: BTreeMap<u32, u64>,
    /// How often each (slot, gfn) was reported.
    pub counts: BTreeMap<(u32, u64), u64>,
}

impl Collected {
    fn add(&mut self, slot: u32, rel_gfn: u64) {
        self.pages.insert((slot, rel_gfn));
        *self.harvested.entry(slot).or_default() += 1;
        if let Some(b) = &mut self.by_gfn {
            let base = b.bases.get(&slot).copied().unwrap_or(0);
            *b.counts.entry((slot, base + rel_gfn)).or_default() += 1;
        }
    }

    /// The report for `mode`, with one `per_slot` row per logged slot.
    pub fn report(&self, mode: &str, slots: &[LoggedSlot]) -> DirtyReport {
        let mut per_slot: Vec<SlotDirty> = slots
            .iter()
            .map(|s| SlotDirty {
                slot: s.slot,
                distinct: self.pages.range((s.slot, 0)..=(s.slot, u64::MAX)).count() as u64,
                harvested: self.harvested.get(&s.slot).copied().unwrap_or(0),
            })
            .collect();
        // Slots KVM named that we did not log (should not happen): still report them.
        for (&slot, &h) in &self.harvested {
            if !slots.iter().any(|s| s.slot == slot) {
                let distinct = self.pages.range((slot, 0)..=(slot, u64::MAX)).count() as u64;
                per_slot.push(SlotDirty {
                    slot,
                    distinct,
                    harvested: h,
                });
            }
        }
        DirtyReport {
            mode: mode.to_string(),
            distinct_pages: self.pages.len() as u64,
            harvested: self.harvested.values().sum(),
            collections: self.collections,
            ring_full_exits: self.ring_full_exits,
            per_slot,
            pages: self.pages.iter().copied().collect(),
            page_counts: self
                .by_gfn
                .as_ref()
                .map(|b| b.counts.iter().map(|(&(s, g), &n)| (s, g, n)).collect()),
        }
    }
}

/// KVM_GET_DIRTY_LOG on every logged slot (also clears and re-protects them).
pub fn collect_bitmaps(vm: &VmFd, slots: &[LoggedSlot], into: &mut Collected) -> Result<()> {
    for s in slots {
        let bitmap = vm
            .get_dirty_log(s.slot, s.size as usize)
            .with_context(|| format!("KVM_GET_DIRTY_LOG(slot {})", s.slot))?;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                into.add(s.slot, w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }
    into.collections += 1;
    Ok(())
}

/// One vCPU's dirty ring, mmapped from its vCPU fd; unmapped when dropped.
pub struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    next: u32,
}

// SAFETY: the ring is shared memory meant to be read by any userspace thread; all
// access goes through `RingSet`, which is kept behind a Mutex.
unsafe impl Send for Ring {}

impl Ring {
    /// mmaps the ring of `vcpu` (`count` entries, a power of two).
    pub fn map(vcpu: &impl AsRawFd, count: u32) -> Result<Ring> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let len = count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: mapping a region the kernel provides for this fd; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the vCPU dirty ring");
        }
        Ok(Ring {
            entries: p.cast(),
            count,
            next: 0,
        })
    }

    /// Harvests every entry KVM marked dirty; returns how many.
    fn harvest(&mut self, into: &mut Collected) -> u64 {
        let mut n = 0;
        loop {
            // SAFETY: index masked to the ring size; the mapping lives as long as self.
            let e = unsafe { self.entries.add((self.next & (self.count - 1)) as usize) };
            // SAFETY: `flags` is the first u32 of the entry, 4-byte aligned.
            let flags = unsafe { &*(e as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: KVM wrote slot/offset before setting the flag (acquire above).
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(&(*e).slot),
                    std::ptr::read_volatile(&(*e).offset),
                )
            };
            into.add(slot & 0xffff, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: the mapping made in `Ring::map`; nothing else refers to it.
        unsafe { libc::munmap(self.entries.cast(), len) };
    }
}

/// All rings of a VM.
pub struct RingSet {
    /// The VM fd (for KVM_RESET_DIRTY_RINGS); owned by the caller, outlives the set.
    pub vm_fd: RawFd,
    /// One per vCPU.
    pub rings: Vec<Ring>,
}

impl RingSet {
    /// Harvests all rings, then KVM_RESET_DIRTY_RINGS; returns the entries harvested.
    pub fn collect(&mut self, into: &mut Collected) -> Result<u64> {
        let mut n = 0;
        for r in &mut self.rings {
            n += r.harvest(into);
        }
        into.collections += 1;
        if n > 0 {
            // SAFETY: no argument.
            let ret = unsafe { libc::ioctl(self.vm_fd, KVM_RESET_DIRTY_RINGS as _, 0) };
            if ret < 0 {
                return Err(std::io::Error::last_os_error()).context("KVM_RESET_DIRTY_RINGS");
            }
        }
        Ok(n)
    }
}
