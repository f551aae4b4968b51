//! `kvm-watcher demo`, the first command of the README's Quick start: it runs,
//! every comparison it prints against KVM's own figures matches, and a reader
//! that goes away early (`| head`) ends it quietly without leaving its guest or
//! watchers behind.

mod common;

use std::process::{Command, Stdio};

/// Processes still running the demo's guest (its command line is unique).
fn demo_guests() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains("--halt-poll-ns 100000 --dirty-pages 8 ")
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn demo_matches_kvm_and_cleans_up() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let out = Command::new(common::bin())
        .args(["demo", "--seconds", "1"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}\n{stdout}");
    for section in [
        "== wakeup",
        "== halt-poll",
        "== dirty",
        "== vcpu-load",
        "== run-delay",
        "== exits",
    ] {
        assert!(stdout.contains(section), "no {section} in:\n{stdout}");
    }
    // One halt_wait_hist comparison per vCPU, the dirty set, one schedstat
    // comparison per vCPU, and one comparison of exits per vCPU.
    assert_eq!(stdout.matches("matches").count(), 7, "{stdout}");
    assert!(!stdout.contains("DIFFERS"), "{stdout}");

    // A reader that closes after the first line.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut child = Command::new(common::bin())
        .args(["demo", "--seconds", "1"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the demo");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut &reader, &mut first).expect("the demo's first bytes");
    drop(reader);
    let status = child.wait().expect("waiting for the demo");
    assert!(status.success(), "demo with a closed pipe: {status}");
    assert!(
        demo_guests().is_empty(),
        "guests left behind: {:?}",
        demo_guests()
    );
}
