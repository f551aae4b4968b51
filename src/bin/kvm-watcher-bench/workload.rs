//! The synthetic guest's two workloads, and a VM run while something watches it.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::env::Env;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// One vCPU writing 8192 pages per pass into dirty-ring-logged memory, never halting.
    Dirty,
    /// Two vCPUs halting at 5000 Hz (LAPIC timer), no dirty pages.
    Halt,
    /// One vCPU writing to an I/O port its VMM handles, 64 times per pass,
    /// never halting: exits to the VMM as fast as it can.
    Exits,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Dirty => "dirty",
            Workload::Halt => "halt",
            Workload::Exits => "exits",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::Dirty => "pages dirtied/s",
            Workload::Halt => "halts/s",
            Workload::Exits => "exits to the VMM/s",
        }
    }

    /// The VM's shape and work (`kvm-watcher vm` options), without its length.
    pub fn shape(self) -> Vec<String> {
        let v: &[&str] = match self {
            Workload::Dirty => &[
                "--vcpus",
                "1",
                "--dirty-pages",
                "8192",
                "--dirty-log",
                "ring",
            ],
            Workload::Halt => &["--vcpus", "2", "--halt-hz", "5000"],
            Workload::Exits => &["--vcpus", "1", "--io-exits", "64"],
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    fn vm_args(self, seconds: f64) -> Vec<String> {
        let mut v = self.shape();
        v.push("--seconds".into());
        v.push(format!("{seconds}"));
        v
    }

    /// The guest's own count of this workload's units in one vCPU's report
    /// (pages it wrote, HLTs it ran, port writes it completed).
    pub fn units(self, vcpu: &Value) -> Option<u64> {
        match self {
            Workload::Dirty => vcpu["pages_written"].as_u64(),
            Workload::Halt => vcpu["halts"].as_u64(),
            Workload::Exits => vcpu["exits_made"]["io"].as_u64(),
        }
    }

    /// Work per second from the VM's report.
    pub fn rate(self, report: &Value) -> Result<f64> {
        let secs = report["seconds"]
            .as_f64()
            .context("report has no seconds")?;
        let total: u64 = report["vcpus"]
            .as_array()
            .context("report has no vcpus")?
            .iter()
            .map(|v| self.units(v).unwrap_or(0))
            .sum();
        Ok(total as f64 / secs.max(1e-9))
    }
}

/// Runs the VM of `w` for `seconds` while `attach` holds whatever it started; returns its report.
pub fn run_vm<T>(
    env: &Env,
    w: Workload,
    seconds: f64,
    attach: impl FnOnce() -> Result<T>,
) -> Result<(Value, T)> {
    let args = w.vm_args(seconds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = env.start_vm(&args)?;
    let held = attach()?;
    std::thread::sleep(Duration::from_millis(if env.quick { 50 } else { 300 }));
    vm.signal(libc::SIGUSR1);
    let st = vm.wait_exit(Duration::from_secs_f64(seconds + 60.0))?;
    if st.status != Some(0) {
        bail!("kvm-watcher vm failed: {}", st.stderr.trim());
    }
    let report: Value = serde_json::from_str(&st.stdout).context("VM report is not JSON")?;
    Ok((report, held))
}
