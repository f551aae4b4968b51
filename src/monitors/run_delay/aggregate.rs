//! run-delay's interval step, with no kernel: per-thread differences of the
//! kernel's cumulative waits, split by cause, the longest wait of the
//! interval, and the tasks that ran instead, with their share.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};

use super::record::cause_name;
use crate::monitors::histogram::histogram_lines;
use crate::monitors::interval::fields_of;
use crate::monitors::ledger::{Change, Counters, since, since_each};
use crate::monitors::{Cell, Column, Figures, Thread, Tick, Unit, VmRule, percent_of};
use crate::output::terminal_safe as printable;

/// Culprits shown per vCPU and interval.
pub const TOP_CULPRITS: usize = 5;

/// One thread's cumulative figures, as the kernel keeps them.
#[derive(Clone, Debug, Default)]
pub struct RunDelayTotals {
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// Switch-ins seen.
    pub switch_ins: u64,
    /// Switch-ins that ended a wait seen from its start.
    pub waits: u64,
    /// Their total, ns.
    pub delay_ns: u64,
    /// Waits by cause (`enum run_delay_cause`).
    pub cause_waits: [u64; 2],
    /// Waiting time by cause, ns.
    pub cause_ns: [u64; 2],
    /// Waiting time no remembered slice covers, ns.
    pub unattributed_ns: u64,
    /// Interval numbers of the per-interval maxima.
    pub epoch: [u32; 2],
    /// Longest wait per interval slot, ns.
    pub max_ns: [u64; 2],
    /// Waits in log2 buckets of microseconds.
    pub hist: Vec<u64>,
}

/// The cumulative time task `tid` ran while thread `waiter` waited.
#[derive(Clone, Debug, Default)]
pub struct CulpritReading {
    /// The waiting vCPU thread.
    pub waiter: u32,
    /// The task that ran.
    pub tid: u32,
    /// Its process.
    pub pid: u32,
    /// Its name.
    pub comm: String,
    /// Time, ns.
    pub ns: u64,
}

/// A task that ran while a vCPU waited, in one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Culprit {
    /// Its process.
    pub pid: u32,
    /// Its thread.
    pub tid: u32,
    /// Its name.
    pub comm: String,
    /// The VM it belongs to, if it is a VMM's thread.
    pub vm: Option<String>,
    /// Its vCPU id, if it is a vCPU thread.
    pub vcpu_id: Option<u32>,
    /// Time it ran while the vCPU waited, ns.
    pub ns: u64,
    /// Its share of the vCPU's waiting time.
    pub share: f64,
}

/// One thread's waits in one interval.
#[derive(Clone, Debug, Default)]
pub struct RunDelayInterval {
    /// The thread.
    pub thread: Thread,
    /// Switch-ins.
    pub switch_ins: u64,
    /// Waits.
    pub waits: u64,
    /// Their total, ns.
    pub delay_ns: u64,
    /// Waits and time after a wake-up.
    pub woken: (u64, u64),
    /// Waits and time after a preemption.
    pub preempted: (u64, u64),
    /// The longest wait, ns.
    pub max_ns: Option<u64>,
    /// Waiting time no remembered slice covers, ns.
    pub unattributed_ns: u64,
    /// Waits in log2 buckets of microseconds.
    pub hist: Vec<u64>,
    /// The tasks that ran instead, most first.
    pub culprits: Vec<Culprit>,
}

/// A thread that did not wait in the interval (it never became runnable,
/// e.g. a vCPU halted throughout): no waits, not unknown.
pub fn quiet() -> Box<dyn Figures> {
    Box::new(crate::monitors::Quiet(RunDelayInterval {
        hist: vec![0; crate::bpf::types::limits::RUN_DELAY_HIST_SLOTS.0 as usize],
        ..RunDelayInterval::default()
    }))
}

/// One thread's cumulative figures and, by task, the time that task ran
/// while it waited.
#[derive(Clone, Debug, Default)]
pub struct Waits {
    /// The thread's figures.
    pub totals: RunDelayTotals,
    /// By culprit thread id.
    pub culprits: BTreeMap<u32, CulpritReading>,
}

impl Waits {
    /// Each thread's figures with its culprits.
    pub fn join(totals: Vec<RunDelayTotals>, culprits: Vec<CulpritReading>) -> Vec<Waits> {
        let mut by_waiter: HashMap<u32, BTreeMap<u32, CulpritReading>> = HashMap::new();
        for c in culprits {
            by_waiter.entry(c.waiter).or_default().insert(c.tid, c);
        }
        totals
            .into_iter()
            .map(|t| Waits {
                culprits: by_waiter.remove(&t.tid).unwrap_or_default(),
                totals: t,
            })
            .collect()
    }
}

impl Counters for Waits {
    fn delta(&self, prev: &Waits) -> Waits {
        let (t, p) = (&self.totals, &prev.totals);
        let pair = |a: [u64; 2], b: [u64; 2]| [since(a[0], b[0]), since(a[1], b[1])];
        Waits {
            totals: RunDelayTotals {
                switch_ins: since(t.switch_ins, p.switch_ins),
                waits: since(t.waits, p.waits),
                delay_ns: since(t.delay_ns, p.delay_ns),
                cause_waits: pair(t.cause_waits, p.cause_waits),
                cause_ns: pair(t.cause_ns, p.cause_ns),
                unattributed_ns: since(t.unattributed_ns, p.unattributed_ns),
                hist: since_each(&t.hist, &p.hist),
                ..t.clone()
            },
            culprits: self
                .culprits
                .iter()
                .filter_map(|(tid, c)| {
                    let ns = since(c.ns, prev.culprits.get(tid).map_or(0, |p| p.ns));
                    (ns > 0).then(|| (*tid, CulpritReading { ns, ..c.clone() }))
                })
                .collect(),
        }
    }

    fn zero(&self, _last_read_ns: u64) -> Waits {
        Waits::default()
    }
}

/// The interval `tick`'s figures per thread (threads without switch-ins
/// left out), from every thread's changes.
pub fn intervals(changes: Vec<Change<Waits>>, tick: &Tick) -> Vec<RunDelayInterval> {
    let vcpu_of: HashMap<u32, Option<u32>> =
        changes.iter().map(|c| (c.who.tid, c.who.vcpu_id)).collect();
    let mut out = Vec::new();
    for Change { who, delta, total } in changes {
        let (d, t) = (delta.totals, &total.totals);
        if d.switch_ins == 0 && d.waits == 0 {
            continue;
        }
        let mut culprits: Vec<Culprit> = delta
            .culprits
            .into_values()
            .map(|c| Culprit {
                pid: c.pid,
                tid: c.tid,
                comm: c.comm,
                vm: None,
                vcpu_id: vcpu_of.get(&c.tid).copied().flatten(),
                ns: c.ns,
                share: 0.0,
            })
            .collect();
        culprits.sort_by(|a, b| b.ns.cmp(&a.ns).then(a.tid.cmp(&b.tid)));
        culprits.truncate(TOP_CULPRITS);
        for c in &mut culprits {
            c.share = c.ns as f64 / d.delay_ns.max(1) as f64;
        }
        // Waits of this interval are in slot `ended`; those that ended
        // between the epoch bump and this reading in the other one.
        let max_ns = (0..2)
            .filter(|&s| t.epoch[s] == tick.ended || t.epoch[s] == tick.ended.wrapping_add(1))
            .map(|s| t.max_ns[s])
            .max();
        out.push(RunDelayInterval {
            thread: who,
            switch_ins: d.switch_ins,
            waits: d.waits,
            delay_ns: d.delay_ns,
            woken: (d.cause_waits[0], d.cause_ns[0]),
            preempted: (d.cause_waits[1], d.cause_ns[1]),
            max_ns: max_ns.filter(|_| d.delay_ns > 0 || d.switch_ins > 0),
            unattributed_ns: d.unattributed_ns,
            hist: d.hist,
            culprits,
        });
    }
    out.sort_by_key(|r| (r.thread.pid, r.thread.vcpu_id, r.thread.tid));
    out
}

impl RunDelayTotals {
    /// The thread these figures are of.
    pub fn thread(&self) -> Thread {
        Thread::new(self.pid, self.tid, &self.comm, self.vcpu_id)
    }
}

/// run-delay's fields of a vCPU's interval record (`vcpu_interval`).
#[derive(Serialize)]
struct Fields<'a> {
    run_delay_ns: u64,
    run_delay_waits: u64,
    run_delay_max_ns: Option<u64>,
    run_delay_woken_waits: u64,
    run_delay_woken_ns: u64,
    run_delay_preempted_waits: u64,
    run_delay_preempted_ns: u64,
    run_delay_switch_ins: u64,
    run_delay_unattributed_ns: u64,
    run_delay_hist: &'a [u64],
    run_delay_culprits: &'a [Culprit],
}

/// The names of [`Fields`], in order.
pub const FIELDS: &[&str] = &[
    "run_delay_ns",
    "run_delay_waits",
    "run_delay_max_ns",
    "run_delay_woken_waits",
    "run_delay_woken_ns",
    "run_delay_preempted_waits",
    "run_delay_preempted_ns",
    "run_delay_switch_ins",
    "run_delay_unattributed_ns",
    "run_delay_hist",
    "run_delay_culprits",
];

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Culprit {
    /// How the table names it.
    fn label(&self) -> String {
        match (&self.vm, self.vcpu_id) {
            (Some(vm), Some(v)) => format!("vCPU {v} of VM {}", printable(vm)),
            (Some(vm), None) => format!("{} of VM {}", printable(&self.comm), printable(vm)),
            _ => format!("{} (pid {})", printable(&self.comm), self.pid),
        }
    }

    /// How `top`'s narrow column names it: another VM's vCPU by its VM,
    /// not as a bare `CPU 0/KVM` that reads like the waiter's own.
    fn short_label(&self) -> String {
        match (&self.vm, self.vcpu_id) {
            (Some(vm), Some(v)) => format!("{vm} vCPU {v}"),
            (None, Some(v)) => format!("vCPU {v} pid {}", self.pid),
            (Some(vm), None) => format!("{} ({vm})", self.comm),
            (None, None) => self.comm.clone(),
        }
    }
}

/// run-delay's columns in `top`.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "STEAL%",
        width: 6,
        help: "time runnable but waiting for a physical CPU (a VM's: its vCPUs' added up)",
        unit: Unit::Percent,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "WAITMAX",
        width: 7,
        help: "the longest wait for a physical CPU (a VM's: its vCPUs' longest)",
        unit: Unit::Nanoseconds,
        vm: VmRule::Max,
        idle: Cell::Blank,
    },
    Column {
        title: "RAN INSTEAD",
        width: 15,
        help: "the task that ran longest while it waited",
        unit: Unit::Text,
        vm: VmRule::Blank,
        idle: Cell::Blank,
    },
];

impl Figures for RunDelayInterval {
    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        vec![
            Cell::Value(percent_of(self.delay_ns, interval_ns)),
            self.max_ns.map_or(Cell::Blank, |m| Cell::Value(m as f64)),
            self.culprits
                .first()
                .map_or(Cell::Blank, |c| Cell::Text(c.short_label())),
        ]
    }

    fn fields(&self) -> Map<String, Value> {
        fields_of(&Fields {
            run_delay_ns: self.delay_ns,
            run_delay_waits: self.waits,
            run_delay_max_ns: self.max_ns,
            run_delay_woken_waits: self.woken.0,
            run_delay_woken_ns: self.woken.1,
            run_delay_preempted_waits: self.preempted.0,
            run_delay_preempted_ns: self.preempted.1,
            run_delay_switch_ins: self.switch_ins,
            run_delay_unattributed_ns: self.unattributed_ns,
            run_delay_hist: &self.hist,
            run_delay_culprits: &self.culprits,
        })
    }

    fn lines(&self, interval_ns: u64) -> Vec<String> {
        let share = self.delay_ns as f64 * 100.0 / interval_ns.max(1) as f64;
        let mut lines = vec![format!(
            "    run delay: {:.3} ms ({share:.1}% of the interval) in {} waits, mean {:.3} ms, max {:.3} ms; {} {} ({:.3} ms), {} {} ({:.3} ms)",
            ms(self.delay_ns),
            self.waits,
            ms(self.delay_ns) / self.waits.max(1) as f64,
            ms(self.max_ns.unwrap_or(0)),
            cause_name(0),
            self.woken.0,
            ms(self.woken.1),
            cause_name(1),
            self.preempted.0,
            ms(self.preempted.1),
        )];
        lines.extend(
            histogram_lines("run delay (us)", &self.hist)
                .into_iter()
                .map(|l| format!("    {l}")),
        );
        if !self.culprits.is_empty() {
            let named: Vec<String> = self
                .culprits
                .iter()
                .map(|c| format!("{} {:.0}%", c.label(), c.share * 100.0))
                .collect();
            lines.push(format!("    ran instead: {}", named.join(", ")));
        }
        lines
    }
}

#[cfg(test)]
mod tests;
