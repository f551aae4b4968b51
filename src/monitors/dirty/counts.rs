//! The counts file: every page's logged writes (`PID GFN REL_GFN SLOT_ID
//! COUNTS`), written atomically and never through a symlink.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::rand::GetRandomFlags;

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
/// Refuses a counts-file path with a symbolic link in it (the file or any
/// directory above it), or that is not a regular file, or whose directory
/// does not exist or cannot be written (a read-only or full file system, a
/// path under /proc): all found out before any work starts.
pub fn check_counts_path(path: &Path) -> anyhow::Result<()> {
    let target = Target::open(path)?;
    // A file that is created, written and synced, then removed: what the
    // rewrites will do, short of the rename.
    let tmp = target.create_temp()?;
    let probe = (|| -> std::io::Result<()> {
        let mut f = File::from(tmp.1);
        f.write_all(header().as_bytes())?;
        f.sync_all()
    })();
    let _ = rustix::fs::unlinkat(&target.dir, &tmp.0, AtFlags::empty());
    if let Err(e) = probe {
        crate::usage_bail!(
            "--counts-file {}: cannot write in {} ({e}); choose another path",
            path.display(),
            target.dir_path.display()
        );
    }
    Ok(())
}

/// The header line of a counts file.
fn header() -> String {
    format!(
        "{:<10} {:<10} {:<10} {:<10} {:<10}\n",
        "PID", "GFN", "REL_GFN", "SLOT_ID", "COUNTS"
    )
}

/// A counts file's directory, opened without following any symbolic link,
/// and its name in it: every later step works relative to that directory,
/// so nothing renamed or planted meanwhile redirects the file.
struct Target {
    dir: OwnedFd,
    dir_path: PathBuf,
    name: std::ffi::OsString,
    path: PathBuf,
}

impl Target {
    fn open(path: &Path) -> anyhow::Result<Target> {
        let name = match path.file_name() {
            Some(n) => n.to_os_string(),
            None => crate::usage_bail!(
                "--counts-file {}: has no file name; choose a file path",
                path.display()
            ),
        };
        // The temporary file next to it is named `.NAME.tmp.` + 16 hex digits.
        const MOST: usize = 255 - 22;
        if name.len() > MOST {
            crate::usage_bail!(
                "--counts-file: its file name is {} bytes long, at most {MOST} are allowed; choose a shorter name",
                name.len()
            );
        }
        let dir_path = parent_dir(path);
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let dir = match rustix::fs::openat2(
            rustix::fs::CWD,
            &dir_path,
            flags,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => crate::usage_bail!(
                "--counts-file {}: a directory in the path is a symbolic link; refusing to follow it, give the real path",
                path.display()
            ),
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => crate::usage_bail!(
                "--counts-file {}: directory {} does not exist",
                path.display(),
                dir_path.display()
            ),
            Err(e) => crate::usage_bail!(
                "--counts-file {}: cannot open directory {} ({}); choose another path",
                path.display(),
                dir_path.display(),
                std::io::Error::from(e)
            ),
        };
        let target = Target {
            dir,
            dir_path,
            name,
            path: path.to_path_buf(),
        };
        target.check_file()?;
        Ok(target)
    }

    /// The file itself, if present, must be a regular file (not a symlink).
    fn check_file(&self) -> anyhow::Result<()> {
        let path = self.path.display();
        match rustix::fs::statat(&self.dir, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let what = match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile => return Ok(()),
                    FileType::Symlink => crate::usage_bail!(
                        "--counts-file {path}: is a symbolic link; refusing to follow or replace it, choose another path"
                    ),
                    FileType::Directory => "a directory",
                    FileType::Fifo => "a FIFO",
                    _ => "not a regular file",
                };
                crate::usage_bail!(
                    "--counts-file {path}: is {what}; refusing to replace it, choose another path"
                )
            }
            Err(Errno::NOENT) => Ok(()),
            Err(e) => crate::usage_bail!(
                "--counts-file {path}: cannot inspect it ({}); choose another path",
                std::io::Error::from(e)
            ),
        }
    }

    /// A new 0600 file with an unpredictable name next to the target.
    fn create_temp(&self) -> anyhow::Result<(std::ffi::OsString, OwnedFd)> {
        loop {
            let mut random = [0u8; 8];
            rustix::rand::getrandom(&mut random, GetRandomFlags::empty())
                .context("cannot get random bytes for a temporary file name")?;
            let mut tmp = std::ffi::OsString::from(".");
            tmp.push(&self.name);
            tmp.push(format!(".tmp.{:016x}", u64::from_ne_bytes(random)));
            match rustix::fs::openat(
                &self.dir,
                &tmp,
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => return Ok((tmp, fd)),
                Err(Errno::EXIST) => continue,
                Err(e) => crate::usage_bail!(
                    "--counts-file {}: cannot write in {} ({}); choose another path",
                    self.path.display(),
                    self.dir_path.display(),
                    std::io::Error::from(e)
                ),
            }
        }
    }
}

/// A file with no name in the counts file's directory, gone when closed:
/// room on disk for what the counts file holds but memory should not.
pub fn scratch_file(path: &Path) -> anyhow::Result<File> {
    let target = Target::open(path)?;
    let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
    match rustix::fs::openat(&target.dir, ".", flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        // A file system without O_TMPFILE: a named file, removed at once.
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
            let (name, fd) = target.create_temp()?;
            rustix::fs::unlinkat(&target.dir, &name, AtFlags::empty())?;
            Ok(File::from(fd))
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot make a scratch file in {}: {}",
            target.dir_path.display(),
            std::io::Error::from(e)
        )),
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
/// `path` atomically: a new 0600 file with an unpredictable name in the same
/// directory, fsync, rename over `path`, fsync of the directory. Never
/// follows a symlink (in the file name or any directory above it) and never
/// replaces anything that is not a regular file.
pub fn write_counts_file(path: &Path, counts: &[PageCount]) -> anyhow::Result<()> {
    write_counts_iter(path, counts.iter().copied().map(Ok))
}

/// Writes the counts file from `counts`, already in counts-file order; an
/// error reading them leaves the file as it was.
pub fn write_counts_iter(
    path: &Path,
    counts: impl Iterator<Item = std::io::Result<PageCount>>,
) -> anyhow::Result<()> {
    // Checked before the watch started: what fails now is a runtime failure.
    let runtime = |e: anyhow::Error| anyhow::anyhow!("{e:#}");
    let target = Target::open(path).map_err(runtime)?;
    let (tmp, fd) = target.create_temp().map_err(runtime)?;
    let write = || -> anyhow::Result<()> {
        let mut w = std::io::BufWriter::new(File::from(fd));
        w.write_all(header().as_bytes())?;
        for c in counts {
            let c = c?;
            writeln!(
                w,
                "{:<10} {:<10x} {:<10x} {:<10} {:<10}",
                c.pid, c.gfn, c.rel_gfn, c.slot, c.count
            )?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        target.check_file()?;
        rustix::fs::renameat(&target.dir, &tmp, &target.dir, &target.name)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = rustix::fs::unlinkat(&target.dir, &tmp, AtFlags::empty());
        return Err(e.context(format!("cannot write counts file {}", path.display())));
    }
    let _ = rustix::fs::fsync(&target.dir);
    Ok(())
}

/// One entry per page: the hash's and the dense storage's counts of a page
/// added up (sorted in place, no second copy).
pub fn one_per_page(mut pages: Vec<PageCount>) -> Vec<PageCount> {
    pages.sort_unstable_by_key(|p| (p.pid, p.slot, p.gfn));
    pages.dedup_by(|later, kept| {
        let same = (later.pid, later.slot, later.gfn) == (kept.pid, kept.slot, kept.gfn);
        if same {
            kept.count += later.count;
        }
        same
    });
    pages
}

/// An exited VM's pages, one memslot at a time and one entry per page:
/// for each slot in `slots`, `read` adds the pages every place it held
/// counted, and the pages of `hashed` (counted elsewhere) of that slot join
/// them; what is left of `hashed` comes last. A slot that moved has had two
/// places, and a page of either may also be in the hash: its counts must
/// meet in one batch, since the spill never merges two batches.
pub fn by_slot(
    slots: &[u32],
    mut hashed: Vec<PageCount>,
    read: &mut dyn FnMut(u32, &mut Vec<PageCount>) -> anyhow::Result<()>,
    sink: &mut dyn FnMut(Vec<PageCount>),
) -> anyhow::Result<()> {
    let mut done: Vec<u32> = Vec::with_capacity(slots.len());
    for &slot in slots {
        if done.contains(&slot) {
            continue;
        }
        done.push(slot);
        let mut pages = Vec::new();
        read(slot, &mut pages)?;
        hashed.retain(|p| {
            let here = p.slot == slot;
            if here {
                pages.push(*p);
            }
            !here
        });
        sink(one_per_page(pages));
    }
    if !hashed.is_empty() {
        sink(one_per_page(hashed));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_page_counted_in_two_places_is_one_entry_with_both_counts() {
        let p = |pid, slot, gfn, count| PageCount {
            pid,
            slot,
            gfn,
            rel_gfn: gfn - 0x100,
            count,
        };
        let pages = one_per_page(vec![
            p(7, 1, 0x102, 3),
            p(7, 1, 0x101, 1),
            p(7, 2, 0x101, 5),
            p(7, 1, 0x102, 4),
            p(8, 1, 0x101, 2),
        ]);
        let got: Vec<_> = pages
            .iter()
            .map(|q| (q.pid, q.slot, q.gfn, q.count))
            .collect();
        assert_eq!(
            got,
            [
                (7, 1, 0x101, 1),
                (7, 1, 0x102, 7),
                (7, 2, 0x101, 5),
                (8, 1, 0x101, 2)
            ]
        );
    }

    /// Slot 1 moved: its pages at both places, and one of each in the hash,
    /// come out in one batch with one entry per page; slot 2's in another,
    /// and a page of a slot with no storage last.
    #[test]
    fn a_moved_slot_is_one_batch_whatever_place_counted_its_pages() {
        let p = |slot, gfn, count| PageCount {
            pid: 7,
            slot,
            gfn,
            rel_gfn: gfn & 0xff,
            count,
        };
        // Storages in the order the VM made them: slot 1's old place,
        // slot 2, slot 1's new place.
        let stores = [(1, 0x100), (2, 0x200), (1, 0x300)];
        let hashed = vec![p(1, 0x301, 30), p(1, 0x101, 1), p(9, 0x900, 2)];
        let mut batches = Vec::new();
        by_slot(
            &stores.map(|s| s.0),
            hashed,
            &mut |slot, pages| {
                for &(_, base) in stores.iter().filter(|s| s.0 == slot) {
                    pages.push(p(slot, base + 1, 5));
                }
                Ok(())
            },
            &mut |b| {
                batches.push(
                    b.iter()
                        .map(|q| (q.slot, q.gfn, q.count))
                        .collect::<Vec<_>>(),
                )
            },
        )
        .unwrap();
        assert_eq!(
            batches,
            [
                vec![(1, 0x101, 6), (1, 0x301, 35)],
                vec![(2, 0x201, 5)],
                vec![(9, 0x900, 2)]
            ]
        );
    }

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
    fn a_symlink_above_the_file_is_refused() {
        let d = dir();
        let real = d.join("real");
        fs::create_dir_all(&real).unwrap();
        let link = d.join("linkdir");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = check_counts_path(&link.join("c.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = write_counts_file(&link.join("c.txt"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!real.join("c.txt").exists(), "written through the link");
        fs::remove_file(&link).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_hold_files_is_refused_at_once() {
        // /proc takes no new files, whoever asks.
        let err = check_counts_path(Path::new("/proc/kvm-watcher-counts"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot write in /proc"), "{err}");
    }

    #[test]
    fn temporary_names_are_not_predictable() {
        let target = Target::open(&dir().join("c.txt")).unwrap();
        let (a, _fa) = target.create_temp().unwrap();
        let (b, _fb) = target.create_temp().unwrap();
        assert_ne!(a, b);
        assert!(
            !a.to_string_lossy()
                .contains(&std::process::id().to_string())
        );
        for t in [a, b] {
            rustix::fs::unlinkat(&target.dir, &t, AtFlags::empty()).unwrap();
        }
    }

    #[test]
    fn text_that_is_not_a_counts_file_is_an_error() {
        assert!(parse_counts_file("hello\n").is_err());
        assert!(parse_counts_file("PID GFN REL_GFN SLOT_ID COUNTS\n1 zz 0 1 2\n").is_err());
    }
}
