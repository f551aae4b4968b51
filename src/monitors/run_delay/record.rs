//! run-delay's ring-buffer record: one row per wait of a vCPU thread on a
//! run queue, at the moment it got its CPU.

use serde::Serialize;

use crate::bpf::{comm_to_string, read_record, types};
use crate::monitors::{common_of, vcpu_cell};
use crate::output::{Clock, Common, Row, terminal_safe as printable};

/// The name of a wait's cause (`enum run_delay_cause`).
pub fn cause_name(cause: u32) -> &'static str {
    if cause == types::run_delay_cause::RUN_DELAY_PREEMPTED.0 {
        "preempted"
    } else {
        "woken"
    }
}

/// One wait.
#[derive(Clone, Debug, Serialize)]
pub struct RunDelayRow {
    /// Common fields (the time is the switch-in).
    #[serde(flatten)]
    pub common: Common,
    /// How long the thread was runnable without running, ns, by the wall
    /// clock from the hook that saw the wait begin.
    pub delay_ns: u64,
    /// The kernel's accounting of the same arrival (schedstat's clock), ns.
    pub sched_delay_ns: u64,
    /// Why it began: `woken` or `preempted`.
    pub cause: &'static str,
    /// The CPU it got.
    pub cpu: u32,
    /// The task that ran on that CPU just before it: process...
    pub prev_pid: u32,
    /// ... thread ...
    pub prev_tid: u32,
    /// ... and name.
    pub prev_comm: String,
}

/// Decodes a `struct run_delay_event`.
pub fn decode(bytes: &[u8]) -> Option<RunDelayRow> {
    let e: types::run_delay_event = read_record(bytes)?;
    Some(RunDelayRow {
        common: common_of(&e.hdr),
        delay_ns: e.delay_ns,
        sched_delay_ns: e.sched_delay_ns,
        cause: cause_name(e.cause),
        cpu: e.cpu,
        prev_pid: e.prev_pid,
        prev_tid: e.prev_tid,
        prev_comm: comm_to_string(&e.prev_comm),
    })
}

impl Row for RunDelayRow {
    fn monitor(&self) -> &'static str {
        "run_delay"
    }

    fn header(&self) -> String {
        format!(
            "{:<15} {:<16} {:>15} {:>7} {:>11} {:<9} {:>4} {:<32} VM",
            "TIME", "COMM", "PID/TID", "VCPU_ID", "WAIT(ms)", "CAUSE", "CPU", "PREV(PID/TID)"
        )
    }

    fn row(&self, clock: &Clock) -> String {
        format!(
            "{:<15} {:<16} {:>15} {:>7} {:>11.6} {:<9} {:>4} {:<32} {}",
            clock.format(self.common.time_ns),
            printable(&self.common.comm),
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            self.delay_ns as f64 / 1e6,
            self.cause,
            self.cpu,
            format!(
                "{} ({}/{})",
                printable(&self.prev_comm),
                self.prev_pid,
                self.prev_tid
            ),
            printable(self.common.vm.as_deref().unwrap_or("-")),
        )
    }
}
