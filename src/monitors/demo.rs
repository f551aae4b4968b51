//! A monitor's section of `kvm-watcher demo` ([`super::Monitor::demo`]): the
//! demo starts the synthetic guest, watches it with every monitor that has a
//! section (`kvm-watcher <command> -p <pid> --output json`, each its own
//! process), and hands each section its records and the guest's own report
//! (`vm::report`), the ground truth it compares them with.

use std::io::Write;

use serde_json::Value;

use crate::vm::report::VmReport;

/// How a monitor takes part in the demo.
#[derive(Clone, Copy, Debug)]
pub struct DemoSection {
    /// It is watched with `--summary` and shown its `vcpu_interval`
    /// records; otherwise one record per event, those of its own name.
    pub summary: bool,
    /// Prints its section: what it saw of the guest, next to the guest's
    /// report, with a [`verdict`] for each comparison.
    pub show: fn(&mut dyn Write, &VmReport, &[Value]) -> anyhow::Result<()>,
}

/// A comparison's verdict, as the demo prints it.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "matches" } else { "DIFFERS" }
}

/// A record's count (0 when absent).
pub fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The records of the vCPU thread `tid`.
pub fn of_thread(records: &[Value], tid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| count(&r["tid"]) == u64::from(tid))
        .collect()
}
