//! vcpu-load's interval step, with no kernel: the kernel keeps cumulative
//! counters per thread; each interval is the difference between two
//! readings, so nothing that happens between a read and the next is lost. A
//! vCPU still loaded at the boundary has its time up to the boundary counted
//! in the interval it ran in, so an interval's total never exceeds its length.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};

use super::read::Reading;
use super::record::VcpuLoadRow;
use crate::bpf::comm_to_string;
use crate::monitors::interval::fields_of;
use crate::monitors::{Cell, Column, Figures, Thread, Tick, Unit, VcpuFigures, VmRule, percent_of};

#[derive(Default, Clone, Copy)]
struct Seen {
    count: u64,
    cpu_migrations: u64,
    /// Cumulative loaded time including the open pair, as of the last reading.
    total_ns: u64,
}

/// Turns cumulative kernel counters into per-interval rows.
#[derive(Default)]
pub struct LoadTracker {
    seen: HashMap<u32, Seen>,
    cpu_seen: HashMap<(u32, u32), u64>,
}

impl LoadTracker {
    /// Rows for the interval `tick` (its epoch already closed by bumping the
    /// kernel's `epoch`), from a snapshot taken after it ended; and the
    /// threads that exited, whose last figures these are (delete them now).
    pub fn tick(&mut self, readings: &[Reading], tick: &Tick) -> (Vec<VcpuLoadRow>, Vec<u32>) {
        let (ended, now_ns, interval_ns) = (tick.ended, tick.now_ns, tick.interval_ns);
        let mut rows = Vec::new();
        let mut exited = Vec::new();
        for r in readings {
            let (tid, t) = (r.tid, &r.thread);
            let open_ns = if t.loaded_at != 0 && t.loaded_at <= now_ns {
                now_ns - t.loaded_at
            } else {
                0
            };
            // Cumulative loaded time per CPU; the open pair's time so far
            // counts on the CPU it is loaded on.
            let mut cpu_total: BTreeMap<u32, u64> = r.cpus.iter().copied().collect();
            if open_ns > 0 {
                *cpu_total.entry(t.loaded_cpu).or_default() += open_ns;
            }
            let mut pcpus = BTreeMap::new();
            for (cpu, total) in cpu_total {
                let prev = self.cpu_seen.insert((tid, cpu), total).unwrap_or(0);
                if total > prev {
                    pcpus.insert(cpu, total - prev);
                }
            }
            let total_now = t.total_ns + open_ns;
            let prev = self.seen.insert(
                tid,
                Seen {
                    count: t.count,
                    cpu_migrations: t.cpu_migrations,
                    total_ns: total_now,
                },
            );
            let prev = prev.unwrap_or_default();
            let count = t.count.saturating_sub(prev.count);
            let cpu_migrations = t.cpu_migrations.saturating_sub(prev.cpu_migrations);
            let total_ns = total_now.saturating_sub(prev.total_ns).min(interval_ns);
            if t.exited != 0 {
                exited.push(tid);
            }
            if count == 0 && total_ns == 0 {
                continue;
            }
            // Pairs of this interval are in slot `ended`; those that ended
            // between the epoch bump and this reading (counted above) are in
            // the other slot already.
            let (mut max_ns, mut min_ns): (Option<u64>, Option<u64>) = (None, None);
            if count > 0 {
                for slot in 0..2 {
                    if t.epoch[slot] == ended || t.epoch[slot] == ended.wrapping_add(1) {
                        max_ns = max_ns.max(Some(t.max_ns[slot]));
                        min_ns = Some(min_ns.map_or(t.min_ns[slot], |m| m.min(t.min_ns[slot])));
                    }
                }
            }
            let pcpu = pcpus
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(cpu, _)| *cpu);
            rows.push(VcpuLoadRow {
                time_ns: now_ns,
                pid: t.pid,
                tid,
                comm: comm_to_string(&t.comm),
                vcpu_id: u32::try_from(t.vcpu_id).ok(),
                vm: None,
                interval_ns,
                count,
                total_ns,
                max_ns,
                min_ns,
                pcpu,
                pcpus,
                cpu_migrations,
            });
        }
        for tid in &exited {
            self.seen.remove(tid);
            self.cpu_seen.retain(|(t, _), _| t != tid);
        }
        rows.sort_by_key(|r| (r.pid, r.vcpu_id, r.tid));
        (rows, exited)
    }
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

/// The interval's rows as parts of the vCPUs' records.
pub fn vcpu_figures(rows: Vec<VcpuLoadRow>) -> Vec<VcpuFigures> {
    rows.into_iter()
        .map(|r| VcpuFigures {
            thread: Thread {
                pid: r.pid,
                tid: r.tid,
                comm: r.comm.clone(),
                vcpu_id: r.vcpu_id,
            },
            figures: Box::new(r),
        })
        .collect()
}

#[cfg(test)]
mod tests;
