//! halt-poll (`-n`): halt-polling window changes, one row per
//! `kvm:kvm_halt_poll_ns` or per-thread grows, shrinks and the window now
//! (kernel half: src/bpf/halt_poll.bpf.c).

mod aggregate;
mod demo;
mod metrics;
mod read;
mod record;

pub use aggregate::{HaltPollTotals, quiet};
pub use record::{HaltPollRow, decode};

use crate::backend::{Backend, Quirk, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{RawTp, TpBtf};
use crate::monitors::families::Family;
use crate::monitors::ledger::{Change, Reading};
use crate::monitors::task_aggregates::TaskAggregates;
use crate::monitors::tracked::{Table, Tracked};
use crate::monitors::{
    Configure, Face, Half, Mode, Monitor, Part, Start, Thread, Tick, shrink, write_with_vm,
};
use crate::output::Output;
use crate::procfs::VmNames;

/// The halt-poll monitor.
pub struct HaltPoll;

static FACE: Face = Face {
    name: "halt_poll",
    command: "halt-poll",
    events_flag: "halt-poll-events",
    short: 'n',
    about: "One row per halt-polling window change (grow or shrink)",
    what: "halt-polling window changes",
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_HALT_POLL,
    backends: BACKENDS,
    vcpu_fields: aggregate::FIELDS,
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

static BACKENDS: &[Backend] = &[Backend {
    name: "tracepoint",
    needs: &[
        // BTF-typed with aggregates in task storage where the kernel has
        // both, raw otherwise (src/bpf/halt_poll.bpf.c).
        need(&[
            ("kvm:kvm_halt_poll_ns", TpBtf, read::IN_TASK.program),
            ("kvm:kvm_halt_poll_ns", RawTp, "tp_halt_poll_ns"),
        ]),
        // With task storage, an exiting thread's aggregate moves to the
        // hash; without, the generic exit hook (harmless here).
        need(&[
            ("sched:sched_process_exit", TpBtf, read::IN_TASK.exit),
            ("sched:sched_process_exit", RawTp, "tp_process_exit"),
        ]),
    ],
    // Task storage from tracing programs came in Linux 5.12.
    quirks: &[Quirk {
        before: (5, 12),
        replace: &[
            (read::IN_TASK.program, "tp_halt_poll_ns"),
            (read::IN_TASK.exit, "tp_process_exit"),
        ],
        also: &[],
    }],
    note: "kvm:kvm_halt_poll_ns carries the vCPU id; summaries in task storage where it is tp_btf (Linux 5.12+), in a hash by thread id otherwise",
}];

impl Monitor for HaltPoll {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let aggregate = running && cx.mode.aggregates();
        let ro = rodata(open)?;
        ro.stream_halt_poll = running && cx.mode == Mode::Rows;
        ro.aggregate_halt_poll = aggregate;
        if !aggregate {
            shrink(&mut open.maps.halt_poll_stats)?;
        }
        read::IN_TASK.configure(
            &mut open.maps.halt_poll_task,
            &mut open.progs.iter_halt_poll_task,
            cx,
        )
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        write_with_vm(decode(data), |r| &mut r.common, out, names)
    }

    fn start(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        Ok(Box::new(Tracked::new(
            Windows(read::source(skel, cx)?),
            cx.mode,
        )))
    }
}

/// halt-poll's figures: the kernel's per-thread aggregates (rows need
/// nothing here, they arrive through the ring buffer).
struct Windows(TaskAggregates);

impl Table for Windows {
    type Counters = HaltPollTotals;
    const FAMILIES: &'static [Family<HaltPollTotals>] = metrics::FAMILIES;

    fn read(&mut self, _at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<HaltPollTotals>>> {
        read::totals(&self.0)
    }

    fn forget(&mut self, gone: &[Thread]) {
        self.0.forget(gone);
    }

    fn aggregate(&mut self, changes: Vec<Change<HaltPollTotals>>, _tick: &Tick) -> Part {
        aggregate::part(changes)
    }
}
