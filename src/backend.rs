//! How a monitor gets its data: an ordered table of backends per monitor
//! (each monitor keeps its own table in its folder under src/monitors/). The
//! first backend whose hooks all load and attach wins (that is what `doctor`
//! reports); `--backend NAME` forces one. Kernel-specific variants are data
//! in the table ([`Quirk`]), not code here.

use serde::Serialize;

use crate::hooks::{AttachKind, Prober};

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
    /// What changes on older kernels.
    pub quirks: &'static [Quirk],
    /// What it can and cannot see, for `doctor`.
    pub note: &'static str,
}

impl Backend {
    /// Whether it runs a program on every system call of the host.
    pub fn on_every_syscall(&self) -> bool {
        self.needs.iter().any(|n| {
            n.alternatives
                .iter()
                .any(|(t, _, _)| t.starts_with("raw_syscalls:"))
        })
    }
}

/// What a backend needs differently on kernels before `before`: programs
/// swapped for variants (e.g. without BPF compare-and-swap, which verifiers
/// before 5.12 reject even in dead code) and hooks needed in addition.
#[derive(Debug)]
pub struct Quirk {
    /// The first kernel (major, minor) that does not need it.
    pub before: (u32, u32),
    /// (program, its replacement on such kernels).
    pub replace: &'static [(&'static str, &'static str)],
    /// Hooks needed in addition there, all of them: (target, kind, program).
    pub also: &'static [(&'static str, AttachKind, &'static str)],
}

/// A hook a backend needs, with its alternatives.
pub const fn need(alternatives: &'static [(&'static str, AttachKind, &'static str)]) -> Need {
    Need { alternatives }
}

/// Forgets exiting vCPU threads; every backend that keeps per-thread state needs it.
pub const THREAD_EXIT: Need = need(&[(
    "sched:sched_process_exit",
    AttachKind::RawTp,
    "tp_process_exit",
)]);
/// The one program at the start of every KVM_RUN (`kvm:kvm_fpu`, right after
/// KVM loaded the vCPU), shared by the monitors that need it. It fires on
/// vCPU threads only, where `raw_syscalls:sys_enter` ran for every system
/// call of the host.
pub const RUN_START: &str = "tp_kvm_fpu";

/// The start of every KVM_RUN: [`RUN_START`].
pub const VCPU_RUN: Need = need(&[("kvm:kvm_fpu", AttachKind::RawTp, RUN_START)]);

/// The one BTF-typed program on `sched:sched_switch` (Linux 5.5+), shared
/// by the monitors that need the hook: on the hottest hook of a host one
/// program costs one dispatch per context switch, not one per monitor. Each
/// monitor turns its part on (`switch_<monitor>`) with [`runs_on_switch`].
pub const SCHED_SWITCH: &str = "tp_btf_sched_switch";

/// Whether `resolved` uses [`SCHED_SWITCH`], so its part there must run.
pub fn runs_on_switch(resolved: Option<&Resolved>) -> bool {
    resolved.is_some_and(|r| r.programs.contains(&SCHED_SWITCH))
}

/// Whether `resolved` learns vCPU threads at [`RUN_START`] (the program's
/// `learn_vcpu_threads`: other monitors share the program for other work).
pub fn learns_vcpu_threads(resolved: Option<&Resolved>) -> bool {
    resolved.is_some_and(|r| r.programs.contains(&RUN_START))
}

/// The programs and hooks a backend resolved to on this kernel.
#[derive(Debug, Clone)]
pub struct Resolved {
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

/// Why `target` cannot be attached as `kind`, as the prober found out.
fn unavailable(target: &str, kind: AttachKind, prober: &mut Prober) -> String {
    crate::hooks::find(target, kind)
        .and_then(|h| prober.check(h).reason)
        .unwrap_or_else(|| "unknown hook".into())
}

/// Resolves the programs of `backend` on this kernel, or says which hook is missing.
pub fn resolve(backend: &'static Backend, prober: &mut Prober) -> Result<Resolved, Refusal> {
    let refuse = |reason: String| Refusal {
        backend: backend.name,
        reason,
    };
    let mut programs = Vec::new();
    let mut hooks = Vec::new();
    for need in backend.needs {
        let mut why = Vec::new();
        let found = need.alternatives.iter().find(|(target, kind, _)| {
            let ok = prober.available(target, *kind);
            if !ok {
                why.push(format!(
                    "{} {target}: {}",
                    kind.name(),
                    unavailable(target, *kind, prober)
                ));
            }
            ok
        });
        let Some((target, kind, program)) = found else {
            return Err(refuse(why.join("; ")));
        };
        programs.push(*program);
        hooks.push(format!("{target} ({})", kind.name()));
    }
    let version = crate::procfs::kernel_version();
    for quirk in backend.quirks.iter().filter(|q| version < q.before) {
        for (p, hook) in programs.iter_mut().zip(hooks.iter_mut()) {
            if let Some((_, variant)) = quirk.replace.iter().find(|(from, _)| from == p) {
                *p = variant;
                // A variant that is another alternative of a need is attached as that one.
                if let Some((target, kind, _)) = backend
                    .needs
                    .iter()
                    .flat_map(|n| n.alternatives)
                    .find(|(_, _, prog)| prog == variant)
                {
                    *hook = format!("{target} ({})", kind.name());
                }
            }
        }
        for &(target, kind, program) in quirk.also {
            if !prober.available(target, kind) {
                let (major, minor) = quirk.before;
                return Err(refuse(format!(
                    "{} {target} (needed before Linux {major}.{minor}): {}",
                    kind.name(),
                    unavailable(target, kind, prober)
                )));
            }
            programs.push(program);
            hooks.push(format!("{target} ({})", kind.name()));
        }
    }
    // Two needs may come down to the same program (a generic exit hook).
    let mut seen = Vec::new();
    let (programs, hooks) = programs
        .into_iter()
        .zip(hooks)
        .filter(|(p, _)| {
            let first = !seen.contains(p);
            seen.push(*p);
            first
        })
        .unzip();
    Ok(Resolved {
        backend,
        programs,
        hooks,
    })
}

/// Picks the backend of monitor `monitor` from its table `backends`: `forced`
/// if given (an error says why it cannot be used), otherwise the first that
/// works here; with `spare_syscalls`, the first that works without a
/// program on every system call of the host, if one does.
pub fn choose(
    monitor: &str,
    backends: &'static [Backend],
    forced: Option<&str>,
    spare_syscalls: bool,
    prober: &mut Prober,
) -> anyhow::Result<Resolved> {
    if let Some(name) = forced {
        let Some(backend) = backends.iter().find(|b| b.name == name) else {
            let names: Vec<_> = backends.iter().map(|b| b.name).collect();
            crate::usage_bail!(
                "{monitor} has no backend `{name}`; choose one of: {}",
                names.join(", ")
            );
        };
        return resolve(backend, prober).map_err(|r| {
            anyhow::anyhow!(
                "backend `{name}` cannot be used for {monitor} here: {} (see `kvm-watcher doctor`)",
                r.reason
            )
        });
    }
    let mut refusals = Vec::new();
    let mut ordered: Vec<&'static Backend> = backends.iter().collect();
    if spare_syscalls {
        // Stable: in table order, those sparing the syscalls first.
        ordered.sort_by_key(|b| b.on_every_syscall());
    }
    for backend in ordered {
        match resolve(backend, prober) {
            Ok(resolved) => return Ok(resolved),
            Err(r) => refusals.push(format!("{}: {}", r.backend, r.reason)),
        }
    }
    anyhow::bail!(
        "no backend of {monitor} works on this kernel ({}); see `kvm-watcher doctor`",
        refusals.join("; ")
    )
}
