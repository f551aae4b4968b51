//! Helpers shared by the integration tests: environment checks that skip (or fail
//! on CI) and a driver for the synthetic guest `kvm-watcher vm`.
//!
//! Each test file does `mod common;`; not every file uses every helper.
#![allow(dead_code)]

pub mod observe;
pub mod sched;
pub mod screen;
pub mod tmux;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use kvm_watcher::vm::report::{StatValue, Stats, VcpuReport, VmReport};

/// Path of the kvm-watcher binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kvm-watcher")
}

/// True when running on CI (`CI=true` or `CI=1`), where a skipped test is a failure.
pub fn on_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Name of the running test (libtest names the test thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unknown test>")
        .to_string()
}

/// Skips the current test: prints `SKIP <test>: <reason>` on stderr and returns
/// false, or panics on CI. Use as `if !common::skip(..) { return; }` or through
/// the `require_*` helpers.
pub fn skip(reason: &str) -> bool {
    let msg = format!("SKIP {}: {reason}", test_name());
    if on_ci() {
        panic!("{msg} (CI=true: a skipped test is a failure)");
    }
    eprintln!("{msg}");
    false
}

/// True when running as root (effective uid 0); otherwise skips.
pub fn require_root() -> bool {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        skip("not running as root")
    }
}

/// True when /dev/kvm can be opened read-write and answers KVM_GET_API_VERSION
/// with 12; otherwise skips.
pub fn require_kvm() -> bool {
    use std::os::fd::AsRawFd;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => return skip(&format!("cannot open /dev/kvm: {e}")),
    };
    // KVM_GET_API_VERSION = _IO(0xae, 0x00)
    // SAFETY: no argument.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), 0xae00 as _, 0) };
    if v != 12 {
        return skip(&format!(
            "/dev/kvm answers KVM_GET_API_VERSION with {v}, not 12"
        ));
    }
    true
}

/// True when BPF programs can be loaded: root and a kernel with BTF
/// (/sys/kernel/btf/vmlinux); otherwise skips. (The monitors' own tests check the
/// individual hooks with `kvm-watcher doctor`.)
pub fn require_bpf() -> bool {
    if !require_root() {
        return false;
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return skip("no /sys/kernel/btf/vmlinux (kernel without BTF)");
    }
    true
}

/// Runs `kvm-watcher <args>` to completion (with a timeout) and returns its output.
pub fn run_cli(args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning kvm-watcher");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("waiting for kvm-watcher"),
        Err(_) => {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("kvm-watcher {args:?} did not finish within {timeout:?}");
        }
    }
}

/// What the ready line `kvm-watcher vm: ready pid=.. tids=.. vcpu_ids=..` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// VMM process id.
    pub pid: u32,
    /// vCPU thread ids, by vCPU index.
    pub tids: Vec<u32>,
    /// KVM vCPU ids, by vCPU index.
    pub vcpu_ids: Vec<u32>,
}

/// Parses a ready line; None if `line` is not one.
pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim_end().strip_prefix("kvm-watcher vm: ready ")?;
    let (mut pid, mut tids, mut ids) = (None, None, None);
    let list = |v: &str| {
        v.split(',')
            .map(|x| x.parse::<u32>().ok())
            .collect::<Option<Vec<u32>>>()
    };
    for field in rest.split(' ') {
        let (k, v) = field.split_once('=')?;
        match k {
            "pid" => pid = v.parse().ok(),
            "tids" => tids = list(v),
            "vcpu_ids" => ids = list(v),
            _ => {}
        }
    }
    Some(Ready {
        pid: pid?,
        tids: tids?,
        vcpu_ids: ids?,
    })
}

/// A running `kvm-watcher vm ... --wait-for-signal --json`. Killed on drop.
pub struct VmProcess {
    child: Child,
    /// The parsed ready line.
    pub ready: Ready,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
    stdout_thread: Option<JoinHandle<String>>,
}

/// Starts `kvm-watcher vm <args> --wait-for-signal --json` and waits (up to 30 s)
/// for its ready line. The guest has not run any instruction yet.
pub fn spawn_vm(args: &[&str]) -> VmProcess {
    let mut child = Command::new(bin())
        .arg("vm")
        .args(args)
        .args(["--wait-for-signal", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning kvm-watcher vm");
    let mut out = child.stdout.take().unwrap();
    let stdout_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = child.stderr.take().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let acc = stderr.clone();
    let stderr_thread = std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            acc.lock().unwrap().push_str(&line);
            acc.lock().unwrap().push('\n');
            let _ = tx.send(line);
        }
    });
    let mut p = VmProcess {
        child,
        ready: Ready {
            pid: 0,
            tids: vec![],
            vcpu_ids: vec![],
        },
        stderr,
        stderr_thread: Some(stderr_thread),
        stdout_thread: Some(stdout_thread),
    };
    p.ready = wait_ready(&rx, &mut p, Duration::from_secs(30));
    p
}

fn wait_ready(rx: &Receiver<String>, p: &mut VmProcess, timeout: Duration) -> Ready {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(r) = parse_ready(&line) {
                    return r;
                }
            }
            Err(_) => {
                let status = p.child.try_wait().ok().flatten();
                panic!(
                    "kvm-watcher vm printed no ready line (exit status {status:?}); stderr:\n{}",
                    p.stderr()
                );
            }
        }
    }
}

impl VmProcess {
    /// Everything the VM wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` to the VM process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill of our own child.
        let r = unsafe { libc::kill(self.ready.pid as i32, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.ready.pid);
    }

    /// Sends SIGUSR1: the guest starts running.
    pub fn start(&self) {
        self.signal(libc::SIGUSR1);
    }

    /// Waits (up to `timeout`) for the VM to exit, asserts exit status 0, and
    /// returns its JSON report.
    pub fn finish(mut self, timeout: Duration) -> VmReport {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for kvm-watcher vm") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "kvm-watcher vm did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stdout = self.stdout_thread.take().unwrap().join().unwrap();
        assert!(
            status.success(),
            "kvm-watcher vm exited with {status}; stderr:\n{}",
            self.stderr()
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON report ({e}):\n{stdout}\nstderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns the VM, starts it at once and returns its report (asserting exit 0).
pub fn run_vm(args: &[&str], timeout: Duration) -> VmReport {
    let vm = spawn_vm(args);
    vm.start();
    vm.finish(timeout)
}

/// A scalar KVM stat of a vCPU (panics if absent); histograms are summed.
pub fn stat(stats: &Stats, name: &str) -> u64 {
    stats
        .get(name)
        .unwrap_or_else(|| panic!("KVM stat {name} missing; have {:?}", stats.keys()))
        .total()
}

/// The expected dirty set of `kvm-watcher vm --dirty-pages n` for the vCPUs in
/// `report`, computed from the layout documented in `src/vm/guest.rs` and the
/// report's memslots (data slots in slot order): vCPU index i, page j -> g = i*n + j,
/// data slot number g % K, relative page g / K. Returns sorted (slot, rel_gfn).
pub fn expected_dirty_pages(report: &VmReport, n: u64) -> Vec<(u32, u64)> {
    let mut data: Vec<_> = report
        .memslots
        .iter()
        .filter(|m| m.role == "data")
        .collect();
    data.sort_by_key(|m| m.slot);
    let k = data.len() as u64;
    let mut v = Vec::new();
    for cpu in &report.vcpus {
        if cpu.passes == 0 {
            continue; // never wrote anything
        }
        for j in 0..n {
            let g = cpu.index as u64 * n + j;
            let slot = data[(g % k) as usize];
            let rel = g / k;
            assert!(
                rel < slot.npages,
                "expected page {rel} beyond slot {} ({} pages)",
                slot.slot,
                slot.npages
            );
            v.push((slot.slot, rel));
        }
    }
    v.sort();
    v
}
