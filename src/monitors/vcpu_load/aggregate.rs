//! vcpu-load's interval step, with no kernel: the kernel keeps cumulative
//! counters per thread; each interval is the difference between two
//! readings, so nothing that happens between a read and the next is lost. A
//! vCPU still loaded at the boundary has its time up to the boundary counted
//! in the interval it ran in, so an interval's total never exceeds its length.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::read::Reading;
use super::record::VcpuLoadRow;
use crate::bpf::types;
use crate::monitors::interval::{NamesThread, fields_of};
use crate::monitors::ledger::{Change, Counters, since};
use crate::monitors::{Cell, Column, Figures, Thread, Tick, Unit, VmRule, percent_of};

/// One vCPU thread's cumulative loaded time and load/put pairs at one
/// reading, the open pair's time so far included (on the CPU it runs on).
#[derive(Clone, Debug, Default)]
pub struct Load {
    /// Completed pairs.
    pub count: u64,
    /// Loads on another CPU than the load before.
    pub cpu_migrations: u64,
    /// Loaded time, ns.
    pub total_ns: u64,
    /// Loaded time per CPU, ns.
    pub cpus: BTreeMap<u32, u64>,
    /// The thread's entry as read (its per-interval slots).
    pub entry: types::vcpu_thread,
}

impl Load {
    /// The reading `r` taken at `at_ns` (CLOCK_MONOTONIC): the thread, its
    /// figures, and whether the kernel saw it exit.
    pub fn of(r: &Reading, at_ns: u64) -> (Thread, Load, bool) {
        let t = &r.thread;
        let open_ns = if t.loaded_at != 0 && t.loaded_at <= at_ns {
            at_ns - t.loaded_at
        } else {
            0
        };
        let mut cpus: BTreeMap<u32, u64> = r.cpus.iter().copied().collect();
        if open_ns > 0 {
            *cpus.entry(t.loaded_cpu).or_default() += open_ns;
        }
        let who = t.who(r.tid);
        let load = Load {
            count: t.count,
            cpu_migrations: t.cpu_migrations,
            total_ns: t.total_ns + open_ns,
            cpus,
            entry: *t,
        };
        (who, load, t.exited != 0)
    }
}

impl Counters for Load {
    fn delta(&self, prev: &Load) -> Load {
        Load {
            count: since(self.count, prev.count),
            cpu_migrations: since(self.cpu_migrations, prev.cpu_migrations),
            total_ns: since(self.total_ns, prev.total_ns),
            cpus: self
                .cpus
                .iter()
                .map(|(cpu, ns)| (*cpu, since(*ns, prev.cpus.get(cpu).copied().unwrap_or(0))))
                .filter(|(_, ns)| *ns > 0)
                .collect(),
            entry: self.entry,
        }
    }

    fn zero(&self, _last_read_ns: u64) -> Load {
        Load::default()
    }

    /// A thread is loaded at most all the time between two readings; the
    /// rest is taken off the CPU it was loaded on last first.
    fn hold_back(&mut self, delta: &mut Load, span_ns: u64) {
        let mut excess = delta.total_ns.saturating_sub(span_ns);
        delta.total_ns -= excess;
        self.total_ns -= excess;
        let mut cpus: Vec<u32> = delta.cpus.keys().copied().collect();
        cpus.sort_by_key(|c| *c != self.entry.loaded_cpu);
        for cpu in cpus {
            let (Some(d), Some(t)) = (delta.cpus.get_mut(&cpu), self.cpus.get_mut(&cpu)) else {
                continue;
            };
            let part = excess.min(*d);
            (*d, *t, excess) = (*d - part, *t - part, excess - part);
        }
        delta.cpus.retain(|_, ns| *ns > 0);
    }
}

/// The row of the interval `tick` (its epoch already closed by bumping the
/// kernel's `epoch`) of a thread that ran in it; None for one that did not.
fn row(c: Change<Load>, tick: &Tick) -> Option<VcpuLoadRow> {
    let Change {
        who,
        delta: d,
        total,
    } = c;
    let t = &total.entry;
    // An interval never holds more than its length.
    let total_ns = d.total_ns.min(tick.interval_ns);
    if d.count == 0 && total_ns == 0 {
        return None;
    }
    // Pairs of this interval are in slot `ended`; those that ended between
    // the epoch bump and this reading (counted above) are in the other slot.
    let (mut max_ns, mut min_ns): (Option<u64>, Option<u64>) = (None, None);
    if d.count > 0 {
        for slot in 0..2 {
            if t.epoch[slot] == tick.ended || t.epoch[slot] == tick.ended.wrapping_add(1) {
                max_ns = max_ns.max(Some(t.max_ns[slot]));
                min_ns = Some(min_ns.map_or(t.min_ns[slot], |m| m.min(t.min_ns[slot])));
            }
        }
    }
    let pcpu = d
        .cpus
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(cpu, _)| *cpu);
    Some(VcpuLoadRow {
        time_ns: tick.now_ns,
        pid: who.pid,
        tid: who.tid,
        comm: who.comm,
        vcpu_id: who.vcpu_id,
        vm: None,
        interval_ns: tick.interval_ns,
        count: d.count,
        total_ns,
        max_ns,
        min_ns,
        pcpu,
        cpu_migrations: d.cpu_migrations,
        pcpus: d.cpus,
    })
}

/// A thread that was not loaded in the interval: 0 loaded, not unknown.
pub fn quiet() -> Box<dyn crate::monitors::Figures> {
    Box::new(crate::monitors::Quiet(VcpuLoadRow {
        time_ns: 0,
        pid: 0,
        tid: 0,
        comm: String::new(),
        vcpu_id: None,
        vm: None,
        interval_ns: 0,
        count: 0,
        total_ns: 0,
        max_ns: None,
        min_ns: None,
        pcpu: None,
        pcpus: BTreeMap::new(),
        cpu_migrations: 0,
    }))
}

/// The interval's rows, in the order of VMs, vCPUs and threads.
pub fn rows(changes: Vec<Change<Load>>, tick: &Tick) -> Vec<VcpuLoadRow> {
    let mut rows: Vec<VcpuLoadRow> = changes.into_iter().filter_map(|c| row(c, tick)).collect();
    rows.sort_by_key(|r| (r.pid, r.vcpu_id, r.tid));
    rows
}

/// vcpu-load's fields of a vCPU's interval record (`vcpu_interval`).
#[derive(Serialize)]
struct Fields<'a> {
    run_ns: u64,
    load_count: u64,
    pcpus: &'a BTreeMap<u32, u64>,
    cpu_migrations: u64,
}

/// The names of [`Fields`], in order.
pub const FIELDS: &[&str] = &["run_ns", "load_count", "pcpus", "cpu_migrations"];

/// vcpu-load's columns in `top`.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "RUN%",
        width: 6,
        help: "time loaded on a physical CPU (a VM's: its vCPUs' added up)",
        unit: Unit::Percent,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "PCPU",
        width: 4,
        help: "the physical CPU it was loaded on longest",
        unit: Unit::Cpu,
        vm: VmRule::Blank,
        idle: Cell::Blank,
    },
];

impl Figures for VcpuLoadRow {
    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        vec![
            Cell::Value(percent_of(self.total_ns, interval_ns)),
            self.pcpu.map_or(Cell::Blank, |c| Cell::Value(f64::from(c))),
        ]
    }

    fn fields(&self) -> Map<String, Value> {
        fields_of(&Fields {
            run_ns: self.total_ns,
            load_count: self.count,
            pcpus: &self.pcpus,
            cpu_migrations: self.cpu_migrations,
        })
    }

    fn lines(&self, interval_ns: u64) -> Vec<String> {
        let run = self.total_ns;
        let share = run as f64 * 100.0 / interval_ns.max(1) as f64;
        let mut pcpus: Vec<(u32, u64)> = self.pcpus.iter().map(|(c, n)| (*c, *n)).collect();
        pcpus.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let per_cpu: Vec<String> = pcpus
            .iter()
            .map(|(cpu, ns)| format!("cpu{cpu} {:.0}%", *ns as f64 * 100.0 / run.max(1) as f64))
            .collect();
        vec![format!(
            "    run: {:.3} ms ({share:.1}% of the interval) in {} load/put pairs{}; {}",
            run as f64 / 1e6,
            self.count,
            match self.cpu_migrations {
                0 => String::new(),
                n => format!(" ({n} moved to another CPU)"),
            },
            if per_cpu.is_empty() {
                "-".into()
            } else {
                per_cpu.join(", ")
            }
        )]
    }
}

impl VcpuLoadRow {
    /// The thread of this row.
    pub fn thread(&self) -> Thread {
        Thread::new(self.pid, self.tid, &self.comm, self.vcpu_id)
    }
}

#[cfg(test)]
mod tests;
