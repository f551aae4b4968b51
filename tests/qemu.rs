//! Debian's QEMU with its SeaBIOS as the VMM: an idle guest halts on its
//! timer, and what kvm-watcher counts equals KVM's own per-vCPU statistics
//! as QEMU reports them over QMP (`query-stats`); the VM is known by the
//! name QEMU was given.

mod common;

use std::time::Duration;

use common::observe::{of, records, summary, u, watcher};
use common::qemu::Qemu;
use serde_json::{Value, json};

/// An idle SeaBIOS guest halts on its 18.2 Hz timer: with the vCPUs paused
/// (QMP stop) while kvm-watcher attaches and detaches, the wake-ups after
/// sleeping it counts per vCPU equal KVM's halt_wait_hist over the same
/// run, the records name the VM as QEMU does, and `vms` lists it with its
/// vCPU threads.
#[test]
fn qemu_wakeups_match_kvm_stats_and_the_vm_is_named() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    // One vCPU: SeaBIOS leaves the others waiting for a SIPI, not halted.
    let Some(mut qemu) = Qemu::start("seabios-idle", 1) else {
        return;
    };
    // SeaBIOS offers its boot menu, finds no bootable device and idles in
    // HLT: wait until it halts at its timer's pace.
    qemu.wait_until_halting(Duration::from_secs(1), 10);
    qemu.execute("stop", json!({}));
    let before = qemu.halts_waited();
    let pid = qemu.pid().to_string();
    let listed = common::run_cli(&["vms", "--json"], Duration::from_secs(20));
    let vms: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let w = watcher(&["watch", "-w", "-p", &pid, "--output", "json", "-i", "0.5"]);
    qemu.execute("cont", json!({}));
    std::thread::sleep(Duration::from_secs(3));
    qemu.execute("stop", json!({}));
    let after = qemu.halts_waited();
    w.signal(libc::SIGTERM);
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");

    let me = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pid"].as_u64() == Some(qemu.pid() as u64))
        .unwrap_or_else(|| panic!("QEMU not listed: {vms}"));
    assert_eq!(me["name"], "seabios-idle", "{me}");
    assert!(me["vmm"].as_str().unwrap_or("").contains("qemu"), "{me}");
    let threads: Vec<&str> = me["vcpu_threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["comm"].as_str())
        .collect();
    assert_eq!(threads, ["CPU 0/KVM"], "{me}");

    let recs = records(&out);
    let intervals = of(&recs, "vcpu_interval");
    assert!(
        intervals.iter().all(|r| r["vm"] == "seabios-idle"),
        "records without the VM's name"
    );
    let mut waited: Vec<(u64, u64)> = Vec::new();
    for r in &intervals {
        let id = u(&r["vcpu_id"]);
        match waited.iter_mut().find(|(v, _)| *v == id) {
            Some((_, n)) => *n += u(&r["waited"]),
            None => waited.push((id, u(&r["waited"]))),
        }
    }
    waited.sort();
    let kvm: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let ours: Vec<u64> = waited.iter().map(|(_, n)| *n).collect();
    eprintln!("halts waited per vCPU: KVM {kvm:?}, kvm-watcher {ours:?}");
    assert!(
        kvm.iter().sum::<u64>() > 10,
        "the guest hardly halted: {kvm:?}"
    );
    assert_eq!(
        ours, kvm,
        "wake-ups after sleeping per vCPU vs KVM's halt_wait_hist"
    );
    assert_eq!(u(&summary(&recs)["lost"]["wakeup"]), 0);
}
