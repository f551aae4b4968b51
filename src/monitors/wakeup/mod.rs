//! wakeup (`-w`): vCPU halts and wake-ups, one row per `kvm:kvm_vcpu_wakeup`
//! or per-thread aggregates with a halt-duration histogram (kernel half:
//! src/bpf/wakeup.bpf.c).

mod aggregate;
mod metrics;
mod read;
mod record;

pub use aggregate::{HIST_SLOTS, WakeupTotals, WakeupTracker};
pub use read::read_totals;
pub use record::{WakeupRow, decode};

use libbpf_rs::MapHandle;

use crate::backend::{Backend, THREAD_EXIT, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{Fentry, Kprobe, RawTp};
use crate::monitors::threads::ExitedThreads;
use crate::monitors::{
    Configure, Face, Metrics, Mode, Monitor, Part, Start, Tick, Watching, shrink, write_with_vm,
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
};

const WAKEUP_TP: crate::backend::Need = need(&[("kvm:kvm_vcpu_wakeup", RawTp, "tp_vcpu_wakeup")]);

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
        ],
        quirks: &[],
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
        ],
        quirks: &[],
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from a kprobe on kvm_vcpu_halt/kvm_vcpu_block",
    },
    Backend {
        name: "tracepoint",
        needs: &[WAKEUP_TP],
        quirks: &[],
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from the vCPU the waking thread has loaded (KVM's preempt notifier, read with CO-RE)",
    },
];

impl Monitor for Wakeup {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn kind(&self) -> types::monitor_kind {
        types::monitor_kind::MONITOR_WAKEUP
    }

    fn backends(&self) -> &'static [Backend] {
        BACKENDS
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let aggregate = running && cx.mode.aggregates();
        let ro = rodata(open)?;
        ro.stream_wakeup = running && cx.mode == Mode::Rows;
        ro.aggregate_wakeup = aggregate;
        if !aggregate {
            shrink(&mut open.maps.wakeup_stats)?;
        }
        Ok(())
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        write_with_vm(decode(data), |r| &mut r.common, out, names)
    }

    fn watch(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        Ok(Box::new(Watch {
            stats: MapHandle::try_from(&skel.maps.wakeup_stats)?,
            summary: cx.mode == Mode::Summary,
            tracker: WakeupTracker::default(),
            exited: ExitedThreads::default(),
        }))
    }

    fn metrics(&self, skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        Ok(Box::new(metrics::WakeupMetrics::new(MapHandle::try_from(
            &skel.maps.wakeup_stats,
        )?)))
    }

    fn vcpu_fields(&self) -> &'static [&'static str] {
        aggregate::FIELDS
    }

    fn top_columns(&self) -> &'static [crate::monitors::Column] {
        aggregate::COLUMNS
    }
}

/// wakeup during a session: summaries come from `wakeup_stats`; rows need
/// nothing here (they arrive through the ring buffer).
struct Watch {
    stats: MapHandle,
    summary: bool,
    tracker: WakeupTracker,
    exited: ExitedThreads,
}

impl Watching for Watch {
    fn interval(&mut self, _tick: &Tick) -> anyhow::Result<Part> {
        if !self.summary {
            return Ok(Part::default());
        }
        let deltas = self.tracker.tick(read_totals(&self.stats)?);
        // Their last figures are read: forget threads that exited.
        self.exited.sweep(&self.stats);
        Ok(Part {
            vcpus: aggregate::vcpu_figures(deltas),
            ..Part::default()
        })
    }
}
