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

    fn vm_args(self, seconds: f64) -> Vec<String> {
        let mut v: Vec<String> = match self {
            Workload::Dirty => [
                "--vcpus",
                "1",
                "--dirty-pages",
                "8192",
                "--dirty-log",
                "ring",
            ]
            .map(String::from)
            .to_vec(),
            Workload::Halt => ["--vcpus", "2", "--halt-hz", "5000"]
                .map(String::from)
                .to_vec(),
            Workload::Exits => ["--vcpus", "1", "--io-exits", "64"]
                .map(String::from)
                .to_vec(),
        };
        v.push("--seconds".into());
        v.push(format!("{seconds}"));
        v
    }

    /// Work per second from the VM's report.
    pub fn rate(self, report: &Value) -> Result<f64> {
        let secs = report["seconds"]
            .as_f64()
            .context("report has no seconds")?;
        let of = |v: &Value| match self {
            Workload::Dirty => v["pages_written"].as_u64(),
            Workload::Halt => v["halts"].as_u64(),
            Workload::Exits => v["exits_made"]["io"].as_u64(),
        };
        let total: u64 = report["vcpus"]
            .as_array()
            .context("report has no vcpus")?
            .iter()
            .map(|v| of(v).unwrap_or(0))
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
