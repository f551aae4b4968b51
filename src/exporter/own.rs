//! What `serve` says about itself: its build, each monitor's attach status
//! and backend, the kernel's run time and run count of each of its BPF
//! programs (the kernel's BPF statistics, kept while
//! `kernel.bpf_stats_enabled` is 1, as ebpf_exporter and bpftop read them),
//! its own CPU time and memory, and whether it is healthy (`/healthz`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use libbpf_rs::libbpf_sys;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// One BPF program of a monitor, and the link that attaches it.
pub struct Program {
    /// Every monitor that needs it, never none (one program serves all the
    /// monitors at the start of KVM_RUN, `kvm:kvm_fpu`, or on a thread's exit).
    pub users: Vec<&'static str>,
    /// Its name in the BPF object.
    pub name: String,
    /// Its file descriptor (a duplicate: the program stays loaded while held).
    pub fd: OwnedFd,
    /// Its link's kernel id (0 when it has none).
    pub link_id: u32,
}

impl Program {
    /// The monitor it is labelled with: the one that needs it, or those
    /// that share it joined by `+` (one program on `sched_switch` serves
    /// wakeup, vcpu-load and run-delay): its time is theirs together, and
    /// a sum by monitor must not charge it to one of them.
    pub fn monitor(&self) -> String {
        self.users.join("+")
    }
}

/// A program's figures from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Its kernel id (as `bpftool prog show` lists it).
    pub id: u32,
    /// Run time, ns, counted while kernel.bpf_stats_enabled is 1.
    pub run_time_ns: u64,
    /// Runs, counted likewise.
    pub run_cnt: u64,
}

/// The kernel's figures of program `fd`.
pub fn prog_stats(fd: BorrowedFd<'_>) -> Option<ProgStats> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: `info` is a bpf_prog_info of `len` bytes, all its pointers null.
    let ret = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(
            fd.as_raw_fd(),
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(ProgStats {
        id: info.id,
        run_time_ns: info.run_time_ns,
        run_cnt: info.run_cnt,
    })
}

/// True while link `id` exists and still holds a program.
pub fn link_attached(id: u32) -> bool {
    if id == 0 {
        return false;
    }
    // SAFETY: no pointers.
    let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(id) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a file descriptor just returned to us, closed once.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    libbpf_rs::query::LinkInfo::from_fd(fd.as_fd()).is_ok_and(|l| l.prog_id != 0)
}

/// The kernel id of link `link`.
pub fn link_id(link: &libbpf_rs::Link) -> u32 {
    libbpf_rs::query::LinkInfo::from_fd(link.as_fd()).map_or(0, |l| l.id)
}

/// 1 while the kernel keeps BPF statistics, 0 when not, None when unknown.
pub fn bpf_stats_enabled() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every monitor's attach status: (monitor, backend, attached).
pub fn status(
    programs: &[Program],
    backends: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str, bool)> {
    backends
        .iter()
        .map(|&(monitor, backend)| {
            let attached = programs
                .iter()
                .filter(|p| p.users.contains(&monitor))
                .all(|p| link_attached(p.link_id));
            (monitor, backend, attached)
        })
        .collect()
}

/// `/healthz`: Ok with a line per monitor while every monitor asked for is
/// attached, Err naming those that are not.
pub fn health(
    programs: &[Program],
    backends: &[(&'static str, &'static str)],
) -> Result<String, String> {
    let st = status(programs, backends);
    let detached: Vec<&str> = st.iter().filter(|s| !s.2).map(|s| s.0).collect();
    if detached.is_empty() {
        let mut body = String::from("ok\n");
        for (m, b, _) in &st {
            body.push_str(&format!("{m}: attached ({b} backend)\n"));
        }
        Ok(body)
    } else {
        Err(format!("detached: {}\n", detached.join(", ")))
    }
}

/// Encodes the exporter's own families.
pub fn encode(
    encoder: &mut DescriptorEncoder,
    programs: &[Program],
    backends: &[(&'static str, &'static str)],
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(
            "build",
            "kvm-watcher's version and the git revision it was built from; always 1",
            None,
            MetricType::Info,
        )?
        .encode_info(&vec![
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (
                "revision".to_string(),
                option_env!("KVM_WATCHER_GIT_REVISION")
                    .unwrap_or("unknown")
                    .to_string(),
            ),
        ])?;
    {
        let mut m = encoder.encode_descriptor(
            "monitor_attached",
            "1 while every BPF program of the monitor is attached, 0 once one is not; its backend as a label",
            None,
            MetricType::Gauge,
        )?;
        for (monitor, backend, attached) in status(programs, backends) {
            m.encode_family(&vec![
                ("monitor".to_string(), monitor.to_string()),
                ("backend".to_string(), backend.to_string()),
            ])?
            .encode_gauge(&i64::from(attached))?;
        }
    }
    let enabled = bpf_stats_enabled();
    encoder
        .encode_descriptor(
            "bpf_stats_enabled",
            "1 while the kernel keeps BPF run time and run counts (sysctl kernel.bpf_stats_enabled); the program figures below do not grow while it is 0",
            None,
            MetricType::Gauge,
        )?
        .encode_family(&Vec::<(String, String)>::new())?
        .encode_gauge(&i64::from(enabled.map_or(-1, i16::from)))?;
    let stats: Vec<(&Program, ProgStats)> = programs
        .iter()
        .filter_map(|p| prog_stats(p.fd.as_fd()).map(|s| (p, s)))
        .collect();
    let labels = |p: &Program, s: &ProgStats| {
        vec![
            ("monitor".to_string(), p.monitor()),
            ("program".to_string(), p.name.clone()),
            ("id".to_string(), s.id.to_string()),
        ]
    };
    {
        let mut m = encoder.encode_descriptor(
            "bpf_program_run",
            "Kernel time spent running each of kvm-watcher's BPF programs (the kernel's run_time_ns, counted while kernel.bpf_stats_enabled is 1)",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for (p, s) in &stats {
            m.encode_family(&labels(p, s))?
                .encode_counter::<NoLabelSet, _, f64>(&(s.run_time_ns as f64 / 1e9), None)?;
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "bpf_program_runs",
            "Runs of each of kvm-watcher's BPF programs (the kernel's run_cnt, counted while kernel.bpf_stats_enabled is 1)",
            None,
            MetricType::Counter,
        )?;
        for (p, s) in &stats {
            m.encode_family(&labels(p, s))?
                .encode_counter::<NoLabelSet, _, u64>(&s.run_cnt, None)?;
        }
    }
    if let Some(cpu) = crate::procfs::own_cpu_seconds() {
        encoder
            .encode_descriptor(
                "process_cpu",
                "CPU time of the kvm-watcher process, user plus system",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?
            .encode_family(&Vec::<(String, String)>::new())?
            .encode_counter::<NoLabelSet, _, f64>(&cpu, None)?;
    }
    if let Some(rss) = crate::procfs::own_rss_bytes() {
        encoder
            .encode_descriptor(
                "process_resident_memory",
                "Resident memory of the kvm-watcher process",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?
            .encode_family(&Vec::<(String, String)>::new())?
            .encode_gauge(&rss)?;
    }
    Ok(())
}
