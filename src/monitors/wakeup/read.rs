//! The only code that reads wakeup's aggregates: `wakeup_stats`, and where
//! they live in task storage, `wakeup_task` through its iterator.

use super::aggregate::WakeupTotals;
use crate::bpf::{KvmWatcherSkel, types};
use crate::monitors::Start;
use crate::monitors::interval::names_thread;
use crate::monitors::ledger::Reading;
use crate::monitors::task_aggregates::{InTask, TaskAggregates};
use crate::output::monotonic_ns;

/// The programs that keep wakeup's aggregates in task storage (see
/// src/bpf/wakeup.bpf.c).
pub const IN_TASK: InTask = InTask {
    program: "tp_btf_vcpu_wakeup",
    exit: "tp_btf_wakeup_exit",
};

/// sched_switch's programs that mark halts in progress, with aggregates in
/// task storage (a part of the one program there) and in the hash.
pub const SWITCH_IN_TASK: &str = crate::backend::SCHED_SWITCH;
pub const SWITCH: &str = "tp_wakeup_switch";

names_thread!(types::wakeup_stats);

/// The aggregates of a session or an exporter.
pub fn source(skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<TaskAggregates> {
    IN_TASK.source(
        "wakeup",
        &skel.maps.wakeup_stats,
        &skel.progs.iter_wakeup_task,
        cx,
    )
}

/// The kernel's cumulative per-thread wake-up aggregates, halts in progress
/// charged up to `at` (CLOCK_MONOTONIC; None: the end of the read, so no
/// halt in progress began after it). An interval passes its own end, so a
/// halt is charged to the interval boundaries the records state.
pub fn totals(
    source: &TaskAggregates,
    at: Option<u64>,
) -> anyhow::Result<Vec<Reading<WakeupTotals>>> {
    let entries = source.read::<types::wakeup_stats>()?;
    let read_at = at.unwrap_or_else(monotonic_ns);
    Ok(entries
        .into_iter()
        .map(|r| {
            r.map(|s| WakeupTotals {
                wakeups: s.wakeups,
                waited: s.waited,
                invalid: s.invalid,
                halt_ns: s.halt_ns,
                // Halts since attach, and the one in progress since
                // `halt_at` (0: none) for its time so far.
                halted_ns: s.halt_ns.saturating_sub(s.before_attach_ns)
                    + if s.halt_at == 0 {
                        0
                    } else {
                        read_at.saturating_sub(s.halt_at)
                    },
                hist: s.hist.to_vec(),
            })
        })
        .collect())
}
