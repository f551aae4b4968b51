//! Reading sampled guest pages through the VMM's address space: whether
//! each is there (`/proc/PID/pagemap`), and a hash of its content
//! (`process_vm_readv`). Guest memory is hashed in a buffer that is
//! overwritten by the next page; nothing of it is kept or shown.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::xxh3_64;

/// Page size of the sampled memory.
pub const PAGE: u64 = 4096;

/// Pages read with one `process_vm_readv` (its limit is IOV_MAX, 1024).
const BATCH: usize = 256;

/// What a sampled page held at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Not in memory and not swapped out: it reads as zeros, and reading it
    /// would allocate it, so it is not read.
    Absent,
    /// In memory, with the hash of its content.
    Present(u64),
    /// Swapped out, or it could not be read (unmapped in between): not compared.
    Unknown,
}

/// The hash of a page of zeros.
pub fn zero_hash() -> u64 {
    xxh3_64(&[0u8; PAGE as usize])
}

impl PageState {
    /// Whether it holds only zeros (as far as the hash tells), `None` if unknown.
    pub fn is_zero(self, zero: u64) -> Option<bool> {
        match self {
            PageState::Absent => Some(true),
            PageState::Present(h) => Some(h == zero),
            PageState::Unknown => None,
        }
    }
}

/// Whether a page's content changed between two readings; `None` when one
/// of them is unknown. A page that appears is compared with zeros, and so is
/// one that disappears without being swapped out (e.g. a balloon discarded it).
pub fn changed(before: PageState, after: PageState, zero: u64) -> Option<bool> {
    match (before, after) {
        (PageState::Unknown, _) | (_, PageState::Unknown) => None,
        (PageState::Present(a), PageState::Present(b)) => Some(a != b),
        (PageState::Absent, PageState::Absent) => Some(false),
        (PageState::Absent, PageState::Present(h)) | (PageState::Present(h), PageState::Absent) => {
            Some(h != zero)
        }
    }
}

/// A pagemap entry's state bits (Documentation/admin-guide/mm/pagemap.rst):
/// bit 63 present, bit 62 swapped.
fn state_bits(entry: u64) -> (bool, bool) {
    (entry & (1 << 63) != 0, entry & (1 << 62) != 0)
}

/// Why a VMM's memory cannot be read, as one line for the user.
pub fn access_error(pid: u32, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "reading the memory of pid {pid} is not allowed: the dirty-rate sampler needs CAP_SYS_PTRACE (run as root)"
        ),
        ErrorKind::NotFound => format!("pid {pid} has exited"),
        _ => format!("cannot read the memory of pid {pid}: {e}"),
    }
}

/// Reads pages of one VMM process.
pub struct Reader {
    pid: u32,
    pagemap: File,
    buf: Vec<u8>,
    /// Bytes of guest memory read so far.
    pub bytes_read: u64,
}

impl Reader {
    /// Opens `pid`'s pagemap (the same permission check as reading its memory).
    pub fn open(pid: u32) -> std::io::Result<Reader> {
        Ok(Reader {
            pid,
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
            buf: vec![0; BATCH * PAGE as usize],
            bytes_read: 0,
        })
    }

    /// The state of the pages at host addresses `addrs` (page-aligned), in order.
    pub fn read(&mut self, addrs: &[u64]) -> Vec<PageState> {
        let mut out = vec![PageState::Unknown; addrs.len()];
        let mut present = Vec::new();
        for (i, &addr) in addrs.iter().enumerate() {
            let mut entry = [0u8; 8];
            if self
                .pagemap
                .read_exact_at(&mut entry, (addr / PAGE) * 8)
                .is_err()
            {
                continue;
            }
            match state_bits(u64::from_le_bytes(entry)) {
                (true, _) => present.push(i),
                (false, false) => out[i] = PageState::Absent,
                (false, true) => {}
            }
        }
        for chunk in present.chunks(BATCH) {
            self.read_present(addrs, chunk, &mut out);
        }
        out
    }

    /// Hashes the pages `which` (indexes into `addrs`) into `out`; a page that
    /// cannot be read stays unknown and the rest of the batch is read after it.
    fn read_present(&mut self, addrs: &[u64], which: &[usize], out: &mut [PageState]) {
        let mut start = 0;
        while start < which.len() {
            let batch = &which[start..];
            let local: Vec<libc::iovec> = (0..batch.len())
                .map(|k| libc::iovec {
                    // SAFETY: k < BATCH, inside `buf`.
                    iov_base: unsafe { self.buf.as_mut_ptr().add(k * PAGE as usize) }.cast(),
                    iov_len: PAGE as usize,
                })
                .collect();
            let remote: Vec<libc::iovec> = batch
                .iter()
                .map(|&i| libc::iovec {
                    iov_base: addrs[i] as *mut libc::c_void,
                    iov_len: PAGE as usize,
                })
                .collect();
            // SAFETY: `local` points into `buf`, which outlives the call; the
            // remote addresses are only read by the kernel, in the other process.
            let n = unsafe {
                libc::process_vm_readv(
                    self.pid as libc::pid_t,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            };
            let whole = if n < 0 { 0 } else { n as usize / PAGE as usize };
            for (k, &i) in batch.iter().take(whole).enumerate() {
                let page = &self.buf[k * PAGE as usize..(k + 1) * PAGE as usize];
                out[i] = PageState::Present(xxh3_64(page));
            }
            self.bytes_read += (whole as u64) * PAGE;
            // The page after the last whole one failed: skip it.
            start += whole + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_judged_from_both_readings() {
        let z = zero_hash();
        let (a, b) = (PageState::Present(1), PageState::Present(2));
        assert_eq!(changed(a, a, z), Some(false));
        assert_eq!(changed(a, b, z), Some(true));
        assert_eq!(
            changed(PageState::Absent, PageState::Absent, z),
            Some(false)
        );
        // A page that appears with zeros did not change; with data it did.
        assert_eq!(
            changed(PageState::Absent, PageState::Present(z), z),
            Some(false)
        );
        assert_eq!(changed(PageState::Absent, a, z), Some(true));
        assert_eq!(changed(a, PageState::Absent, z), Some(true));
        assert_eq!(
            changed(PageState::Present(z), PageState::Absent, z),
            Some(false)
        );
        assert_eq!(changed(PageState::Unknown, a, z), None);
        assert_eq!(changed(a, PageState::Unknown, z), None);
        assert_eq!(PageState::Absent.is_zero(z), Some(true));
        assert_eq!(a.is_zero(z), Some(false));
        assert_eq!(PageState::Unknown.is_zero(z), None);
    }

    #[test]
    fn pagemap_bits() {
        assert_eq!(state_bits(1 << 63 | 0x1234), (true, false));
        assert_eq!(state_bits(1 << 62), (false, true));
        assert_eq!(state_bits(0), (false, false));
    }

    #[test]
    fn reads_its_own_pages_and_sees_a_change() {
        // This process as the "VMM": a page it writes, one it never touches
        // and one unmapped (pagemap shows both as not present).
        let len = 3 * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe { *(base as *mut u32) = 7 };
        // SAFETY: the third page of our own mapping.
        unsafe { libc::munmap((base + 2 * PAGE) as *mut libc::c_void, PAGE as usize) };
        let mut r = Reader::open(std::process::id()).unwrap();
        let addrs = [base, base + PAGE, base + 2 * PAGE];
        let first = r.read(&addrs);
        assert!(matches!(first[0], PageState::Present(_)), "{first:?}");
        assert_eq!(first[1], PageState::Absent);
        assert_eq!(first[2], PageState::Absent);
        assert_eq!(r.bytes_read, PAGE);
        // SAFETY: inside the mapping.
        unsafe { *(base as *mut u32) = 8 };
        let second = r.read(&addrs);
        let z = zero_hash();
        assert_eq!(changed(first[0], second[0], z), Some(true));
        assert_eq!(changed(first[1], second[1], z), Some(false));
        assert_eq!(second[2], PageState::Absent);
        // SAFETY: the rest of our own mapping.
        unsafe { libc::munmap(base as *mut libc::c_void, 2 * PAGE as usize) };
    }
}
