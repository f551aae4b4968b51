//! Debian's QEMU with its SeaBIOS as the VMM, driven over QMP (tests/qemu.rs,
//! tests/memslots.rs).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QEMU process with a QMP socket. Killed on drop.
pub struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    sock: std::path::PathBuf,
}

impl Qemu {
    /// QEMU with 64 MiB of RAM and `vcpus` vCPUs, no devices; None (after
    /// `common::skip`) if QEMU is not installed.
    pub fn start(name: &str, vcpus: u32) -> Option<Qemu> {
        Qemu::start_with(name, vcpus, 64, &[])
    }

    /// The same with `mem_mib` of RAM and `extra` arguments.
    pub fn start_with(name: &str, vcpus: u32, mem_mib: u64, extra: &[&str]) -> Option<Qemu> {
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            super::skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
            return None;
        }
        let sock = std::env::temp_dir().join(format!(
            "kvm-watcher-qmp-{}-{}",
            std::process::id(),
            name.replace(',', "_")
        ));
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
            .args(["-monitor", "none", "-m", &mem_mib.to_string()])
            .args(["-smp", &vcpus.to_string()])
            .args(extra)
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a QMP command; its `return` value (events in between skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
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

    /// Waits (up to 60 s) until vCPU 0 halts at least `halts` times in one
    /// `step`: SeaBIOS, having found no bootable device, idles in HLT on its
    /// timer.
    pub fn wait_until_halting(&mut self, step: Duration, halts: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.halts_waited();
        loop {
            std::thread::sleep(step);
            let now = self.halts_waited();
            if now[0] >= last[0] + halts {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaBIOS never idled in HLT: {now:?}"
            );
            last = now;
        }
    }

    /// KVM's `halt_wait_hist` of each vCPU (by QOM path), summed.
    pub fn halts_waited(&mut self) -> Vec<u64> {
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
