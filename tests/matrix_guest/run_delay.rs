//! run_delay: each vCPU thread's waits for a CPU against its schedstat.

use std::collections::BTreeMap;

use crate::matrix::Matrix;
use crate::scenario::{Outcome, Run, Scenario, check_identity, run_scenario};
use crate::util::{s, u};

impl Matrix {
    /// Scenario 5: Run delay: two halting vCPUs on the VM's CPUs, against each vCPU
    /// thread's schedstat read before the guest starts and once it has run
    /// and lingers. Waits depend on the moment: runs are not compared with
    /// each other.
    pub fn run_delay(&self) {
        let vm = s(&[
            "--vcpus",
            "2",
            "--halt-hz",
            "200",
            "--passes",
            "100",
            "--linger",
        ]);
        let sc = Scenario {
            vm_args: vm,
            watchers: self.watchers_for("run_delay", "run-delay", &["--summary", "-i", "0.25"]),
            trace_events: vec![],
            trace_first: false,
            schedstat: true,
        };
        self.evaluate(
            "run_delay",
            "-",
            run_scenario(&sc, &self.tmp),
            &check_run_delay,
            &self.all_runs("run_delay"),
        );
    }
}

/// run-delay against each vCPU thread's schedstat, read before the guest
/// started and once it had run and lingered, inside the watch: the same
/// switch-ins, and the waiting time within 1 % or 100 us.
fn check_run_delay(run: &Run, o: &Outcome) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    let mut seen: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for row in run.rows("vcpu_interval") {
        if row["run_delay_ns"].is_null() {
            continue;
        }
        check_identity(row, &o.report)?;
        let e = seen.entry(u(&row["tid"])).or_default();
        e.0 += u(&row["run_delay_ns"]);
        e.1 += u(&row["run_delay_switch_ins"]);
        e.2 += u(&row["run_delay_waits"]);
    }
    let mut shown = Vec::new();
    for v in &o.report.vcpus {
        let &(k_ns, k_ins) = o
            .sched
            .get(&v.tid)
            .ok_or(format!("no schedstat of vCPU {}", v.vcpu_id))?;
        let (ns, ins, waits) = seen.get(&(v.tid as u64)).copied().unwrap_or_default();
        ensure!(
            ins == k_ins && ns.abs_diff(k_ns) <= (k_ns / 100).max(100_000),
            "vCPU {}: waited {ns} ns in {ins} switch-ins, schedstat {k_ns} ns in {k_ins}",
            v.vcpu_id
        );
        ensure!(
            waits <= ins && ins > 0,
            "vCPU {}: {waits} waits of {ins}",
            v.vcpu_id
        );
        shown.push(format!(
            "vCPU {} {:.3}/{:.3} ms {ins}/{k_ins} switch-ins ({waits} seen)",
            v.vcpu_id,
            ns as f64 / 1e6,
            k_ns as f64 / 1e6,
        ));
    }
    Ok(format!("vs schedstat: {}", shown.join(", ")))
}
