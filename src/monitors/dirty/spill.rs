//! The pages of exited VMs for the counts file, kept on disk rather than in
//! memory: a long watch sees VMs come and go without end, and its memory
//! must not grow with every page they ever wrote. Pages are gathered in
//! memory up to [`FRESH_MAX`], then merged into an unnamed file in the
//! counts file's directory (in counts-file order, 32 bytes a page), which
//! the counts file is merged from at every write.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use itertools::Itertools;

use super::counts::{PageCount, scratch_file};
use super::read::{counts_order, sort_counts};

/// Pages gathered in memory before they go to disk (256 KiB; merging them
/// in rewrites the spill, a sequential copy).
pub const FRESH_MAX: usize = 8 * 1024;

const RECORD: usize = 32;

/// Pages kept for the counts file.
pub struct Spill {
    /// The counts file: its directory holds the spill.
    counts_file: PathBuf,
    file: Option<File>,
    on_disk: u64,
    fresh: Vec<PageCount>,
    /// Pages gathered in memory before they go to disk.
    fresh_max: usize,
    /// Writing the spill failed once: pages stay in memory from then on.
    failed: bool,
}

impl Spill {
    pub fn new(counts_file: PathBuf) -> Self {
        Spill::with_limit(counts_file, FRESH_MAX)
    }

    fn with_limit(counts_file: PathBuf, fresh_max: usize) -> Self {
        Spill {
            counts_file,
            file: None,
            on_disk: 0,
            fresh: Vec::new(),
            fresh_max,
            failed: false,
        }
    }

    /// Pages kept.
    pub fn len(&self) -> u64 {
        self.on_disk + self.fresh.len() as u64
    }

    /// Keeps `pages`; past [`FRESH_MAX`] in memory they go to disk.
    pub fn add(&mut self, mut pages: Vec<PageCount>) {
        // A batch (a memslot's pages) is taken as it is, not copied.
        if self.fresh.is_empty() {
            self.fresh = pages;
        } else {
            self.fresh.append(&mut pages);
        }
        if self.fresh.len() >= self.fresh_max
            && !self.failed
            && let Err(e) = self.flush()
        {
            self.failed = true;
            crate::output::warn(&format!(
                "cannot keep exited VMs' pages on disk next to the counts file ({e:#}): they are kept in memory"
            ));
        }
    }

    /// Merges the pages in memory into a new spill file.
    fn flush(&mut self) -> anyhow::Result<()> {
        sort_counts(&mut self.fresh);
        let out = scratch_file(&self.counts_file)?;
        let mut w = BufWriter::with_capacity(1 << 16, &out);
        let mut n = 0u64;
        for p in merge(self.on_disk()?, self.fresh.iter().copied().map(Ok)) {
            let p = p?;
            let mut r = [0u8; RECORD];
            r[..4].copy_from_slice(&p.pid.to_le_bytes());
            r[4..8].copy_from_slice(&p.slot.to_le_bytes());
            r[8..16].copy_from_slice(&p.gfn.to_le_bytes());
            r[16..24].copy_from_slice(&p.rel_gfn.to_le_bytes());
            r[24..].copy_from_slice(&p.count.to_le_bytes());
            w.write_all(&r)?;
            n += 1;
        }
        w.flush()?;
        drop(w);
        self.file = Some(out);
        self.on_disk = n;
        self.fresh = Vec::new();
        Ok(())
    }

    /// Every page kept, in counts-file order.
    pub fn pages(
        &mut self,
    ) -> anyhow::Result<impl Iterator<Item = std::io::Result<PageCount>> + '_> {
        sort_counts(&mut self.fresh);
        Ok(merge(self.on_disk()?, self.fresh.iter().copied().map(Ok)))
    }

    /// The pages on disk, from the start.
    fn on_disk(&self) -> std::io::Result<impl Iterator<Item = std::io::Result<PageCount>> + '_> {
        let mut reader = match &self.file {
            Some(f) => {
                let mut f: &File = f;
                f.seek(SeekFrom::Start(0))?;
                Some(BufReader::with_capacity(1 << 16, f))
            }
            None => None,
        };
        Ok((0..self.on_disk).map(move |_| {
            let mut r = [0u8; RECORD];
            reader
                .as_mut()
                .ok_or_else(|| std::io::Error::other("the spill file is gone"))?
                .read_exact(&mut r)?;
            let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap());
            let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap());
            Ok(PageCount {
                pid: u32_at(0),
                slot: u32_at(4),
                gfn: u64_at(8),
                rel_gfn: u64_at(16),
                count: u64_at(24),
            })
        }))
    }
}

/// Two runs in counts-file order merged into one; an error comes out as
/// soon as it is met.
pub fn merge(
    a: impl Iterator<Item = std::io::Result<PageCount>>,
    b: impl Iterator<Item = std::io::Result<PageCount>>,
) -> impl Iterator<Item = std::io::Result<PageCount>> {
    a.merge_by(b, |x, y| match (x, y) {
        (Ok(x), Ok(y)) => counts_order(x, y) != Ordering::Greater,
        (Err(_), _) => true,
        (_, Err(_)) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitors::dirty::counts::{parse_counts_file, write_counts_file, write_counts_iter};

    fn page(pid: u32, gfn: u64, count: u64) -> PageCount {
        PageCount {
            pid,
            slot: 1,
            gfn,
            rel_gfn: gfn - 0x100,
            count,
        }
    }

    /// VMs exiting in batches, some on disk and some in memory: the spill
    /// gives back every page, in counts-file order, and the counts file
    /// merged from it equals the one written from all pages at once.
    #[test]
    fn pages_on_disk_and_in_memory_come_back_in_counts_file_order() {
        let dir = std::env::temp_dir().join(format!("kvm-watcher-spill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("counts.txt");
        let mut spill = Spill::with_limit(path.clone(), 5);
        let mut all = Vec::new();
        for pid in 1..=7u32 {
            let batch: Vec<PageCount> = (0..3)
                .map(|i| page(pid, 0x100 + i, u64::from((pid * 7 + i as u32) % 5)))
                .collect();
            all.extend_from_slice(&batch);
            spill.add(batch);
        }
        assert!(
            spill.on_disk > 0 && !spill.fresh.is_empty(),
            "both places are used"
        );
        assert_eq!(spill.len(), all.len() as u64);
        sort_counts(&mut all);
        let back: Vec<PageCount> = spill.pages().unwrap().map(Result::unwrap).collect();
        assert_eq!(back, all);
        let live = vec![page(99, 0x100, 3), page(99, 0x101, 0)];
        let mut sorted_live = live.clone();
        sort_counts(&mut sorted_live);
        write_counts_iter(
            &path,
            merge(sorted_live.into_iter().map(Ok), spill.pages().unwrap()),
        )
        .unwrap();
        let merged = std::fs::read_to_string(&path).unwrap();
        all.extend(live);
        sort_counts(&mut all);
        write_counts_file(&path, &all).unwrap();
        assert_eq!(merged, std::fs::read_to_string(&path).unwrap());
        assert_eq!(parse_counts_file(&merged).unwrap(), all);
        // The spill has no name: only the counts file is in the directory.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["counts.txt"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
