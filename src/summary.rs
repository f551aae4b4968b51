//! The interval summary (`--summary`, the default of `watch`): the parts
//! every running monitor made of one interval, put together into one record
//! per vCPU thread (`"monitor": "vcpu_interval"`) and a screen per VM.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::monitors::{Figures, Monitor, Part, REGISTRY, Thread, Tick};
use crate::output::{Clock, Output, OutputFormat, Row};
use crate::procfs::VmNames;

/// One vCPU thread's interval. Every monitor's fields are present, in
/// registry order; those of monitors that are not running, or that saw
/// nothing of this thread, are null.
#[derive(Clone, Debug, Serialize)]
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
    /// The monitors' fields.
    #[serde(flatten)]
    pub figures: Map<String, Value>,
    /// The monitors' lines for the table.
    #[serde(skip)]
    pub lines: Vec<String>,
}

impl Row for VcpuInterval {
    fn monitor(&self) -> &'static str {
        "vcpu_interval"
    }
    fn header(&self) -> String {
        String::new()
    }
    fn row(&self, _clock: &Clock) -> String {
        String::new()
    }
}

/// What one interval produced: each running monitor's part.
pub struct Interval {
    /// The interval.
    pub tick: Tick,
    /// The running monitors' parts.
    pub parts: Vec<(&'static dyn Monitor, Part)>,
}

/// A thread's figures, one slot per registry monitor.
struct Entry {
    thread: Thread,
    figures: Vec<Option<Box<dyn Figures>>>,
}

fn registry_index(m: &dyn Monitor) -> usize {
    REGISTRY
        .iter()
        .position(|r| r.name() == m.name())
        .unwrap_or(REGISTRY.len())
}

impl Interval {
    /// The per-vCPU records of the interval, sorted by VM, vCPU id and thread.
    pub fn vcpus(&mut self, names: &mut VmNames) -> Vec<VcpuInterval> {
        self.parts.sort_by_key(|(m, _)| registry_index(*m));
        let mut by_tid: BTreeMap<u32, Entry> = BTreeMap::new();
        for (m, part) in &mut self.parts {
            let i = registry_index(*m);
            for v in part.vcpus.drain(..) {
                let e = by_tid.entry(v.thread.tid).or_insert_with(|| Entry {
                    thread: v.thread.clone(),
                    figures: (0..REGISTRY.len()).map(|_| None).collect(),
                });
                if e.thread.vcpu_id.is_none() {
                    e.thread.vcpu_id = v.thread.vcpu_id;
                }
                if let Some(slot) = e.figures.get_mut(i) {
                    *slot = Some(v.figures);
                }
            }
        }
        for (m, part) in &mut self.parts {
            let i = registry_index(*m);
            for v in part.annotations.drain(..) {
                if let Some(slot) = by_tid
                    .get_mut(&v.thread.tid)
                    .and_then(|e| e.figures.get_mut(i))
                    && slot.is_none()
                {
                    *slot = Some(v.figures);
                }
            }
            if let Some(quiet) = part.quiet {
                for slot in by_tid.values_mut().filter_map(|e| e.figures.get_mut(i)) {
                    slot.get_or_insert_with(quiet);
                }
            }
        }
        let mut out: Vec<VcpuInterval> = by_tid
            .into_values()
            .map(|e| self.record(e, names))
            .collect();
        out.sort_by_key(|v| (v.pid, v.vcpu_id, v.tid));
        out
    }

    fn record(&self, e: Entry, names: &mut VmNames) -> VcpuInterval {
        let mut figures = Map::new();
        let mut lines = Vec::new();
        for (m, f) in REGISTRY.iter().zip(&e.figures) {
            match f {
                Some(f) => {
                    figures.extend(f.fields());
                    lines.extend(f.lines(self.tick.interval_ns));
                }
                None => {
                    figures.extend(m.vcpu_fields().iter().map(|k| (k.to_string(), Value::Null)))
                }
            }
        }
        VcpuInterval {
            time_ns: self.tick.now_ns,
            pid: e.thread.pid,
            tid: e.thread.tid,
            comm: e.thread.comm,
            vcpu_id: e.thread.vcpu_id,
            vm: names.get(e.thread.pid),
            interval_ns: self.tick.interval_ns,
            figures,
            lines,
        }
    }

    /// Writes the interval: a screen per VM for tables, records otherwise.
    pub fn write(mut self, out: &mut Output, names: &mut VmNames) {
        let vcpus = self.vcpus(names);
        for (_, part) in &mut self.parts {
            for r in &mut part.vm_rows {
                r.set_vm(names.get(r.pid()));
            }
        }
        if out.format() != OutputFormat::Table {
            for v in &vcpus {
                out.record(v);
            }
            for r in self.parts.iter().flat_map(|(_, p)| &p.vm_rows) {
                r.record(out);
            }
            return;
        }
        let title = format!(
            "\n=== {}  interval {:.3} s",
            out.clock().format(self.tick.now_ns),
            self.tick.interval_ns as f64 / 1e9
        );
        out.text(&title);
        let mut pids: Vec<u32> = vcpus
            .iter()
            .map(|v| v.pid)
            .chain(
                self.parts
                    .iter()
                    .flat_map(|(_, p)| p.vm_rows.iter().map(|r| r.pid())),
            )
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
                out.text(&format!(
                    "  vCPU {}  (tid {}, {})",
                    v.vcpu_id.map_or("?".into(), |id| id.to_string()),
                    v.tid,
                    v.comm
                ));
                for line in &v.lines {
                    out.text(line);
                }
            }
            for (_, part) in &self.parts {
                let mine: Vec<_> = part.vm_rows.iter().filter(|r| r.pid() == pid).collect();
                if !mine.is_empty() {
                    out.text(part.vm_title);
                    for r in mine {
                        out.text(&r.line());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
