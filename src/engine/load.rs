//! The loader: picks each monitor's backend, opens the BPF object, lets
//! every monitor configure its part, loads only the chosen programs and
//! attaches them. On any error everything loaded so far is released.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags};

use crate::backend::{self, Resolved};
use crate::bpf::{KvmWatcherSkel, KvmWatcherSkelBuilder, rodata};
use crate::hooks::{self, Prober};
use crate::monitors::{Configure, Filter, Mode, Monitor, Options, REGISTRY};

/// What to load: monitors, filters and how the programs are used.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Monitors to run.
    pub monitors: Vec<&'static dyn Monitor>,
    /// In-kernel filters.
    pub filter: Filter,
    /// Backends the user forced.
    pub backend: super::Forced,
    /// Ring buffer size, KiB.
    pub ringbuf_kib: u32,
    /// Rows, summaries or metrics.
    pub mode: Mode,
    /// The monitors' own options.
    pub options: Options,
    /// Prefer backends that run nothing on the host's system calls (serve,
    /// which runs on every host of a fleet).
    pub spare_syscalls: bool,
    /// Leave out the monitors no backend of which works here, instead of
    /// failing (see [`Attached::unavailable`]).
    pub partial: bool,
}

/// A monitor left out because no backend of it works on this kernel.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// The monitor.
    pub monitor: &'static dyn Monitor,
    /// Why, in one line.
    pub reason: String,
}

/// A backend chosen for a monitor, with the programs it turns on.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The monitor.
    pub monitor: &'static dyn Monitor,
    /// Its backend, resolved on this kernel.
    pub resolved: Resolved,
}

impl Choice {
    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.resolved.backend.name
    }
}

/// A loaded BPF object with its programs attached. Dropping it detaches
/// everything; `links` can also be cleared first to stop new events.
pub struct Attached<'obj> {
    /// The skeleton: maps and programs.
    pub skel: KvmWatcherSkel<'obj>,
    /// One link per attached program.
    pub links: Vec<Link>,
    /// The backend chosen for each monitor, in the order asked for.
    pub choices: Vec<Choice>,
    /// The monitors asked for that were left out ([`EngineConfig::partial`]).
    pub unavailable: Vec<Unavailable>,
}

impl Attached<'_> {
    /// `wakeup (tracepoint backend), ...` for the start-up line.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .choices
            .iter()
            .map(|c| format!("{} ({} backend)", c.monitor.name(), c.backend()))
            .collect();
        parts.join(", ")
    }
}

/// Picks backends, loads the programs they need configured for `cfg`, and
/// attaches them.
pub fn start<'obj>(
    cfg: &EngineConfig,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> anyhow::Result<Attached<'obj>> {
    cfg.backend.check(&cfg.monitors)?;
    let version = crate::procfs::kernel_version();
    let mut prober = Prober::new();
    let mut choices: Vec<Choice> = Vec::new();
    let mut unavailable = Vec::new();
    for &m in &cfg.monitors {
        match backend::choose(
            m.name(),
            m.backends(),
            cfg.backend.of(m),
            cfg.spare_syscalls,
            &mut prober,
        ) {
            Ok(resolved) => choices.push(Choice {
                monitor: m,
                resolved,
            }),
            // A backend the user forced must work.
            Err(e) if cfg.partial && cfg.backend.of(m).is_none() => unavailable.push(Unavailable {
                monitor: m,
                reason: format!("{e:#}"),
            }),
            Err(e) => return Err(e),
        }
    }
    let programs: Vec<&str> = choices
        .iter()
        .flat_map(|c| c.resolved.programs.iter().copied())
        .collect();
    hooks::quiet_libbpf();

    let mut open = KvmWatcherSkelBuilder::default()
        .open(storage)
        .context("cannot open the BPF object")?;
    {
        let ro = rodata(&mut open)?;
        ro.filter_pids = !cfg.filter.pids.is_empty();
        ro.filter_tid = cfg.filter.tid.unwrap_or(0);
        ro.filter_vcpu = cfg.filter.vcpu.map_or(-1, |v| v as i32);
    }
    open.maps
        .events
        .set_max_entries(cfg.ringbuf_kib * 1024)
        .context("cannot size the ring buffer")?;
    for mut prog in open.open_object_mut().progs_mut() {
        let wanted = prog.name().to_str().is_some_and(|n| programs.contains(&n));
        prog.set_autoload(wanted);
    }
    // Every monitor configures its part, running or not: the maps of those
    // that are not running still get created, and should be tiny. A running
    // one may turn on programs of its own that it runs itself (vcpu-load's
    // task iterator); only the backends' programs are attached here.
    for &m in REGISTRY {
        let chosen = choices.iter().find(|c| c.monitor.name() == m.name());
        m.configure(
            &mut open,
            &Configure {
                resolved: chosen.map(|c| &c.resolved),
                mode: cfg.mode,
                options: &cfg.options,
                version,
            },
        )?;
    }
    let skel = open
        .load()
        .map_err(|e| match crate::hooks::verifier_refusal() {
            Some(why) => anyhow::anyhow!("cannot load the BPF programs: {e} ({why})"),
            None => anyhow::anyhow!("cannot load the BPF programs: {e}"),
        })?;
    for &pid in &cfg.filter.pids {
        skel.maps
            .allowed_pids
            .update(&pid.to_ne_bytes(), &[1u8], MapFlags::ANY)
            .context("cannot set the pid filter")?;
    }
    let mut links: Vec<Link> = Vec::new();
    for prog in skel.object().progs_mut() {
        let name = prog.name().to_string_lossy().into_owned();
        if !programs.contains(&name.as_str()) {
            continue;
        }
        links.push(
            prog.attach()
                .map_err(|e| anyhow::anyhow!("cannot attach {name}: {e}"))?,
        );
    }
    Ok(Attached {
        skel,
        links,
        choices,
        unavailable,
    })
}

/// The pids named by `--pid` and `--vm`, checked to be VMMs.
pub fn resolve_pids(pids: &[u32], vms: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for &pid in pids {
        crate::procfs::check_vmm_pid(pid)?;
        out.push(pid);
    }
    for name in vms {
        out.extend(crate::procfs::pids_of_vm(name)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Installs handlers for the signals that end a watch (SIGINT, SIGTERM, and
/// SIGHUP and SIGQUIT, e.g. a closed terminal) that set the returned flag, so
/// every one of them ends it cleanly: detached, drained, counts file written.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handler")?;
        // Without SA_RESTART, so a write to a stdout nobody reads is
        // interrupted and can give up (output::stop_on).
        // SAFETY: reads the action just installed and installs it again
        // with one flag less; the handler itself is signal-hook's.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) == 0 {
                act.sa_flags &= !libc::SA_RESTART;
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    }
    crate::output::stop_on(Arc::clone(&stop));
    Ok(stop)
}
