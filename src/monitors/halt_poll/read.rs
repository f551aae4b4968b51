//! The only code that reads halt-poll's aggregates: `halt_poll_stats`, and
//! where they live in task storage, `halt_poll_task` through its iterator.

use super::aggregate::HaltPollTotals;
use crate::bpf::{KvmWatcherSkel, types};
use crate::monitors::Start;
use crate::monitors::interval::names_thread;
use crate::monitors::ledger::Reading;
use crate::monitors::task_aggregates::{InTask, TaskAggregates};

/// The programs that keep halt-poll's aggregates in task storage (see
/// src/bpf/halt_poll.bpf.c).
pub const IN_TASK: InTask = InTask {
    program: "tp_btf_halt_poll_ns",
    exit: "tp_btf_halt_poll_exit",
};

names_thread!(types::halt_poll_stats);

/// The aggregates of a session or an exporter.
pub fn source(skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<TaskAggregates> {
    IN_TASK.source(
        "halt_poll",
        &skel.maps.halt_poll_stats,
        &skel.progs.iter_halt_poll_task,
        cx,
    )
}

/// The kernel's cumulative per-thread halt-poll aggregates.
pub fn totals(source: &TaskAggregates) -> anyhow::Result<Vec<Reading<HaltPollTotals>>> {
    Ok(source
        .read::<types::halt_poll_stats>()?
        .into_iter()
        .map(|r| {
            r.map(|s| HaltPollTotals {
                grows: s.grows,
                shrinks: s.shrinks,
                window_ns: s.window_ns,
            })
        })
        .collect())
}
