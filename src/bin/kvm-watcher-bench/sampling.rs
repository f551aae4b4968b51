//! `kvm-watcher-bench dirty-rate`: what the dirty-rate sampler costs for 1,
//! 4 and 16 GiB of guest RAM: guest memory read per second and the
//! watcher's CPU, with the default read cap and without one. The guests
//! (several: one caps --memory at 3820 MiB) write every page once and then
//! linger, so all their memory is there to be read, as in a guest that has
//! run for a while.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::env::Env;
use crate::process::{Proc, Ready};
use crate::procfs::clock_ticks;

/// One size and cap.
#[derive(Serialize, Debug)]
pub struct Case {
    pub guest_gib: u64,
    pub vms: u64,
    pub mib_per_vm: u64,
    /// --max-read-rate, MiB/s per VM.
    pub cap_mib_per_s: u64,
    pub seconds: f64,
    pub windows: u64,
    pub read_mib_per_s: f64,
    pub read_mib_per_s_per_gib: f64,
    /// utime + stime of the watcher over the wall time, % of one CPU.
    pub cpu_percent: f64,
    /// Peak RSS of the watcher.
    pub peak_rss_mib: f64,
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Guests of `gib` GiB in all, each written once and lingering.
fn guests(env: &Env, gib: u64) -> Result<(Vec<Proc>, u64, u64)> {
    let vms = gib.div_ceil(3);
    let mib = gib * 1024 / vms;
    if mem_available_mib() < gib * 1024 + 2048 {
        bail!(
            "{gib} GiB of guests need {} MiB free, {} MiB are",
            gib * 1024 + 2048,
            mem_available_mib()
        );
    }
    let mut out = Vec::new();
    for _ in 0..vms {
        let mut c = env.kw(&["vm"]);
        let pages = (mib * 256).to_string();
        c.args(["--memory", &mib.to_string(), "--slots", "1"])
            .args(["--dirty-pages", &pages, "--passes", "1", "--linger"]);
        out.push(Proc::start(
            "kvm-watcher vm (dirty-rate)",
            c,
            Ready {
                marker: "kvm-watcher vm: lingering",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )?);
    }
    Ok((out, vms, mib))
}

fn case(env: &Env, gib: u64, cap: u64, seconds: f64) -> Result<Case> {
    let (vms, n, mib) = guests(env, gib)?;
    let pids: Vec<String> = vms.iter().map(|v| v.pid().to_string()).collect();
    let mut args = vec!["dirty-rate", "--output", "json", "-i", "1"];
    let cap_s = cap.to_string();
    let secs = seconds.to_string();
    args.extend(["--max-read-rate", &cap_s, "-t", &secs]);
    for p in &pids {
        args.extend(["-p", p]);
    }
    let kw = Proc::start(
        "dirty-rate",
        env.kw(&args),
        Ready {
            marker: "kvm-watcher: watching",
            on_stdout: false,
            perf_fds: 0,
        },
        true,
    )?;
    let (t0, ticks0) = (Instant::now(), clock_ticks(kw.pid())?);
    let (mut ticks1, mut hwm_kib) = (ticks0, 0);
    // The last readings before it exits by itself (-t).
    while t0.elapsed().as_secs_f64() < seconds - 0.3 {
        std::thread::sleep(Duration::from_millis(100));
        ticks1 = clock_ticks(kw.pid()).unwrap_or(ticks1);
        hwm_kib = hwm_kib.max(crate::procfs::status_kib(kw.pid(), "VmHWM:"));
    }
    let wall = t0.elapsed().as_secs_f64();
    let st = kw.wait_exit(Duration::from_secs(60))?;
    for v in vms {
        let _ = v.stop(libc::SIGINT, Duration::from_secs(30));
    }
    if st.status != Some(0) {
        bail!("kvm-watcher dirty-rate failed: {}", st.stderr.trim());
    }
    let summary: serde_json::Value = st
        .stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .context("no summary record")?;
    let read = summary["dirty_rate_read_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
    // SAFETY: no arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let run_s = seconds;
    Ok(Case {
        guest_gib: gib,
        vms: n,
        mib_per_vm: mib,
        cap_mib_per_s: cap,
        seconds: run_s,
        windows: summary["dirty_rate_windows"].as_u64().unwrap_or(0),
        read_mib_per_s: read / run_s,
        read_mib_per_s_per_gib: read / run_s / gib as f64,
        cpu_percent: (ticks1 - ticks0) as f64 / hz / wall * 100.0,
        peak_rss_mib: hwm_kib.max(st.maxrss_kib) as f64 / 1024.0,
    })
}

/// Every size, with the default cap and with none; prints a table.
pub fn measure(env: &Env) -> Result<Vec<Case>> {
    let (sizes, seconds): (&[u64], f64) = if env.quick {
        (&[1], 4.0)
    } else {
        (&[1, 4, 16], 20.0)
    };
    let mut out = Vec::new();
    for &gib in sizes {
        for cap in [16, 4096] {
            eprintln!("  dirty-rate: {gib} GiB, --max-read-rate {cap}");
            out.push(case(env, gib, cap, seconds)?);
        }
    }
    println!(
        "{:>9} {:>4} {:>8} {:>10} {:>12} {:>16} {:>8} {:>9}",
        "GUEST GiB",
        "VMS",
        "CAP MiB/s",
        "WINDOWS",
        "READ MiB/s",
        "READ MiB/s/GiB",
        "CPU %",
        "RSS MiB"
    );
    for c in &out {
        println!(
            "{:>9} {:>4} {:>8} {:>10} {:>12.2} {:>16.2} {:>8.2} {:>9.1}",
            c.guest_gib,
            c.vms,
            c.cap_mib_per_s,
            c.windows,
            c.read_mib_per_s,
            c.read_mib_per_s_per_gib,
            c.cpu_percent,
            c.peak_rss_mib
        );
    }
    Ok(out)
}
