//! exits (`-e`): per vCPU and interval, every exit from the guest by reason
//! with the time KVM spent on it until the next guest entry, and every exit
//! to the VMM by reason with the time the VMM spent until it called KVM_RUN
//! again, with the I/O ports and guest-physical addresses behind them
//! (kernel half: src/bpf/exits.bpf.c). Where kvm:kvm_exit does not fire,
//! only the exits to the VMM are shown, and labelled so.

mod aggregate;
mod builtin;
mod metrics;
mod read;
mod reasons;
mod record;

pub use aggregate::{
    ExitTotals, ExitsInterval, ExitsTracker, Kind, ReasonFigures, TargetFigures, TargetKind,
    TargetReading,
};
pub use read::{read_targets, read_totals};
pub use reasons::{Reasons, Vendor, parse_exit_format, parse_userspace_format};
pub use record::{ExitRow, decode};

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libbpf_rs::MapHandle;

use crate::backend::{Backend, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::RawTp;
use crate::monitors::{
    Configure, Face, Metrics, Mode, Monitor, Part, Start, Tick, Watching, shrink,
};
use crate::output::Output;
use crate::procfs::VmNames;

/// The exits monitor.
pub struct Exits;

static FACE: Face = Face {
    name: "exits",
    command: "exits",
    events_flag: "exits-events",
    short: 'e',
    about: "Per interval, each vCPU's exits by reason, with the time in KVM and in the VMM",
    what: "VM exits by reason, with the time KVM and the VMM spend on each",
};

static BACKENDS: &[Backend] = &[Backend {
    name: "tracepoint",
    needs: &[
        need(&[("kvm:kvm_userspace_exit", RawTp, "tp_exits_userspace")]),
        need(&[("raw_syscalls:sys_enter", RawTp, "tp_exits_sys_enter")]),
        need(&[("kvm:kvm_exit", RawTp, "tp_exits_exit")]),
        need(&[("kvm:kvm_entry", RawTp, "tp_exits_entry")]),
        need(&[("kvm:kvm_pio", RawTp, "tp_exits_pio")]),
        need(&[("kvm:kvm_mmio", RawTp, "tp_exits_mmio")]),
    ],
    quirks: &[],
    note: "exits from the guest from kvm:kvm_exit to kvm:kvm_entry (or the return to the VMM), exits to the VMM from kvm:kvm_userspace_exit to the next ioctl(KVM_RUN), ports and addresses from kvm:kvm_pio/kvm_mmio; reason names from tracefs, else built in",
}];

/// The reason names, read once.
fn reason_names() -> &'static Reasons {
    static NAMES: OnceLock<Reasons> = OnceLock::new();
    NAMES.get_or_init(Reasons::of_host)
}

impl Monitor for Exits {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn kind(&self) -> types::monitor_kind {
        types::monitor_kind::MONITOR_EXITS
    }

    fn backends(&self) -> &'static [Backend] {
        BACKENDS
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let ro = rodata(open)?;
        ro.stream_exits = running && cx.mode == Mode::Rows;
        if !running {
            shrink(&mut open.maps.exits_stats)?;
            shrink(&mut open.maps.exits_threads)?;
            shrink(&mut open.maps.exits_targets)?;
        }
        Ok(())
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        decode(data, reason_names())
            .map(|mut r| {
                r.common.vm = names.get(r.common.pid);
                out.record(&r);
            })
            .is_some()
    }

    fn watch(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        Ok(Box::new(Watch {
            maps: Maps::new(skel)?,
            summary: cx.mode == Mode::Summary,
            tracker: ExitsTracker::new(reason_names().clone()),
            next_prune: cx.start + Duration::from_secs(5),
        }))
    }

    fn metrics(&self, skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        Ok(Box::new(metrics::ExitsMetrics::new(
            Maps::new(skel)?,
            reason_names().clone(),
        )))
    }

    fn vcpu_fields(&self) -> &'static [&'static str] {
        aggregate::FIELDS
    }

    fn top_columns(&self) -> &'static [crate::monitors::Column] {
        aggregate::COLUMNS
    }
}

/// The exits monitor's maps.
struct Maps {
    stats: MapHandle,
    targets: MapHandle,
    threads: MapHandle,
    /// Threads found gone at the previous sweep.
    gone: Vec<u32>,
}

impl Maps {
    fn new(skel: &KvmWatcherSkel<'_>) -> anyhow::Result<Maps> {
        Ok(Maps {
            stats: MapHandle::try_from(&skel.maps.exits_stats)?,
            targets: MapHandle::try_from(&skel.maps.exits_targets)?,
            threads: MapHandle::try_from(&skel.maps.exits_threads)?,
            gone: Vec::new(),
        })
    }

    /// After a reading: forgets threads found gone at the previous one
    /// (their last figures are read); returns them.
    fn sweep(&mut self) -> Vec<u32> {
        let gone = std::mem::replace(&mut self.gone, read::gone_threads(&self.threads));
        read::forget(&self.stats, &self.targets, &self.threads, &gone);
        gone
    }
}

/// The exits monitor during a session.
struct Watch {
    maps: Maps,
    summary: bool,
    tracker: ExitsTracker,
    next_prune: Instant,
}

impl Watching for Watch {
    fn interval(&mut self, tick: &Tick) -> anyhow::Result<Part> {
        if !self.summary {
            return Ok(Part::default());
        }
        let totals = read_totals(&self.maps.stats)?;
        let targets = read_targets(&self.maps.targets)?;
        let intervals = self.tracker.tick(totals, targets, tick);
        let gone = self.maps.sweep();
        self.tracker.forget(&gone);
        Ok(Part {
            vcpus: aggregate::vcpu_figures(intervals),
            ..Part::default()
        })
    }

    fn poll(&mut self, now: Instant, _pruning: bool) -> anyhow::Result<()> {
        // Rows carry the exits: only exited threads' entries need forgetting.
        if !self.summary && now >= self.next_prune {
            self.maps.sweep();
            self.next_prune = now + Duration::from_secs(5);
        }
        Ok(())
    }
}
