//! The counts file: every page's logged writes (`PID GFN REL_GFN SLOT_ID
//! COUNTS`), written atomically and never through a symlink.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kvm-watcher-counts-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_counts_file_reads_back_as_written() {
        let path = dir().join("counts.txt");
        let counts = [
            PageCount {
                pid: 7,
                slot: 1,
                gfn: 0x10118,
                rel_gfn: 0x118,
                count: 62,
            },
            PageCount {
                pid: 7,
                slot: 1 << 16 | 2,
                gfn: 0x20000,
                rel_gfn: 0,
                count: 1,
            },
        ];
        write_counts_file(&path, &counts).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(parse_counts_file(&text).unwrap(), counts);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn symlinks_and_directories_are_refused() {
        let d = dir();
        let link = d.join("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let err = check_counts_path(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = check_counts_path(&d).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = check_counts_path(&d.join("no/such/file"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        fs::remove_file(&link).unwrap();
    }

    #[test]
    fn text_that_is_not_a_counts_file_is_an_error() {
        assert!(parse_counts_file("hello\n").is_err());
        assert!(parse_counts_file("PID GFN REL_GFN SLOT_ID COUNTS\n1 zz 0 1 2\n").is_err());
    }
}
