//! A dense storage's bitmap, shared with the kernel: a BPF_F_MMAPABLE
//! array of u64 words mapped into this process.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::AtomicU64;

use libbpf_rs::MapHandle;

/// A BPF_F_MMAPABLE array of u64 words, mapped into this process.
pub struct Bitmap {
    ptr: *mut u64,
    words: usize,
    len: usize,
}

// SAFETY: the mapping is owned by the Bitmap and only accessed atomically.
unsafe impl Send for Bitmap {}

impl Bitmap {
    pub fn map(map: &MapHandle, words: usize) -> anyhow::Result<Bitmap> {
        let len = (words * 8).next_multiple_of(4096);
        // SAFETY: a shared mapping of the map's fd, unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            anyhow::bail!(
                "cannot map a dirty-page bitmap: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Bitmap {
            ptr: ptr.cast(),
            words,
            len,
        })
    }

    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: in bounds, 8-byte aligned (page-aligned mapping), shared
        // with the kernel, which also writes it atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.add(i)) }
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
