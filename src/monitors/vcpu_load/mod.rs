//! vcpu-load (`-o`): per interval, how long each vCPU thread held a physical
//! CPU, split by CPU (kernel half: src/bpf/vcpu_load.bpf.c).

mod aggregate;
mod demo;
mod metrics;
mod read;
mod record;
mod seed;

pub use aggregate::LoadTracker;
pub use read::{Reading, snapshot};
pub use record::VcpuLoadRow;

use libbpf_rs::MapHandle;

use crate::backend::{Backend, THREAD_EXIT, VCPU_IOCTL_ENTER, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{Fentry, Kprobe, RawTp, TpBtf};
use crate::monitors::Begun;
use crate::monitors::{Configure, Face, Metrics, Monitor, Part, Start, Tick, Watching, shrink};
use crate::output::Output;
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
            VCPU_IOCTL_ENTER,
            // BTF-typed where the kernel has them: plain loads instead of
            // probe reads on hooks that fire for every thread on the host.
            need(&[
                ("raw_syscalls:sys_exit", TpBtf, "tp_btf_sys_exit"),
                ("raw_syscalls:sys_exit", RawTp, "tp_sys_exit"),
            ]),
            need(&[
                ("sched:sched_switch", TpBtf, "tp_btf_sched_switch"),
                ("sched:sched_switch", RawTp, "tp_sched_switch"),
            ]),
            THREAD_EXIT,
        ],
        quirks: &[],
        note: "loaded while the thread is inside a vCPU ioctl and on a CPU (raw_syscalls:sys_enter/sys_exit + sched:sched_switch)",
    },
];

impl Monitor for VcpuLoad {
    fn demo(&self) -> Option<&'static crate::monitors::demo::DemoSection> {
        Some(&demo::SECTION)
    }

    fn face(&self) -> &'static Face {
        &FACE
    }

    fn kind(&self) -> types::monitor_kind {
        types::monitor_kind::MONITOR_VCPU_LOAD
    }

    fn backends(&self) -> &'static [Backend] {
        BACKENDS
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        rodata(open)?.load_from_ioctls = cx.resolved.is_some_and(|r| r.backend.name == FROM_IOCTLS);
        if cx.resolved.is_none() {
            shrink(&mut open.maps.vcpu_cpu_ns)?;
        }
        seed::configure(open, cx.resolved.is_some());
        Ok(())
    }

    fn watch(&self, skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        seed::run(skel);
        Ok(Box::new(Watch {
            threads: MapHandle::try_from(&skel.maps.vcpu_threads)?,
            cpu_ns: MapHandle::try_from(&skel.maps.vcpu_cpu_ns)?,
            tracker: LoadTracker::default(),
        }))
    }

    fn metrics(&self, skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        seed::run(skel);
        Ok(Box::new(metrics::VcpuLoadMetrics::new(
            MapHandle::try_from(&skel.maps.vcpu_threads)?,
            MapHandle::try_from(&skel.maps.vcpu_cpu_ns)?,
        )))
    }

    fn vcpu_fields(&self) -> &'static [&'static str] {
        aggregate::FIELDS
    }

    fn top_columns(&self) -> &'static [crate::monitors::Column] {
        aggregate::COLUMNS
    }
}

/// vcpu-load during a session: a table every interval (rows mode) or its
/// part of the summary, from the same readings.
struct Watch {
    threads: MapHandle,
    cpu_ns: MapHandle,
    tracker: LoadTracker,
}

impl Watch {
    /// The interval's rows; deletes threads that exited once their last
    /// figures are in them.
    fn rows(&mut self, tick: &Tick) -> anyhow::Result<Vec<VcpuLoadRow>> {
        let readings = snapshot(&self.threads, &self.cpu_ns)?;
        let (rows, exited) = self.tracker.tick(&readings, tick);
        read::forget(&self.threads, &self.cpu_ns, &exited);
        Ok(rows)
    }
}

impl Watching for Watch {
    fn begin(&mut self, start_ns: u64) -> anyhow::Result<Begun> {
        // What was loaded before (a pair the seeding opened at attach counts
        // only from here).
        let readings = snapshot(&self.threads, &self.cpu_ns)?;
        let start = Tick {
            ended: 0,
            now_ns: start_ns,
            interval_ns: 0,
        };
        self.tracker.tick(&readings, &start);
        Ok(Begun {
            rows_every_interval: true,
        })
    }

    fn interval(&mut self, tick: &Tick) -> anyhow::Result<Part> {
        Ok(Part {
            vcpus: aggregate::vcpu_figures(self.rows(tick)?),
            ..Part::default()
        })
    }

    fn interval_rows(
        &mut self,
        tick: &Tick,
        out: &mut Output,
        names: &mut VmNames,
    ) -> anyhow::Result<()> {
        let mut rows = self.rows(tick)?;
        for r in &mut rows {
            r.vm = names.get(r.pid);
        }
        crate::monitors::write_periodic(out, tick, "vcpu-load", "(no vCPU was loaded)", &rows);
        Ok(())
    }
}
