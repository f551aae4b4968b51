//! Where the binaries are, what this machine offers, and how each tool the
//! benchmark runs is started.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::bpftrace::BtScript;
use crate::process::{Proc, Ready};

/// Where the binaries are, and what this machine offers.
pub struct Env {
    pub kw: PathBuf,
    pub quick: bool,
    pub rounds: usize,
    pub ncpu: usize,
    pub has_watch: bool,
}

impl Env {
    /// The kvm-watcher binary (`kw`, default: next to this one) and this machine.
    pub fn new(kw: Option<PathBuf>, quick: bool, rounds: Option<usize>) -> Result<Env> {
        let kw = match kw {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .context("no directory")?
                .join("kvm-watcher"),
        };
        let has_watch = Command::new(&kw)
            .args(["watch", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Ok(Env {
            kw,
            quick,
            rounds: rounds.unwrap_or(if quick { 1 } else { 5 }),
            ncpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
            has_watch,
        })
    }

    pub fn kw(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kw);
        c.args(args);
        c
    }

    /// A kvm-watcher monitor, ready once it says it is watching.
    pub fn start_kw(&self, name: &str, args: &[&str]) -> Result<Proc> {
        Proc::start(
            name,
            self.kw(args),
            Ready {
                marker: "kvm-watcher: watching",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )
    }

    /// bpftrace running `script`, ready once its tracepoints are attached.
    pub fn start_bt(&self, name: &str, script: &BtScript) -> Result<Proc> {
        let mut c = Command::new("bpftrace");
        c.args(["-e", script.text]);
        c.env("BPFTRACE_MAP_KEYS_MAX", script.keys_max.to_string());
        Proc::start(
            name,
            c,
            Ready {
                marker: "Attaching",
                on_stdout: true,
                perf_fds: script.probes + self.ncpu,
            },
            false,
        )
    }

    /// `kvm-watcher serve --listen 127.0.0.1:<port>` with its default
    /// monitors, ready once it says it is serving (its programs are attached).
    pub fn start_serve(&self, port: u16, extra: &[&str]) -> Result<Proc> {
        let listen = format!("127.0.0.1:{port}");
        let mut c = self.kw(&["serve", "--listen", &listen]);
        c.args(extra);
        Proc::start(
            "kvm-watcher serve",
            c,
            Ready {
                marker: "serving metrics",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )
    }

    /// `kvm-watcher vm <args> --wait-for-signal --json`, ready (not yet running).
    pub fn start_vm(&self, args: &[&str]) -> Result<Proc> {
        let mut c = self.kw(&["vm"]);
        c.args(args).args(["--wait-for-signal", "--json"]);
        Proc::start(
            "kvm-watcher vm",
            c,
            Ready {
                marker: "kvm-watcher vm: ready",
                on_stdout: false,
                perf_fds: 0,
            },
            true,
        )
    }
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    json!({
        "kernel": sh("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_kib": status_kib_meminfo(),
        "bpftrace": sh("bpftrace", &["--version"]),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "note": "shared 2-core development machine (Firecracker guest, nested KVM through the PVM backend); other engineers' tests may run concurrently, so compare ratios within this run, not absolute times across runs",
    })
}

fn status_kib_meminfo() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
