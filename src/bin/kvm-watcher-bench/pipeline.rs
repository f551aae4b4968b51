//! Part 3: the user-space pipeline (ring buffer, decode, NDJSON to
//! /dev/null) fed by the benchmark-only BPF event source, in a child process
//! of this binary (`kvm-watcher-bench pipeline`) per trial.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kvm_watcher::bpf::read_record;
use kvm_watcher::output::Output;
use kvm_watcher::output::{OutputFormat, TimeFormat};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, RingBufferBuilder};
use serde::Serialize;

use crate::env::Env;
use crate::skel::{self, BenchSkelBuilder};
use crate::stats::{Spread, spread};

#[derive(Serialize, serde::Deserialize, Clone, Debug, Default)]
pub struct PipelineTrial {
    target_rate: f64,
    /// Wall time from the first record to the last decoded one.
    seconds: f64,
    /// How long the generator took to emit target_rate * requested seconds.
    generator_seconds: f64,
    requested_seconds: f64,
    /// Kernel time per record of the generator program (BPF stats).
    producer_ns_per_record: f64,
    emitted: u64,
    lost: u64,
    decoded: u64,
    consumer_cpu_s: f64,
}

impl PipelineTrial {
    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.consumer_cpu_s / self.seconds
    }
    /// Zero lost, everything decoded, and the generator kept up with the target rate.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.decoded == self.emitted
            && self.emitted as f64 >= 0.99 * self.target_rate * self.requested_seconds
            && self.generator_seconds <= 1.03 * self.requested_seconds + 0.005
    }
}

fn thread_cpu_s() -> f64 {
    // SAFETY: rusage is plain data for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The child side: generator thread on CPU 0, decoder (this thread) on CPU 1,
/// NDJSON to stdout (the parent points it at /dev/null), result on stderr.
pub fn child(rate: f64, seconds: f64, defer_consume: bool) -> Result<()> {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut storage = MaybeUninit::uninit();
    let mut open = BenchSkelBuilder::default()
        .open(&mut storage)
        .context("cannot open the bench BPF object")?;
    for mut p in open.open_object_mut().progs_mut() {
        let gen_prog = p.name().to_str() == Some("gen_dirty_events");
        p.set_autoload(gen_prog);
    }
    // kvm-watcher's default --ringbuf-size.
    open.maps.events.set_max_entries(4096 * 1024)?;
    let skel = open.load().context("cannot load the bench BPF object")?;
    let prog_fd = skel.progs.gen_dirty_events.as_fd().as_raw_fd();

    if ncpu > 1 {
        pin_to_cpu(1);
    }
    let output = Rc::new(RefCell::new(Output::new(
        OutputFormat::Json,
        TimeFormat::Mono,
    )));
    let decoded = Rc::new(RefCell::new(0u64));
    let mut rb = RingBufferBuilder::new();
    {
        let output = Rc::clone(&output);
        let decoded = Rc::clone(&decoded);
        let mut names = kvm_watcher::procfs::VmNames::default();
        // The same decode + write path as session.rs's ring-buffer callback.
        rb.add(&skel.maps.events, move |data: &[u8]| {
            if kvm_watcher::monitors::write_record(data, &mut output.borrow_mut(), &mut names) {
                *decoded.borrow_mut() += 1;
            }
            0
        })?;
    }
    let ring = rb.build()?;

    let done = Arc::new(AtomicBool::new(false));
    let emitted = Arc::new(AtomicU64::new(0));
    let batch = ((rate / 4000.0) as u64).clamp(16, 8192);
    let generator = {
        let done = Arc::clone(&done);
        let emitted = Arc::clone(&emitted);
        std::thread::spawn(move || -> f64 {
            pin_to_cpu(0);
            let start = Instant::now();
            let total = (rate * seconds) as u64;
            let mut sent = 0u64;
            while sent < total {
                let due = start + Duration::from_secs_f64(sent as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let n = batch.min(total - sent);
                let mut ctx = [n];
                // SAFETY: zeroed opts are valid; the context outlives the call.
                let r = unsafe {
                    let mut opts: libbpf_rs::libbpf_sys::bpf_test_run_opts = std::mem::zeroed();
                    opts.sz = std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_test_run_opts>() as _;
                    opts.ctx_in = ctx.as_mut_ptr().cast();
                    opts.ctx_size_in = std::mem::size_of_val(&ctx) as _;
                    libbpf_rs::libbpf_sys::bpf_prog_test_run_opts(prog_fd, &mut opts)
                };
                if r != 0 {
                    eprintln!(
                        "BPF_PROG_TEST_RUN failed: {}",
                        std::io::Error::last_os_error()
                    );
                    break;
                }
                sent += n;
                emitted.store(sent, Ordering::Relaxed);
            }
            done.store(true, Ordering::Release);
            start.elapsed().as_secs_f64()
        })
    };
    let cpu0 = thread_cpu_s();
    let t0 = Instant::now();
    while !done.load(Ordering::Acquire) {
        if defer_consume {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        ring.poll(Duration::from_millis(100))?;
        output.borrow_mut().flush();
    }
    ring.consume()?;
    output.borrow_mut().flush();
    let wall = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_s() - cpu0;
    let generator_seconds = generator
        .join()
        .map_err(|_| anyhow!("generator panicked"))?;

    let mut lost = 0;
    let mut events = 0;
    let key = 2u32.to_ne_bytes();
    if let Some(per_cpu) = skel.maps.counters.lookup_percpu(&key, MapFlags::ANY)? {
        for v in per_cpu {
            if let Some(c) = read_record::<skel::types::monitor_counters>(&v) {
                lost += c.lost;
                events += c.events;
            }
        }
    }
    // Kernel time per record of the generator (reserve, fill, submit), from BPF stats.
    let gen_stats =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{prog_fd}")).unwrap_or_default();
    let stat = |k: &str| -> f64 {
        gen_stats
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let t = PipelineTrial {
        producer_ns_per_record: stat("run_time_ns:") / (events + lost).max(1) as f64,
        target_rate: rate,
        seconds: wall,
        generator_seconds,
        requested_seconds: seconds,
        emitted: events + lost,
        lost,
        decoded: *decoded.borrow(),
        consumer_cpu_s: cpu,
    };
    eprintln!("{}", serde_json::to_string(&t)?);
    Ok(())
}

fn pipeline_trial(rate: f64, seconds: f64) -> Result<PipelineTrial> {
    let me = std::env::current_exe()?;
    let out = Command::new(me)
        .args([
            "pipeline",
            "--rate",
            &format!("{rate}"),
            "--seconds",
            &format!("{seconds}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("pipeline trial failed: {}", err.trim());
    }
    let line = err.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("bad pipeline result: {err}"))
}

#[derive(Serialize)]
pub struct PipelineResult {
    pub record: &'static str,
    pub max_rate_zero_lost: Spread,
    pub trials: Vec<PipelineTrial>,
    cpu_pct_at_100k: Spread,
    cpu_pct_at_1m: Spread,
}

pub fn measure(env: &Env) -> Result<PipelineResult> {
    let seconds = if env.quick { 0.3 } else { 2.0 };
    let ladder: &[f64] = if env.quick {
        &[1e5, 2e5]
    } else {
        &[5e5, 1e6, 1.5e6, 2e6, 2.5e6, 3e6, 3.5e6, 4e6, 5e6, 6e6]
    };
    let mut trials = Vec::new();
    let mut best = Vec::new();
    let mut cpu100k = Vec::new();
    let mut cpu1m = Vec::new();
    for r in 0..env.rounds.min(3) {
        eprintln!("  pipeline: round {}", r + 1);
        let mut top = 0.0f64;
        let mut fails = 0;
        for &rate in ladder {
            let t = pipeline_trial(rate, seconds)?;
            if t.ok() {
                top = top.max(rate);
                fails = 0;
            } else {
                fails += 1;
            }
            trials.push(t);
            if fails >= 2 {
                break;
            }
        }
        best.push(top);
        let t = pipeline_trial(1e5, seconds)?;
        cpu100k.push(t.cpu_pct());
        trials.push(t);
        if !env.quick {
            let t = pipeline_trial(1e6, seconds)?;
            cpu1m.push(t.cpu_pct());
            trials.push(t);
        }
    }
    if env.quick {
        cpu1m = cpu100k.clone();
    }
    Ok(PipelineResult {
        record: "dirty_event (88 bytes with the ring-buffer header) -> DirtyRow -> NDJSON -> /dev/null",
        max_rate_zero_lost: spread(&best),
        trials,
        cpu_pct_at_100k: spread(&cpu100k),
        cpu_pct_at_1m: spread(&cpu1m),
    })
}
