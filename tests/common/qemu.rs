//! Debian's QEMU with its SeaBIOS as the VMM, driven over QMP (tests/qemu.rs,
//! tests/memslots.rs), and a guest for it that rewrites memory
//! (tests/migration.rs, tests/dirty_rate_qemu.rs).

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

    /// vCPU 0's instruction pointer (HMP's `info registers`).
    pub fn rip(&mut self) -> Option<u64> {
        let regs = self.execute(
            "human-monitor-command",
            json!({"command-line": "info registers"}),
        );
        rips(regs.as_str()?).first().copied()
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

/// The instruction pointer of each vCPU in HMP's `info registers [-a]`
/// (`RIP=` in long mode, `EIP=` otherwise).
pub fn rips(info_registers: &str) -> Vec<u64> {
    info_registers
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("RIP=").or_else(|| w.strip_prefix("EIP=")))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// A multiboot image (QEMU's `-kernel`, the a.out kludge: loaded at 1 MiB,
/// entered in 32-bit protected mode without paging, interrupts off) that
/// writes a counter into every page of [4 MiB, 4 MiB + `region`) in turn,
/// forever: every page of the region changes within any window longer
/// than one sweep, no other page changes.
pub fn writer_image(region: u64) -> Vec<u8> {
    const LOAD: u32 = 0x10_0000;
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = 1 << 16; // the address fields below are valid
    let start: u32 = 0x40_0000;
    let end = start + region as u32;
    let mut img = Vec::new();
    for word in [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        LOAD,      // header_addr: the header is the image's first bytes
        LOAD,      // load_addr
        0,         // load_end_addr: the whole file
        0,         // bss_end_addr: none
        LOAD + 32, // entry_addr: right after the header
    ] {
        img.extend(word.to_le_bytes());
    }
    let mut code = vec![0xbf]; // mov $start,%edi
    code.extend(start.to_le_bytes());
    code.push(0xbe); // mov $end,%esi
    code.extend(end.to_le_bytes());
    code.extend([
        0x31, 0xc0, // xor %eax,%eax
        // loop (offset 12):
        0x89, 0x07, // mov %eax,(%edi)
        0x40, // inc %eax
        0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add $4096,%edi
        0x39, 0xf7, // cmp %esi,%edi
        0x72, 0xf3, // jb loop
        0xbf, // mov $start,%edi
    ]);
    code.extend(start.to_le_bytes());
    code.extend([0xeb, 0xec]); // jmp loop
    img.extend(code);
    img
}
