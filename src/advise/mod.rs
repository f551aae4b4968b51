//! `kvm-watcher advise`: what is wrong with a VM, what it costs, what to
//! change, with the evidence. The rules are pure functions of a
//! [`input::Recording`] (the `vcpu_interval` records of a summary session,
//! live or read back from `watch --output json`); docs/advise.md explains
//! each rule, its threshold and its sources.

pub mod halt;
pub mod input;
pub mod kvm_stats;
pub mod migration;
pub mod moves;
pub mod replay;
pub mod rules;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::monitors::{OptionValue, Options, REGISTRY};
use crate::output::{OutputFormat, TimeFormat, terminal_safe, to_stdout};
use crate::procfs::VmNames;
use crate::session::{Session, WatchConfig, resolve_pids, stop_flag};
use input::Recording;
use replay::Policy;

/// What `advise` looks at and how it answers.
#[derive(Debug, Clone)]
pub struct AdviseConfig {
    /// Only these VMM pids.
    pub pids: Vec<u32>,
    /// Only these VMs.
    pub vms: Vec<String>,
    /// Seconds to watch.
    pub seconds: f64,
    /// Analyse this recording instead of watching.
    pub from: Option<PathBuf>,
    /// Also write what the live run recorded here (as `watch --output json`).
    pub record: Option<PathBuf>,
    /// One JSON object per finding instead of text.
    pub json: bool,
    /// The VMs' maximum halt-polling window when their VMM sets one
    /// (KVM_CAP_HALT_POLL); default: the host's kvm.halt_poll_ns.
    pub halt_poll_ns: Option<u64>,
    /// Migration bandwidth, MiB/s: also run the dirty-rate monitor (it
    /// reads guest memory) and say whether pre-copy converges.
    pub link_mib_per_s: Option<f64>,
    /// The longest final pause allowed, seconds, with `link_mib_per_s`.
    pub max_downtime_s: Option<f64>,
}

/// The change a finding asks for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    /// The exact setting or command.
    pub setting: String,
    /// Where it applies: host, VM, vCPU, a host task.
    pub scope: String,
}

/// One thing wrong with a VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// The rule that found it (`halt_polling`, `run_delay`, `placement`, `exits`).
    pub rule: &'static str,
    /// What is wrong.
    pub problem: String,
    /// The figures it rests on, per vCPU where it matters.
    pub evidence: Vec<String>,
    /// Host CPU it costs, seconds per second.
    pub cost_cpu: f64,
    /// vCPU time it costs the guest, seconds per second.
    pub guest_time_lost: f64,
    /// What to change.
    pub change: Change,
    /// What the change is predicted to give.
    pub predicted: String,
    /// The same figures for programs.
    pub figures: serde_json::Value,
}

impl Finding {
    /// What it costs, for ranking: host CPU and guest time alike.
    pub fn weight(&self) -> f64 {
        self.cost_cpu + self.guest_time_lost
    }
}

/// The advice for one VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Advice {
    /// VMM process.
    pub pid: u32,
    /// VM name.
    pub vm: Option<String>,
    /// Observed time, seconds.
    pub seconds: f64,
    /// Findings, most costly first.
    pub findings: Vec<Finding>,
    /// What was checked and found fine.
    pub checked: Vec<String>,
    /// The halt-polling replay: the current maximum window and each
    /// candidate's predicted polling CPU and caught share (empty without halts).
    pub halt_polling: Vec<halt::Prediction>,
    /// The maximum window the replay took as the current one, ns.
    pub current_window_ns: u64,
    /// KVM's own halt-polling figures over the run (debugfs, live runs
    /// where it is mounted): `seconds` and `stats`.
    pub kvm_halt_poll: Option<serde_json::Value>,
}

/// Every rule over every VM of `rec`.
pub fn analyze(rec: &Recording, policy: &Policy) -> Vec<Advice> {
    rec.vms
        .values()
        .map(|vm| {
            let halt_polling = if vm.vcpus.values().any(|v| v.wakeups > 0) {
                halt::predictions(vm, policy)
            } else {
                Vec::new()
            };
            let mut results = vec![
                halt::rule_with(vm, policy, &halt_polling),
                rules::run_delay(vm),
                rules::placement(vm),
                moves::rule(vm),
            ];
            results.extend(rules::exits(vm));
            results.extend(migration::rule(vm));
            let mut findings = Vec::new();
            let mut checked = Vec::new();
            for r in results {
                match r {
                    Ok(f) => findings.push(f),
                    Err(line) => checked.push(line),
                }
            }
            findings.sort_by(|a, b| b.weight().total_cmp(&a.weight()));
            Advice {
                pid: vm.pid,
                vm: vm.name.clone(),
                seconds: vm.observed_ns() as f64 / 1e9,
                findings,
                checked,
                halt_polling,
                current_window_ns: policy.max_ns,
                kvm_halt_poll: vm
                    .kvm
                    .map(|(k, seconds)| serde_json::json!({"seconds": seconds, "stats": k})),
            }
        })
        .collect()
}

/// Writes `advice` as text.
pub fn write_text(advice: &[Advice], w: &mut dyn Write) -> anyhow::Result<()> {
    if advice.is_empty() {
        writeln!(w, "no vCPU activity seen: nothing to advise")?;
    }
    for a in advice {
        let name = a.vm.as_deref().map_or("(unnamed)".into(), terminal_safe);
        writeln!(w, "VM {name} (pid {}), {:.1} s observed", a.pid, a.seconds)?;
        if a.findings.is_empty() {
            writeln!(w, "  no findings: nothing to change")?;
        }
        for (i, f) in a.findings.iter().enumerate() {
            writeln!(w, "  {}. [{}] {}", i + 1, f.rule, f.problem)?;
            for e in &f.evidence {
                writeln!(w, "       {e}")?;
            }
            if f.cost_cpu > 0.0 {
                writeln!(w, "     cost: {:.3} s/s of host CPU", f.cost_cpu)?;
            }
            if f.guest_time_lost > 0.0 {
                writeln!(w, "     cost: {:.3} s/s of vCPU time", f.guest_time_lost)?;
            }
            writeln!(w, "     change ({}): {}", f.change.scope, f.change.setting)?;
            writeln!(w, "     predicted: {}", f.predicted)?;
        }
        for c in &a.checked {
            writeln!(w, "  checked: {c}")?;
        }
    }
    Ok(())
}

/// Writes `advice` as NDJSON: one `advice` object per finding, then one
/// `advice_vm` object per VM.
pub fn write_json(advice: &[Advice], w: &mut dyn Write) -> anyhow::Result<()> {
    for a in advice {
        for (rank, f) in a.findings.iter().enumerate() {
            let mut v = serde_json::to_value(f)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("monitor".into(), "advice".into());
                o.insert("pid".into(), a.pid.into());
                o.insert("vm".into(), a.vm.clone().into());
                o.insert("rank".into(), (rank + 1).into());
            }
            writeln!(w, "{v}")?;
        }
        let v = serde_json::json!({
            "monitor": "advice_vm", "pid": a.pid, "vm": a.vm, "seconds": a.seconds,
            "findings": a.findings.len(), "checked": a.checked,
            "current_window_ns": a.current_window_ns, "halt_polling": a.halt_polling,
            "kvm_halt_poll": a.kvm_halt_poll,
        });
        writeln!(w, "{v}")?;
    }
    Ok(())
}

/// The `vcpu_interval` records of `interval`, as `watch --output json`
/// writes them (its per-vCPU parts are taken).
pub fn records_of(interval: &mut crate::session::Interval, names: &mut VmNames) -> Vec<Value> {
    let vm_rows: Vec<Value> = interval
        .parts
        .iter_mut()
        .flat_map(|(_, p)| p.vm_rows.iter_mut())
        .filter_map(|r| {
            r.set_vm(names.get(r.pid()));
            r.value()
        })
        .collect();
    let mut out: Vec<Value> = interval
        .vcpus(names)
        .iter()
        .filter_map(|v| serde_json::to_value(v).ok())
        .map(|mut value| {
            if let Some(o) = value.as_object_mut() {
                // `monitor` first, as every record has it.
                let mut with = serde_json::Map::new();
                with.insert("monitor".into(), "vcpu_interval".into());
                with.append(o);
                *o = with;
            }
            value
        })
        .collect();
    out.extend(vm_rows);
    out
}

/// Advice over the last intervals of a running session (`top`'s detail pane).
pub struct Rolling {
    intervals: VecDeque<Vec<Value>>,
    keep: usize,
    policy: Policy,
}

impl Rolling {
    /// Advice over the last `keep` intervals, under the host's policy.
    pub fn new(keep: usize) -> Rolling {
        Rolling {
            intervals: VecDeque::new(),
            keep: keep.max(1),
            policy: Policy::of_host(),
        }
    }

    /// Takes in an interval's records (see [`records_of`]).
    pub fn add(&mut self, records: Vec<Value>) {
        self.intervals.push_back(records);
        while self.intervals.len() > self.keep {
            self.intervals.pop_front();
        }
    }

    /// Each VM's advice as lines, by pid.
    pub fn lines(&self) -> BTreeMap<u32, Vec<String>> {
        let mut rec = Recording::default();
        for r in self.intervals.iter().flatten() {
            rec.add(r);
        }
        analyze(&rec, &self.policy)
            .iter()
            .map(|a| (a.pid, pane_lines(a)))
            .collect()
    }
}

/// A VM's advice in a few lines: each finding's problem, change and
/// prediction, or that there is nothing to change.
pub fn pane_lines(a: &Advice) -> Vec<String> {
    if a.findings.is_empty() {
        return vec![format!(
            "no findings over {:.0} s: nothing to change",
            a.seconds
        )];
    }
    let mut lines = Vec::new();
    for (i, f) in a.findings.iter().enumerate() {
        lines.push(format!("{}. [{}] {}", i + 1, f.rule, f.problem));
        lines.push(format!(
            "   change ({}): {}",
            f.change.scope, f.change.setting
        ));
        lines.push(format!("   predicted: {}", f.predicted));
    }
    lines
}

/// Watches for `cfg.seconds` with the summary monitors and returns what
/// they recorded, as `watch --output json` would have written it.
fn record_live(cfg: &AdviseConfig) -> anyhow::Result<Recording> {
    let pids = resolve_pids(&cfg.pids, &cfg.vms)?;
    let mut file = match &cfg.record {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(std::io::BufWriter::new(f)),
            Err(e) => crate::usage_bail!("cannot write {}: {e}", path.display()),
        },
        None => None,
    };
    let stop = stop_flag()?;
    let monitors: Vec<_> = REGISTRY
        .iter()
        .copied()
        .filter(|m| {
            ["wakeup", "halt_poll", "vcpu_load", "run_delay", "exits"].contains(&m.name())
                || (m.name() == "dirty_rate" && cfg.link_mib_per_s.is_some())
        })
        .collect();
    let mut options = Options::default();
    if let Some(mib) = cfg.link_mib_per_s {
        options.set("link", OptionValue::MibPerSecond(mib));
        options.set(
            "max_downtime",
            OptionValue::Seconds(cfg.max_downtime_s.unwrap_or(0.3)),
        );
    }
    for m in &monitors {
        m.check(&options)?;
    }
    let watch = WatchConfig {
        monitors,
        pids: pids.clone(),
        vms: Vec::new(),
        follow: false,
        tid: None,
        vcpu: None,
        duration: Some(cfg.seconds),
        interval: cfg.seconds.min(1.0),
        output: OutputFormat::Json,
        time: TimeFormat::Mono,
        backend: crate::engine::Forced::default(),
        ringbuf_kib: 4,
        summary: true,
        options,
        partial: true,
        announce: false,
    };
    let mut storage = MaybeUninit::uninit();
    let mut session = Session::start(&watch, pids, &mut storage)?;
    for u in session.unavailable() {
        crate::output::warn(&format!(
            "{} cannot run here ({}): advice without it",
            u.monitor.name(),
            u.reason
        ));
    }
    eprintln!(
        "kvm-watcher: watching for advice, {} s; Ctrl-C to stop",
        cfg.seconds
    );
    let kvm_before = kvm_stats::read_all();
    let started = std::time::Instant::now();
    let end = started + Duration::from_secs_f64(cfg.seconds);
    let mut names = VmNames::default();
    let mut rec = Recording::default();
    let mut take =
        |interval: Option<crate::session::Interval>, names: &mut VmNames| -> anyhow::Result<()> {
            let Some(mut i) = interval else {
                return Ok(());
            };
            for value in records_of(&mut i, names) {
                if let Some(f) = &mut file {
                    writeln!(f, "{value}")?;
                }
                rec.add(&value);
            }
            Ok(())
        };
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
        let wait = end.saturating_duration_since(std::time::Instant::now());
        take(
            session.next_interval(wait.min(Duration::from_millis(200)))?,
            &mut names,
        )?;
    }
    // The last, partial interval.
    take(session.close_interval()?, &mut names)?;
    // KVM's own figures over the same time, where debugfs shows them.
    let seconds = started.elapsed().as_secs_f64();
    for (pid, after) in kvm_stats::read_all() {
        let Some(before) = kvm_before.get(&pid) else {
            continue;
        };
        if !rec.vms.contains_key(&pid) {
            continue;
        }
        let value = serde_json::json!({"monitor": "kvm_halt_poll", "pid": pid,
            "seconds": seconds, "kvm": after.since(before)});
        if let Some(f) = &mut file {
            writeln!(f, "{value}")?;
        }
        rec.add(&value);
    }
    if let Some(mut f) = file {
        f.flush()?;
    }
    Ok(rec)
}

/// Runs `advise`.
pub fn run(cfg: &AdviseConfig) -> anyhow::Result<()> {
    let mut policy = Policy::of_host();
    if let Some(ns) = cfg.halt_poll_ns {
        policy.max_ns = ns;
    }
    let rec = match &cfg.from {
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => crate::usage_bail!("cannot read {}: {e}", path.display()),
            };
            let mut rec = match Recording::read(&text) {
                Ok(r) => r,
                Err(e) => crate::usage_bail!("{}: {e:#}", path.display()),
            };
            if rec.records == 0 {
                crate::usage_bail!(
                    "{} holds no vcpu_interval records: record with `kvm-watcher watch --output json`",
                    path.display()
                );
            }
            if !cfg.pids.is_empty() {
                rec.vms.retain(|p, _| cfg.pids.contains(p));
            }
            if !cfg.vms.is_empty() {
                rec.vms
                    .retain(|_, vm| vm.name.as_ref().is_some_and(|n| cfg.vms.contains(n)));
            }
            rec
        }
        None => record_live(cfg)?,
    };
    let advice = analyze(&rec, &policy);
    to_stdout(|w| {
        if cfg.json {
            write_json(&advice, w)
        } else {
            write_text(&advice, w)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, io_ns: u64, wait_ns: u64) -> Value {
        serde_json::json!({"monitor": "vcpu_interval", "pid": pid, "tid": pid + 1,
            "vcpu_id": 0, "vm": "v", "interval_ns": 1_000_000_000u64,
            "run_delay_ns": wait_ns,
            "run_delay_culprits": [{"pid": 9, "tid": 9, "comm": "hog", "vm": null, "ns": wait_ns}],
            "pcpus": {"1": 1},
            "exits_targets": [{"kind": "pio", "addr": 0x3f8, "count": 1, "vmm_ns": io_ns}]})
    }

    #[test]
    fn findings_are_ranked_by_cost_and_a_quiet_vm_says_so() {
        let mut rec = Recording::default();
        rec.add(&record(1, 100_000_000, 300_000_000));
        rec.add(&record(2, 0, 0));
        let advice = analyze(&rec, &Policy::DEFAULT);
        let rules: Vec<_> = advice[0].findings.iter().map(|f| f.rule).collect();
        assert_eq!(rules, ["run_delay", "exits"]);
        assert!(advice[1].findings.is_empty());
        assert_eq!(
            pane_lines(&advice[1]),
            ["no findings over 1 s: nothing to change"]
        );
        let mut text = Vec::new();
        write_text(&advice, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("1. [run_delay]") && text.contains("no findings: nothing to change"));
        let mut json = Vec::new();
        write_json(&advice, &mut json).unwrap();
        let lines: Vec<Value> = String::from_utf8(json)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<_> = lines
            .iter()
            .map(|l| l["monitor"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["advice", "advice", "advice_vm", "advice_vm"]);
        assert_eq!(lines[0]["rank"], 1);
        assert_eq!(lines[1]["figures"]["device"], "16550 UART COM1");
    }

    #[test]
    fn the_pane_looks_back_a_fixed_number_of_intervals() {
        let mut r = Rolling::new(2);
        r.add(vec![record(1, 500_000_000, 0)]);
        r.add(vec![record(1, 0, 0)]);
        assert!(r.lines()[&1][0].contains("[exits]"));
        r.add(vec![record(1, 0, 0)]);
        assert!(r.lines()[&1][0].contains("nothing to change"));
    }
}
