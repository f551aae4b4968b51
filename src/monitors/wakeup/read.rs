//! The only code that reads wakeup's aggregates: `wakeup_stats`, and where
//! they live in task storage, `wakeup_task` through its iterator.

use super::aggregate::WakeupTotals;
use crate::bpf::{KvmWatcherSkel, comm_to_string, types};
use crate::monitors::Start;
use crate::monitors::task_aggregates::{InTask, TaskAggregates};

/// The programs that keep wakeup's aggregates in task storage (see
/// src/bpf/wakeup.bpf.c).
pub const IN_TASK: InTask = InTask {
    program: "tp_btf_vcpu_wakeup",
    exit: "tp_btf_wakeup_exit",
};

/// The aggregates of a session or an exporter.
pub fn source(skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<TaskAggregates> {
    IN_TASK.source(
        "wakeup",
        &skel.maps.wakeup_stats,
        &skel.progs.iter_wakeup_task,
        cx,
    )
}

/// The kernel's cumulative per-thread wake-up aggregates.
pub fn read_totals(source: &TaskAggregates) -> anyhow::Result<Vec<WakeupTotals>> {
    Ok(source
        .read::<types::wakeup_stats>()?
        .into_iter()
        .map(|(tid, s)| WakeupTotals {
            pid: s.pid,
            tid,
            comm: comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            wakeups: s.wakeups,
            waited: s.waited,
            invalid: s.invalid,
            halt_ns: s.halt_ns,
            hist: s.hist.to_vec(),
        })
        .collect())
}
