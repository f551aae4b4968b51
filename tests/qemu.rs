//! Debian's QEMU with its SeaBIOS as the VMM: an idle guest halts on its
//! timer, and what kvm-watcher counts equals KVM's own per-vCPU statistics
//! as QEMU reports them over QMP (`query-stats`); the VM is known by the
//! name QEMU was given.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::observe::{of, records, summary, u, watcher};
use serde_json::{Value, json};

/// A QEMU process with a QMP socket. Killed on drop.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    sock: std::path::PathBuf,
}

impl Qemu {
    fn start(name: &str, vcpus: u32) -> Option<Qemu> {
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            common::skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
            return None;
        }
        let sock =
            std::env::temp_dir().join(format!("kvm-watcher-qmp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "kvm",
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "none",
            ])
            .args(["-monitor", "none", "-m", "64", "-smp", &vcpus.to_string()])
            .args(["-name", &format!("guest={name},debug-threads=on")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu");
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU's QMP socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
            sock,
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.execute("qmp_capabilities", json!({}));
        Some(q)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a QMP command; its `return` value (events in between skipped).
    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.qmp.get_mut(), "{msg}").unwrap();
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).expect("QMP answer");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {command}: {v}");
        }
    }

    /// KVM's `halt_wait_hist` of each vCPU (by QOM path), summed.
    fn halts_waited(&mut self) -> Vec<u64> {
        let stats = self.execute("query-stats", json!({"target": "vcpu"}));
        let mut per_vcpu: Vec<(String, u64)> = stats
            .as_array()
            .expect("query-stats returns a list")
            .iter()
            .filter(|s| s["provider"] == "kvm")
            .map(|s| {
                let hist = s["stats"]
                    .as_array()
                    .and_then(|st| st.iter().find(|x| x["name"] == "halt_wait_hist"))
                    .and_then(|x| x["value"].as_array())
                    .expect("halt_wait_hist in KVM's vCPU stats");
                let n = hist.iter().map(|b| b.as_u64().unwrap_or(0)).sum();
                (s["qom-path"].as_str().unwrap_or("").to_string(), n)
            })
            .collect();
        per_vcpu.sort();
        per_vcpu.into_iter().map(|(_, n)| n).collect()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

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
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = qemu.halts_waited();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = qemu.halts_waited();
        if now[0] >= last[0] + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SeaBIOS never idled in HLT: {now:?}"
        );
        last = now;
    }
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
