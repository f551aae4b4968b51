//! Inputs that must be refused before any work starts: a thread filter that
//! would match nothing or everything, and counts files that could not be
//! written or could be redirected.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::observe::watcher;
use common::usage::{USAGE, expect_errors, pid_max};

/// `--tid 0` would turn the in-kernel thread filter off (every VM shown);
/// a thread that does not exist, or that is no VMM's, would show nothing.
#[test]
fn tid_that_is_zero_missing_or_not_a_vmms() {
    let missing = pid_max().to_string();
    // This test process holds no KVM VM.
    let mine = std::process::id().to_string();
    expect_errors(&[
        (vec!["-w", "--tid", "0", "-t", "0.5"], USAGE, "--tid"),
        (vec!["watch", "--tid", "0", "-t", "0.5"], USAGE, "--tid"),
        (
            vec!["wakeup", "--tid", &missing, "-t", "0.5"],
            USAGE,
            &missing,
        ),
        (vec!["-n", "--tid", &mine, "-t", "0.5"], USAGE, &mine),
    ]);
}

/// A tmpfs mounted for one test (root only); unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(tag: &str, options: &str) -> Tmpfs {
        let dir =
            std::env::temp_dir().join(format!("kvm-watcher-inputs-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "kvm-watcher-test"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", dir.display());
        Tmpfs { dir }
    }

    /// Fills the file system: writes until ENOSPC.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvm-watcher-inputs-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A counts file that could not be written at exit (read-only or full file
/// system, a directory under /proc) is refused before the watch starts,
/// instead of the run's counts being lost at the end.
#[test]
fn counts_file_that_cannot_be_written_is_refused_at_start() {
    if !common::require_root() {
        return;
    }
    let ro = Tmpfs::mount("ro", "ro,size=1m");
    let full = Tmpfs::mount("full", "size=64k");
    full.fill();
    let in_ro = ro.dir.join("c.txt");
    let in_full = full.dir.join("c.txt");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["dirty", "--counts-file", "/proc/c.txt", "-t", "0.5"],
            USAGE,
            "cannot write in /proc",
        ),
        (
            vec!["-d", "--counts-file", in_ro.to_str().unwrap(), "-t", "0.5"],
            USAGE,
            "Read-only file system",
        ),
        (
            vec![
                "watch",
                "--counts-file",
                in_full.to_str().unwrap(),
                "-t",
                "0.5",
            ],
            USAGE,
            "No space left on device",
        ),
    ];
    expect_errors(&cases);
}

/// With --counts-every, a rewrite that fails (the disk filled up) is warned
/// about and retried while monitoring goes on; once there is room again the
/// watch ends normally with its counts file.
#[test]
fn counts_every_on_a_full_disk_warns_and_retries() {
    if !common::require_root() || !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let fs = Tmpfs::mount("every", "size=256k");
    let counts = fs.dir.join("c.txt");
    // A VM that never runs: the watch goes on until it is stopped.
    let vm = common::spawn_vm(&["--seconds", "1"]);
    let pid = vm.ready.pid.to_string();
    let mut w = watcher(&[
        "dirty",
        "-p",
        &pid,
        "--counts-file",
        counts.to_str().unwrap(),
        "--counts-every",
        "0.1",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !counts.exists() {
        assert!(Instant::now() < deadline, "the counts file never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let filler = fs.fill();
    // Ten periods or more with nowhere to write.
    std::thread::sleep(Duration::from_secs(1));
    let alive = w.running();
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    w.signal(libc::SIGTERM);
    let (status, _, err) = w.wait(Duration::from_secs(30));
    drop(vm);
    assert!(alive, "the watch ended when the disk was full:\n{err}");
    assert!(status.success(), "{status}:\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains("retrying"),
        "no warning about the failed rewrite:\n{err}"
    );
    assert_eq!(
        err.matches("retrying").count(),
        1,
        "warned more than once:\n{err}"
    );
    let text = std::fs::read_to_string(&counts).unwrap();
    kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
}

/// The counts file's temporary file has an unpredictable name: one planted
/// under the name a watcher's pid would give cannot make its counts be lost.
#[test]
fn counts_file_survives_a_planted_temporary_file() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let d = scratch("plant");
    let counts = d.join("c.txt");
    let vm = common::spawn_vm(&["--seconds", "1"]);
    let pid = vm.ready.pid.to_string();
    let w = watcher(&[
        "dirty",
        "-p",
        &pid,
        "--counts-file",
        counts.to_str().unwrap(),
    ]);
    std::fs::write(d.join(format!(".c.txt.tmp.{}", w.pid())), b"planted").unwrap();
    std::os::unix::fs::symlink("/dev/null", d.join(format!(".c.txt.tmp.{}.lnk", w.pid()))).unwrap();
    w.signal(libc::SIGTERM);
    let (status, _, err) = w.wait(Duration::from_secs(30));
    drop(vm);
    assert!(status.success(), "{status}:\n{err}");
    let text = std::fs::read_to_string(&counts).unwrap();
    kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

/// A symbolic link in a directory above the counts file is refused, not
/// followed, like one in its last component.
#[test]
fn counts_file_under_a_symlinked_directory_is_refused() {
    let d = scratch("link");
    std::fs::create_dir_all(d.join("real")).unwrap();
    std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
    let through = d.join("link/c.txt");
    expect_errors(&[(
        vec![
            "dirty",
            "--counts-file",
            through.to_str().unwrap(),
            "-t",
            "0.5",
        ],
        USAGE,
        "symbolic link",
    )]);
    assert!(!d.join("real/c.txt").exists(), "written through the link");
    let _ = std::fs::remove_dir_all(&d);
}
