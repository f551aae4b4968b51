//! The interval summary (`--summary`, the default of `watch`): per VM and
//! vCPU, what the in-kernel aggregates say happened in the last interval.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::monitors::dirty::SlotSummaryRow;
use crate::monitors::halt_poll::HaltPollTotals;
use crate::monitors::vcpu_load::VcpuLoadRow;
use crate::monitors::wakeup::{WakeupTotals, histogram_lines};
use crate::output::{Output, Row};
use crate::procfs::VmNames;

/// One vCPU thread's interval (`"monitor": "vcpu_interval"`). Fields of
/// monitors that are not running are null.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VcpuInterval {
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
    /// Wake-ups.
    pub wakeups: Option<u64>,
    /// Wake-ups caught by halt polling.
    pub polled: Option<u64>,
    /// Wake-ups after sleeping.
    pub waited: Option<u64>,
    /// Wake-ups without a real cause.
    pub invalid: Option<u64>,
    /// Sum of halt durations, ns.
    pub halt_ns: Option<u64>,
    /// Halt durations in log2 buckets of microseconds: element 0 counts halts
    /// under 2 us, element i > 0 halts of [2^i, 2^(i+1)) us.
    pub halt_hist: Option<Vec<u64>>,
    /// Halt-polling window grows.
    pub poll_grows: Option<u64>,
    /// Halt-polling window shrinks.
    pub poll_shrinks: Option<u64>,
    /// Halt-polling window after the last change seen, ns.
    pub poll_window_ns: Option<u64>,
    /// Time loaded on a physical CPU, ns.
    pub run_ns: Option<u64>,
    /// load->put pairs.
    pub load_count: Option<u64>,
    /// Loaded time per physical CPU, ns.
    pub pcpus: Option<BTreeMap<u32, u64>>,
}

impl Row for VcpuInterval {
    fn monitor(&self) -> &'static str {
        "vcpu_interval"
    }
    fn header(&self) -> String {
        String::new()
    }
    fn row(&self, _clock: &crate::output::Clock) -> String {
        String::new()
    }
}

/// What one interval produced, per monitor.
#[derive(Default)]
pub struct Interval {
    /// End of the interval.
    pub time_ns: u64,
    /// Its length.
    pub interval_ns: u64,
    /// Wake-up aggregates (None when the monitor is off).
    pub wakeup: Option<Vec<WakeupTotals>>,
    /// Halt-poll aggregates, with the last window of every thread seen.
    pub halt_poll: Option<(Vec<HaltPollTotals>, BTreeMap<u32, u64>)>,
    /// vcpu-load rows.
    pub load: Option<Vec<VcpuLoadRow>>,
    /// Dirty pages per slot.
    pub dirty: Option<Vec<SlotSummaryRow>>,
}

impl Interval {
    /// The per-vCPU records of the interval.
    pub fn vcpus(&self, names: &mut VmNames) -> Vec<VcpuInterval> {
        let mut by_tid: BTreeMap<u32, VcpuInterval> = BTreeMap::new();
        let (time_ns, interval_ns) = (self.time_ns, self.interval_ns);
        let entry = |by_tid: &mut BTreeMap<u32, VcpuInterval>,
                     pid: u32,
                     tid: u32,
                     comm: &str,
                     vcpu_id: Option<u32>| {
            let e = by_tid.entry(tid).or_insert_with(|| VcpuInterval {
                time_ns,
                pid,
                tid,
                comm: comm.to_string(),
                vcpu_id,
                interval_ns,
                ..Default::default()
            });
            if e.vcpu_id.is_none() {
                e.vcpu_id = vcpu_id;
            }
        };
        if let Some(w) = &self.wakeup {
            for t in w {
                entry(&mut by_tid, t.pid, t.tid, &t.comm, t.vcpu_id);
                let e = by_tid.get_mut(&t.tid).expect("just inserted");
                e.wakeups = Some(t.wakeups);
                e.polled = Some(t.polled());
                e.waited = Some(t.waited);
                e.invalid = Some(t.invalid);
                e.halt_ns = Some(t.halt_ns);
                e.halt_hist = Some(t.hist.clone());
            }
        }
        if let Some((changes, windows)) = &self.halt_poll {
            for t in changes {
                entry(&mut by_tid, t.pid, t.tid, &t.comm, t.vcpu_id);
                let e = by_tid.get_mut(&t.tid).expect("just inserted");
                e.poll_grows = Some(t.grows);
                e.poll_shrinks = Some(t.shrinks);
            }
            for e in by_tid.values_mut() {
                if let Some(w) = windows.get(&e.tid) {
                    e.poll_window_ns = Some(*w);
                    e.poll_grows.get_or_insert(0);
                    e.poll_shrinks.get_or_insert(0);
                }
            }
        }
        if let Some(rows) = &self.load {
            for r in rows {
                entry(&mut by_tid, r.pid, r.tid, &r.comm, r.vcpu_id);
                let e = by_tid.get_mut(&r.tid).expect("just inserted");
                e.run_ns = Some(r.total_ns);
                e.load_count = Some(r.count);
                e.pcpus = Some(r.pcpus.clone());
            }
        }
        let mut out: Vec<VcpuInterval> = by_tid.into_values().collect();
        for v in &mut out {
            v.vm = names.get(v.pid);
        }
        out.sort_by_key(|v| (v.pid, v.vcpu_id, v.tid));
        out
    }

    /// Writes the interval: a screen per VM for tables, records otherwise.
    pub fn write(&self, out: &mut Output, names: &mut VmNames) {
        let vcpus = self.vcpus(names);
        let mut slots = self.dirty.clone().unwrap_or_default();
        for s in &mut slots {
            s.vm = names.get(s.pid);
        }
        if out.format() != crate::cli::OutputFormat::Table {
            for v in &vcpus {
                out.record(v);
            }
            for s in &slots {
                out.record(s);
            }
            return;
        }
        let title = format!(
            "\n=== {}  interval {:.3} s",
            out.clock().format(self.time_ns),
            self.interval_ns as f64 / 1e9
        );
        out.text(&title);
        let mut pids: Vec<u32> = vcpus
            .iter()
            .map(|v| v.pid)
            .chain(slots.iter().map(|s| s.pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            out.text("(no vCPU activity)");
        }
        for pid in pids {
            let name = names.get(pid).unwrap_or_else(|| "(exited)".into());
            out.text(&format!("VM {name} (pid {pid})"));
            for v in vcpus.iter().filter(|v| v.pid == pid) {
                for line in vcpu_lines(v) {
                    out.text(&line);
                }
            }
            let mine: Vec<&SlotSummaryRow> = slots.iter().filter(|s| s.pid == pid).collect();
            if !mine.is_empty() {
                out.text("  dirty pages:");
                for s in mine {
                    let distinct = match s.distinct_pages {
                        Some(d) => format!(
                            "{d} distinct pages, {:.2} MiB/s",
                            crate::monitors::dirty::dirty_mib_s(d, s.interval_ns)
                        ),
                        None => "distinct pages n/a (Linux 5.12+)".to_string(),
                    };
                    out.text(&format!(
                        "    slot {} (gfn {:#x}, {} pages): {} writes, {distinct}",
                        s.slot_id, s.base_gfn, s.npages, s.writes
                    ));
                }
            }
        }
    }
}

fn vcpu_lines(v: &VcpuInterval) -> Vec<String> {
    let mut lines = vec![format!(
        "  vCPU {}  (tid {}, {})",
        v.vcpu_id.map_or("?".into(), |id| id.to_string()),
        v.tid,
        v.comm
    )];
    if let Some(w) = v.wakeups {
        let mean = v.halt_ns.unwrap_or(0) as f64 / w.max(1) as f64 / 1e6;
        lines.push(format!(
            "    wake-ups {w}: polled {}, slept {}, invalid {}; mean halt {mean:.3} ms",
            v.polled.unwrap_or(0),
            v.waited.unwrap_or(0),
            v.invalid.unwrap_or(0)
        ));
        if let Some(h) = &v.halt_hist {
            lines.extend(histogram_lines(h).into_iter().map(|l| format!("    {l}")));
        }
    }
    if let Some(g) = v.poll_grows {
        lines.push(format!(
            "    halt-poll: {g} grow, {} shrink, window now {} ns",
            v.poll_shrinks.unwrap_or(0),
            v.poll_window_ns.map_or("?".into(), |w| w.to_string())
        ));
    }
    if let Some(run) = v.run_ns {
        let share = run as f64 * 100.0 / v.interval_ns.max(1) as f64;
        let mut pcpus: Vec<(u32, u64)> = v.pcpus.clone().unwrap_or_default().into_iter().collect();
        pcpus.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let per_cpu: Vec<String> = pcpus
            .iter()
            .map(|(cpu, ns)| format!("cpu{cpu} {:.0}%", *ns as f64 * 100.0 / run.max(1) as f64))
            .collect();
        lines.push(format!(
            "    run: {:.3} ms ({share:.1}% of the interval) in {} load/put pairs; {}",
            run as f64 / 1e6,
            v.load_count.unwrap_or(0),
            if per_cpu.is_empty() {
                "-".into()
            } else {
                per_cpu.join(", ")
            }
        ));
    }
    lines
}
