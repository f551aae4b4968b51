//! exits (`-e`): per vCPU and interval, every exit from the guest by reason
//! with the time KVM spent on it until the next guest entry, and every exit
//! to the VMM by reason with the time the VMM spent until it called KVM_RUN
//! again, with the I/O ports and guest-physical addresses behind them
//! (kernel half: src/bpf/exits.bpf.c). Where kvm:kvm_exit does not fire,
//! only the exits to the VMM are shown, and labelled so.

mod aggregate;
mod builtin;
mod counters;
mod demo;
mod metrics;
mod read;
mod reasons;
mod record;

pub use aggregate::{
    ExitTotals, ExitsInterval, Kind, ReasonFigures, TargetFigures, TargetKind, TargetReading,
};
pub use counters::ThreadExits;
pub use read::{read_targets, read_totals};
pub use reasons::{Reasons, Vendor, parse_exit_format, parse_userspace_format};
pub use record::{ExitRow, decode};

use std::sync::OnceLock;

use libbpf_rs::MapHandle;

use crate::backend::{Backend, Need, VCPU_RUN, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::RawTp;
use crate::monitors::families::Family;
use crate::monitors::ledger::{Change, Reading};
use crate::monitors::tracked::{Table, Tracked};
use crate::monitors::{
    Configure, Face, Half, LiveCheck, Mode, Monitor, Part, Start, Thread, Tick, shrink,
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
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_EXITS,
    backends: BACKENDS,
    vcpu_fields: aggregate::FIELDS,
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

/// The backend that hooks KVM's tracepoints only: the time in the VMM ends
/// where the next KVM_RUN has loaded the vCPU.
const KVM_ONLY: &str = "kvm-only";

/// exits' hooks, with the one where the time in the VMM ends (`run_start`).
const fn hooks(run_start: Need) -> [Need; 6] {
    [
        need(&[("kvm:kvm_userspace_exit", RawTp, "tp_exits_userspace")]),
        run_start,
        need(&[("kvm:kvm_exit", RawTp, "tp_exits_exit")]),
        need(&[("kvm:kvm_entry", RawTp, "tp_exits_entry")]),
        need(&[("kvm:kvm_pio", RawTp, "tp_exits_pio")]),
        need(&[("kvm:kvm_mmio", RawTp, "tp_exits_mmio")]),
    ]
}

static BACKENDS: &[Backend] = &[
    Backend {
        name: "tracepoint",
        needs: &hooks(need(&[("raw_syscalls:sys_enter", RawTp, "tp_sys_enter")])),
        quirks: &[],
        note: "exits from the guest from kvm:kvm_exit to kvm:kvm_entry (or the return to the VMM), exits to the VMM from kvm:kvm_userspace_exit to the next ioctl(KVM_RUN) (raw_syscalls:sys_enter: every system call of the host runs its program), the port of an I/O exit from its kvm_run, addresses from kvm:kvm_mmio, accesses from kvm:kvm_pio/kvm_mmio; reason names from tracefs, else built in",
    },
    Backend {
        name: KVM_ONLY,
        needs: &hooks(VCPU_RUN),
        quirks: &[],
        note: "as tracepoint, but nothing on the host's system calls: the time in the VMM ends where the next KVM_RUN has loaded the vCPU (kvm:kvm_fpu), so it includes the kernel's way back into KVM_RUN",
    },
];

/// The reason names, read once.
fn reason_names() -> &'static Reasons {
    static NAMES: OnceLock<Reasons> = OnceLock::new();
    NAMES.get_or_init(Reasons::of_host)
}

impl Monitor for Exits {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let ro = rodata(open)?;
        ro.stream_exits = running && cx.mode == Mode::Rows;
        ro.exits_on_kvm_run = cx.resolved.is_some_and(|r| r.backend.name == KVM_ONLY);
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

    fn start(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        Ok(Box::new(Tracked::new(Maps::new(skel)?, cx.mode)))
    }

    fn live_check(&self) -> Option<LiveCheck> {
        Some(live_check())
    }
}

/// Exits to the VMM the synthetic guest of the live check makes.
const LIVE_IO_EXITS: u32 = 200;

/// Runs the synthetic guest briefly: `LIVE_IO_EXITS` I/O exits to its VMM,
/// each an exit from the guest first; returns how many its VMM handled.
fn run_live_guest() -> anyhow::Result<u64> {
    let config = crate::vm::VmConfig {
        vcpus: 1,
        first_vcpu_id: 0,
        run_for: None,
        memory_mib: 1,
        slots: 1,
        passes: Some(LIVE_IO_EXITS / 4),
        halt_hz: None,
        halt_pattern: Vec::new(),
        halt_poll_ns: None,
        dirty_pages: 0,
        sweep: None,
        same_content: false,
        dirty_log: crate::vm::DirtyLog::Off,
        dirty_ring_entries: 4096,
        swap_slots_at: None,
        io_exits: 4,
        mmio_exits: 0,
        io_in: 0,
        mmio_spread: false,
        wait_for_signal: false,
        linger: false,
        json: false,
        timeline: None,
    };
    // In a thread of its own: running the guest blocks signals in the caller.
    std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut vm = crate::vm::SyntheticVm::build(&config)?;
        vm.run()?;
        let report = vm.stop()?;
        Ok(report.vcpus.iter().map(|v| v.exits_made.vmm_io).sum())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the synthetic guest panicked"))?
}

/// Whether kvm:kvm_exit and kvm:kvm_entry fire here: each counted by its
/// probe while the synthetic guest makes a known number of I/O exits.
pub fn live_check() -> LiveCheck {
    let mut silent = Vec::new();
    let mut seen = Vec::new();
    for target in ["kvm:kvm_exit", "kvm:kvm_entry"] {
        let Some(hook) = crate::hooks::find(target, RawTp) else {
            continue;
        };
        match crate::hooks::hits_during(hook, run_live_guest) {
            Err(e) => {
                return LiveCheck {
                    text: format!("not checked: {target} cannot be attached ({e})"),
                    silent: Vec::new(),
                };
            }
            Ok((_, Err(e))) => {
                return LiveCheck {
                    text: format!("not checked: the synthetic guest cannot run ({e:#})"),
                    silent: Vec::new(),
                };
            }
            Ok((0, Ok(made))) if made > 0 => {
                silent.push(target);
                seen.push(format!("{target} 0 times"));
            }
            Ok((hits, Ok(_))) => seen.push(format!("{target} {hits} times")),
        }
    }
    let counted = format!(
        "{} for {LIVE_IO_EXITS} I/O exits of the synthetic guest",
        seen.join(", ")
    );
    let text = if silent.is_empty() {
        format!("exits from the guest are seen ({counted}): all exits")
    } else {
        format!(
            "{} never fire on this host ({counted}): exits to the VMM only, exits from the guest are not shown",
            silent.join(" and ")
        )
    };
    LiveCheck { text, silent }
}

/// The exits monitor's maps, read as each thread's cumulative exits.
struct Maps {
    stats: MapHandle,
    targets: MapHandle,
    threads: MapHandle,
    reasons: Reasons,
}

impl Maps {
    fn new(skel: &KvmWatcherSkel<'_>) -> anyhow::Result<Maps> {
        Ok(Maps {
            stats: MapHandle::try_from(&skel.maps.exits_stats)?,
            targets: MapHandle::try_from(&skel.maps.exits_targets)?,
            threads: MapHandle::try_from(&skel.maps.exits_threads)?,
            reasons: reason_names().clone(),
        })
    }
}

impl Table for Maps {
    type Counters = ThreadExits;
    const FAMILIES: &'static [Family<ThreadExits>] = metrics::FAMILIES;
    // Rows carry the exits, but the kernel counts them per thread anyway.
    const PRUNES_ROWS: bool = true;

    fn read(&mut self, _at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<ThreadExits>>> {
        let threads = read::read_threads(&self.threads)?;
        let totals = read_totals(&self.stats)?;
        let targets = read_targets(&self.targets)?;
        let rows = counters::by_thread(threads, totals, targets, &self.reasons);
        Ok(Reading::all(rows, |t| t.thread.clone()))
    }

    fn forget(&mut self, gone: &[Thread]) {
        let tids: Vec<u32> = gone.iter().map(|t| t.tid).collect();
        read::forget(&self.stats, &self.targets, &self.threads, &tids);
    }

    fn aggregate(&mut self, changes: Vec<Change<ThreadExits>>, tick: &Tick) -> Part {
        aggregate::part(changes, tick)
    }
}

#[cfg(test)]
mod backend_tests {
    /// Only the tracepoint backend runs on every system call, so serve,
    /// which spares them, picks kvm-only.
    #[test]
    fn only_the_exact_backend_runs_on_every_syscall() {
        let on: Vec<_> = super::BACKENDS
            .iter()
            .map(|b| (b.name, b.on_every_syscall()))
            .collect();
        assert_eq!(on, [("tracepoint", true), (super::KVM_ONLY, false)]);
    }
}
