//! A watch under pressure: a reader that stops reading, and more pages than
//! `--max-pages` over a run in which VMs come and go.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ready() -> bool {
    common::require_bpf() && common::require_kvm()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-robust-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// True while thread `pid` is in write(1, ...): its stdout is full.
fn blocked_writing_stdout(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| s.starts_with("1 0x1 "))
}

/// SIGTERM ends a watch whose stdout nobody reads (`... | sleep 25`) at
/// once, with its counts file written, instead of when the reader goes.
#[test]
fn sigterm_ends_a_watch_whose_stdout_is_not_read() {
    if !ready() {
        return;
    }
    let dir = tempdir("blocked");
    let counts = dir.join("c.txt");
    let vm = common::spawn_vm(&[
        "--dirty-pages",
        "256",
        "--dirty-log",
        "ring",
        "--seconds",
        "60",
    ]);
    let pid = vm.ready.pid.to_string();
    let mut w = Command::new(common::bin())
        .args(["dirty", "-p", &pid, "--counts-file"])
        .arg(&counts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = w.stdout.take();
    let mut err = BufReader::new(w.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("watching") {}
    vm.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !blocked_writing_stdout(w.id()) {
        assert!(
            Instant::now() < deadline,
            "the watcher never filled its stdout"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = w.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = w.kill();
            let _ = w.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(vm);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let status = status.expect("SIGTERM did not end the watch while its stdout was blocked");
    assert!(status.success(), "{status}: {rest}");
    let text = std::fs::read_to_string(&counts).expect("no counts file");
    let pages = kvm_watcher::monitors::dirty::parse_counts_file(&text).unwrap();
    assert!(!pages.is_empty(), "the counts file counts nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
