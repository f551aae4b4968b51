//! One trial of the guest tax: a synthetic VM doing a fixed amount of work
//! (`--passes`), and what it cost its vCPU threads by the kernel's account.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::env::Env;
use crate::workload::Workload;

/// Passes per vCPU of each workload in a trial: about 0.15-0.2 s of guest
/// work unwatched here (8192 pages, one HLT, or 64 port writes per pass).
pub fn passes(w: Workload, quick: bool) -> u64 {
    let p: u64 = match w {
        Workload::Dirty => 4,
        Workload::Halt => 750,
        Workload::Exits => 300,
    };
    if quick { p.div_ceil(8) } else { p }
}

/// The `kvm-watcher vm` options of a trial of `w`: part 2's VM, for a
/// fixed number of passes. The halting VM polls for no time: a vCPU that
/// polls burns its CPU until the timer fires whatever runs in its thread,
/// and whether a VM's window settles grown or shrunk at 5000 Hz is decided
/// in its first halts: 40 or 180 us of vCPU time per HLT, VM by VM.
pub fn args(w: Workload, quick: bool) -> Vec<String> {
    let mut a = w.shape();
    if w == Workload::Halt {
        a.extend(["--halt-poll-ns".into(), "0".into()]);
    }
    a.extend(["--passes".into(), passes(w, quick).to_string()]);
    a
}

/// What one trial gave, from the VM's report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trial {
    /// Units of guest work, the guest's own count over all vCPUs.
    pub units: u64,
    /// Time the vCPU threads spent on a CPU over the guest run (their
    /// schedstat), ns, all vCPUs.
    pub cpu_ns: u64,
    /// The guest run's wall-clock length, s.
    pub seconds: f64,
}

impl Trial {
    /// vCPU CPU time per unit of guest work, ns.
    pub fn cpu_ns_per_unit(&self) -> f64 {
        if self.units == 0 {
            return f64::NAN;
        }
        self.cpu_ns as f64 / self.units as f64
    }

    /// Units of guest work per wall-clock second.
    pub fn rate(&self) -> f64 {
        if self.seconds <= 0.0 {
            return f64::NAN;
        }
        self.units as f64 / self.seconds
    }
}

/// The trial in `report` (`kvm-watcher vm --json`): every vCPU must have
/// run its passes to the end and have the kernel's CPU time.
pub fn from_report(w: Workload, report: &Value) -> Result<Trial> {
    let vcpus = report["vcpus"].as_array().context("report has no vcpus")?;
    if vcpus.is_empty() {
        bail!("the VM report has no vCPU");
    }
    let mut t = Trial {
        units: 0,
        cpu_ns: 0,
        seconds: report["seconds"]
            .as_f64()
            .context("report has no seconds")?,
    };
    for v in vcpus {
        let i = &v["index"];
        if v["exit"] != "guest" {
            bail!(
                "vCPU {i} did not finish its passes (stopped by {})",
                v["exit"]
            );
        }
        t.units += w
            .units(v)
            .with_context(|| format!("vCPU {i} has no count of {}", w.unit()))?;
        t.cpu_ns += v["sched"]["cpu_ns"].as_u64().with_context(|| {
            format!("vCPU {i} has no CPU time (a kernel without schedstat, or a VM without it)")
        })?;
    }
    Ok(t)
}

/// Runs `w` for its passes on a fresh VM while whatever is attached stays
/// attached; `settle` lets a watcher notice the VM before its guest starts.
pub fn run(env: &Env, w: Workload, settle: Duration) -> Result<Trial> {
    let args = args(w, env.quick);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = env.start_vm(&args)?;
    std::thread::sleep(settle);
    vm.signal(libc::SIGUSR1);
    let st = vm.wait_exit(Duration::from_secs(120))?;
    if st.status != Some(0) {
        bail!("kvm-watcher vm failed: {}", st.stderr.trim());
    }
    let report: Value = serde_json::from_str(&st.stdout).context("VM report is not JSON")?;
    from_report(w, &report)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_trial_sums_the_vcpus_own_counts_and_cpu_time() {
        let r = json!({ "seconds": 0.5, "vcpus": [
            { "index": 0, "exit": "guest", "halts": 1000, "sched": { "cpu_ns": 4_000_000 } },
            { "index": 1, "exit": "guest", "halts": 1000, "sched": { "cpu_ns": 6_000_000 } },
        ]});
        let t = from_report(Workload::Halt, &r).unwrap();
        assert_eq!((t.units, t.cpu_ns), (2000, 10_000_000));
        assert_eq!(t.cpu_ns_per_unit(), 5000.0);
        assert_eq!(t.rate(), 4000.0);
        let pages = json!({ "seconds": 1.0, "vcpus": [
            { "index": 0, "exit": "guest", "pages_written": 65536, "halts": 0,
              "exits_made": { "io": 3 }, "sched": { "cpu_ns": 65_536_000 } },
        ]});
        assert_eq!(
            from_report(Workload::Dirty, &pages)
                .unwrap()
                .cpu_ns_per_unit(),
            1000.0
        );
        assert_eq!(from_report(Workload::Exits, &pages).unwrap().units, 3);
    }

    #[test]
    fn a_trial_without_cpu_time_or_cut_short_is_refused() {
        let no_sched = json!({ "seconds": 0.5, "vcpus": [
            { "index": 0, "exit": "guest", "halts": 10, "sched": null } ]});
        let e = from_report(Workload::Halt, &no_sched).unwrap_err();
        assert!(format!("{e:#}").contains("no CPU time"), "{e:#}");
        let kicked = json!({ "seconds": 0.5, "vcpus": [
            { "index": 0, "exit": "kick", "halts": 10, "sched": { "cpu_ns": 1 } } ]});
        let e = from_report(Workload::Halt, &kicked).unwrap_err();
        assert!(format!("{e:#}").contains("did not finish"), "{e:#}");
        assert!(from_report(Workload::Halt, &json!({ "seconds": 1.0, "vcpus": [] })).is_err());
    }

    #[test]
    fn a_trial_without_work_has_no_figures() {
        let t = Trial {
            units: 0,
            cpu_ns: 5,
            seconds: 0.0,
        };
        assert!(t.cpu_ns_per_unit().is_nan() && t.rate().is_nan());
        assert!(passes(Workload::Halt, true) < passes(Workload::Halt, false));
        assert!(passes(Workload::Dirty, true) >= 1);
    }
}
