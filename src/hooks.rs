//! Probing kernel hooks: load and attach one tiny program (src/bpf/probe.bpf.c)
//! per hook and attach type, and explain the kernel's answer when it refuses.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::{Mutex, OnceLock};

use libbpf_rs::PrintLevel;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use serde::Serialize;

use crate::bpf::{ProbeSkelBuilder, errno_of};

/// How a BPF program attaches to its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    /// BTF-typed raw tracepoint (Linux 5.5+).
    TpBtf,
    /// Raw tracepoint (Linux 4.17+), needs neither BTF nor tracefs.
    RawTp,
    /// Classic tracepoint through perf_event_open (needs tracefs for the event id).
    Tracepoint,
    /// BPF trampoline on a kernel function (Linux 5.5+, needs BTF of the function).
    Fentry,
    /// kprobe on a kernel function (CONFIG_KPROBES).
    Kprobe,
    /// BPF iterator (Linux 5.8+, needs BTF), run when user space reads it.
    Iter,
}

impl AttachKind {
    /// The name `doctor` and `--backend` use.
    pub fn name(self) -> &'static str {
        match self {
            AttachKind::TpBtf => "tp_btf",
            AttachKind::RawTp => "raw_tp",
            AttachKind::Tracepoint => "tracepoint",
            AttachKind::Fentry => "fentry",
            AttachKind::Kprobe => "kprobe",
            AttachKind::Iter => "iter",
        }
    }
}

/// One hook the monitors may use, in one attach type.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// Program name in probe.bpf.c.
    pub program: &'static str,
    /// The tracepoint (`kvm:kvm_vcpu_wakeup`) or kernel function it hooks.
    pub target: &'static str,
    /// How it attaches.
    pub kind: AttachKind,
}

const fn hook(program: &'static str, target: &'static str, kind: AttachKind) -> Hook {
    Hook {
        program,
        target,
        kind,
    }
}

use AttachKind::*;

/// Every hook `doctor` checks, in the order it prints them.
pub const HOOKS: &[Hook] = &[
    hook("tp_btf_kvm_vcpu_wakeup", "kvm:kvm_vcpu_wakeup", TpBtf),
    hook("raw_tp_kvm_vcpu_wakeup", "kvm:kvm_vcpu_wakeup", RawTp),
    hook(
        "tracepoint_kvm_vcpu_wakeup",
        "kvm:kvm_vcpu_wakeup",
        Tracepoint,
    ),
    hook("tp_btf_kvm_halt_poll_ns", "kvm:kvm_halt_poll_ns", TpBtf),
    hook("raw_tp_kvm_halt_poll_ns", "kvm:kvm_halt_poll_ns", RawTp),
    hook(
        "tracepoint_kvm_halt_poll_ns",
        "kvm:kvm_halt_poll_ns",
        Tracepoint,
    ),
    hook(
        "tp_btf_kvm_dirty_ring_push",
        "kvm:kvm_dirty_ring_push",
        TpBtf,
    ),
    hook(
        "raw_tp_kvm_dirty_ring_push",
        "kvm:kvm_dirty_ring_push",
        RawTp,
    ),
    hook(
        "tracepoint_kvm_dirty_ring_push",
        "kvm:kvm_dirty_ring_push",
        Tracepoint,
    ),
    hook("tp_btf_kvm_exit", "kvm:kvm_exit", TpBtf),
    hook("raw_tp_kvm_exit", "kvm:kvm_exit", RawTp),
    hook("tracepoint_kvm_exit", "kvm:kvm_exit", Tracepoint),
    hook("tp_btf_kvm_entry", "kvm:kvm_entry", TpBtf),
    hook("raw_tp_kvm_entry", "kvm:kvm_entry", RawTp),
    hook("tracepoint_kvm_entry", "kvm:kvm_entry", Tracepoint),
    hook("tp_btf_kvm_userspace_exit", "kvm:kvm_userspace_exit", TpBtf),
    hook("raw_tp_kvm_userspace_exit", "kvm:kvm_userspace_exit", RawTp),
    hook(
        "tracepoint_kvm_userspace_exit",
        "kvm:kvm_userspace_exit",
        Tracepoint,
    ),
    hook("tp_btf_kvm_pio", "kvm:kvm_pio", TpBtf),
    hook("raw_tp_kvm_pio", "kvm:kvm_pio", RawTp),
    hook("tracepoint_kvm_pio", "kvm:kvm_pio", Tracepoint),
    hook("tp_btf_kvm_mmio", "kvm:kvm_mmio", TpBtf),
    hook("raw_tp_kvm_mmio", "kvm:kvm_mmio", RawTp),
    hook("tracepoint_kvm_mmio", "kvm:kvm_mmio", Tracepoint),
    hook("tp_btf_sched_switch", "sched:sched_switch", TpBtf),
    hook("raw_tp_sched_switch", "sched:sched_switch", RawTp),
    hook("tracepoint_sched_switch", "sched:sched_switch", Tracepoint),
    hook("tp_btf_sched_wakeup", "sched:sched_wakeup", TpBtf),
    hook("raw_tp_sched_wakeup", "sched:sched_wakeup", RawTp),
    hook("tracepoint_sched_wakeup", "sched:sched_wakeup", Tracepoint),
    hook("tp_btf_sched_wakeup_new", "sched:sched_wakeup_new", TpBtf),
    hook("raw_tp_sched_wakeup_new", "sched:sched_wakeup_new", RawTp),
    hook(
        "tracepoint_sched_wakeup_new",
        "sched:sched_wakeup_new",
        Tracepoint,
    ),
    hook(
        "tp_btf_sched_process_exit",
        "sched:sched_process_exit",
        TpBtf,
    ),
    hook(
        "raw_tp_sched_process_exit",
        "sched:sched_process_exit",
        RawTp,
    ),
    hook(
        "tracepoint_sched_process_exit",
        "sched:sched_process_exit",
        Tracepoint,
    ),
    hook("tp_btf_sys_enter", "raw_syscalls:sys_enter", TpBtf),
    hook("raw_tp_sys_enter", "raw_syscalls:sys_enter", RawTp),
    hook("tracepoint_sys_enter", "raw_syscalls:sys_enter", Tracepoint),
    hook("tp_btf_kvm_fpu", "kvm:kvm_fpu", TpBtf),
    hook("raw_tp_kvm_fpu", "kvm:kvm_fpu", RawTp),
    hook("tracepoint_kvm_fpu", "kvm:kvm_fpu", Tracepoint),
    hook("fentry_kvm_vcpu_halt", "kvm_vcpu_halt", Fentry),
    hook("kprobe_kvm_vcpu_halt", "kvm_vcpu_halt", Kprobe),
    hook("fentry_kvm_vcpu_block", "kvm_vcpu_block", Fentry),
    hook("kprobe_kvm_vcpu_block", "kvm_vcpu_block", Kprobe),
    hook(
        "fentry_mark_page_dirty_in_slot",
        "mark_page_dirty_in_slot",
        Fentry,
    ),
    hook(
        "kprobe_mark_page_dirty_in_slot",
        "mark_page_dirty_in_slot",
        Kprobe,
    ),
    hook(
        "kprobe_kvm_vcpu_mark_page_dirty",
        "kvm_vcpu_mark_page_dirty",
        Kprobe,
    ),
    hook(
        "kretprobe_kvm_vcpu_gfn_to_memslot",
        "kvm_vcpu_gfn_to_memslot",
        Kprobe,
    ),
    hook("fentry_kvm_arch_vcpu_load", "kvm_arch_vcpu_load", Fentry),
    hook("kprobe_kvm_arch_vcpu_load", "kvm_arch_vcpu_load", Kprobe),
    hook("fentry_kvm_arch_vcpu_put", "kvm_arch_vcpu_put", Fentry),
    hook("kprobe_kvm_arch_vcpu_put", "kvm_arch_vcpu_put", Kprobe),
];

/// The BPF task iterator: no backend needs it, so it is not in [`HOOKS`];
/// vcpu-load runs one at attach where [`task_iterator`] says it can.
const TASK_ITERATOR: Hook = hook("iter_task", "task", Iter);

/// Whether this kernel runs BPF task iterators (Linux 5.8+ with BTF),
/// probed once per process; the error says why not.
pub fn task_iterator() -> Result<(), String> {
    static ANSWER: OnceLock<Result<(), String>> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let s = probe(&TASK_ITERATOR);
            if s.available {
                Ok(())
            } else {
                Err(s.reason.unwrap_or_else(|| "refused".into()))
            }
        })
        .clone()
}

/// Looks a hook up by its target and attach kind.
pub fn find(target: &str, kind: AttachKind) -> Option<&'static Hook> {
    HOOKS.iter().find(|h| h.target == target && h.kind == kind)
}

/// What happened when a hook was tried.
#[derive(Clone, Debug, Serialize)]
pub struct HookStatus {
    /// The program loaded and attached.
    pub available: bool,
    /// `load` or `attach`: the step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<&'static str>,
    /// The kernel's errno, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// The errno's symbolic name (`EPERM`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno_name: Option<&'static str>,
    /// What the failure means for this kind of hook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// libbpf's last message about the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// libbpf's messages while probing: kept, not printed, to explain failures.
static LIBBPF_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn keep_libbpf_message(_level: PrintLevel, msg: String) {
    if let Ok(mut log) = LIBBPF_LOG.lock() {
        log.push(msg.trim_end().to_string());
    }
}

fn print_libbpf_message(_level: PrintLevel, msg: String) {
    eprint!("libbpf: {msg}");
}

/// Sends libbpf's own messages to an internal log instead of stderr, or,
/// with `KVM_WATCHER_LIBBPF_LOG=1` in the environment, all of them (debug
/// level, verifier logs included) to stderr.
pub fn quiet_libbpf() {
    if std::env::var_os("KVM_WATCHER_LIBBPF_LOG").is_some_and(|v| v == "1") {
        libbpf_rs::set_print(Some((PrintLevel::Debug, print_libbpf_message)));
        return;
    }
    libbpf_rs::set_print(Some((PrintLevel::Warn, keep_libbpf_message)));
}

/// Why the kernel refused the program libbpf last failed to load: its name
/// and the verifier's last word, from the load log libbpf passed on.
pub fn verifier_refusal() -> Option<String> {
    let log = LIBBPF_LOG.lock().ok()?;
    refusal_in(&log.join("\n"))
}

fn refusal_in(text: &str) -> Option<String> {
    let end = text.rfind("-- END PROG LOAD LOG --")?;
    let begin = text[..end].rfind("-- BEGIN PROG LOAD LOG --")?;
    let head = &text[..begin];
    let prog = head
        .rfind("prog '")
        .and_then(|i| head[i + 6..].split('\'').next())
        .unwrap_or("?");
    let lines: Vec<&str> = text[begin..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("libbpf:")
                && !l.starts_with("prog '")
        })
        .collect();
    let why = lines.last()?;
    // The instruction it refused, where the log names one.
    let insn = lines.iter().rev().skip(1).find(|l| {
        l.split_once(": (")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    });
    Some(match insn {
        Some(i) => format!("program {prog}: {why}, at {i}"),
        None => format!("program {prog}: {why}"),
    })
}

fn take_last_libbpf_message() -> Option<String> {
    let mut log = LIBBPF_LOG.lock().ok()?;
    let last = log
        .iter()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string());
    log.clear();
    last
}

/// Probes hooks once each and remembers the answers.
#[derive(Default)]
pub struct Prober {
    cache: HashMap<&'static str, HookStatus>,
}

impl Prober {
    /// A prober with an empty cache.
    pub fn new() -> Self {
        quiet_libbpf();
        Prober::default()
    }

    /// Whether `hook` loads and attaches here (probed at most once).
    pub fn check(&mut self, hook: &Hook) -> HookStatus {
        if let Some(status) = self.cache.get(hook.program) {
            return status.clone();
        }
        let status = probe(hook);
        self.cache.insert(hook.program, status.clone());
        status
    }

    /// Whether the hook `target` in attach type `kind` is available.
    pub fn available(&mut self, target: &str, kind: AttachKind) -> bool {
        find(target, kind).is_some_and(|h| self.check(h).available)
    }
}

fn probe(hook: &Hook) -> HookStatus {
    let _ = take_last_libbpf_message();
    let mut storage = MaybeUninit::uninit();
    let failed = |step: &'static str, err: &libbpf_rs::Error| {
        let errno = errno_of(err);
        HookStatus {
            available: false,
            failed_at: Some(step),
            errno,
            errno_name: errno.map(errno_name),
            reason: Some(explain(hook, errno)),
            detail: take_last_libbpf_message(),
        }
    };
    let mut open = match ProbeSkelBuilder::default().open(&mut storage) {
        Ok(open) => open,
        Err(e) => return failed("load", &e),
    };
    for mut prog in open.open_object_mut().progs_mut() {
        let wanted = prog.name() == hook.program;
        prog.set_autoload(wanted);
    }
    let skel = match open.load() {
        Ok(skel) => skel,
        Err(e) => return failed("load", &e),
    };
    use libbpf_rs::skel::Skel;
    let Some(prog) = skel.object().progs_mut().find(|p| p.name() == hook.program) else {
        return HookStatus {
            available: false,
            failed_at: Some("load"),
            errno: None,
            errno_name: None,
            reason: Some("probe program missing from the BPF object".into()),
            detail: None,
        };
    };
    match prog.attach() {
        // Dropping the link detaches it at once.
        Ok(_link) => HookStatus {
            available: true,
            failed_at: None,
            errno: None,
            errno_name: None,
            reason: None,
            detail: None,
        },
        Err(e) => failed("attach", &e),
    }
}

/// Attaches `hook`'s probe alone, runs `during`, and returns how many times
/// the hook fired meanwhile (e.g. to find out whether a tracepoint that
/// exists fires at all for a running guest), with what `during` returned.
pub fn hits_during<R>(hook: &Hook, during: impl FnOnce() -> R) -> anyhow::Result<(u64, R)> {
    use libbpf_rs::skel::Skel;
    let mut storage = MaybeUninit::uninit();
    let mut open = ProbeSkelBuilder::default().open(&mut storage)?;
    for mut prog in open.open_object_mut().progs_mut() {
        let wanted = prog.name() == hook.program;
        prog.set_autoload(wanted);
    }
    let mut skel = open.load()?;
    let link = skel
        .object()
        .progs_mut()
        .find(|p| p.name() == hook.program)
        .ok_or_else(|| anyhow::anyhow!("probe program {} missing", hook.program))?
        .attach()?;
    let result = during();
    drop(link);
    let hits = skel.maps.bss_data.as_deref_mut().map_or(0, |b| b.hits);
    Ok((hits, result))
}

/// The symbolic name of common errnos.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::E2BIG => "E2BIG",
        libc::ENOTSUP => "EOPNOTSUPP",
        libc::EBUSY => "EBUSY",
        libc::ENOMEM => "ENOMEM",
        libc::ENOSYS => "ENOSYS",
        libc::ENODEV => "ENODEV",
        libc::EFAULT => "EFAULT",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        _ => "errno",
    }
}

fn explain(hook: &Hook, errno: Option<i32>) -> String {
    let what = match hook.kind {
        Fentry => "fentry programs",
        Kprobe => "kprobes",
        Iter => "BPF iterators",
        _ => "this tracepoint",
    };
    match (hook.kind, errno) {
        (Fentry, Some(libc::EPERM)) => {
            "the kernel refuses fentry/fexit programs (BPF_PROG_LOAD returns EPERM: lockdown, a security policy, or missing CAP_BPF/CAP_PERFMON)".into()
        }
        (Fentry, Some(libc::ESRCH | libc::ENOENT)) => format!(
            "{} is not in this kernel's BTF (absent, renamed, inlined, or KVM has no module BTF)",
            hook.target
        ),
        (Kprobe, Some(libc::ENOENT | libc::ENODEV))
            if !std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() =>
        {
            "this kernel has no kprobes (no kprobe PMU: CONFIG_KPROBES is not set)".into()
        }
        (Kprobe, Some(libc::ENOENT | libc::ENODEV)) => {
            format!("{} is not a probeable function in this kernel", hook.target)
        }
        (Kprobe, Some(libc::EINVAL)) => format!("{} cannot be kprobed here (absent or notrace)", hook.target),
        (TpBtf, Some(libc::ESRCH | libc::ENOENT | libc::EINVAL)) => format!(
            "no BTF for tracepoint {} (no vmlinux/module BTF, or the tracepoint is absent)",
            hook.target
        ),
        (Tracepoint, Some(libc::ENOENT))
            if !std::path::Path::new("/sys/kernel/tracing/events").exists()
                && !std::path::Path::new("/sys/kernel/debug/tracing/events").exists() =>
        {
            "classic tracepoints need tracefs, which is not mounted (mount -t tracefs nodev /sys/kernel/tracing)".into()
        }
        (Tracepoint, Some(libc::ENOENT)) => format!(
            "tracepoint {} does not exist (KVM module not loaded?)",
            hook.target
        ),
        (RawTp, Some(libc::ENOENT)) => format!("tracepoint {} does not exist (KVM module not loaded?)", hook.target),
        (_, Some(libc::EPERM | libc::EACCES)) => {
            format!("{what} are not permitted: run as root or with CAP_BPF and CAP_PERFMON")
        }
        (_, Some(libc::EINVAL)) => format!("the kernel rejected {what} (EINVAL)"),
        (_, Some(libc::ENOTSUP)) => format!("{what} are not supported by this kernel"),
        (_, Some(e)) => format!("failed with {}", std::io::Error::from_raw_os_error(e)),
        (_, None) => "failed without an errno (see detail)".into(),
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::refusal_in;

    #[test]
    fn the_verifiers_last_word_names_the_program() {
        let log = "libbpf: prog 'tp_run_delay_switch': BPF program load failed: Invalid argument\n\
                   libbpf: prog 'tp_run_delay_switch': -- BEGIN PROG LOAD LOG --\n\
                   0: R1=ctx() R10=fp0\n\
                   12: (79) r2 = *(u64 *)(r1 +8)\n\
                   R2 invalid mem access 'scalar'\n\
                   processed 40 insns (limit 1000000) max_states_per_insn 0\n\
                   -- END PROG LOAD LOG --\n\
                   libbpf: failed to load object 'kvm_watcher_bpf'";
        assert_eq!(
            refusal_in(log).as_deref(),
            Some(
                "program tp_run_delay_switch: R2 invalid mem access 'scalar', \
                 at 12: (79) r2 = *(u64 *)(r1 +8)"
            )
        );
        assert_eq!(refusal_in("libbpf: failed to load object"), None);
    }
}
