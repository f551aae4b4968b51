//! Guest memory: anonymous host mappings and the memslots that hand them to the
//! guest, the system slot (0) at gpa 0 and the data slots 1..=K from
//! [`guest::DATA_BASE`]; and the slot swap of `--swap-slots-at`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;

use super::dirty::LoggedSlot;
use super::guest::{self, DataLayout, PAGE};
use super::report::MemslotReport;
use super::{DirtyLog, VmConfig};

/// Anonymous host memory backing one memslot; unmapped when dropped.
pub(super) struct Region {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Region {
    fn new(len: u64) -> Result<Region> {
        // SAFETY: fresh anonymous private mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {len} bytes of guest memory"));
        }
        Ok(Region {
            ptr: p.cast(),
            len: len as usize,
        })
    }

    pub fn read_u64(&self, off: u64) -> u64 {
        assert!(off as usize + 8 <= self.len);
        // SAFETY: in bounds, 8-byte aligned by the layout; the guest may write concurrently.
        unsafe { std::ptr::read_volatile(self.ptr.add(off as usize) as *const u64) }
    }

    pub fn write_u32(&self, off: u64, v: u32) {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds and aligned; the guest only reads this word.
        unsafe { std::ptr::write_volatile(self.ptr.add(off as usize) as *mut u32, v) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, and nothing runs the guest any more: the owner
        // stops and joins the vCPU threads first (KVM itself only faults on a
        // slot whose memory is gone).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The VM's memory: the host mappings, every memslot as KVM has it now, and the
/// dirty-logged ones.
pub(super) struct GuestMemory {
    /// Slot 0: code, tables, stacks and the guest's own counters.
    pub sys: Region,
    /// The data slots' memory, in slot order.
    #[allow(dead_code)] // only kept mapped: the guest reaches it through the memslots
    data: Vec<Region>,
    /// Every memslot: slot 0 first, then the data slots (in their current places).
    pub memslots: Vec<MemslotReport>,
    /// The dirty-logged data slots; empty without dirty logging.
    pub logged: Vec<LoggedSlot>,
}

impl GuestMemory {
    /// Maps the host memory of every slot and registers the memslots with `vm`.
    pub fn new(vm: &VmFd, config: &VmConfig, data: &DataLayout) -> Result<GuestMemory> {
        let logging = config.dirty_log != DirtyLog::Off;
        let sys_size = guest::system_slot_size(config.vcpus, config.dirty_pages);
        let sys = Region::new(sys_size)?;
        let mut memslots = vec![MemslotReport {
            slot: 0,
            base_gfn: 0,
            npages: sys_size / PAGE,
            userspace_addr: sys.ptr as u64,
            flags: 0,
            role: "system".into(),
        }];
        let mut regions = Vec::new();
        let mut logged = Vec::new();
        for k in 0..data.slots {
            let size = data.slot_pages(k) * PAGE;
            let r = Region::new(size)?;
            let slot = 1 + k;
            memslots.push(MemslotReport {
                slot,
                base_gfn: data.slot_gpa(k) / PAGE,
                npages: size / PAGE,
                userspace_addr: r.ptr as u64,
                flags: if logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                role: "data".into(),
            });
            if logging {
                logged.push(LoggedSlot { slot, size });
            }
            regions.push(r);
        }
        for m in &memslots {
            set_memslot(vm, m, m.npages * PAGE)
                .with_context(|| format!("KVM_SET_USER_MEMORY_REGION(slot {})", m.slot))?;
        }
        Ok(GuestMemory {
            sys,
            data: regions,
            memslots,
            logged,
        })
    }

    /// Each memslot's first gfn, by slot id.
    pub fn slot_bases(&self) -> BTreeMap<u32, u64> {
        self.memslots.iter().map(|m| (m.slot, m.base_gfn)).collect()
    }

    /// Data slots 1 and 2 trade places: both are deleted, then each is created
    /// again with the other's guest-physical range, size and host memory.
    pub fn swap_slots(&mut self, vm: &VmFd) -> Result<()> {
        let set = |m: &MemslotReport, size: u64| {
            set_memslot(vm, m, size).with_context(|| {
                format!(
                    "KVM_SET_USER_MEMORY_REGION(slot {}) for --swap-slots-at",
                    m.slot
                )
            })
        };
        let memslots = &mut self.memslots;
        for m in memslots.iter().filter(|m| m.slot == 1 || m.slot == 2) {
            set(m, 0)?;
        }
        let (a, b) = (memslots[1].clone(), memslots[2].clone());
        for (m, from) in [(1, &b), (2, &a)] {
            let slot = memslots[m].slot;
            memslots[m] = MemslotReport {
                slot,
                ..from.clone()
            };
        }
        for l in self.logged.iter_mut() {
            if let Some(m) = memslots.iter().find(|m| m.slot == l.slot) {
                l.size = m.npages * PAGE;
            }
        }
        for m in &memslots[1..=2] {
            set(m, m.npages * PAGE)?;
        }
        Ok(())
    }
}

/// KVM_SET_USER_MEMORY_REGION for `m` with `size` bytes (0 deletes the slot).
fn set_memslot(vm: &VmFd, m: &MemslotReport, size: u64) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot: m.slot,
        flags: m.flags,
        guest_phys_addr: m.base_gfn * PAGE,
        memory_size: size,
        userspace_addr: m.userspace_addr,
    };
    // SAFETY: the host memory stays mapped while any vCPU can run: GuestMemory
    // owns it and outlives the vCPU threads.
    unsafe { vm.set_user_memory_region(region) }
}
