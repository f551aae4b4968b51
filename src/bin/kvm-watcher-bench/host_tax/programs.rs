//! The BPF programs an attached tool holds, by name, and the kernel's time
//! in each of them while a workload runs (BPF statistics, switched on only
//! for those trials).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use libbpf_rs::libbpf_sys;

use crate::procfs::prog_stats;

/// Who a program belongs to: (monitor, program name).
pub type Labels = HashMap<u32, (String, String)>;

/// The body of `GET /metrics` from `serve` on 127.0.0.1:`port`.
pub fn scrape(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("cannot connect to serve on port {port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("serve answered no HTTP response: {text:.200}");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "serve answered /metrics with {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}

fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// prog id -> (monitor, program) from serve's own metrics (its
/// `bpf_program_runs` series, labelled with the kernel's program id).
pub fn labels_from_metrics(text: &str) -> Labels {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains("bpf_program_runs"))
        .filter_map(|l| {
            let id = label(l, "id")?.parse().ok()?;
            Some((
                id,
                (
                    label(l, "monitor")?.to_string(),
                    label(l, "program")?.to_string(),
                ),
            ))
        })
        .collect()
}

/// The kernel's (16-byte) name of program `id`.
pub fn kernel_name(id: u32) -> Option<String> {
    // SAFETY: the returned descriptor is owned here; `info` is a plain
    // bpf_prog_info of `len` bytes with every pointer null.
    unsafe {
        let fd = libbpf_sys::bpf_prog_get_fd_by_id(id);
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut info = libbpf_sys::bpf_prog_info::default();
        let mut len = std::mem::size_of_val(&info) as u32;
        if libbpf_sys::bpf_obj_get_info_by_fd(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&mut info as *mut libbpf_sys::bpf_prog_info).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        let name: Vec<u8> = info
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Some(String::from_utf8_lossy(&name).into_owned())
    }
}

/// Every program `pid` holds, named by the kernel ("" as the monitor).
pub fn labels_from_kernel(pid: u32) -> Labels {
    let mut ids: Vec<u32> = prog_stats(pid).into_keys().collect();
    ids.sort_unstable();
    numbered(
        ids.into_iter()
            .map(|id| (id, kernel_name(id).unwrap_or_else(|| format!("prog {id}"))))
            .collect(),
    )
}

/// (id, name) in load order -> labels, a name's second and later programs
/// numbered ("sched_switch#2"): bpftrace names each program after its probe,
/// and loads them in the script's order whenever it starts.
fn numbered(progs: Vec<(u32, String)>) -> Labels {
    let mut seen: HashMap<String, usize> = HashMap::new();
    progs
        .into_iter()
        .map(|(id, name)| {
            let n = seen.entry(name.clone()).or_default();
            *n += 1;
            let name = if *n == 1 { name } else { format!("{name}#{n}") };
            (id, (String::new(), name))
        })
        .collect()
}

/// Kernel BPF statistics on while held (BPF_ENABLE_STATS: the kernel counts
/// while any holder or the sysctl asks it to).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn new() -> Result<StatsOn> {
        // SAFETY: a plain syscall wrapper; the descriptor is owned here.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        if fd < 0 {
            bail!(
                "cannot enable BPF statistics: {}",
                std::io::Error::from_raw_os_error(-fd)
            );
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

/// `kernel.bpf_stats_enabled` off until dropped (then back to what it was):
/// the timed trials measure the programs as they run on a host where nobody
/// asked for statistics, which cost two clock reads per program run.
pub struct SysctlStatsOff {
    before: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// kernel.bpf_stats_enabled as it is now ("?" if unreadable).
pub fn sysctl_stats() -> String {
    std::fs::read_to_string(STATS_SYSCTL).map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

impl SysctlStatsOff {
    pub fn new() -> Result<SysctlStatsOff> {
        let before = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("cannot read {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "0")
            .with_context(|| format!("cannot write {STATS_SYSCTL}"))?;
        Ok(SysctlStatsOff {
            before: before.trim().to_string(),
        })
    }
}

impl Drop for SysctlStatsOff {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, &self.before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_of_one_name_are_numbered_in_load_order() {
        let l = numbered(vec![
            (7, "sched_switch".into()),
            (8, "sys_enter".into()),
            (9, "sched_switch".into()),
            (12, "sched_switch".into()),
        ]);
        assert_eq!(l[&7].1, "sched_switch");
        assert_eq!(l[&9].1, "sched_switch#2");
        assert_eq!(l[&12].1, "sched_switch#3");
        assert_eq!(l[&8].1, "sys_enter");
    }

    #[test]
    fn program_ids_come_from_the_runs_series_only() {
        let text = "\
# HELP kvm_watcher_bpf_program_runs Runs of each program
# TYPE kvm_watcher_bpf_program_runs counter
kvm_watcher_bpf_program_runs_total{monitor=\"run_delay\",program=\"tp_run_delay_switch\",id=\"812\"} 9
kvm_watcher_bpf_program_runs_total{monitor=\"vcpu_load\",program=\"tp_btf_sched_switch\",id=\"805\"} 3
kvm_watcher_bpf_program_run_seconds_total{monitor=\"exits\",program=\"tp_sys_enter\",id=\"9\"} 0.1
kvm_watcher_bpf_program_runs_total{monitor=\"exits\",program=\"broken\",id=\"x\"} 1
";
        let l = labels_from_metrics(text);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(
            l[&812],
            ("run_delay".to_string(), "tp_run_delay_switch".to_string())
        );
        assert_eq!(l[&805].1, "tp_btf_sched_switch");
    }
}
