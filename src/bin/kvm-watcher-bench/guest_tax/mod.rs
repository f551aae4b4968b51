//! Part 7: the guest tax. kvm-watcher's programs run in the vCPU thread's
//! context, on its exits, halts, dirty-ring pushes, syscalls and switches,
//! so their cost lands on the vCPU threads: this part charges it there.
//!
//! Design. The synthetic guest does a fixed amount of work per trial
//! ([`trial`]: pages written, HLTs, port writes, each counted by the guest
//! itself) on a fresh VM, and the kernel's CPU time of its vCPU threads
//! (their schedstat over the guest run) is divided by that work: vCPU ns
//! per unit, which a busy neighbour on the machine delays but does not
//! inflate the way it does the wall-clock rate (kept as the second figure).
//!
//! Conditions ([`conds`]): nothing, each monitor alone in summary and rows
//! mode and bpftrace doing its job, the default set (`serve`; `watch
//! --rows`) and bpftrace doing the default set's jobs. A watcher's
//! programs stay attached while it lives, so as in
//! part 6 the conditions alternate by blocks: a round starts and stops
//! each watcher once, in the order of a row of a balanced Latin square; in
//! a block the three workloads run (order rotating), `trials` each.
//! On this shared machine the vCPU time per unit drifts by 10-20 % within
//! seconds as other tenants come and go, so the round's unwatched blocks
//! sit between the watched ones (none, A, none, B, ..., none) and each
//! block is paired with the mean of the two around it; "added" is the
//! mean of the per-round differences with a 95 % t-interval
//! ([`crate::stats::added`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::env::Env;
use crate::host_tax::programs::{SysctlStatsOff, sysctl_stats};
use crate::process::stop_all;
use crate::stats::{Paired, Spread, added, spread, williams};
use crate::workload::Workload;

pub mod conds;
pub mod trial;

use conds::Cond;

pub const WORKLOADS: [Workload; 3] = [Workload::Dirty, Workload::Halt, Workload::Exits];

/// How many blocks and trials a run has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    /// Trials of each workload in a block.
    pub trials: usize,
    /// Wait after a watcher is ready (and after nothing, likewise).
    pub settle: Duration,
    /// Wait between a VM's being ready and its guest's start.
    pub vm_settle: Duration,
}

impl Plan {
    pub fn new(quick: bool, rounds: usize) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 2,
                trials: 1,
                settle: Duration::from_millis(50),
                vm_settle: Duration::from_millis(30),
            }
        } else {
            Plan {
                quick,
                rounds: rounds.max(12),
                // The least of three: see `block`.
                trials: 3,
                settle: Duration::from_millis(300),
                vm_settle: Duration::from_millis(50),
            }
        }
    }
}

/// The workloads' order in trial `t` of round `r`: rotating.
fn workloads_in(r: usize, t: usize) -> [Workload; 3] {
    let mut w = WORKLOADS;
    w.rotate_left((r + t) % 3);
    w
}

/// A block's figures per workload: (vCPU ns per unit, units per second).
type Block = BTreeMap<&'static str, (f64, f64)>;

/// Per (condition index, workload): the baselines and the block figures.
type Pairs = BTreeMap<(usize, &'static str), (Vec<f64>, Vec<f64>)>;

/// Per (condition index, workload): every trial's (vCPU ns per unit,
/// rate), and per round the pair (unwatched baseline, block figure) of
/// each figure.
#[derive(Default)]
struct Samples {
    trials: BTreeMap<(usize, &'static str), Vec<(f64, f64)>>,
    cpu_pairs: Pairs,
    rate_pairs: Pairs,
}

impl Samples {
    /// Pairs block `b` of condition `i` with the unwatched blocks right
    /// before and after it: its baseline is their mean, so a load that
    /// rises or falls steadily across the three cancels out.
    fn pair(&mut self, i: usize, before: &Block, b: &Block, after: &Block) {
        for (w, &(cpu, rate)) in b {
            let (Some(x), Some(y)) = (before.get(w), after.get(w)) else {
                continue;
            };
            let p = self.cpu_pairs.entry((i, w)).or_default();
            p.0.push((x.0 + y.0) / 2.0);
            p.1.push(cpu);
            let p = self.rate_pairs.entry((i, w)).or_default();
            p.0.push((x.1 + y.1) / 2.0);
            p.1.push(rate);
        }
    }
}

/// One block of condition `i`: its watcher started, each workload's
/// trials, the watcher stopped. The block's figure is its least vCPU time
/// per unit (and its median rate): here the time per unit of back-to-back
/// trials swings by 14 % (sd), upwards by up to 40 % in one trial in
/// five, with hardly any correlation between neighbours (another tenant's
/// burst slows the CPU under the guest); a watcher's programs add the same
/// work to every trial, so they show in the least disturbed one too.
fn block(env: &Env, plan: &Plan, r: usize, i: usize, c: &Cond, s: &mut Samples) -> Result<Block> {
    let p = c.start(env)?;
    std::thread::sleep(plan.settle);
    let mut per: BTreeMap<&'static str, Vec<(f64, f64)>> = BTreeMap::new();
    for t in 0..plan.trials {
        for w in workloads_in(r, t) {
            let tr = trial::run(env, w, plan.vm_settle)
                .with_context(|| format!("{} workload", w.name()))?;
            per.entry(w.name())
                .or_default()
                .push((tr.cpu_ns_per_unit(), tr.rate()));
        }
    }
    if let Some(p) = p {
        stop_all(vec![p])?;
    }
    let mut b = Block::new();
    for (w, v) in per {
        let cpu: Vec<f64> = v.iter().map(|x| x.0).collect();
        let rate: Vec<f64> = v.iter().map(|x| x.1).collect();
        b.insert(w, (spread(&cpu).min, spread(&rate).median));
        s.trials.entry((i, w)).or_default().extend(v);
    }
    Ok(b)
}

#[derive(Serialize)]
pub struct CondResult {
    pub condition: String,
    pub tool: &'static str,
    pub monitor: &'static str,
    pub mode: &'static str,
    pub command: String,
    /// vCPU CPU ns per unit of guest work, every trial.
    pub cpu_ns_per_unit: Spread,
    /// Added vCPU ns per unit against the same round's unwatched block.
    pub added_cpu_ns: Paired,
    /// The same in % of the unwatched vCPU time per unit.
    pub added_cpu_pct: Paired,
    /// Units of guest work per wall-clock second, every trial.
    pub rate: Spread,
    /// Change of the work rate against the same round's unwatched block, %.
    pub rate_change_pct: Paired,
    /// Per round: (baseline, block figure) of vCPU ns per unit, what the
    /// interval comes from.
    pub cpu_pairs: Vec<[f64; 2]>,
}

#[derive(Serialize)]
pub struct WorkloadResult {
    pub workload: &'static str,
    /// What one unit of work is.
    pub unit: &'static str,
    pub vm_args: String,
    pub none_cpu_ns_per_unit: Spread,
    pub none_rate: Spread,
    pub attached: Vec<CondResult>,
}

#[derive(Serialize)]
pub struct GuestTaxResult {
    pub design: &'static str,
    pub rounds: usize,
    pub trials_per_block: usize,
    /// kernel.bpf_stats_enabled while the trials ran ("0": off).
    pub bpf_stats_during_trials: String,
    pub workloads: Vec<WorkloadResult>,
}

const DESIGN: &str = "blocks: each watcher started and stopped once per round, in the order of a row of a balanced Latin square, with an unwatched block before each and one at the end; in a block each workload runs on a fresh synthetic VM for a fixed number of passes; figure = CPU time of the vCPU threads (their schedstat over the guest run) per unit of work the guest counted; each block's least vCPU time per unit over its trials paired with the mean of those of the unwatched blocks on either side (rates: block medians); mean of the per-round differences with a 95 % t-interval; wall-clock work rate paired the same way";

/// What one unit of a workload is.
pub fn unit(w: Workload) -> &'static str {
    match w {
        Workload::Dirty => "page written (dirty ring, every write an exit here)",
        Workload::Halt => "HLT (2 vCPUs, LAPIC timer at 5000 Hz, no halt polling)",
        Workload::Exits => "port write handled by the VMM (KVM_EXIT_IO)",
    }
}

/// Runs part 7; `leave_stats` keeps kernel.bpf_stats_enabled as it is;
/// `only` names the monitors whose conditions run (all when empty).
/// A round runs the watched conditions in the order of a row of a
/// balanced Latin square, with an unwatched block before each and one at
/// the end.
pub fn measure(env: &Env, leave_stats: bool, only: &[String]) -> Result<GuestTaxResult> {
    let plan = Plan::new(env.quick, env.rounds);
    let conds: Vec<Cond> = conds::only(
        if env.quick {
            conds::quick()
        } else {
            conds::all()
        },
        only,
    );
    let none = conds
        .iter()
        .position(Cond::is_none)
        .context("no unwatched condition")?;
    let watched: Vec<usize> = (0..conds.len()).filter(|&i| i != none).collect();
    let mut s = Samples::default();
    let _off = if leave_stats {
        None
    } else {
        Some(SysctlStatsOff::new()?)
    };
    let stats = sysctl_stats();
    let run = |r: usize, i: usize, s: &mut Samples| {
        let c = &conds[i];
        eprintln!("  guest tax: round {}/{}, {}", r + 1, plan.rounds, c.name());
        block(env, &plan, r, i, c, s).with_context(|| format!("guest tax: {}", c.name()))
    };
    for r in 0..plan.rounds {
        let mut before = run(r, none, &mut s)?;
        for k in williams(watched.len(), r) {
            let b = run(r, watched[k], &mut s)?;
            let after = run(r, none, &mut s)?;
            s.pair(watched[k], &before, &b, &after);
            before = after;
        }
    }
    Ok(summarize(&plan, &conds, &s, stats))
}

fn summarize(plan: &Plan, conds: &[Cond], s: &Samples, stats: String) -> GuestTaxResult {
    let trials = |i: usize, w: &'static str, f: fn(&(f64, f64)) -> f64| {
        let v: Vec<f64> = s.trials.get(&(i, w)).into_iter().flatten().map(f).collect();
        spread(&v)
    };
    let pairs = |m: &Pairs, i, w| {
        m.get(&(i, w))
            .map_or_else(|| added(&[], &[]), |(base, t)| added(base, t))
    };
    let none = conds.iter().position(Cond::is_none).unwrap_or(0);
    let workloads = WORKLOADS
        .iter()
        .map(|&w| {
            let n = w.name();
            WorkloadResult {
                workload: n,
                unit: unit(w),
                vm_args: trial::args(w, plan.quick).join(" "),
                none_cpu_ns_per_unit: trials(none, n, |x| x.0),
                none_rate: trials(none, n, |x| x.1),
                attached: conds
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.is_none())
                    .map(|(i, c)| {
                        let (ns, pct) = pairs(&s.cpu_pairs, i, n);
                        CondResult {
                            condition: c.name(),
                            tool: c.tool(),
                            monitor: c.monitor,
                            mode: c.mode,
                            command: c.command(),
                            cpu_ns_per_unit: trials(i, n, |x| x.0),
                            added_cpu_ns: ns,
                            added_cpu_pct: pct,
                            rate: trials(i, n, |x| x.1),
                            rate_change_pct: pairs(&s.rate_pairs, i, n).1,
                            cpu_pairs: s
                                .cpu_pairs
                                .get(&(i, n))
                                .map(|(b, t)| b.iter().zip(t).map(|(b, t)| [*b, *t]).collect())
                                .unwrap_or_default(),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    GuestTaxResult {
        design: DESIGN,
        rounds: plan.rounds,
        trials_per_block: plan.trials,
        bpf_stats_during_trials: stats,
        workloads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_comes_first_in_turn() {
        let firsts: Vec<Workload> = (0..3).map(|r| workloads_in(r, 0)[0]).collect();
        assert_eq!(firsts, WORKLOADS);
        assert_eq!(workloads_in(0, 1), workloads_in(1, 0));
        let q = Plan::new(true, 1);
        assert!(q.rounds >= 2, "a quick run still pairs: {q:?}");
        assert!(Plan::new(false, 3).rounds >= 12);
    }

    /// A block pairs with the unwatched blocks on either side, so a load
    /// that drifts across them (another tenant on the machine) does not
    /// count as the watcher's cost; the rate is paired the same way.
    #[test]
    fn blocks_pair_with_the_unwatched_blocks_around_them() {
        let conds = conds::quick();
        let mut s = Samples::default();
        let b = |cpu: f64, rate: f64| -> Block {
            WORKLOADS.iter().map(|w| (w.name(), (cpu, rate))).collect()
        };
        // Drifting load: 1000 -> 1100 ns around a block 1% above 1050.
        s.pair(1, &b(1000.0, 100.0), &b(1060.5, 99.0), &b(1100.0, 100.0));
        s.pair(1, &b(2000.0, 50.0), &b(2020.0, 49.5), &b(2000.0, 50.0));
        s.trials
            .insert((0, "halt"), vec![(1000.0, 100.0), (2000.0, 50.0)]);
        let r = summarize(&Plan::new(true, 1), &conds, &s, "0".into());
        assert_eq!(r.workloads.len(), 3);
        let a = &r.workloads[1].attached[0];
        assert_eq!(a.condition, conds[1].name());
        assert!(
            (a.added_cpu_pct.mean - 1.0).abs() < 1e-9,
            "{:?}",
            a.added_cpu_pct
        );
        assert!((a.added_cpu_ns.mean - 15.25).abs() < 1e-9);
        assert!((a.rate_change_pct.mean + 1.0).abs() < 1e-9);
        assert_eq!(a.cpu_pairs, [[1050.0, 1060.5], [2000.0, 2020.0]]);
        assert_eq!(r.workloads[1].none_cpu_ns_per_unit.median, 1500.0);
        assert_eq!(r.workloads[0].attached.len(), conds.len() - 1);
        assert_eq!(
            r.workloads[0].attached[1].added_cpu_pct.n, 0,
            "no blocks, no pairs"
        );
        assert_eq!(r.bpf_stats_during_trials, "0");
    }

    #[test]
    fn a_block_without_both_neighbours_is_not_paired() {
        let mut s = Samples::default();
        let one: Block = [("dirty", (1.0, 1.0))].into_iter().collect();
        s.pair(1, &one, &one, &Block::new());
        assert!(s.cpu_pairs.is_empty());
    }
}
