//! Which kernel hooks each monitor uses: one ordered table of backends per
//! monitor. The first backend whose hooks all load and attach wins (that is
//! what `doctor` reports); `--backend NAME` forces one.

use serde::Serialize;

use crate::hooks::{AttachKind, Prober};

/// The four monitors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// vCPU halt and wake-up (`kvm:kvm_vcpu_wakeup`).
    Wakeup,
    /// Halt-polling window changes (`kvm:kvm_halt_poll_ns`).
    HaltPoll,
    /// Dirty guest pages.
    Dirty,
    /// vCPU load/put on physical CPUs.
    VcpuLoad,
}

impl Monitor {
    /// All monitors, in the seed tool's order.
    pub const ALL: [Monitor; 4] = [
        Monitor::Wakeup,
        Monitor::HaltPoll,
        Monitor::Dirty,
        Monitor::VcpuLoad,
    ];

    /// The name used in JSON (`"monitor"`) and in `doctor`.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::Wakeup => "wakeup",
            Monitor::HaltPoll => "halt_poll",
            Monitor::Dirty => "dirty",
            Monitor::VcpuLoad => "vcpu_load",
        }
    }

    /// Index into the BPF `counters` map (`enum monitor_kind`).
    pub fn kind(self) -> u32 {
        match self {
            Monitor::Wakeup => 0,
            Monitor::HaltPoll => 1,
            Monitor::Dirty => 2,
            Monitor::VcpuLoad => 3,
        }
    }

    /// This monitor's backends, most preferred first.
    pub fn backends(self) -> &'static [Backend] {
        match self {
            Monitor::Wakeup => WAKEUP,
            Monitor::HaltPoll => HALT_POLL,
            Monitor::Dirty => DIRTY,
            Monitor::VcpuLoad => VCPU_LOAD,
        }
    }
}

/// One hook a backend needs: alternatives, the first available one is used
/// (e.g. `kvm_vcpu_halt`, or `kvm_vcpu_block` before Linux 5.17).
#[derive(Debug)]
pub struct Need {
    /// (hook target, attach kind, program in kvm_watcher.bpf.c), in order of preference.
    pub alternatives: &'static [(&'static str, AttachKind, &'static str)],
}

/// A way for a monitor to get its data.
#[derive(Debug)]
pub struct Backend {
    /// Name shown by `doctor` and accepted by `--backend`.
    pub name: &'static str,
    /// Hooks it needs.
    pub needs: &'static [Need],
    /// Derive vCPU load/put from vCPU ioctls + sched_switch (tracepoint vcpu-load).
    pub load_from_ioctls: bool,
    /// What it can and cannot see, for `doctor`.
    pub note: &'static str,
}

use AttachKind::{Fentry, Kprobe, RawTp};

const fn need(alternatives: &'static [(&'static str, AttachKind, &'static str)]) -> Need {
    Need { alternatives }
}

/// Forgets exiting vCPU threads; every backend keeps the thread table.
const THREAD_EXIT: Need = need(&[("sched:sched_process_exit", RawTp, "tp_process_exit")]);
/// Learns vCPU identities from vCPU ioctls (tracepoints only).
const VCPU_IOCTL_ENTER: Need = need(&[("raw_syscalls:sys_enter", RawTp, "tp_sys_enter")]);
const WAKEUP_TP: Need = need(&[("kvm:kvm_vcpu_wakeup", RawTp, "tp_vcpu_wakeup")]);

const WAKEUP: &[Backend] = &[
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
        load_from_ioctls: false,
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
        load_from_ioctls: false,
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from a kprobe on kvm_vcpu_halt/kvm_vcpu_block",
    },
    Backend {
        name: "tracepoint",
        needs: &[WAKEUP_TP],
        load_from_ioctls: false,
        note: "rows from kvm:kvm_vcpu_wakeup, vCPU id from the vCPU the waking thread has loaded (KVM's preempt notifier, read with CO-RE)",
    },
];

const HALT_POLL: &[Backend] = &[Backend {
    name: "tracepoint",
    needs: &[need(&[("kvm:kvm_halt_poll_ns", RawTp, "tp_halt_poll_ns")])],
    load_from_ioctls: false,
    note: "kvm:kvm_halt_poll_ns carries the vCPU id",
}];

const DIRTY: &[Backend] = &[
    Backend {
        name: "fentry",
        needs: &[need(&[(
            "mark_page_dirty_in_slot",
            Fentry,
            "fentry_mark_page_dirty",
        )])],
        load_from_ioctls: false,
        note: "every logged write (bitmap and ring VMs) through mark_page_dirty_in_slot",
    },
    Backend {
        name: "kprobe",
        needs: &[need(&[(
            "mark_page_dirty_in_slot",
            Kprobe,
            "kprobe_mark_page_dirty",
        )])],
        load_from_ioctls: false,
        note: "every logged write (bitmap and ring VMs) through a kprobe on mark_page_dirty_in_slot",
    },
    Backend {
        name: "tracepoint",
        needs: &[
            need(&[("kvm:kvm_dirty_ring_push", RawTp, "tp_dirty_ring_push")]),
            VCPU_IOCTL_ENTER,
            THREAD_EXIT,
        ],
        load_from_ioctls: false,
        note: "kvm:kvm_dirty_ring_push sees only VMs that use the dirty ring (KVM_CAP_DIRTY_LOG_RING); writes of VMs with bitmap dirty logging are invisible (the vCPU ioctl hook spots such VMs and warns)",
    },
];

const VCPU_LOAD: &[Backend] = &[
    Backend {
        name: "fentry",
        needs: &[
            need(&[("kvm_arch_vcpu_load", Fentry, "fentry_vcpu_load")]),
            need(&[("kvm_arch_vcpu_put", Fentry, "fentry_vcpu_put")]),
            THREAD_EXIT,
        ],
        load_from_ioctls: false,
        note: "fentry on the vendor-neutral kvm_arch_vcpu_load/kvm_arch_vcpu_put",
    },
    Backend {
        name: "kprobe",
        needs: &[
            need(&[("kvm_arch_vcpu_load", Kprobe, "kprobe_vcpu_load")]),
            need(&[("kvm_arch_vcpu_put", Kprobe, "kprobe_vcpu_put")]),
            THREAD_EXIT,
        ],
        load_from_ioctls: false,
        note: "kprobes on the vendor-neutral kvm_arch_vcpu_load/kvm_arch_vcpu_put",
    },
    Backend {
        name: "tracepoint",
        needs: &[
            VCPU_IOCTL_ENTER,
            need(&[("raw_syscalls:sys_exit", RawTp, "tp_sys_exit")]),
            need(&[("sched:sched_switch", RawTp, "tp_sched_switch")]),
            THREAD_EXIT,
        ],
        load_from_ioctls: true,
        note: "loaded while the thread is inside a vCPU ioctl and on a CPU (raw_syscalls:sys_enter/sys_exit + sched:sched_switch)",
    },
];

/// A backend chosen for a monitor, with the programs it turns on.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The monitor.
    pub monitor: Monitor,
    /// The backend.
    pub backend: &'static Backend,
    /// Programs of kvm_watcher.bpf.c to load and attach.
    pub programs: Vec<&'static str>,
    /// The hooks used, as `target (kind)`.
    pub hooks: Vec<String>,
}

/// Why a backend cannot be used.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// The backend.
    pub backend: &'static str,
    /// The first hook it needs that is unavailable, and why.
    pub reason: String,
}

/// Resolves the programs of `backend`, or says which hook is missing.
pub fn resolve(
    monitor: Monitor,
    backend: &'static Backend,
    prober: &mut Prober,
) -> Result<Choice, Refusal> {
    let mut programs = Vec::new();
    let mut hooks = Vec::new();
    for need in backend.needs {
        let mut why = Vec::new();
        let found = need.alternatives.iter().find(|(target, kind, _)| {
            let ok = prober.available(target, *kind);
            if !ok {
                let status = crate::hooks::find(target, *kind).map(|h| prober.check(h));
                let reason = status
                    .and_then(|s| s.reason)
                    .unwrap_or_else(|| "unknown hook".into());
                why.push(format!("{} {target}: {reason}", kind.name()));
            }
            ok
        });
        match found {
            Some((target, kind, program)) => {
                programs.push(*program);
                hooks.push(format!("{target} ({})", kind.name()));
            }
            None => {
                return Err(Refusal {
                    backend: backend.name,
                    reason: why.join("; "),
                });
            }
        }
    }
    if crate::procfs::kernel_version() < (5, 12) && programs.contains(&"kprobe_mark_page_dirty") {
        // Verifiers before 5.12 reject BPF compare-and-swap even in dead code.
        for p in programs.iter_mut() {
            if *p == "kprobe_mark_page_dirty" {
                *p = "kprobe_mark_page_dirty_nocas";
            }
        }
        // Before 5.12 kvm_vcpu_mark_page_dirty() (every guest write the MMU
        // logs) inlines mark_page_dirty_in_slot(): see it through its gfn and
        // the memslot kvm_vcpu_gfn_to_memslot() returns (src/bpf/dirty.bpf.c).
        for (target, program) in [
            ("kvm_vcpu_mark_page_dirty", "kprobe_vcpu_mark_page_dirty"),
            ("kvm_vcpu_gfn_to_memslot", "kretprobe_gfn_to_memslot"),
        ] {
            if !prober.available(target, Kprobe) {
                let reason = crate::hooks::find(target, Kprobe)
                    .and_then(|h| prober.check(h).reason)
                    .unwrap_or_default();
                return Err(Refusal {
                    backend: backend.name,
                    reason: format!("kprobe {target} (needed before Linux 5.12): {reason}"),
                });
            }
            programs.push(program);
            hooks.push(format!("{target} (kprobe)"));
        }
    }
    Ok(Choice {
        monitor,
        backend,
        programs,
        hooks,
    })
}

/// Picks the backend for `monitor`: `forced` if given (an error says why it
/// cannot be used), otherwise the first that works here.
pub fn choose(
    monitor: Monitor,
    forced: Option<&str>,
    prober: &mut Prober,
) -> anyhow::Result<Choice> {
    let backends = monitor.backends();
    if let Some(name) = forced {
        let Some(backend) = backends.iter().find(|b| b.name == name) else {
            let names: Vec<_> = backends.iter().map(|b| b.name).collect();
            crate::usage_bail!(
                "{} has no backend `{name}`; choose one of: {}",
                monitor.name(),
                names.join(", ")
            );
        };
        return resolve(monitor, backend, prober).map_err(|r| {
            anyhow::anyhow!(
                "backend `{name}` cannot be used for {} here: {} (see `kvm-watcher doctor`)",
                monitor.name(),
                r.reason
            )
        });
    }
    let mut refusals = Vec::new();
    for backend in backends {
        match resolve(monitor, backend, prober) {
            Ok(choice) => return Ok(choice),
            Err(r) => refusals.push(format!("{}: {}", r.backend, r.reason)),
        }
    }
    anyhow::bail!(
        "no backend of {} works on this kernel ({}); see `kvm-watcher doctor`",
        monitor.name(),
        refusals.join("; ")
    )
}
