//! Helpers shared by the integration tests: environment checks that skip (or fail
//! on CI) and a driver for the synthetic guest `kvm-watcher vm`.
//!
//! Each test file does `mod common;`; not every file uses every helper.
#![allow(dead_code)]

pub mod advise;
pub mod exporter;
pub mod fleet;
pub mod libvirt;
pub mod manifests;
pub mod observe;
pub mod prometheus;
pub mod qemu;
pub mod rawvm;
pub mod sched;
pub mod screen;
pub mod seed;
pub mod tmux;
pub mod usage;
pub mod windows;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kvm_watcher::child::{self, Running, Spawn, Stream};
use kvm_watcher::monitors::dirty::PageCount;
#[allow(unused_imports)]
pub use kvm_watcher::vm::report::{StatValue, Stats, VcpuReport, VmReport};

/// Path of the kvm-watcher binary the tests run: `$KVM_WATCHER_BIN` if set
/// (the kernel matrix copies a release build into its VMs), else the one
/// cargo built for these tests.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("KVM_WATCHER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kvm-watcher").to_string())
    })
}

/// A child-process error for a panic message: what went wrong, and
/// everything the child wrote.
pub fn failure(e: &child::Error) -> String {
    let mut s = e.to_string();
    if let Some(cause) = std::error::Error::source(e) {
        s += &format!(": {cause}");
    }
    if let Some(exit) = e.exit() {
        s += &format!("\nstdout:\n{}\nstderr:\n{}", exit.stdout, exit.stderr);
    }
    s
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
    run: Running,
    /// The parsed ready line.
    pub ready: Ready,
}

/// Starts `kvm-watcher vm <args> --wait-for-signal --json` and waits (up to 30 s)
/// for its ready line. The guest has not run any instruction yet.
pub fn spawn_vm(args: &[&str]) -> VmProcess {
    let mut cmd = Command::new(bin());
    cmd.arg("vm")
        .args(args)
        .args(["--wait-for-signal", "--json"]);
    let run = Spawn::new(cmd)
        .name("kvm-watcher vm")
        .ready_on(Stream::Stderr, "kvm-watcher vm: ready ")
        .ready_within(Duration::from_secs(30))
        .start()
        .unwrap_or_else(|e| panic!("{}", failure(&e)));
    let line = run.ready_line().unwrap_or_default();
    let ready = parse_ready(line).unwrap_or_else(|| {
        panic!(
            "kvm-watcher vm printed a bad ready line: {line}; stderr:\n{}",
            run.stderr_so_far()
        )
    });
    VmProcess { run, ready }
}

impl VmProcess {
    /// Everything the VM wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.run.stderr_so_far()
    }

    /// Sends `sig` to the VM process.
    pub fn signal(&self, sig: i32) {
        if let Err(e) = self.run.signal(sig) {
            panic!("kill({}, {sig}) failed: {e}", self.ready.pid);
        }
    }

    /// Sends SIGUSR1: the guest starts running.
    pub fn start(&self) {
        self.signal(libc::SIGUSR1);
    }

    /// Waits (up to `timeout`) for the `kvm-watcher vm: lingering` line of
    /// a `--linger` run: the guest has run and its vCPU threads wait.
    pub fn wait_lingering(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.stderr().contains("kvm-watcher vm: lingering") {
            assert!(
                std::time::Instant::now() < deadline,
                "the VM never lingered; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `timeout`) for the VM to exit, asserts exit status 0, and
    /// returns its JSON report.
    pub fn finish(self, timeout: Duration) -> VmReport {
        let exit = self
            .run
            .wait_or_kill(timeout)
            .unwrap_or_else(|e| panic!("{}", failure(&e)));
        assert!(
            !exit.killed,
            "kvm-watcher vm did not exit within {timeout:?}; stderr:\n{}",
            exit.stderr
        );
        assert!(
            exit.status.success(),
            "kvm-watcher vm exited with {}; stderr:\n{}",
            exit.status,
            exit.stderr
        );
        serde_json::from_str(&exit.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON report ({e}):\n{}\nstderr:\n{}",
                exit.stdout, exit.stderr
            )
        })
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

/// A KVM stat of a vCPU, histograms summed; None if the kernel has no stats
/// for it (no binary stats fd before Linux 5.14) or not this one.
pub fn vcpu_stat(v: &VcpuReport, name: &str) -> Option<u64> {
    Some(v.stats.as_ref()?.get(name)?.total())
}

/// The guest's vCPU id of each of its vCPU threads.
pub fn vcpu_of_tid(report: &VmReport) -> HashMap<u64, u64> {
    report
        .vcpus
        .iter()
        .map(|v| (v.tid as u64, v.vcpu_id as u64))
        .collect()
}

/// The pages of a counts file (`--counts-file`), as kvm-watcher parses them.
pub fn counts_file(path: impl AsRef<std::path::Path>) -> Result<Vec<PageCount>, String> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("counts file {}: {e}", path.display()))?;
    kvm_watcher::monitors::dirty::parse_counts_file(&text).map_err(|e| format!("{e:#}"))
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

/// Holds `lock`, for tests of one binary that must not run side by side
/// (taken all the same when a test that held it panicked).
pub fn one_at_a_time(lock: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}
