//! wakeup and halt_poll: the halting guest's wake-ups and halt-polling
//! window changes, as rows and as per-thread summaries, against tracefs
//! and KVM's statistics.

use std::collections::BTreeMap;

use crate::common::vcpu_stat;
use crate::matrix::Matrix;
use crate::scenario::{Outcome, Run, Scenario, check_identity, run_scenario};
use crate::util::{diff, multiset, s, u};

impl Matrix {
    /// The halting guest of scenarios 1 and 1b (with `vm_extra`), watched by
    /// every wakeup and halt-poll backend with `extra`.
    fn halts(&self, vm_extra: &[&str], extra: &[&str]) -> Scenario {
        let mut vm = s(&["--vcpus", "2", "--halt-hz", "200", "--passes", "200"]);
        vm.extend(s(vm_extra));
        if self.has_halt_poll_cap {
            vm.extend(s(&["--halt-poll-ns", "2000000"]));
        }
        let mut watchers = self.watchers_for("wakeup", "wakeup", extra);
        watchers.extend(self.watchers_for("halt_poll", "halt-poll", extra));
        Scenario {
            vm_args: vm,
            watchers,
            trace_events: vec!["kvm_vcpu_wakeup", "kvm_halt_poll_ns"],
            trace_first: false,
            schedstat: false,
        }
    }

    /// Scenario 1: Halts: wakeup and halt-poll side by side. A large host window makes
    /// KVM grow and shrink it at 200 Hz.
    pub fn halts_side_by_side(&self) {
        let _ = std::fs::write("/sys/module/kvm/parameters/halt_poll_ns", "2000000");
        let sc = self.halts(&["--first-vcpu-id", "3"], &[]);
        let o = run_scenario(&sc, &self.tmp);
        let (o1, o2) = match o {
            Ok(o) => {
                let runs = o
                    .runs
                    .iter()
                    .map(|r| Run {
                        label: r.label.clone(),
                        ok: r.ok,
                        records: r.records.clone(),
                        stderr: r.stderr.clone(),
                        counts_file: None,
                    })
                    .collect();
                let copy = o.with_halts_only(runs);
                (Ok(o), Ok(copy))
            }
            Err(e) => (Err(e.clone()), Err(e)),
        };
        self.evaluate("wakeup", "-", o1, &check_wakeup, &[]);
        self.evaluate("halt_poll", "-", o2, &check_halt_poll, &[]);
    }

    /// Scenario 1b: The same halts as summaries: per-thread aggregates in the kernel
    /// (task storage where it can, the hash otherwise; the detail says
    /// which), read every 0.25 s while the vCPUs run and once more
    /// after they exited, against tracefs per thread.
    pub fn halt_summaries(&self) {
        let sc = self.halts(&[], &["--summary", "-i", "0.25"]);
        let place = |monitor: &str, label: &str| -> &'static str {
            let backend = match label.rsplit(' ').next().unwrap_or("") {
                "default" => self.defaults.get(monitor).cloned().unwrap_or_default(),
                b => b.to_string(),
            };
            aggregates_place(monitor, &backend, &mut kvm_watcher::hooks::Prober::new())
        };
        match run_scenario(&sc, &self.tmp) {
            Ok(mut o) => {
                let (wakeup_runs, poll_runs): (Vec<Run>, Vec<Run>) = std::mem::take(&mut o.runs)
                    .into_iter()
                    .partition(|r| r.label.starts_with("wakeup "));
                let split = |runs: Vec<Run>| o.with_halts_only(runs);
                self.evaluate(
                    "wakeup",
                    "summary",
                    Ok(split(wakeup_runs)),
                    &|r, o| check_wakeup_summary(r, o, place("wakeup", &r.label)),
                    &self.all_runs("wakeup"),
                );
                self.evaluate(
                    "halt_poll",
                    "summary",
                    Ok(split(poll_runs)),
                    &|r, o| check_halt_poll_summary(r, o, place("halt_poll", &r.label)),
                    &self.all_runs("halt_poll"),
                );
            }
            Err(e) => {
                self.evaluate(
                    "wakeup",
                    "summary",
                    Err(e.clone()),
                    &check_wakeup_summary_unused,
                    &[],
                );
                self.evaluate(
                    "halt_poll",
                    "summary",
                    Err(e),
                    &check_wakeup_summary_unused,
                    &[],
                );
            }
        }
    }
}

fn check_wakeup(run: &Run, o: &Outcome) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    let rows = run.rows("wakeup");
    ensure!(!rows.is_empty(), "no wakeup rows");
    for row in &rows {
        // halt_ns can be 0: a wake-up already pending when KVM checked.
        check_identity(row, &o.report)?;
        ensure!(row["halt_ns"].is_u64(), "halt_ns of {row}");
    }
    let ours = multiset(
        rows.iter()
            .map(|r| (u(&r["tid"]) as u32, r["waited"] == true, r["valid"] == true)),
    );
    let theirs = multiset(o.trace.wakeups.iter().cloned());
    ensure!(
        ours == theirs,
        "rows vs tracefs kvm_vcpu_wakeup: {}",
        diff(&ours, &theirs)
    );
    let mut detail = format!("{} rows = tracefs", rows.len());
    for v in &o.report.vcpus {
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| u(&r["tid"]) == v.tid as u64)
            .collect();
        let waited = mine.iter().filter(|r| r["waited"] == true).count() as u64;
        ensure!(
            !mine.is_empty() && mine.len() as u64 <= v.halts,
            "vCPU {}: {} wake-ups for {} halts",
            v.vcpu_id,
            mine.len(),
            v.halts
        );
        if let (Some(exits), Some(hist)) =
            (vcpu_stat(v, "halt_exits"), vcpu_stat(v, "halt_wait_hist"))
        {
            ensure!(
                mine.len() as u64 <= exits,
                "vCPU {}: {} wake-ups > KVM halt_exits {exits}",
                v.vcpu_id,
                mine.len()
            );
            ensure!(
                waited == hist,
                "vCPU {}: {waited} waited wake-ups vs KVM sum(halt_wait_hist) {hist}",
                v.vcpu_id
            );
            if v.index == 0 {
                detail.push_str("; waited = KVM halt_wait_hist");
            }
        }
    }
    let s = run.summary()?;
    ensure!(
        u(&s["events"]["wakeup"]) == rows.len() as u64 && u(&s["lost"]["wakeup"]) == 0,
        "summary events/lost: {s}"
    );
    Ok(detail)
}

fn check_halt_poll(run: &Run, o: &Outcome) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    let rows = run.rows("halt_poll");
    ensure!(!rows.is_empty(), "no halt-poll rows");
    for row in &rows {
        check_identity(row, &o.report)?;
        ensure!(
            (row["grow"] == true) == (u(&row["new_ns"]) > u(&row["old_ns"])),
            "grow vs old/new in {row}"
        );
    }
    let ours = multiset(rows.iter().map(|r| {
        (
            u(&r["tid"]) as u32,
            u(&r["vcpu_id"]) as u32,
            r["grow"] == true,
            u(&r["old_ns"]),
            u(&r["new_ns"]),
        )
    }));
    let theirs = multiset(o.trace.halt_polls.iter().cloned());
    ensure!(
        ours == theirs,
        "rows vs tracefs kvm_halt_poll_ns: {}",
        diff(&ours, &theirs)
    );
    Ok(format!("{} rows = tracefs", rows.len()))
}

/// Where `monitor` on `backend` keeps its per-thread aggregates on this
/// kernel: what the backend table resolves to.
fn aggregates_place(
    monitor: &str,
    backend: &str,
    prober: &mut kvm_watcher::hooks::Prober,
) -> &'static str {
    let Some(m) = kvm_watcher::monitors::REGISTRY
        .iter()
        .find(|m| m.name() == monitor)
    else {
        return "unknown";
    };
    let Some(b) = m.backends().iter().find(|b| b.name == backend) else {
        return "unknown";
    };
    match kvm_watcher::backend::resolve(b, prober) {
        Ok(r)
            if r.programs
                .iter()
                .any(|p| p.starts_with("tp_btf_") && p.ends_with("_exit")) =>
        {
            "aggregates in task storage"
        }
        Ok(_) => "aggregates in the hash",
        Err(_) => "unknown",
    }
}

/// Sums of a summary's vcpu_interval rows, per thread: field -> tid -> sum.
fn interval_sums(run: &Run, fields: &[&str]) -> BTreeMap<(String, u32), u64> {
    let mut sums = BTreeMap::new();
    for row in run.rows("vcpu_interval") {
        for f in fields {
            if let Some(v) = row[*f].as_u64() {
                *sums
                    .entry((f.to_string(), u(&row["tid"]) as u32))
                    .or_default() += v;
            }
        }
    }
    sums
}

fn check_wakeup_summary(run: &Run, o: &Outcome, place: &str) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    ensure!(run.rows("wakeup").is_empty(), "--summary streamed rows");
    let intervals = run.rows("vcpu_interval").len();
    ensure!(
        intervals >= 4,
        "{intervals} interval rows: expected several readings"
    );
    let sums = interval_sums(run, &["wakeups", "waited"]);
    for v in &o.report.vcpus {
        let theirs = |waited_only: bool| {
            o.trace
                .wakeups
                .iter()
                .filter(|(t, w, _)| *t == v.tid && (*w || !waited_only))
                .count() as u64
        };
        for (field, truth) in [("wakeups", theirs(false)), ("waited", theirs(true))] {
            let ours = sums.get(&(field.to_string(), v.tid)).copied().unwrap_or(0);
            ensure!(
                ours == truth,
                "vCPU {}: {field} {ours} in the summaries vs {truth} kvm_vcpu_wakeup in tracefs",
                v.vcpu_id
            );
        }
        ensure!(
            theirs(false) > 0,
            "vCPU {}: no wake-up in tracefs",
            v.vcpu_id
        );
    }
    Ok(format!(
        "{} wake-ups = tracefs per thread over {intervals} interval rows; {place}",
        o.trace.wakeups.len()
    ))
}

fn check_halt_poll_summary(run: &Run, o: &Outcome, place: &str) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    ensure!(run.rows("halt_poll").is_empty(), "--summary streamed rows");
    ensure!(
        !o.trace.halt_polls.is_empty(),
        "no kvm_halt_poll_ns in tracefs"
    );
    let sums = interval_sums(run, &["poll_grows", "poll_shrinks"]);
    for v in &o.report.vcpus {
        for (field, grow) in [("poll_grows", true), ("poll_shrinks", false)] {
            let truth = o
                .trace
                .halt_polls
                .iter()
                .filter(|(t, _, g, _, _)| *t == v.tid && *g == grow)
                .count() as u64;
            let ours = sums.get(&(field.to_string(), v.tid)).copied().unwrap_or(0);
            ensure!(
                ours == truth,
                "vCPU {}: {field} {ours} in the summaries vs {truth} in tracefs",
                v.vcpu_id
            );
        }
    }
    Ok(format!(
        "{} window changes = tracefs per thread and direction; {place}",
        o.trace.halt_polls.len()
    ))
}

/// The check of a scenario that did not run (never called).
fn check_wakeup_summary_unused(_: &Run, _: &Outcome) -> Result<String, String> {
    Err("the scenario did not run".into())
}
