//! KVM binary statistics (KVM_GET_STATS_FD, Linux 5.14+), parsed generically.
//!
//! Layout of the fd's contents (include/uapi/linux/kvm.h):
//! `struct kvm_stats_header` at offset 0 (flags, name_size, num_desc, id_offset,
//! desc_offset, data_offset: six u32), then at `desc_offset` `num_desc` descriptors
//! of `16 + name_size` bytes each (`struct kvm_stats_desc`: u32 flags, s16 exponent,
//! u16 size, u32 offset, u32 bucket_size, char name[name_size]), and at
//! `data_offset + desc.offset` the stat's `size` u64 values.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};
use kvm_bindings::{KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST, KVM_STATS_TYPE_MASK};

use super::report::{StatValue, Stats};

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
/// `KVM_CAP_BINARY_STATS_FD`.
pub const KVM_CAP_BINARY_STATS_FD: libc::c_ulong = 203;

/// An open stats fd of a VM or a vCPU.
pub struct StatsFd(File);

impl StatsFd {
    /// `KVM_GET_STATS_FD` on a VM or vCPU fd.
    pub fn open(kvm_fd: &impl AsRawFd) -> Result<StatsFd> {
        open_raw(kvm_fd.as_raw_fd())
    }

    /// Reads all statistics now.
    pub fn read(&self) -> Result<Stats> {
        parse(&self.0)
    }
}

fn open_raw(fd: RawFd) -> Result<StatsFd> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
    let ret = unsafe { libc::ioctl(fd, KVM_GET_STATS_FD as _, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).context("KVM_GET_STATS_FD");
    }
    // SAFETY: the kernel just gave us this fd; we own it now.
    Ok(StatsFd(unsafe { File::from_raw_fd(ret) }))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn parse(f: &File) -> Result<Stats> {
    let mut hdr = [0u8; 24];
    f.read_exact_at(&mut hdr, 0)
        .context("reading the KVM stats header")?;
    let name_size = u32_at(&hdr, 4) as usize;
    let num_desc = u32_at(&hdr, 8) as usize;
    let desc_offset = u32_at(&hdr, 16) as u64;
    let data_offset = u32_at(&hdr, 20) as u64;
    if name_size == 0 || num_desc > 100_000 {
        bail!("implausible KVM stats header (name_size {name_size}, num_desc {num_desc})");
    }
    let stride = 16 + name_size;
    let mut descs = vec![0u8; stride * num_desc];
    f.read_exact_at(&mut descs, desc_offset)
        .context("reading the KVM stats descriptors")?;
    let mut out = Stats::new();
    for d in descs.chunks_exact(stride) {
        let flags = u32_at(d, 0);
        let size = u16::from_ne_bytes([d[6], d[7]]) as usize;
        let offset = u32_at(d, 8) as u64;
        let name_bytes = &d[16..];
        let end = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let mut data = vec![0u8; size * 8];
        f.read_exact_at(&mut data, data_offset + offset)
            .with_context(|| format!("reading KVM stat {name}"))?;
        let vals: Vec<u64> = data
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        let ty = flags & KVM_STATS_TYPE_MASK;
        let is_hist = ty == KVM_STATS_TYPE_LOG_HIST || ty == KVM_STATS_TYPE_LINEAR_HIST;
        let v = if size == 1 && !is_hist {
            StatValue::Value(vals[0])
        } else {
            StatValue::Array(vals)
        };
        out.insert(name, v);
    }
    Ok(out)
}
