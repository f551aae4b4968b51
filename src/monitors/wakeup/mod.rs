//! wakeup (`-w`): vCPU halts and wake-ups, one row per `kvm:kvm_vcpu_wakeup`
//! or per-thread aggregates with a halt-duration histogram (kernel half:
//! src/bpf/wakeup.bpf.c).

mod aggregate;
mod demo;
mod metrics;
mod read;
mod record;
mod seed;

pub use aggregate::{HIST_SLOTS, WakeupTotals};
pub use record::{WakeupRow, decode};

use crate::monitors::task_aggregates::TaskAggregates;

use crate::backend::{Backend, Need, Quirk, THREAD_EXIT, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{Fentry, Kprobe, RawTp, TpBtf};
use crate::monitors::families::Family;
use crate::monitors::ledger::{Change, Reading};
use crate::monitors::tracked::{Table, Tracked};
use crate::monitors::{
    Configure, Face, Half, Mode, Monitor, Part, Start, Thread, Tick, shrink, write_with_vm,
};
use crate::output::Output;
use crate::procfs::VmNames;

/// The wakeup monitor.
pub struct Wakeup;

static FACE: Face = Face {
    name: "wakeup",
    command: "wakeup",
    events_flag: "wakeup-events",
    short: 'w',
    about: "One row per vCPU wake-up: halt duration, poll or wait, valid or not",
    what: "vCPU halt and wake-up events",
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_WAKEUP,
    backends: BACKENDS,
    vcpu_fields: aggregate::FIELDS,
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

/// The wake-up tracepoint: BTF-typed with aggregates in task storage where
/// the kernel has both, raw otherwise (src/bpf/wakeup.bpf.c).
const WAKEUP_TP: Need = need(&[
    ("kvm:kvm_vcpu_wakeup", TpBtf, read::IN_TASK.program),
    ("kvm:kvm_vcpu_wakeup", RawTp, "tp_vcpu_wakeup"),
]);
/// With task storage, an exiting thread's aggregate moves to the hash;
/// without, the generic exit hook (harmless where nothing else needs it).
const WAKEUP_EXIT: Need = need(&[
    ("sched:sched_process_exit", TpBtf, read::IN_TASK.exit),
    ("sched:sched_process_exit", RawTp, "tp_process_exit"),
]);
/// A halt in progress: a vCPU thread that sleeps in KVM's halt, charged as
/// it goes (see src/bpf/wakeup.bpf.c).
const HALT_SLEEP: Need = need(&[
    ("sched:sched_switch", TpBtf, read::SWITCH_IN_TASK),
    ("sched:sched_switch", RawTp, read::SWITCH),
]);
/// Task storage from tracing programs came in Linux 5.12.
const NO_TASK_STORAGE: Quirk = Quirk {
    before: (5, 12),
    replace: &[
        (read::IN_TASK.program, "tp_vcpu_wakeup"),
        (read::IN_TASK.exit, "tp_process_exit"),
        (read::SWITCH_IN_TASK, read::SWITCH),
    ],
    also: &[],
};

static BACKENDS: &[Backend] = &[
    Backend {
        name: "fentry",
        needs: &[
            WAKEUP_TP,
            need(&[
                ("kvm_vcpu_halt", Fentry, "fentry_vcpu_halt"),
                ("kvm_vcpu_block", Fentry, "fentry_vcpu_block"),
            ]),
            THREAD_EXIT,
            WAKEUP_EXIT,
            HALT_SLEEP,
        ],
        quirks: &[NO_TASK_STORAGE],
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from fentry on kvm_vcpu_halt/kvm_vcpu_block",
    },
    Backend {
        name: "kprobe",
        needs: &[
            WAKEUP_TP,
            need(&[
                ("kvm_vcpu_halt", Kprobe, "kprobe_vcpu_halt"),
                ("kvm_vcpu_block", Kprobe, "kprobe_vcpu_block"),
            ]),
            THREAD_EXIT,
            WAKEUP_EXIT,
            HALT_SLEEP,
        ],
        quirks: &[NO_TASK_STORAGE],
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from a kprobe on kvm_vcpu_halt/kvm_vcpu_block",
    },
    Backend {
        name: "tracepoint",
        needs: &[WAKEUP_TP, WAKEUP_EXIT, HALT_SLEEP],
        quirks: &[NO_TASK_STORAGE],
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from the vCPU the waking thread has loaded (KVM's preempt notifier, read with CO-RE); summaries in task storage where kvm_vcpu_wakeup is tp_btf (Linux 5.12+), in a hash by thread id otherwise",
    },
];

impl Monitor for Wakeup {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let aggregate = running && cx.mode.aggregates();
        let ro = rodata(open)?;
        ro.stream_wakeup = running && cx.mode == Mode::Rows;
        ro.aggregate_wakeup = aggregate;
        ro.switch_wakeup = crate::backend::runs_on_switch(cx.resolved);
        if !aggregate {
            shrink(&mut open.maps.wakeup_stats)?;
        }
        seed::configure(open, cx);
        read::IN_TASK.configure(
            &mut open.maps.wakeup_task,
            &mut open.progs.iter_wakeup_task,
            cx,
        )
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        write_with_vm(decode(data), |r| &mut r.common, out, names)
    }

    /// Halts in progress at attach are seeded first.
    fn start(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        seed::run(skel, cx);
        Ok(Box::new(Tracked::new(
            Halts(read::source(skel, cx)?),
            cx.mode,
        )))
    }
}

/// wakeup's figures: the kernel's per-thread aggregates (rows need
/// nothing here, they arrive through the ring buffer).
struct Halts(TaskAggregates);

impl Table for Halts {
    type Counters = WakeupTotals;
    const FAMILIES: &'static [Family<WakeupTotals>] = metrics::FAMILIES;

    fn read(&mut self, at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<WakeupTotals>>> {
        read::totals(&self.0, at_ns)
    }

    fn forget(&mut self, gone: &[Thread]) {
        self.0.forget(gone);
    }

    fn aggregate(&mut self, changes: Vec<Change<WakeupTotals>>, _tick: &Tick) -> Part {
        aggregate::part(changes)
    }
}
