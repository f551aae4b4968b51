//! halt-poll's ring-buffer record: one row per `kvm:kvm_halt_poll_ns`.

use serde::Serialize;

use crate::bpf::{read_record, types};
use crate::monitors::{common_of, vcpu_cell};
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
