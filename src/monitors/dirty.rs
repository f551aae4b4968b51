//! dirty: one row per dirtied guest page, exact per-page counts, per-slot
//! summaries and the counts file (kernel half: src/bpf/dirty.bpf.c).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Serialize;

use super::{common_of, vcpu_cell};
use crate::bpf::{read_record, types};
use crate::output::{Clock, Common, Row};

/// One dirtied page.
#[derive(Clone, Debug, Serialize)]
pub struct DirtyRow {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// Guest frame number.
    pub gfn: u64,
    /// gfn minus the memslot's base_gfn.
    pub rel_gfn: u64,
    /// Memslot id (without the address-space bits).
    pub slot_id: u32,
    /// Address space (1 = SMM on x86).
    pub as_id: u32,
    /// Pages in the memslot.
    pub npages: u64,
    /// Host virtual address where the memslot starts.
    pub userspace_addr: u64,
}

/// Decodes a `struct dirty_event`.
pub fn decode(bytes: &[u8]) -> Option<DirtyRow> {
    let e: types::dirty_event = read_record(bytes)?;
    Some(DirtyRow {
        common: common_of(&e.hdr),
        gfn: e.gfn,
        rel_gfn: e.rel_gfn,
        slot_id: e.slot_id,
        as_id: e.as_id,
        npages: e.npages,
        userspace_addr: e.userspace_addr,
    })
}

impl Row for DirtyRow {
    fn monitor(&self) -> &'static str {
        "dirty"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:>7} {:>12} {:>10} {:>10} {:>18} {:>7}",
            "TIME",
            "COMM",
            "PID/TID",
            "VCPU_ID",
            "GFN(hex)",
            "REL_GFN",
            "NPAGES",
            "USERSPACE_ADDR",
            "SLOT_ID"
        );
        format!("{base} VM")
    }

    fn row(&self, clock: &Clock) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:>7} {:>12x} {:>10x} {:>10} {:>#18x} {:>7}",
            clock.format(self.common.time_ns),
            self.common.comm,
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            self.gfn,
            self.rel_gfn,
            self.npages,
            self.userspace_addr,
            self.slot_id,
        );
        format!("{base} {}", self.common.vm.as_deref().unwrap_or("-"))
    }
}

/// One page's count, as kept in the kernel's `dirty_counts` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCount {
    /// VMM process.
    pub pid: u32,
    /// KVM's slot encoding: address space << 16 | slot id.
    pub slot: u32,
    /// Guest frame number.
    pub gfn: u64,
    /// gfn minus the slot's base_gfn.
    pub rel_gfn: u64,
    /// Logged writes.
    pub count: u64,
}

/// Calls `f(key, value)` for every entry of `map` with batched lookups. Returns
/// false if the kernel has no batch lookups for this map (nothing was read).
///
/// Not libbpf-rs's `lookup_batch` iterator: it takes a short batch for the
/// last one, but a hash map's batch ends at a bucket boundary and is often
/// short long before the end (a 262,144-page map came back as 65,535 pages).
/// The end is ENOENT.
fn lookup_all(map: &MapHandle, f: &mut impl FnMut(&[u8], &[u8])) -> anyhow::Result<bool> {
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
    // Count first and allocate once: growing by doubling briefly holds the old
    // and the new buffer (peak RSS 61 MiB instead of 46 at 2^20 pages).
    let mut n = 0usize;
    lookup_all(map, &mut |_: &[u8], _: &[u8]| n += 1)?;
    let mut out = Vec::with_capacity(n + n / 16);
    let mut push = |k: &[u8], v: &[u8]| {
        if let (Some(key), Some(val)) = (
            read_record::<types::dirty_key>(k),
            read_record::<types::dirty_count>(v),
        ) {
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
    // In place: sort_by would allocate half the vector again (16 MiB at 1M pages).
    // The order is total (pid, slot, gfn are unique), so stability is moot.
    out.sort_unstable_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.pid.cmp(&b.pid))
            .then(a.slot.cmp(&b.slot))
            .then(a.gfn.cmp(&b.gfn))
    });
    Ok(out)
}

/// Refuses a counts-file path that is a symlink or not a regular file.
pub fn check_counts_path(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => crate::usage_bail!(
            "--counts-file {}: is a symbolic link; refusing to follow or replace it, choose another path",
            path.display()
        ),
        Ok(meta) if !meta.file_type().is_file() => {
            let what = if meta.is_dir() {
                "a directory"
            } else if meta.file_type().is_fifo() {
                "a FIFO"
            } else {
                "not a regular file"
            };
            crate::usage_bail!(
                "--counts-file {}: is {what}; refusing to replace it, choose another path",
                path.display()
            )
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = parent_dir(path);
            if !dir.is_dir() {
                crate::usage_bail!(
                    "--counts-file {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads back what [`write_counts_file`] wrote (for tools and tests that
/// check a counts file against another source).
pub fn parse_counts_file(text: &str) -> anyhow::Result<Vec<PageCount>> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h))
            if h.split_whitespace()
                .eq(["PID", "GFN", "REL_GFN", "SLOT_ID", "COUNTS"]) => {}
        _ => anyhow::bail!("not a kvm-watcher counts file: the header line is missing"),
    }
    lines
        .map(|(i, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let parsed = (f.len() == 5)
                .then(|| {
                    Some(PageCount {
                        pid: f[0].parse().ok()?,
                        gfn: u64::from_str_radix(f[1], 16).ok()?,
                        rel_gfn: u64::from_str_radix(f[2], 16).ok()?,
                        slot: f[3].parse().ok()?,
                        count: f[4].parse().ok()?,
                    })
                })
                .flatten();
            parsed.ok_or_else(|| anyhow::anyhow!("counts file line {}: cannot parse {l:?}", i + 1))
        })
        .collect()
}

/// Writes `PID GFN REL_GFN SLOT_ID COUNTS` (hex gfns, most dirtied first) to
/// `path` atomically: a new 0600 temporary file in the same directory, fsync,
/// rename over `path`, fsync of the directory. Never follows a symlink and
/// never replaces anything that is not a regular file.
pub fn write_counts_file(path: &Path, counts: &[PageCount]) -> anyhow::Result<()> {
    check_counts_path(path)?;
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .with_context(|| format!("--counts-file {} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> anyhow::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        writeln!(
            w,
            "{:<10} {:<10} {:<10} {:<10} {:<10}",
            "PID", "GFN", "REL_GFN", "SLOT_ID", "COUNTS"
        )?;
        for c in counts {
            writeln!(
                w,
                "{:<10} {:<10x} {:<10x} {:<10} {:<10}",
                c.pid, c.gfn, c.rel_gfn, c.slot, c.count
            )?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write counts file {}", path.display())));
    }
    check_counts_path(path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Per-interval figures of one memslot in `--summary` mode.
#[derive(Clone, Debug, Serialize)]
pub struct SlotSummaryRow {
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// VMM process.
    pub pid: u32,
    /// Always null: a slot summary spans all threads.
    pub tid: Option<u32>,
    /// Always null.
    pub comm: Option<String>,
    /// Always null: a slot summary spans all vCPUs.
    pub vcpu_id: Option<u32>,
    /// VM name.
    pub vm: Option<String>,
    /// Memslot id.
    pub slot_id: u32,
    /// Address space.
    pub as_id: u32,
    /// First gfn of the slot.
    pub base_gfn: u64,
    /// Pages in the slot.
    pub npages: u64,
    /// Host virtual address of the slot.
    pub userspace_addr: u64,
    /// Interval length, ns.
    pub interval_ns: u64,
    /// Logged writes in the interval.
    pub writes: u64,
    /// Distinct pages written in the interval (null on kernels before 5.12,
    /// which lack the BPF cmpxchg this needs).
    pub distinct_pages: Option<u64>,
}

impl Row for SlotSummaryRow {
    fn monitor(&self) -> &'static str {
        "dirty_summary"
    }

    fn header(&self) -> String {
        format!(
            "{:<15} {:>8} {:>7} {:>12} {:>10} {:>12} {:>14} {:>12}",
            "TIME",
            "PID",
            "SLOT_ID",
            "BASE_GFN",
            "NPAGES",
            "WRITES",
            "DISTINCT_PAGES",
            "DIRTY(MiB/s)"
        )
    }

    fn row(&self, clock: &Clock) -> String {
        let (distinct, mib_s) = match self.distinct_pages {
            Some(d) => (
                d.to_string(),
                format!("{:.2}", dirty_mib_s(d, self.interval_ns)),
            ),
            None => ("n/a".to_string(), "n/a".to_string()),
        };
        format!(
            "{:<15} {:>8} {:>7} {:>12x} {:>10} {:>12} {:>14} {:>12}",
            clock.format(self.time_ns),
            self.pid,
            self.slot_id,
            self.base_gfn,
            self.npages,
            self.writes,
            distinct,
            mib_s
        )
    }
}

/// MiB/s of `pages` distinct 4 KiB pages dirtied over `interval_ns`.
pub fn dirty_mib_s(pages: u64, interval_ns: u64) -> f64 {
    pages as f64 * 4096.0 / f64::from(1u32 << 20) / (interval_ns.max(1) as f64 / 1e9)
}

/// Turns the in-kernel per-slot counters into per-interval rows.
pub struct SlotSummary {
    prev_writes: HashMap<(u32, u32), u64>,
    tracks_distinct: bool,
}

impl SlotSummary {
    /// A summary; `tracks_distinct` says whether the kernel counts distinct
    /// pages per interval (`dirty_summary`).
    pub fn new(tracks_distinct: bool) -> Self {
        SlotSummary {
            prev_writes: HashMap::new(),
            tracks_distinct,
        }
    }

    /// Rows for interval `ended` (already closed by bumping `epoch`), deleting
    /// its per-interval entries from the kernel.
    pub fn tick(
        &mut self,
        slot_stats: &MapHandle,
        epoch_pages: &MapHandle,
        ended: u32,
        now_ns: u64,
        interval_ns: u64,
    ) -> anyhow::Result<Vec<SlotSummaryRow>> {
        let mut distinct: HashMap<(u32, u32), u64> = HashMap::new();
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
        let mut rows = Vec::new();
        for k in slot_stats.keys() {
            let (Some(key), Some(v)) = (
                read_record::<types::dirty_slot_key>(&k),
                slot_stats.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            let Some(stats) = read_record::<types::dirty_slot_stats>(&v) else {
                continue;
            };
            let prev = self
                .prev_writes
                .insert((key.pid, key.slot), stats.writes)
                .unwrap_or(0);
            let writes = stats.writes.saturating_sub(prev);
            let distinct_pages = self
                .tracks_distinct
                .then(|| distinct.get(&(key.pid, key.slot)).copied().unwrap_or(0));
            if writes == 0 && distinct_pages.unwrap_or(0) == 0 {
                continue;
            }
            rows.push(SlotSummaryRow {
                time_ns: now_ns,
                pid: key.pid,
                tid: None,
                comm: None,
                vcpu_id: None,
                vm: None,
                slot_id: key.slot & 0xffff,
                as_id: key.slot >> 16,
                base_gfn: stats.base_gfn,
                npages: stats.npages,
                userspace_addr: stats.userspace_addr,
                interval_ns,
                writes,
                distinct_pages,
            });
        }
        rows.sort_by_key(|r| (r.pid, r.as_id, r.slot_id));
        Ok(rows)
    }
}
