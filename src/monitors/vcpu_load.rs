//! vcpu-load: per interval, how long each vCPU thread held a physical CPU
//! (kernel half: src/bpf/vcpu_load.bpf.c).
//!
//! The kernel keeps cumulative counters per thread; each interval is the
//! difference between two readings, so nothing that happens between a read
//! and the next is lost. A vCPU still loaded at the boundary has its time up
//! to the boundary counted in the interval it ran in, so an interval's total
//! never exceeds its length.

use std::collections::{BTreeMap, HashMap};

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Serialize;

use super::vcpu_cell;
use crate::bpf::{comm_to_string, read_record, types};
use crate::output::{Clock, Row};

/// One thread's figures for one interval.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuLoadRow {
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// VM name.
    pub vm: Option<String>,
    /// Interval length, ns.
    pub interval_ns: u64,
    /// load->put pairs completed in the interval.
    pub count: u64,
    /// Time loaded in the interval, ns (includes a pair still open at its end).
    pub total_ns: u64,
    /// Longest completed pair, ns (null without one).
    pub max_ns: Option<u64>,
    /// Shortest completed pair, ns (null without one).
    pub min_ns: Option<u64>,
    /// The physical CPU it was loaded on longest in the interval.
    pub pcpu: Option<u32>,
    /// Loaded time per physical CPU in the interval, ns.
    pub pcpus: BTreeMap<u32, u64>,
}

impl Row for VcpuLoadRow {
    fn monitor(&self) -> &'static str {
        "vcpu_load"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:>8} {:>8} {:<16} {:>7} {:>13} {:>11} {:>11} {:>8} {:<10}",
            "PID", "TID", "COMM", "VCPU_ID", "TOTAL(ms)", "MAX(ms)", "MIN(ms)", "COUNT", "PCPU(ms)"
        );
        format!("{base} VM")
    }

    fn row(&self, _clock: &Clock) -> String {
        let ms = |v: Option<u64>| {
            v.map_or_else(|| "-".to_string(), |v| format!("{:.3}", v as f64 / 1e6))
        };
        let mut by_time: Vec<(&u32, &u64)> = self.pcpus.iter().collect();
        by_time.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let pcpus: Vec<String> = by_time
            .iter()
            .map(|(cpu, ns)| format!("{cpu}:{:.1}", **ns as f64 / 1e6))
            .collect();
        let base = format!(
            "{:>8} {:>8} {:<16} {:>7} {:>13.3} {:>11} {:>11} {:>8} {:<10}",
            self.pid,
            self.tid,
            self.comm,
            vcpu_cell(self.vcpu_id),
            self.total_ns as f64 / 1e6,
            ms(self.max_ns),
            ms(self.min_ns),
            self.count,
            pcpus.join(" "),
        );
        format!("{base} {}", self.vm.as_deref().unwrap_or("-"))
    }
}

#[derive(Default, Clone, Copy)]
struct Seen {
    count: u64,
    /// Cumulative loaded time including the open pair, as of the last reading.
    total_ns: u64,
}

/// Turns cumulative kernel counters into per-interval rows.
#[derive(Default)]
pub struct LoadTracker {
    seen: HashMap<u32, Seen>,
    cpu_seen: HashMap<(u32, u32), u64>,
}

/// Reads of a thread's entry before its snapshot is taken as it is.
const SNAPSHOT_ATTEMPTS: usize = 8;

fn read_thread(threads: &MapHandle, key: &[u8]) -> anyhow::Result<Option<types::vcpu_thread>> {
    Ok(threads
        .lookup(key, MapFlags::ANY)?
        .and_then(|v| read_record::<types::vcpu_thread>(&v)))
}

/// Thread `tid`'s cumulative loaded time on each CPU, one lookup per CPU.
fn cpu_times_of(cpu_ns: &MapHandle, tid: u32) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for cpu in 0..libbpf_rs::num_possible_cpus()? as u32 {
        let key = types::vcpu_cpu_key { tid, cpu };
        if let Some(v) = cpu_ns.lookup(crate::bpf::as_bytes(&key), MapFlags::ANY)? {
            out.push((cpu, read_record::<u64>(&v).unwrap_or(0)));
        }
    }
    Ok(out)
}

impl LoadTracker {
    /// Rows for the interval that ended at `now_ns` (epoch `ended`, already
    /// closed by bumping the kernel's `epoch`). Deletes threads that exited
    /// once their last figures are reported.
    pub fn tick(
        &mut self,
        threads: &MapHandle,
        cpu_ns: &MapHandle,
        ended: u32,
        now_ns: u64,
        interval_ns: u64,
    ) -> anyhow::Result<Vec<VcpuLoadRow>> {
        // Each thread's entry and its per-CPU times as one snapshot: the times
        // read between two equal, even `seq` values of the entry (the kernel
        // makes `seq` odd while it changes either). All entries first, then
        // all per-CPU times, then each entry again; a thread that moved on
        // meanwhile is read again, its per-CPU times key by key.
        let mut first = Vec::new();
        for k in threads.keys() {
            if let (Some(tid), Some(t)) = (read_record::<u32>(&k), read_thread(threads, &k)?) {
                first.push((tid, k, t));
            }
        }
        let mut cpu_of_thread: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        let mut cpu_keys = Vec::new();
        for k in cpu_ns.keys() {
            let (Some(key), Some(v)) = (
                read_record::<types::vcpu_cpu_key>(&k),
                cpu_ns.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            cpu_of_thread
                .entry(key.tid)
                .or_default()
                .push((key.cpu, read_record::<u64>(&v).unwrap_or(0)));
            cpu_keys.push((key.tid, k));
        }
        let mut threads_now = Vec::new();
        let mut cpu_total: HashMap<(u32, u32), u64> = HashMap::new();
        for (tid, k, mut t) in first {
            let mut cpus = cpu_of_thread.remove(&tid).unwrap_or_default();
            for _ in 0..SNAPSHOT_ATTEMPTS {
                let Some(again) = read_thread(threads, &k)? else {
                    break;
                };
                if again.seq == t.seq && t.seq % 2 == 0 {
                    break;
                }
                t = again;
                cpus = cpu_times_of(cpu_ns, tid)?;
            }
            let open_ns = if t.loaded_at != 0 && t.loaded_at <= now_ns {
                now_ns - t.loaded_at
            } else {
                0
            };
            // Cumulative loaded time per CPU; the open pair's time so far
            // counts on the CPU it is loaded on.
            for (cpu, ns) in cpus {
                cpu_total.insert((tid, cpu), ns);
            }
            if open_ns > 0 {
                *cpu_total.entry((tid, t.loaded_cpu)).or_default() += open_ns;
            }
            threads_now.push((tid, k, t, open_ns));
        }
        let mut per_cpu: HashMap<u32, BTreeMap<u32, u64>> = HashMap::new();
        for ((tid, cpu), total) in cpu_total {
            let prev = self.cpu_seen.insert((tid, cpu), total).unwrap_or(0);
            if total > prev {
                per_cpu.entry(tid).or_default().insert(cpu, total - prev);
            }
        }

        let mut rows = Vec::new();
        let mut exited = Vec::new();
        for (tid, k, t, open_ns) in threads_now {
            let total_now = t.total_ns + open_ns;
            let prev = self.seen.insert(
                tid,
                Seen {
                    count: t.count,
                    total_ns: total_now,
                },
            );
            let prev = prev.unwrap_or_default();
            let count = t.count.saturating_sub(prev.count);
            let total_ns = total_now.saturating_sub(prev.total_ns).min(interval_ns);
            let pcpus = per_cpu.remove(&tid).unwrap_or_default();
            if t.exited != 0 {
                exited.push((tid, k.clone()));
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
            });
        }
        for (tid, k) in exited {
            let _ = threads.delete(&k);
            self.seen.remove(&tid);
            for (ctid, ck) in &cpu_keys {
                if *ctid == tid {
                    let _ = cpu_ns.delete(ck);
                    self.cpu_seen.retain(|(t, _), _| *t != tid);
                }
            }
        }
        rows.sort_by_key(|r| (r.pid, r.vcpu_id, r.tid));
        Ok(rows)
    }
}
