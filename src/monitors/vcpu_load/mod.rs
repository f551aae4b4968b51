//! vcpu-load (`-o`): per interval, how long each vCPU thread held a physical
//! CPU, split by CPU (kernel half: src/bpf/vcpu_load.bpf.c).

mod aggregate;
mod demo;
mod metrics;
mod read;
mod record;
mod seed;

pub use aggregate::{Load, quiet};
use read::snapshot;
pub use record::VcpuLoadRow;

use libbpf_rs::MapHandle;

use crate::backend::{
    Backend, SCHED_SWITCH, THREAD_EXIT, VCPU_RUN, learns_vcpu_threads, need, runs_on_switch,
};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{Fentry, Kprobe, RawTp, TpBtf};
use crate::monitors::families::Family;
use crate::monitors::ledger::{Change, Reading};
use crate::monitors::tracked::{Table, Tracked};
use crate::monitors::{Configure, Face, Half, Monitor, Part, Start, Thread, Tick, shrink};
use crate::output::Output;
use crate::output::monotonic_ns;
use crate::procfs::VmNames;

/// The vcpu-load monitor.
pub struct VcpuLoad;

static FACE: Face = Face {
    name: "vcpu_load",
    command: "vcpu-load",
    events_flag: "vcpu-load-events",
    short: 'o',
    about: "Per interval, how long each vCPU thread held a physical CPU",
    what: "vCPU load/put on physical CPUs",
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_VCPU_LOAD,
    backends: BACKENDS,
    vcpu_fields: aggregate::FIELDS,
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

/// The backend that derives load/put from vCPU ioctls and sched_switch.
const FROM_IOCTLS: &str = "tracepoint";

static BACKENDS: &[Backend] = &[
    Backend {
        name: "fentry",
        needs: &[
            need(&[("kvm_arch_vcpu_load", Fentry, "fentry_vcpu_load")]),
            need(&[("kvm_arch_vcpu_put", Fentry, "fentry_vcpu_put")]),
            THREAD_EXIT,
        ],
        quirks: &[],
        note: "fentry on the vendor-neutral kvm_arch_vcpu_load/kvm_arch_vcpu_put",
    },
    Backend {
        name: "kprobe",
        needs: &[
            need(&[("kvm_arch_vcpu_load", Kprobe, "kprobe_vcpu_load")]),
            need(&[("kvm_arch_vcpu_put", Kprobe, "kprobe_vcpu_put")]),
            THREAD_EXIT,
        ],
        quirks: &[],
        note: "kprobes on the vendor-neutral kvm_arch_vcpu_load/kvm_arch_vcpu_put",
    },
    Backend {
        name: FROM_IOCTLS,
        needs: &[
            VCPU_RUN,
            need(&[("kvm:kvm_userspace_exit", RawTp, "tp_vcpu_run_exit")]),
            // BTF-typed where the kernel has it: plain loads instead of
            // probe reads on a hook that fires for every thread on the host.
            need(&[
                ("sched:sched_switch", TpBtf, SCHED_SWITCH),
                ("sched:sched_switch", RawTp, "tp_sched_switch"),
            ]),
            THREAD_EXIT,
        ],
        quirks: &[],
        note: "loaded while the thread is inside KVM_RUN and on a CPU (kvm:kvm_fpu to kvm:kvm_userspace_exit + sched:sched_switch)",
    },
];

impl Monitor for VcpuLoad {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let ro = rodata(open)?;
        ro.load_from_ioctls = cx.resolved.is_some_and(|r| r.backend.name == FROM_IOCTLS);
        ro.learn_vcpu_threads |= learns_vcpu_threads(cx.resolved);
        ro.switch_vcpu_load = runs_on_switch(cx.resolved);
        if cx.resolved.is_none() {
            shrink(&mut open.maps.vcpu_cpu_ns)?;
        }
        seed::configure(open, cx.resolved.is_some());
        Ok(())
    }

    fn start(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        seed::run(skel);
        Ok(Box::new(Tracked::new(Maps::new(skel)?, cx.mode)))
    }
}

/// vcpu-load's maps: the load/put fields of the shared thread table and
/// the loaded time per CPU. A table every interval in the rows mode, its
/// part of the summary otherwise, from the same readings.
struct Maps {
    threads: MapHandle,
    cpu_ns: MapHandle,
}

impl Maps {
    fn new(skel: &KvmWatcherSkel<'_>) -> anyhow::Result<Maps> {
        Ok(Maps {
            threads: MapHandle::try_from(&skel.maps.vcpu_threads)?,
            cpu_ns: MapHandle::try_from(&skel.maps.vcpu_cpu_ns)?,
        })
    }
}

impl Table for Maps {
    type Counters = Load;
    const FAMILIES: &'static [Family<Load>] = metrics::FAMILIES;
    const ROWS_EVERY_INTERVAL: bool = true;

    fn read(&mut self, at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<Load>>> {
        let at = at_ns.unwrap_or_else(monotonic_ns);
        Ok(snapshot(&self.threads, &self.cpu_ns)?
            .iter()
            .map(|r| {
                let (who, counters, exited) = Load::of(r, at);
                Reading {
                    who,
                    counters,
                    exited,
                }
            })
            .collect())
    }

    fn forget(&mut self, gone: &[Thread]) {
        let tids: Vec<u32> = gone.iter().map(|t| t.tid).collect();
        read::forget(&self.threads, &self.cpu_ns, &tids);
    }

    fn aggregate(&mut self, changes: Vec<Change<Load>>, tick: &Tick) -> Part {
        Part {
            quiet: Some(aggregate::quiet),
            ..Part::of(
                aggregate::rows(changes, tick)
                    .into_iter()
                    .map(|r| (r.thread(), r)),
            )
        }
    }

    fn write_rows(
        &mut self,
        changes: Vec<Change<Load>>,
        tick: &Tick,
        out: &mut Output,
        names: &mut VmNames,
    ) {
        let mut rows = aggregate::rows(changes, tick);
        for r in &mut rows {
            r.vm = names.get(r.pid);
        }
        crate::monitors::write_periodic(out, tick, "vcpu-load", "(no vCPU was loaded)", &rows);
    }
}
