//! vcpu-load's row: one per vCPU thread and interval, as a table row or a
//! record (`"monitor": "vcpu_load"`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::monitors::vcpu_cell;
use crate::output::{Clock, Row};

/// One thread's figures for one interval.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuLoadRow {
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// VM name.
    pub vm: Option<String>,
    /// Interval length, ns.
    pub interval_ns: u64,
    /// load->put pairs completed in the interval.
    pub count: u64,
    /// Time loaded in the interval, ns (includes a pair still open at its end).
    pub total_ns: u64,
    /// Longest completed pair, ns (null without one).
    pub max_ns: Option<u64>,
    /// Shortest completed pair, ns (null without one).
    pub min_ns: Option<u64>,
    /// The physical CPU it was loaded on longest in the interval.
    pub pcpu: Option<u32>,
    /// Loaded time per physical CPU in the interval, ns.
    pub pcpus: BTreeMap<u32, u64>,
    /// Loads in the interval on another CPU than the load before (moves).
    pub cpu_migrations: u64,
}

impl Row for VcpuLoadRow {
    fn monitor(&self) -> &'static str {
        "vcpu_load"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:>8} {:>8} {:<16} {:>7} {:>13} {:>11} {:>11} {:>8} {:<10}",
            "PID", "TID", "COMM", "VCPU_ID", "TOTAL(ms)", "MAX(ms)", "MIN(ms)", "COUNT", "PCPU(ms)"
        );
        format!("{base} VM")
    }

    fn row(&self, _clock: &Clock) -> String {
        let ms = |v: Option<u64>| {
            v.map_or_else(|| "-".to_string(), |v| format!("{:.3}", v as f64 / 1e6))
        };
        let mut by_time: Vec<(&u32, &u64)> = self.pcpus.iter().collect();
        by_time.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let pcpus: Vec<String> = by_time
            .iter()
            .map(|(cpu, ns)| format!("{cpu}:{:.1}", **ns as f64 / 1e6))
            .collect();
        let base = format!(
            "{:>8} {:>8} {:<16} {:>7} {:>13.3} {:>11} {:>11} {:>8} {:<10}",
            self.pid,
            self.tid,
            self.comm,
            vcpu_cell(self.vcpu_id),
            self.total_ns as f64 / 1e6,
            ms(self.max_ns),
            ms(self.min_ns),
            self.count,
            pcpus.join(" "),
        );
        format!("{base} {}", self.vm.as_deref().unwrap_or("-"))
    }
}
