//! A busy vCPU that is already loaded (inside KVM_RUN, on a CPU) before
//! vcpu-load attaches: the first interval must count all of its time on a
//! CPU, not only the time after its next switch-in. Ground truth: the
//! interval the record states, and the thread's own on-CPU time
//! (`/proc/<pid>/task/<tid>/schedstat`) over the same window; a busy vCPU is
//! loaded whenever it is on a CPU.
//!
//! Returns errors instead of panicking, so the kernel matrix can report a
//! cell and go on.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_watcher::child::{Spawn, Stream};
use kvm_watcher::output::monotonic_ns;
use kvm_watcher::procfs::schedstat;
use serde_json::Value;

use super::observe::parse_records;

/// The busy vCPU's first interval, as the watcher and as schedstat saw it.
#[derive(Debug, Clone)]
pub struct FirstInterval {
    /// The interval's length, as the record states it.
    pub interval_ns: u64,
    /// Loaded time the watcher reported (`run_ns`).
    pub run_ns: u64,
    /// The vCPU thread's on-CPU time over the same window (schedstat).
    pub on_cpu_ns: u64,
    /// What the watcher wrote on stderr (a warning if it could not seed).
    pub stderr: String,
    /// Time every CPU spent in interrupts or had stolen by the hypervisor
    /// under this host during the watch (`/proc/stat`): with IRQ time
    /// accounting and paravirtual steal time the scheduler leaves both out
    /// of a task's on-CPU time, while the vCPU stays loaded through them.
    pub irq_ns: u64,
}

impl FirstInterval {
    /// Ok when the loaded time equals the on-CPU time within 1 % of the
    /// interval, and the interval within 1 % unless schedstat shows the
    /// thread off its CPU for longer than that (another task ran there).
    pub fn check(&self) -> Result<(), String> {
        let tol = self.interval_ns / 100;
        let over = self.run_ns.saturating_sub(self.on_cpu_ns);
        let under = self.on_cpu_ns.saturating_sub(self.run_ns);
        // Loaded for the whole interval while schedstat shows the thread on
        // its CPU for at least 90 % of it: the vCPU counts from the first
        // instant, which is the point; schedstat's shortfall is left open.
        let whole =
            self.run_ns + tol >= self.interval_ns && self.on_cpu_ns * 10 >= self.interval_ns * 9;
        // Over: schedstat of a running thread moves only at ticks and
        // switches (a tick, 4 ms at HZ=250, per reading), and our hosts
        // showed up to 1.6 % more loaded than on-CPU time with no interrupt
        // or steal time: 3 % of the interval.
        // Under: a missed start loses a large part of the interval (369 ms
        // of 1000 before seeding); the sampled schedstat and TCG's timing
        // are good to about 2 % (seen: 943.1 ms loaded, 959.0 ms on CPU).
        if under > 3 * tol || (over > 3 * tol + self.irq_ns && !whole) {
            return Err(format!(
                "{self}: loaded time differs from on-CPU time by more than 1 %"
            ));
        }
        let off_cpu = self.interval_ns.saturating_sub(self.on_cpu_ns);
        if self.interval_ns - self.run_ns.min(self.interval_ns) > 3 * tol + off_cpu {
            return Err(format!(
                "{self}: loaded time is short of the interval; stderr: {}",
                self.stderr.trim()
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for FirstInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "first interval {:.1} ms: loaded {:.1} ms, on CPU (schedstat) {:.1} ms, interrupts and steal {:.1} ms",
            self.interval_ns as f64 / 1e6,
            self.run_ns as f64 / 1e6,
            self.on_cpu_ns as f64 / 1e6,
            self.irq_ns as f64 / 1e6
        )
    }
}

/// Time all CPUs spent in hard and soft interrupts, or had stolen, so far
/// (`/proc/stat`), ns.
fn irq_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(6)
                .take(2)
                .filter_map(|x| x.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

/// On-CPU time of thread `tid` of `pid`, ns.
fn on_cpu(pid: u32, tid: u32) -> Option<u64> {
    schedstat(pid, tid).map(|s| s.run_ns)
}

/// Linear interpolation of the (CLOCK_MONOTONIC, on-CPU ns) samples at `at`.
fn on_cpu_at(samples: &[(u64, u64)], at: u64) -> Option<u64> {
    let i = samples.iter().position(|&(t, _)| t >= at)?;
    if i == 0 {
        return None; // the samples do not reach back that far
    }
    let ((t0, v0), (t1, v1)) = (samples[i - 1], samples[i]);
    let frac = (at - t0) as f64 / (t1 - t0).max(1) as f64;
    Some(v0 + ((v1 - v0) as f64 * frac) as u64)
}

/// Runs a busy one-vCPU guest, waits until its vCPU has run for a while,
/// then runs `kvm-watcher vcpu-load --summary -i 1` (with `--backend
/// backend` if given) on it and returns its first interval.
pub fn busy_vcpu_first_interval(backend: Option<&str>) -> Result<FirstInterval, String> {
    let mut cmd = Command::new(super::bin());
    cmd.args([
        "vm",
        "--vcpus",
        "1",
        "--seconds",
        "30",
        "--wait-for-signal",
        "--json",
    ]);
    let vm = Spawn::new(cmd)
        .name("kvm-watcher vm")
        .ready_on(Stream::Stderr, "kvm-watcher vm: ready ")
        .ready_within(Duration::from_secs(60))
        .start()
        .map_err(|e| super::failure(&e))?;
    let ready = vm
        .ready_line()
        .and_then(super::parse_ready)
        .ok_or("bad ready line")?;
    let (pid, tid) = (ready.pid, ready.tids[0]);
    // Real-time priority keeps other tasks of a busy machine from
    // preempting the vCPU soon after the watcher attaches, which would hide
    // a missed start (the next switch-in loads it again). RT throttling
    // still leaves the CPU to others 5 % of the time.
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: a plain syscall on a thread of our child with a valid parameter.
    unsafe { libc::sched_setscheduler(tid as i32, libc::SCHED_FIFO, &param) };
    vm.signal(libc::SIGUSR1).map_err(|e| e.to_string())?;

    // Loaded before the watcher attaches: the vCPU has been on a CPU for
    // 300 ms of guest code.
    let t0 = Instant::now();
    let base = on_cpu(pid, tid).ok_or("no schedstat")?;
    while on_cpu(pid, tid).ok_or("vCPU thread gone")? < base + 300_000_000 {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("the vCPU did not run for 300 ms within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = on_cpu(pid, tid) {
                    samples.push((monotonic_ns(), v));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        })
    };
    let mut cmd = Command::new(super::bin());
    cmd.args([
        "vcpu-load",
        "--summary",
        "-i",
        "1",
        "-t",
        "2.5",
        "--output",
        "json",
    ]);
    cmd.args(["-p", &pid.to_string()]);
    if let Some(b) = backend {
        cmd.args(["--backend", b]);
    }
    let watcher = Spawn::new(cmd)
        .name("kvm-watcher vcpu-load")
        .ready_on(Stream::Stderr, "kvm-watcher: watching")
        .ready_within(Duration::from_secs(120))
        .start()
        .map_err(|e| super::failure(&e))?;
    let attached_ns = monotonic_ns();
    let irq_before = irq_time();
    let exit = watcher
        .wait_or_kill(Duration::from_secs(120))
        .map_err(|e| super::failure(&e))?;
    let irq_ns = irq_time().saturating_sub(irq_before);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| "sampler panicked")?;
    let _ = vm.stop(libc::SIGKILL, Duration::from_secs(10));
    if !exit.status.success() || exit.killed {
        return Err(format!(
            "kvm-watcher vcpu-load failed: {}",
            exit.stderr.trim()
        ));
    }

    let records = parse_records(&exit.stdout)?;
    let first: &Value = records
        .iter()
        .find(|r| r["monitor"] == "vcpu_interval" && r["tid"].as_u64() == Some(u64::from(tid)))
        .ok_or_else(|| format!("no vcpu_interval record of the vCPU: {}", exit.stdout))?;
    let num = |k: &str| first[k].as_u64().ok_or(format!("no {k} in {first}"));
    let (end, interval_ns, run_ns) = (num("time_ns")?, num("interval_ns")?, num("run_ns")?);
    let start = end - interval_ns;
    // The first interval ends about 1 s after the watcher says it is
    // watching (its schedule starts then), the second about 2 s after: a
    // later first record means the vCPU was missing from the first interval.
    if end > attached_ns + 1_500_000_000 {
        return Err(format!(
            "the vCPU is missing from the first interval; its first record: {first}"
        ));
    }
    let on_cpu_ns = on_cpu_at(&samples, end)
        .zip(on_cpu_at(&samples, start))
        .map(|(b, a)| b - a)
        .ok_or("schedstat samples do not cover the interval")?
        // A running thread's schedstat moves only at ticks and switches: the
        // interpolated figure can come out longer than the interval itself
        // (seen under TCG: 1014.8 ms in 995.1 ms), which no thread can be.
        .min(interval_ns);
    Ok(FirstInterval {
        interval_ns,
        run_ns,
        on_cpu_ns,
        stderr: exit.stderr,
        irq_ns,
    })
}
