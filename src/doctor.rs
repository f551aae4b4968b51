//! `kvm-watcher doctor`: what this kernel allows, checked by really loading and
//! attaching a tiny program on every hook, and which backend each monitor uses.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::backend::{self, Refusal};
use crate::hooks::{HOOKS, HookStatus, Prober};
use crate::monitors::REGISTRY;
use crate::procfs::{self, VmProcess};

/// The whole report (`doctor --json`; schema in docs/doctor.md).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Report format version.
    pub schema_version: u32,
    /// Kernel facts.
    pub kernel: KernelInfo,
    /// Privileges of this process.
    pub privileges: Privileges,
    /// Every hook and attach type, as tried.
    pub hooks: Vec<HookReport>,
    /// The backend each monitor uses, and why the others were passed over.
    pub monitors: Vec<MonitorReport>,
    /// Whether `vms --slots` can read memslots here (its BPF task-file iterator).
    pub memslots: FeatureReport,
    /// Processes holding a KVM VM right now.
    pub vms: Vec<VmProcess>,
}

/// Facts about the running kernel.
#[derive(Debug, Serialize)]
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// /sys/kernel/btf/vmlinux exists.
    pub vmlinux_btf: bool,
    /// /sys/kernel/btf/kvm exists (KVM types when KVM is a module).
    pub kvm_module_btf: bool,
    /// `builtin`, `module` or `absent`.
    pub kvm: &'static str,
    /// Vendor modules present (kvm_intel, kvm_amd, kvm_pvm...).
    pub kvm_vendor: Vec<String>,
    /// /dev/kvm exists.
    pub dev_kvm: bool,
    /// Where tracefs is mounted, if anywhere.
    pub tracefs: Option<String>,
    /// Where debugfs is mounted, if anywhere.
    pub debugfs: Option<String>,
    /// KVM's default halt-polling window (ns), /sys/module/kvm/parameters/halt_poll_ns.
    pub halt_poll_ns: Option<u64>,
}

/// Privileges that matter for BPF.
#[derive(Debug, Serialize)]
pub struct Privileges {
    /// Effective user id.
    pub euid: u32,
    /// CAP_BPF (or CAP_SYS_ADMIN) in the effective set.
    pub cap_bpf: bool,
    /// CAP_PERFMON (or CAP_SYS_ADMIN).
    pub cap_perfmon: bool,
    /// CAP_SYS_ADMIN.
    pub cap_sys_admin: bool,
    /// CAP_SYS_RESOURCE (raising RLIMIT_MEMLOCK; not needed on kernels that
    /// account BPF memory to the cgroup, 5.11+).
    pub cap_sys_resource: bool,
    /// CAP_SYS_PTRACE (reading other users' /proc/PID/fd links and task syscall state).
    pub cap_sys_ptrace: bool,
    /// CAP_DAC_READ_SEARCH (listing other users' /proc/PID/fd, mode 0500).
    pub cap_dac_read_search: bool,
    /// What is missing for which feature, one sentence each.
    pub missing: Vec<String>,
}

/// One hook in one attach type.
#[derive(Debug, Serialize)]
pub struct HookReport {
    /// `kvm:kvm_vcpu_wakeup` or a kernel function.
    pub hook: &'static str,
    /// tp_btf, raw_tp, tracepoint, fentry or kprobe.
    pub attach: &'static str,
    /// The result of loading and attaching.
    #[serde(flatten)]
    pub status: HookStatus,
}

/// The backend a monitor uses.
#[derive(Debug, Serialize)]
pub struct MonitorReport {
    /// Monitor name.
    pub monitor: &'static str,
    /// Chosen backend, or null when none works.
    pub backend: Option<&'static str>,
    /// Hooks it uses.
    pub hooks: Vec<String>,
    /// What it can and cannot see.
    pub note: Option<&'static str>,
    /// What its live check found, with a guest running (null without one).
    pub live: Option<crate::monitors::LiveCheck>,
    /// Backends tried before it (or all, when none works), and why they were refused.
    pub refused: Vec<Refusal>,
}

/// A feature outside the monitors, tried for real.
#[derive(Debug, Serialize)]
pub struct FeatureReport {
    /// It loaded and ran.
    pub available: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Loads and runs the memslot iterator once.
fn memslots_report() -> FeatureReport {
    match crate::memslots::probe() {
        Ok(()) => FeatureReport {
            available: true,
            reason: None,
        },
        Err(e) => FeatureReport {
            available: false,
            reason: Some(format!("{e:#}")),
        },
    }
}

fn mount_point(fstype: &str) -> Option<String> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == fstype).then(|| f[1].to_string())
    })
}

fn kernel_info() -> KernelInfo {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let modules = fs::read_to_string("/proc/modules").unwrap_or_default();
    let loaded_module = |name: &str| modules.lines().any(|l| l.split(' ').next() == Some(name));
    let kvm = if loaded_module("kvm") {
        "module"
    } else if Path::new("/sys/module/kvm").exists() {
        "builtin"
    } else {
        "absent"
    };
    let mut kvm_vendor: Vec<String> = fs::read_dir("/sys/module")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    kvm_vendor.sort();
    KernelInfo {
        release,
        vmlinux_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        kvm_module_btf: Path::new("/sys/kernel/btf/kvm").exists(),
        kvm,
        kvm_vendor,
        dev_kvm: Path::new("/dev/kvm").exists(),
        tracefs: mount_point("tracefs"),
        debugfs: mount_point("debugfs"),
        halt_poll_ns: fs::read_to_string("/sys/module/kvm/parameters/halt_poll_ns")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }
}

fn privileges() -> Privileges {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    let sys_admin = has(21);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let (cap_bpf, cap_perfmon, cap_sys_ptrace) =
        (has(39) || sys_admin, has(38) || sys_admin, has(19));
    let mut missing = Vec::new();
    if !cap_bpf {
        missing.push("CAP_BPF: no BPF program can be loaded, so no monitor can run".to_string());
    }
    if !cap_perfmon {
        missing.push(
            "CAP_PERFMON: tracing programs cannot attach or read kernel memory, so no monitor can run"
                .to_string(),
        );
    }
    if !cap_sys_ptrace {
        missing.push(
            "CAP_SYS_PTRACE: other users' VMM processes cannot be inspected (/proc/PID/fd), so --pid and --vm checks, VM names and `kvm-watcher vms` miss them"
                .to_string(),
        );
    }
    if !has(2) {
        missing.push(
            "CAP_DAC_READ_SEARCH: other users' /proc/PID/fd cannot be listed, so their VMs are not found (libvirt's and KubeVirt's QEMU run as users of their own)"
                .to_string(),
        );
    }
    if !has(24) && crate::procfs::kernel_version() < (5, 11) {
        missing.push(
            "CAP_SYS_RESOURCE: this kernel charges BPF maps to RLIMIT_MEMLOCK, which cannot be raised"
                .to_string(),
        );
    }
    Privileges {
        euid,
        cap_bpf,
        cap_perfmon,
        cap_sys_admin: sys_admin,
        cap_sys_resource: has(24),
        cap_sys_ptrace,
        cap_dac_read_search: has(2),
        missing,
    }
}

/// Probes everything and builds the report.
pub fn report() -> Report {
    // The VMs as they are when asked, before the live checks take their time.
    let vms = procfs::list_vms();
    let mut prober = Prober::new();
    let hooks = HOOKS
        .iter()
        .map(|h| HookReport {
            hook: h.target,
            attach: h.kind.name(),
            status: prober.check(h),
        })
        .collect();
    let monitors = REGISTRY
        .iter()
        .map(|m| {
            let mut refused = Vec::new();
            for b in m.backends() {
                match backend::resolve(b, &mut prober) {
                    Ok(resolved) => {
                        return MonitorReport {
                            monitor: m.name(),
                            backend: Some(b.name),
                            hooks: resolved.hooks,
                            note: Some(b.note),
                            live: m.live_check(),
                            refused,
                        };
                    }
                    Err(r) => refused.push(r),
                }
            }
            MonitorReport {
                monitor: m.name(),
                backend: None,
                hooks: Vec::new(),
                note: None,
                live: None,
                refused,
            }
        })
        .collect();
    Report {
        schema_version: 1,
        kernel: kernel_info(),
        privileges: privileges(),
        hooks,
        monitors,
        memslots: memslots_report(),
        vms,
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Prints the report for people.
pub fn print_text(r: &Report, w: &mut dyn Write) -> std::io::Result<()> {
    let k = &r.kernel;
    writeln!(w, "kernel      {}", k.release)?;
    writeln!(
        w,
        "BTF         vmlinux: {}, kvm module: {}",
        yes(k.vmlinux_btf),
        yes(k.kvm_module_btf)
    )?;
    writeln!(
        w,
        "KVM         {} (vendor: {}), /dev/kvm: {}, default halt_poll_ns: {}",
        k.kvm,
        if k.kvm_vendor.is_empty() {
            "none".into()
        } else {
            k.kvm_vendor.join(", ")
        },
        yes(k.dev_kvm),
        k.halt_poll_ns.map_or("unknown".into(), |v| v.to_string())
    )?;
    writeln!(
        w,
        "tracefs     {}",
        k.tracefs.as_deref().unwrap_or(
            "not mounted (classic tracepoints need it: mount -t tracefs nodev /sys/kernel/tracing)"
        )
    )?;
    writeln!(
        w,
        "debugfs     {}",
        k.debugfs.as_deref().unwrap_or(
            "not mounted (KVM's debugfs stats need it: mount -t debugfs none /sys/kernel/debug)"
        )
    )?;
    let p = &r.privileges;
    writeln!(
        w,
        "privileges  euid {}, CAP_BPF: {}, CAP_PERFMON: {}, CAP_SYS_ADMIN: {}, CAP_SYS_RESOURCE: {}",
        p.euid,
        yes(p.cap_bpf),
        yes(p.cap_perfmon),
        yes(p.cap_sys_admin),
        yes(p.cap_sys_resource)
    )?;
    for m in &p.missing {
        writeln!(w, "            missing {m}")?;
    }
    writeln!(w)?;
    writeln!(w, "{:<26} {:<11} RESULT", "HOOK", "ATTACH")?;
    for h in &r.hooks {
        let result = if h.status.available {
            "available".to_string()
        } else {
            format!(
                "unavailable: {} ({} at {})",
                h.status.reason.as_deref().unwrap_or("unknown"),
                h.status.errno_name.unwrap_or("no errno"),
                h.status.failed_at.unwrap_or("?")
            )
        };
        writeln!(w, "{:<26} {:<11} {result}", h.hook, h.attach)?;
    }
    writeln!(w)?;
    writeln!(w, "{:<10} {:<11} HOOKS", "MONITOR", "BACKEND")?;
    for m in &r.monitors {
        writeln!(
            w,
            "{:<10} {:<11} {}",
            m.monitor,
            m.backend.unwrap_or("none"),
            m.hooks.join(", ")
        )?;
        if let Some(note) = m.note {
            writeln!(w, "{:<22} note: {note}", "")?;
        }
        if let Some(live) = &m.live {
            writeln!(w, "{:<22} live: {}", "", live.text)?;
        }
        for refusal in &m.refused {
            writeln!(w, "{:<22} not {}: {}", "", refusal.backend, refusal.reason)?;
        }
    }
    writeln!(w)?;
    match &r.memslots {
        FeatureReport {
            available: true, ..
        } => writeln!(
            w,
            "memslots    available (vms --slots: BPF task-file iterator)"
        )?,
        FeatureReport { reason, .. } => writeln!(
            w,
            "memslots    unavailable: {}",
            reason.as_deref().unwrap_or("unknown")
        )?,
    }
    writeln!(w)?;
    if r.vms.is_empty() {
        writeln!(w, "VMs         none running")?;
    } else {
        crate::procfs::print_vm_table(&r.vms, w)?;
    }
    Ok(())
}
