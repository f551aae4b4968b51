//! Part 6: the host tax. What `kvm-watcher serve` with its default monitors
//! costs the host's other, non-VM work: some of its programs run on every
//! context switch and wake-up (sched:sched_switch, sched_wakeup) of the
//! host, VM or not; with exits' exact time in the VMM (`--backend
//! exits=tracepoint`, a condition of its own) also on every syscall
//! (raw_syscalls:sys_enter).
//!
//! Design. Two workloads ([`load`]), each pinned to the last CPU: a syscall
//! loop (ns per syscall) and a pipe ping-pong between two threads on that
//! CPU (ns per context switch). The conditions: nothing attached, empty
//! programs on the host-wide hooks serve uses (the price of hooking them at
//! all), the real `kvm-watcher serve` (started as a child, ready once it
//! answers /metrics), bpftrace doing the same jobs ([`BT_SERVE_SET`]), and
//! each monitor with a hook on host-wide events alone, as `kvm-watcher
//! watch` runs it ([`Alone`]; dirty and halt-poll hook only KVM's own
//! tracepoints and process exits, which the workloads do not reach), and
//! bpftrace doing each of those monitors' jobs alone.
//!
//! A tool's programs stay attached while its process lives, even stopped
//! (SIGSTOP), so conditions cannot alternate within a process's life:
//! they alternate by blocks. A round holds one block of each condition, in
//! the orders of a balanced (Williams) Latin square, one row a round (over
//! a cycle each condition is twice in each position and twice right after
//! each other one: drift and warm-up do not favour one condition). In a block the tool is
//! started, settles, then the two workloads alternate in short trials
//! (their order alternating too), then the tool is stopped. Each block gives
//! one median per workload; a tool's block is paired with the unwatched
//! block of the same round, and the added ns and % are the mean of those
//! per-round differences with a 95 % t-interval over the rounds.
//!
//! The timed trials run with `kernel.bpf_stats_enabled` off (restored
//! afterwards; `--leave-bpf-stats` leaves it as it is): statistics add two clock reads to every program run, which
//! a host running serve does not pay unless someone switched them on. After
//! its timed trials, each attached block runs one more trial per workload
//! with statistics on (BPF_ENABLE_STATS, held by this process only): the
//! kernel time of each of the tool's programs per run and per operation,
//! the cost of a foreign event on each hook before the program rejects it
//! (no VM runs here, so no event is the tool's).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::bpftrace::{
    BT_EXITS_COUNT, BT_RUN_DELAY, BT_SERVE_SET, BT_VCPU_LOAD, BT_WAKEUP_COUNT, BtScript,
};
use crate::env::Env;
use crate::kernel_cost::Floors;
use crate::process::{Proc, stop_all};
use crate::procfs::prog_stats;
use crate::stats::{Paired, Spread, added, spread, williams};

pub mod load;
pub mod programs;

use load::Load;
use programs::{Labels, StatsOn, SysctlStatsOff};

/// How many blocks and trials a run has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub rounds: usize,
    /// Trials of each workload in a block.
    pub trials: usize,
    pub trial: Duration,
    /// Wait after a tool is ready (and after nothing, likewise) before timing.
    pub settle: Duration,
}

impl Plan {
    pub fn new(quick: bool, rounds: usize) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                trials: 1,
                trial: Duration::from_millis(30),
                settle: Duration::from_millis(50),
            }
        } else {
            Plan {
                // At least 10 rounds, whole cycles of the orders.
                rounds: rounds.max(10).div_ceil(CYCLE) * CYCLE,
                trials: 4,
                trial: Duration::from_millis(150),
                settle: Duration::from_millis(300),
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cond {
    None,
    Floor,
    Serve,
    /// serve with exits' exact time in the VMM: a program on every syscall.
    ServeExactVmm,
    Bpftrace,
    /// One monitor alone.
    Watch(Alone),
    /// bpftrace doing that monitor's job alone.
    BtAlone(Alone),
}

/// A monitor whose hooks on this host reach events of tasks that are not
/// VMs (`kvm-watcher doctor`'s hooks on the tracepoint backend): wakeup and
/// vcpu-load on `sched_switch`, run-delay on `sched_switch` and
/// `sched_wakeup`, exits (its `tracepoint` backend, which `watch` uses) on
/// `raw_syscalls:sys_enter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alone {
    Wakeup,
    VcpuLoad,
    RunDelay,
    Exits,
}

impl Alone {
    /// The monitor's name in the guest tax's conditions, whose summary-mode
    /// `watch` this part runs too.
    fn monitor(self) -> &'static str {
        match self {
            Alone::Wakeup => "wakeup",
            Alone::VcpuLoad => "vcpu-load",
            Alone::RunDelay => "run-delay",
            Alone::Exits => "exits",
        }
    }

    /// bpftrace doing the same job (the kernel-cost part's scripts).
    fn bt(self) -> &'static BtScript {
        match self {
            Alone::Wakeup => &BT_WAKEUP_COUNT,
            Alone::VcpuLoad => &BT_VCPU_LOAD,
            Alone::RunDelay => &BT_RUN_DELAY,
            Alone::Exits => &BT_EXITS_COUNT,
        }
    }
}

/// Rounds in one cycle of the orders (a balanced Latin square over
/// thirteen conditions has twenty-six rows).
const CYCLE: usize = 26;

/// serve's extra arguments in [`Cond::ServeExactVmm`].
const EXACT_VMM: &[&str] = &["--backend", "exits=tracepoint"];

impl Cond {
    const ALL: [Cond; 13] = [
        Cond::None,
        Cond::Floor,
        Cond::Serve,
        Cond::ServeExactVmm,
        Cond::Bpftrace,
        Cond::Watch(Alone::Wakeup),
        Cond::Watch(Alone::VcpuLoad),
        Cond::Watch(Alone::RunDelay),
        Cond::Watch(Alone::Exits),
        Cond::BtAlone(Alone::Wakeup),
        Cond::BtAlone(Alone::VcpuLoad),
        Cond::BtAlone(Alone::RunDelay),
        Cond::BtAlone(Alone::Exits),
    ];

    fn name(self) -> &'static str {
        match self {
            Cond::None => "none",
            Cond::Floor => "empty programs",
            Cond::Serve => "kvm-watcher serve",
            Cond::ServeExactVmm => "kvm-watcher serve --backend exits=tracepoint",
            Cond::Bpftrace => "bpftrace",
            Cond::Watch(Alone::Wakeup) => "wakeup alone",
            Cond::Watch(Alone::VcpuLoad) => "vcpu-load alone",
            Cond::Watch(Alone::RunDelay) => "run-delay alone",
            Cond::Watch(Alone::Exits) => "exits alone",
            Cond::BtAlone(Alone::Wakeup) => "bpftrace wakeup alone",
            Cond::BtAlone(Alone::VcpuLoad) => "bpftrace vcpu-load alone",
            Cond::BtAlone(Alone::RunDelay) => "bpftrace run-delay alone",
            Cond::BtAlone(Alone::Exits) => "bpftrace exits alone",
        }
    }
}

/// The order of the conditions in round `r`: a balanced (Williams) Latin
/// square, one row per round.
pub fn order(r: usize) -> [Cond; 13] {
    let row = williams(Cond::ALL.len(), r);
    std::array::from_fn(|i| Cond::ALL[row[i]])
}

/// The host-wide hooks of serve's default monitors on the tracepoint backend.
const HOST_HOOKS: &[&str] = &["sched_switch", "sched_wakeup", "sched_wakeup_new"];

/// The workloads' order in trial `t` of round `r`: alternating.
fn loads_in(r: usize, t: usize) -> [Load; 2] {
    if (r + t).is_multiple_of(2) {
        Load::ALL
    } else {
        [Load::ALL[1], Load::ALL[0]]
    }
}

/// A tool attached for a block.
struct Attached {
    /// The tool's process (None: the empty programs, held by this one).
    proc_: Option<Proc>,
    /// Who holds the programs.
    pid: u32,
    labels: Labels,
    command: String,
    _links: Vec<libbpf_rs::Link>,
}

fn attach(env: &Env, floors: &Floors, c: Cond) -> Result<Option<Attached>> {
    Ok(match c {
        Cond::None => None,
        Cond::Floor => {
            let (links, ids) = floors.attach("raw", HOST_HOOKS)?;
            Some(Attached {
                proc_: None,
                pid: std::process::id(),
                labels: ids
                    .into_iter()
                    .map(|(id, hook)| (id, (String::new(), format!("floor_raw_{hook}"))))
                    .collect(),
                command: format!("empty raw_tp programs on {}", HOST_HOOKS.join(", ")),
                _links: links,
            })
        }
        Cond::Serve | Cond::ServeExactVmm => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let extra = if c == Cond::ServeExactVmm {
                EXACT_VMM
            } else {
                &[]
            };
            let p = env.start_serve(port, extra)?;
            let labels = programs::labels_from_metrics(&programs::scrape(port)?);
            if labels.is_empty() {
                bail!("serve's /metrics names none of its BPF programs");
            }
            Some(Attached {
                pid: p.pid(),
                proc_: Some(p),
                labels,
                command: format!(
                    "kvm-watcher serve --listen 127.0.0.1:PORT {}",
                    extra.join(" ")
                )
                .trim_end()
                .to_string(),
                _links: Vec::new(),
            })
        }
        Cond::Watch(m) => {
            let watch = crate::guest_tax::conds::summary_of(m.monitor())
                .with_context(|| format!("no watch condition for {}", m.monitor()))?;
            let p = env.start_kw(c.name(), &watch.watch_args())?;
            Some(Attached {
                labels: programs::labels_from_kernel(p.pid()),
                pid: p.pid(),
                proc_: Some(p),
                command: watch.command(),
                _links: Vec::new(),
            })
        }
        Cond::Bpftrace | Cond::BtAlone(_) => {
            let (name, script) = match c {
                Cond::BtAlone(m) => (c.name(), m.bt()),
                _ => ("bt_serve_set", &BT_SERVE_SET),
            };
            let p = env.start_bt(name, script)?;
            Some(Attached {
                labels: programs::labels_from_kernel(p.pid()),
                pid: p.pid(),
                proc_: Some(p),
                command: script.command(),
                _links: Vec::new(),
            })
        }
    })
}

/// Kernel time of each program of `a` during one trial of `l`:
/// program id -> (run_time_ns, run_cnt), and the trial's operations.
fn kernel_trial(a: &Attached, l: Load, cpu: usize, d: Duration) -> Result<(Deltas, u64)> {
    let _on = StatsOn::new()?;
    let before = prog_stats(a.pid);
    let (ops, _) = l.run(cpu, d)?;
    let after = prog_stats(a.pid);
    let d = after
        .iter()
        // This process holds the empty programs of every hook: only those attached count.
        .filter(|(id, _)| a.proc_.is_some() || a.labels.contains_key(id))
        .map(|(id, (t, c))| {
            let (t0, c0) = before.get(id).copied().unwrap_or((0, 0));
            (*id, (t.saturating_sub(t0), c.saturating_sub(c0)))
        })
        .collect();
    Ok((d, ops))
}

type Deltas = std::collections::HashMap<u32, (u64, u64)>;

#[derive(Serialize)]
pub struct CondResult {
    pub condition: &'static str,
    pub command: String,
    /// Time per operation, over every trial of the condition.
    pub ns_per_op: Spread,
    /// Added ns per operation against the same round's unwatched block.
    pub added_ns: Paired,
    /// The same, in % of the unwatched time.
    pub added_pct: Paired,
    /// Kernel time of all the tool's programs per operation (statistics trials).
    pub bpf_ns_per_op: Spread,
}

#[derive(Serialize)]
pub struct LoadResult {
    pub workload: &'static str,
    pub unit: &'static str,
    pub none_ns_per_op: Spread,
    pub attached: Vec<CondResult>,
}

#[derive(Serialize)]
pub struct ProgramCost {
    pub tool: &'static str,
    pub monitor: String,
    pub program: String,
    pub workload: &'static str,
    /// Kernel ns per run of the program (none of the events is the tool's).
    pub ns_per_run: Spread,
    /// Runs per workload operation.
    pub runs_per_op: Spread,
}

#[derive(Serialize)]
pub struct HostTaxResult {
    pub design: &'static str,
    pub rounds: usize,
    pub trials_per_block: usize,
    pub trial_ms: f64,
    pub cpu: usize,
    /// kernel.bpf_stats_enabled while the trials were timed ("0": off).
    pub bpf_stats_during_timed_trials: String,
    pub loads: Vec<LoadResult>,
    pub programs: Vec<ProgramCost>,
}

const DESIGN: &str = "blocks: none / empty programs / serve / serve with exits' exact time in the VMM / bpftrace / wakeup, vcpu-load, run-delay and exits each alone (watch, and bpftrace doing its job) started and stopped once per round, order rotating through all permutations; in a block the two workloads alternate in short trials pinned to one CPU; per-block medians paired with the same round's unwatched block; mean of the per-round differences with a 95 % t-interval; timed trials with kernel.bpf_stats_enabled off, per-program kernel time from one extra trial per workload and block with statistics on";

/// (tool, monitor, program, workload): its (ns per run, runs per op), one per block.
type ProgramKey = (Cond, String, String, &'static str);

/// What the blocks gave: per (condition, workload) the per-round block
/// medians and every trial; per (tool, program id, workload) the
/// statistics trials.
#[derive(Default)]
struct Samples {
    blocks: BTreeMap<(Cond, &'static str), Vec<f64>>,
    trials: BTreeMap<(Cond, &'static str), Vec<f64>>,
    bpf_per_op: BTreeMap<(Cond, &'static str), Vec<f64>>,
    programs: BTreeMap<ProgramKey, (Vec<f64>, Vec<f64>)>,
}

/// Where a block runs: the machine, what it runs and on which CPU.
struct Bench<'a> {
    env: &'a Env,
    floors: Floors,
    plan: Plan,
    cpu: usize,
}

fn block(b: &Bench, r: usize, c: Cond, s: &mut Samples) -> Result<String> {
    let (plan, cpu) = (&b.plan, b.cpu);
    let a =
        attach(b.env, &b.floors, c).with_context(|| format!("host tax: starting {}", c.name()))?;
    std::thread::sleep(plan.settle);
    let mut per: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for t in 0..plan.trials {
        for l in loads_in(r, t) {
            per.entry(l.name())
                .or_default()
                .push(l.ns_per_op(l.run(cpu, plan.trial)?));
        }
    }
    let mut command = String::new();
    if let Some(a) = &a {
        command = a.command.clone();
        for l in Load::ALL {
            let (d, ops) = kernel_trial(a, l, cpu, plan.trial)?;
            let ops = ops.max(1) as f64;
            let total: u64 = d.values().map(|v| v.0).sum();
            s.bpf_per_op
                .entry((c, l.name()))
                .or_default()
                .push(total as f64 / ops);
            for (id, (t, n)) in d {
                let (monitor, program) = a
                    .labels
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| (String::new(), format!("prog {id}")));
                let e = s
                    .programs
                    .entry((c, monitor, program, l.name()))
                    .or_default();
                if n > 0 {
                    e.0.push(t as f64 / n as f64);
                }
                e.1.push(n as f64 / ops);
            }
        }
    }
    if let Some(p) = a.and_then(|a| a.proc_) {
        stop_all(vec![p])?;
    }
    for (l, v) in per {
        s.blocks.entry((c, l)).or_default().push(spread(&v).median);
        s.trials.entry((c, l)).or_default().extend(v);
    }
    Ok(command)
}

/// Runs part 6; `leave_stats` keeps kernel.bpf_stats_enabled as it is
/// during the timed trials (others on the machine may read statistics).
pub fn measure(env: &Env, leave_stats: bool) -> Result<HostTaxResult> {
    let b = Bench {
        env,
        floors: Floors::load()?,
        plan: Plan::new(env.quick, env.rounds),
        cpu: env.ncpu.saturating_sub(1),
    };
    let (plan, cpu) = (b.plan, b.cpu);
    let mut s = Samples::default();
    let mut commands: BTreeMap<Cond, String> = BTreeMap::new();
    let timed_stats;
    {
        let _off = if leave_stats {
            None
        } else {
            Some(SysctlStatsOff::new()?)
        };
        timed_stats = programs::sysctl_stats();
        for r in 0..plan.rounds {
            for c in order(r) {
                eprintln!("  host tax: round {}/{}, {}", r + 1, plan.rounds, c.name());
                let cmd = block(&b, r, c, &mut s)?;
                commands.insert(c, cmd);
            }
        }
    }
    let mut r = summarize(&plan, cpu, &s, &commands);
    r.bpf_stats_during_timed_trials = timed_stats;
    Ok(r)
}

fn summarize(
    plan: &Plan,
    cpu: usize,
    s: &Samples,
    commands: &BTreeMap<Cond, String>,
) -> HostTaxResult {
    let get = |m: &BTreeMap<(Cond, &'static str), Vec<f64>>, c, l| {
        m.get(&(c, l)).cloned().unwrap_or_default()
    };
    let loads = Load::ALL
        .iter()
        .map(|&l| {
            let base = get(&s.blocks, Cond::None, l.name());
            LoadResult {
                workload: l.name(),
                unit: l.op(),
                none_ns_per_op: spread(&get(&s.trials, Cond::None, l.name())),
                attached: Cond::ALL[1..]
                    .iter()
                    .map(|&c| {
                        let (ns, pct) = added(&base, &get(&s.blocks, c, l.name()));
                        CondResult {
                            condition: c.name(),
                            command: commands.get(&c).cloned().unwrap_or_default(),
                            ns_per_op: spread(&get(&s.trials, c, l.name())),
                            added_ns: ns,
                            added_pct: pct,
                            bpf_ns_per_op: spread(&get(&s.bpf_per_op, c, l.name())),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let programs = s
        .programs
        .iter()
        .map(|((c, monitor, program, l), (ns, runs))| ProgramCost {
            tool: c.name(),
            monitor: monitor.clone(),
            program: program.clone(),
            workload: l,
            ns_per_run: spread(ns),
            runs_per_op: spread(runs),
        })
        .collect();
    HostTaxResult {
        design: DESIGN,
        rounds: plan.rounds,
        trials_per_block: plan.trials,
        trial_ms: plan.trial.as_secs_f64() * 1e3,
        cpu,
        bpf_stats_during_timed_trials: String::new(),
        loads,
        programs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cycle_puts_every_condition_in_every_position_twice() {
        let mut at: BTreeMap<(Cond, usize), usize> = BTreeMap::new();
        let mut after: BTreeMap<(Cond, Cond), usize> = BTreeMap::new();
        for r in 0..CYCLE {
            let o = order(r);
            for c in Cond::ALL {
                assert_eq!(o.iter().filter(|&&x| x == c).count(), 1, "round {r}");
            }
            for (i, c) in o.into_iter().enumerate() {
                *at.entry((c, i)).or_default() += 1;
            }
            for w in o.windows(2) {
                *after.entry((w[0], w[1])).or_default() += 1;
            }
        }
        assert_eq!(at.len(), 169, "{at:?}");
        assert!(at.values().all(|&n| n == 2), "{at:?}");
        // Balanced: each condition directly follows each other one twice.
        assert_eq!(after.len(), 156, "{after:?}");
        assert!(after.values().all(|&n| n == 2), "{after:?}");
    }

    #[test]
    fn workloads_alternate_which_goes_first() {
        assert_eq!(loads_in(0, 0)[0], Load::Syscall);
        assert_eq!(loads_in(0, 1)[0], Load::PingPong);
        assert_eq!(loads_in(1, 0)[0], Load::PingPong);
    }

    #[test]
    fn a_full_run_has_at_least_thirty_trials_per_condition_and_workload() {
        let p = Plan::new(false, 5);
        assert!(p.rounds * p.trials >= 30, "{p:?}");
        assert!(
            p.rounds.is_multiple_of(CYCLE),
            "a whole number of order cycles: {p:?}"
        );
        assert_eq!(Plan::new(false, 13).rounds, 26);
        assert_eq!(Plan::new(false, 30).rounds, 52);
        let q = Plan::new(true, 1);
        assert!(q.rounds >= 2, "a quick run still pairs: {q:?}");
    }

    /// Rounds pair with their own unwatched block, so a slow round (another
    /// tenant on the machine) does not count as the tool's cost.
    #[test]
    fn summary_pairs_blocks_by_round() {
        let mut s = Samples::default();
        let none = vec![100.0, 200.0];
        let serve = vec![101.0, 202.0];
        for l in Load::ALL {
            s.blocks.insert((Cond::None, l.name()), none.clone());
            s.blocks.insert((Cond::Serve, l.name()), serve.clone());
            s.trials.insert((Cond::None, l.name()), none.clone());
        }
        let r = summarize(&Plan::new(true, 1), 1, &s, &BTreeMap::new());
        let serve = &r.loads[0].attached[1];
        assert_eq!(serve.condition, "kvm-watcher serve");
        assert!(
            (serve.added_pct.mean - 1.0).abs() < 1e-9,
            "{:?}",
            serve.added_pct
        );
        assert!((serve.added_ns.mean - 1.5).abs() < 1e-9);
        let bt = &r.loads[0].attached[3];
        assert_eq!(bt.added_pct.n, 0, "no bpftrace blocks, no pairs");
    }
}
