//! A bare KVM VM made in the test process itself (KVM_CREATE_VM and
//! KVM_SET_USER_MEMORY_REGION, no vCPU): memslots whose every field the test
//! chose, as ground truth for listings of them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const KVM_CREATE_VM: u64 = 0xae01;
const KVM_CHECK_EXTENSION: u64 = 0xae03;
/// _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
pub const KVM_CAP_NR_MEMSLOTS: u64 = 10;
pub const KVM_CAP_READONLY_MEM: u64 = 81;
pub const KVM_CAP_MULTI_ADDRESS_SPACE: u64 = 118;
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
pub const KVM_MEM_READONLY: u32 = 2;
const PAGE: usize = 4096;

#[repr(C)]
struct Region {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// A VM with `pages` pages of anonymous memory to map into its slots.
pub struct RawVm {
    kvm: File,
    vm: OwnedFd,
    mem: *mut libc::c_void,
    pages: usize,
}

impl RawVm {
    pub fn new(pages: usize) -> io::Result<RawVm> {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")?;
        // SAFETY: KVM_CREATE_VM takes the machine type (0) and returns a new fd.
        let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us and nothing else owns it.
        let vm = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a fresh anonymous private mapping.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RawVm {
            kvm,
            vm,
            mem,
            pages,
        })
    }

    /// The VM's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.vm.as_raw_fd()
    }

    /// KVM_CHECK_EXTENSION on the VM.
    pub fn cap(&self, cap: u64) -> i32 {
        // SAFETY: takes and returns an integer.
        let n = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap) };
        if n > 0 {
            return n;
        }
        // SAFETY: as above, on /dev/kvm (older kernels answer only there).
        unsafe { libc::ioctl(self.kvm.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap) }
    }

    /// The host address of page `page` of the VM's memory.
    pub fn addr(&self, page: usize) -> u64 {
        assert!(page < self.pages);
        self.mem as u64 + (page * PAGE) as u64
    }

    /// Creates (or, with `npages` 0, deletes) slot `id` of address space
    /// `as_id`: `npages` pages at guest frame `gfn`, backed from page `page`.
    pub fn set_slot(
        &self,
        as_id: u16,
        id: u16,
        flags: u32,
        gfn: u64,
        npages: u64,
        page: usize,
    ) -> io::Result<()> {
        let region = Region {
            slot: u32::from(as_id) << 16 | u32::from(id),
            flags,
            guest_phys_addr: gfn * PAGE as u64,
            memory_size: npages * PAGE as u64,
            userspace_addr: self.addr(page),
        };
        // SAFETY: the region struct outlives the call; KVM only reads it.
        let r = unsafe {
            libc::ioctl(
                self.vm.as_raw_fd(),
                KVM_SET_USER_MEMORY_REGION as _,
                &region as *const Region,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

// SAFETY: the VM fd and /dev/kvm are only used through ioctls, which KVM
// serialises itself; the mapping's address is only read.
unsafe impl Sync for RawVm {}

impl Drop for RawVm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), unmapped once. The VM fd closes
        // after it (field order), and KVM holds its own page references.
        unsafe { libc::munmap(self.mem, self.pages * PAGE) };
    }
}
