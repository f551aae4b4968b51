//! halt-poll: one row per halt-polling window change (kernel half: src/bpf/halt_poll.bpf.c).

use serde::Serialize;

use super::{common_of, vcpu_cell};
use crate::bpf::{read_record, types};
use crate::output::{Clock, Common, Row};

/// One `kvm:kvm_halt_poll_ns`.
#[derive(Clone, Debug, Serialize)]
pub struct HaltPollRow {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// The window grew (false: it shrank).
    pub grow: bool,
    /// Window before, ns.
    pub old_ns: u32,
    /// Window after, ns.
    pub new_ns: u32,
}

/// Decodes a `struct halt_poll_event`.
pub fn decode(bytes: &[u8]) -> Option<HaltPollRow> {
    let e: types::halt_poll_event = read_record(bytes)?;
    Some(HaltPollRow {
        common: common_of(&e.hdr),
        grow: e.grow != 0,
        old_ns: e.old_ns,
        new_ns: e.new_ns,
    })
}

impl Row for HaltPollRow {
    fn monitor(&self) -> &'static str {
        "halt_poll"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:<6} {:>7} {:>11}     {:<11}",
            "TIME", "COMM", "PID/TID", "TYPE", "VCPU_ID", "OLD(ns)", "NEW(ns)"
        );
        format!("{base} VM")
    }

    fn row(&self, clock: &Clock) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:<6} {:>7} {:>11} --> {:<11}",
            clock.format(self.common.time_ns),
            self.common.comm,
            format!("{}/{}", self.common.pid, self.common.tid),
            if self.grow { "grow" } else { "shrink" },
            vcpu_cell(self.common.vcpu_id),
            self.old_ns,
            self.new_ns,
        );
        format!("{base} {}", self.common.vm.as_deref().unwrap_or("-"))
    }
}

/// One thread's halt-polling aggregates, cumulative or for one interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HaltPollTotals {
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// Window grows.
    pub grows: u64,
    /// Window shrinks.
    pub shrinks: u64,
    /// The window after the last change, ns.
    pub window_ns: u64,
}

/// Reads the kernel's cumulative per-thread halt-poll aggregates (`halt_poll_stats`).
pub fn read_totals(map: &libbpf_rs::MapHandle) -> anyhow::Result<Vec<HaltPollTotals>> {
    use libbpf_rs::{MapCore, MapFlags};
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(s) = read_record::<types::halt_poll_stats>(&v) else {
            continue;
        };
        out.push(HaltPollTotals {
            pid: s.pid,
            tid,
            comm: crate::bpf::comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            grows: s.grows,
            shrinks: s.shrinks,
            window_ns: s.window_ns,
        });
    }
    Ok(out)
}

/// Turns cumulative totals into per-interval figures.
#[derive(Default)]
pub struct HaltPollTracker {
    seen: std::collections::HashMap<u32, HaltPollTotals>,
}

impl HaltPollTracker {
    /// The interval's grows and shrinks per thread, with the current window
    /// (threads without changes in the interval left out).
    pub fn tick(&mut self, now: Vec<HaltPollTotals>) -> Vec<HaltPollTotals> {
        let mut out = Vec::new();
        for t in now {
            let (g, s) = match self.seen.get(&t.tid) {
                Some(prev) if prev.pid == t.pid => (
                    t.grows.saturating_sub(prev.grows),
                    t.shrinks.saturating_sub(prev.shrinks),
                ),
                _ => (t.grows, t.shrinks),
            };
            if g + s > 0 {
                out.push(HaltPollTotals {
                    grows: g,
                    shrinks: s,
                    ..t.clone()
                });
            }
            self.seen.insert(t.tid, t);
        }
        out
    }
}
