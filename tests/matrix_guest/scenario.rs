//! One workload: a VM, a set of watchers side by side, tracefs; and what
//! they printed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvm_watcher::child::Running;
use serde_json::Value;

use crate::common::observe::parse_records;
use crate::common::{VmReport, vcpu_of_tid};
use crate::tracefs::{Trace, tracefs_start, tracefs_stop};
use crate::util::{finish, start, u};

/// A watcher run: what it printed.
pub struct Run {
    pub label: String,
    pub ok: bool,
    pub records: Vec<Value>,
    pub stderr: String,
    pub counts_file: Option<String>,
}

impl Run {
    pub fn rows(&self, monitor: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["monitor"] == monitor)
            .collect()
    }
    pub fn summary(&self) -> Result<&Value, String> {
        self.records
            .last()
            .filter(|r| r["monitor"] == "summary")
            .ok_or_else(|| {
                format!(
                    "{}: no summary line; stderr: {}",
                    self.label,
                    self.stderr.trim()
                )
            })
    }
}

/// One workload: a VM, a set of watchers side by side, tracefs.
pub struct Scenario {
    pub vm_args: Vec<String>,
    /// (label, args without -p/--output); label is the backend name or "default".
    pub watchers: Vec<(String, Vec<String>)>,
    pub trace_events: Vec<&'static str>,
    /// Start tracefs before the watchers attach: on a tracepoint, probes run
    /// in the order they attached, so ftrace then stamps each event before
    /// kvm-watcher's program runs, and durations between two events are not
    /// lengthened by the cost of kvm-watcher's program on the first.
    pub trace_first: bool,
    /// The vCPU threads' schedstat, read before the guest starts and once
    /// it has run and lingers (`vm --linger`); the watchers are stopped
    /// before the guest is let go.
    pub schedstat: bool,
}

pub struct Outcome {
    pub report: VmReport,
    /// With `Scenario::schedstat`: per vCPU thread, (run-queue wait ns,
    /// switch-ins) between the two readings.
    pub sched: BTreeMap<u32, (u64, u64)>,
    pub runs: Vec<Run>,
    pub trace: Trace,
    pub ms: u128,
}

impl Outcome {
    /// The same VM and halt events (wake-ups, halt-poll changes) with
    /// `runs`: one monitor's share of a scenario that ran two side by side.
    pub fn with_halts_only(&self, runs: Vec<Run>) -> Outcome {
        Outcome {
            report: self.report.clone(),
            sched: self.sched.clone(),
            runs,
            trace: Trace {
                wakeups: self.trace.wakeups.clone(),
                halt_ns: self.trace.halt_ns.clone(),
                halt_polls: self.trace.halt_polls.clone(),
                ..Trace::default()
            },
            ms: self.ms,
        }
    }
}

/// A started watcher: (label, the process, its `--counts-file`).
type Watcher = (String, Running, Option<String>);

/// Starts the VM (waiting for a signal), the watchers and tracefs, runs the
/// guest, and collects what each printed and what tracefs recorded.
pub fn run_scenario(s: &Scenario, tmp: &str) -> Result<Outcome, String> {
    let t0 = Instant::now();
    let mut vm_args: Vec<String> = vec!["vm".into()];
    vm_args.extend(s.vm_args.iter().cloned());
    vm_args.extend(["--wait-for-signal".into(), "--json".into()]);
    let vm = start("vm".into(), &vm_args, "kvm-watcher vm: ready")?;
    let pid = vm.pid().to_string();
    let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    if s.trace_first && !s.trace_events.is_empty() {
        tracefs_start(&tids, &s.trace_events, &[])?;
    }
    let mut watchers = start_watchers(s, &pid, tmp)?;
    if !s.trace_first && !s.trace_events.is_empty() {
        tracefs_start(&tids, &s.trace_events, &[])?;
    }
    let vcpu_tids: Vec<u32> = tids.iter().copied().filter(|&t| t != vm.pid()).collect();
    let before = if s.schedstat {
        vcpu_schedstat(vm.pid(), &vcpu_tids)
    } else {
        BTreeMap::new()
    };
    vm.signal(libc::SIGUSR1)
        .map_err(|e| format!("cannot start the vm: {e}"))?;
    let mut sched = BTreeMap::new();
    let mut runs = None;
    if s.schedstat {
        sched = schedstat_once_lingering(&vm, &vcpu_tids, &before)?;
        // Watchers end before the guest is let go: its exit is outside.
        for (_, w, _) in &watchers {
            let _ = w.signal(libc::SIGINT);
        }
        runs = Some(collect(std::mem::take(&mut watchers))?);
        vm.signal(libc::SIGUSR1)
            .map_err(|e| format!("cannot release the vm: {e}"))?;
    }
    let (ok, out, err) = finish(vm, Duration::from_secs(300));
    ensure!(ok, "vm failed: {}", err.trim());
    let report: VmReport = serde_json::from_str(&out).map_err(|e| format!("vm report: {e}"))?;
    let trace = if s.trace_events.is_empty() {
        Trace::default()
    } else {
        tracefs_stop()?
    };
    let runs = match runs {
        Some(r) => r,
        None => collect(watchers)?,
    };
    Ok(Outcome {
        report,
        sched,
        runs,
        trace,
        ms: t0.elapsed().as_millis(),
    })
}

/// Starts the scenario's watchers on VM `pid`, each ready when it says it
/// is watching; a dirty watcher writes a counts file in `tmp`.
fn start_watchers(s: &Scenario, pid: &str, tmp: &str) -> Result<Vec<Watcher>, String> {
    let mut watchers = Vec::new();
    for (i, (label, args)) in s.watchers.iter().enumerate() {
        let mut a = args.clone();
        a.extend([
            "-p".into(),
            pid.to_string(),
            "--output".into(),
            "json".into(),
        ]);
        let counts = if a[0] == "dirty" {
            let f = format!("{tmp}/counts-{i}.txt");
            a.extend(["--counts-file".into(), f.clone()]);
            Some(f)
        } else {
            None
        };
        let w = start(format!("{} {label}", a[0]), &a, "kvm-watcher: watching")?;
        watchers.push((label.clone(), w, counts));
    }
    Ok(watchers)
}

/// Waits for each watcher to end and parses what it printed.
fn collect(watchers: Vec<Watcher>) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    for (label, w, counts_file) in watchers {
        let cmd = w.name().split(' ').next().unwrap_or("").to_string();
        let (ok, out, err) = finish(w, Duration::from_secs(120));
        runs.push(Run {
            label: format!("{cmd} {label}"),
            ok,
            records: parse_records(&out)?,
            stderr: err,
            counts_file,
        });
    }
    Ok(runs)
}

/// Per vCPU thread of `pid`: (run-queue wait ns, switch-ins) so far.
fn vcpu_schedstat(pid: u32, vcpu_tids: &[u32]) -> BTreeMap<u32, (u64, u64)> {
    vcpu_tids
        .iter()
        .filter_map(|&t| {
            let k = kvm_watcher::procfs::schedstat(pid, t)?;
            Some((t, (k.wait_ns, k.timeslices)))
        })
        .collect()
}

/// Per vCPU thread of `pid`: (run-queue wait ns, switch-ins) once nothing
/// moved in them for 200 ms (the threads sleep for good), or as they were
/// just before `until`.
pub fn settled_schedstat(pid: u32, vcpu_tids: &[u32], until: Instant) -> BTreeMap<u32, (u64, u64)> {
    let mut last = vcpu_schedstat(pid, vcpu_tids);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = vcpu_schedstat(pid, vcpu_tids);
        if now == last || Instant::now() > until {
            return last;
        }
        last = now;
    }
}

/// Waits until the VM lingers (its vCPU threads have ended their run) and
/// they sleep for good; returns each thread's schedstat since `before`.
fn schedstat_once_lingering(
    vm: &Running,
    vcpu_tids: &[u32],
    before: &BTreeMap<u32, (u64, u64)>,
) -> Result<BTreeMap<u32, (u64, u64)>, String> {
    let t = Instant::now();
    while !vm.stderr_so_far().contains("kvm-watcher vm: lingering") {
        ensure!(
            t.elapsed() < Duration::from_secs(300),
            "the vm never lingered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The threads have ended their run; wait until they sleep for good.
    let last = settled_schedstat(vm.pid(), vcpu_tids, t + Duration::from_secs(300));
    let mut sched = BTreeMap::new();
    for (t, (w, n)) in last {
        if let Some((w0, n0)) = before.get(&t) {
            sched.insert(t, (w - w0, n - n0));
        }
    }
    Ok(sched)
}

/// Common checks of a row: pid, vCPU thread, vcpu_id, comm.
pub fn check_identity(row: &Value, r: &VmReport) -> Result<(), String> {
    ensure!(u(&row["pid"]) == r.pid as u64, "pid of {row}");
    let tid = u(&row["tid"]);
    let vcpu = vcpu_of_tid(r).get(&tid).copied();
    ensure!(vcpu.is_some(), "row from a thread that runs no vCPU: {row}");
    ensure!(
        row["vcpu_id"].as_u64() == vcpu,
        "vcpu_id of {row} (thread {tid} runs vCPU {vcpu:?})"
    );
    let comm = row["comm"].as_str().unwrap_or("");
    ensure!(
        comm.starts_with("CPU ") && comm.ends_with("/KVM"),
        "comm of {row}"
    );
    Ok(())
}
