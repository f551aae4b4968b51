//! kvm-watcher-bench: the overhead benchmark (issue 7). `scripts/bench` runs it
//! and README.md ("Benchmarks") explains the figures; `tests/bench_quick.rs`
//! runs `--quick` only to prove it still works.
//!
//! What it measures, all in one run (trials interleaved, repeated; medians with
//! min..max, ratios taken within a trial):
//! 1. kernel cost per event of each monitor (BPF stats: run_time_ns / run_cnt)
//!    against an empty program on the same hooks (raw_tp like kvm-watcher, and
//!    classic tracepoint like bpftrace) and against bpftrace doing the same job.
//!    In a trial every candidate is attached at once, so all see the same events.
//! 2. guest-visible overhead: the synthetic VM's work rate with nothing, each
//!    monitor, all four and bpftrace attached.
//! 3. the user-space pipeline (decode + NDJSON to /dev/null) fed by a
//!    benchmark-only BPF event source (src/bpf/bench.bpf.c).
//! 4. peak RSS and BPF map memory while tracking ~1M distinct dirty pages.
//! 5. attach + detach time per monitor, and bpftrace's.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use kvm_watcher::bpf::read_record;
use kvm_watcher::output::Output;
use kvm_watcher::output::{OutputFormat, TimeFormat};
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, RingBufferBuilder};
use serde::Serialize;
use serde_json::{Value, json};

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/bench.skel.rs"));
}
use skel::{BenchSkel, BenchSkelBuilder};

/// Overhead benchmark of kvm-watcher (run as root; see README, "Benchmarks").
#[derive(Parser, Debug)]
#[command(name = "kvm-watcher-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A few seconds per part, one trial each: proves the benchmark works, measures nothing reliable.
    #[arg(long)]
    quick: bool,
    /// Trials per configuration (default 5, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Where to write bench.json and bench.svg.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// The kvm-watcher binary (default: next to this one).
    #[arg(long)]
    kvm_watcher: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (internal) One pipeline trial: emit --rate dirty records/s for --seconds into the
    /// ring buffer, decode them and write NDJSON to stdout; print a JSON result on stderr.
    Pipeline {
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        /// Do not read the ring buffer before the generator is done (measures the
        /// producer alone; records beyond the ring's capacity are lost).
        #[arg(long)]
        defer_consume: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Some(Cmd::Pipeline {
            rate,
            seconds,
            defer_consume,
        }) => pipeline_child(rate, seconds, defer_consume),
        None => run(&cli),
    };
    if let Err(e) = r {
        eprintln!("kvm-watcher-bench: error: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// Small statistics.

#[derive(Serialize, Clone, Copy, Debug, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn spread(v: &[f64]) -> Spread {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            n: 0,
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    }
}

impl Spread {
    fn show(&self, digits: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        if self.n == 1 {
            return format!("{:.*}", digits, self.median);
        }
        format!(
            "{:.*} ({:.*}..{:.*})",
            digits, self.median, digits, self.min, digits, self.max
        )
    }
}

/// A deterministic shuffle (xorshift), so runs interleave configurations differently per round.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

// ---------------------------------------------------------------------------
// Processes.

/// A child process with its output drained by threads.
struct Proc {
    child: Child,
    name: String,
    ready_after: Duration,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    reaped: bool,
}

/// How a spawned process says it is ready.
struct Ready<'a> {
    marker: &'a str,
    on_stdout: bool,
    /// Also wait until the process holds this many perf_event fds (bpftrace attaches
    /// tracepoints through perf events after printing its "Attaching" line).
    perf_fds: usize,
}

/// Keeps the first 1 MiB of a stream and notices `marker`; discards the rest.
fn drain(
    mut r: Box<dyn Read + Send>,
    marker: Option<String>,
    tx: std::sync::mpsc::Sender<()>,
) -> String {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut found = marker.is_none();
    let mut tail = Vec::new();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !found && let Some(m) = &marker {
            tail.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&tail).contains(m.as_str()) {
                found = true;
                let _ = tx.send(());
            } else if tail.len() > 4096 {
                tail.drain(..tail.len() - 256);
            }
        }
        if kept.len() < (1 << 20) {
            kept.extend_from_slice(&buf[..n]);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn perf_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("perf_event"))
                })
                .count()
        })
        .unwrap_or(0)
}

impl Proc {
    /// Starts `cmd` (stdout to /dev/null unless `ready.on_stdout` or `keep_stdout`) and
    /// waits up to 60 s until it is ready.
    fn start(name: &str, mut cmd: Command, ready: Ready, keep_stdout: bool) -> Result<Proc> {
        let t0 = Instant::now();
        let stdout = if ready.on_stdout || keep_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = Some(ready.marker.to_string());
        let (m_out, m_err) = if ready.on_stdout {
            (marker, None)
        } else {
            (None, marker)
        };
        let out = child.stdout.take().map(|s| {
            let tx = tx.clone();
            std::thread::spawn(move || drain(Box::new(s), m_out, tx))
        });
        let e = child.stderr.take().unwrap();
        let err = Some(std::thread::spawn(move || drain(Box::new(e), m_err, tx)));
        let mut p = Proc {
            child,
            name: name.to_string(),
            ready_after: Duration::ZERO,
            out,
            err,
            reaped: false,
        };
        let deadline = t0 + Duration::from_secs(60);
        let ok = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok();
        if ok && ready.perf_fds > 0 {
            while perf_fds(p.pid()) < ready.perf_fds && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        p.ready_after = t0.elapsed();
        if !ok {
            let s = p.stop(libc::SIGKILL, Duration::from_secs(5))?;
            bail!(
                "{name} never became ready (exit {:?}); stderr: {}",
                s.status,
                s.stderr.trim()
            );
        }
        Ok(p)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits up to `timeout` for the process to exit by itself.
    fn wait_exit(mut self, timeout: Duration) -> Result<Stopped> {
        self.reap(Instant::now(), timeout)
    }

    /// Waits for the exit a signal sent earlier (at `t0`) asked for.
    fn finish(mut self, t0: Instant, timeout: Duration) -> Result<Stopped> {
        self.reap(t0, timeout)
    }

    /// Sends `sig`, waits (SIGKILL after `timeout`) and collects its output.
    fn stop(mut self, sig: i32, timeout: Duration) -> Result<Stopped> {
        let t0 = Instant::now();
        self.signal(sig);
        self.reap(t0, timeout)
    }

    fn reap(&mut self, t0: Instant, timeout: Duration) -> Result<Stopped> {
        let pid = self.pid() as i32;
        let mut status = 0;
        let mut killed = false;
        // Peak RSS is the last VmHWM read before the exit: rusage's ru_maxrss is no
        // use here, it also holds the RSS of this process, which the child's
        // pre-exec image shared (vfork-style spawn).
        let mut hwm_kib = 0;
        loop {
            hwm_kib = hwm_kib.max(status_kib(self.pid(), "VmHWM:"));
            // SAFETY: waiting for our own child, with valid out-pointers.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, std::ptr::null_mut()) };
            if r == pid {
                break;
            }
            if r < 0 {
                bail!("wait4({}): {}", self.name, std::io::Error::last_os_error());
            }
            if !killed && t0.elapsed() > timeout {
                self.signal(libc::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let exit_after = t0.elapsed();
        self.reaped = true;
        let stdout = self
            .out
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let st = if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status))
        } else {
            None
        };
        if killed {
            eprintln!(
                "kvm-watcher-bench: warning: {} did not exit within {timeout:?}, killed",
                self.name
            );
        }
        Ok(Stopped {
            status: st,
            exit_after,
            maxrss_kib: hwm_kib,
            stdout,
            stderr,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Stopped {
    status: Option<i32>,
    exit_after: Duration,
    maxrss_kib: u64,
    stdout: String,
    stderr: String,
}

/// SIGINT to all, then waits for each; kvm-watcher must exit 0 (bpftrace is only warned about).
fn stop_all(procs: Vec<Proc>) -> Result<()> {
    let t0 = Instant::now();
    for p in &procs {
        p.signal(libc::SIGINT);
    }
    for p in procs {
        let name = p.name.clone();
        let bt = name.starts_with("bt_") || name.starts_with("bpftrace");
        let st = p.finish(t0, Duration::from_secs(if bt { 15 } else { 60 }))?;
        if st.status != Some(0) && !bt {
            bail!("{name} failed ({:?}): {}", st.status, st.stderr.trim());
        }
    }
    Ok(())
}

/// Where the binaries are, and what this machine offers.
struct Env {
    kw: PathBuf,
    quick: bool,
    rounds: usize,
    ncpu: usize,
    has_watch: bool,
}

impl Env {
    fn kw(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kw);
        c.args(args);
        c
    }

    /// A kvm-watcher monitor, ready once it says it is watching.
    fn start_kw(&self, name: &str, args: &[&str]) -> Result<Proc> {
        Proc::start(
            name,
            self.kw(args),
            Ready {
                marker: "kvm-watcher: watching",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )
    }

    /// bpftrace running `script`, ready once its tracepoints are attached.
    fn start_bt(&self, name: &str, script: &BtScript) -> Result<Proc> {
        let mut c = Command::new("bpftrace");
        c.args(["-e", script.text]);
        c.env("BPFTRACE_MAP_KEYS_MAX", script.keys_max.to_string());
        Proc::start(
            name,
            c,
            Ready {
                marker: "Attaching",
                on_stdout: true,
                perf_fds: script.probes + self.ncpu,
            },
            false,
        )
    }

    /// `kvm-watcher vm <args> --wait-for-signal --json`, ready (not yet running).
    fn start_vm(&self, args: &[&str]) -> Result<Proc> {
        let mut c = self.kw(&["vm"]);
        c.args(args).args(["--wait-for-signal", "--json"]);
        Proc::start(
            "kvm-watcher vm",
            c,
            Ready {
                marker: "kvm-watcher vm: ready",
                on_stdout: false,
                perf_fds: 0,
            },
            true,
        )
    }
}

// ---------------------------------------------------------------------------
// BPF statistics from /proc/<pid>/fdinfo.

fn fdinfos(pid: u32) -> Vec<HashMap<String, String>> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let m: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        v.push(m);
    }
    v
}

fn num(m: &HashMap<String, String>, k: &str) -> Option<u64> {
    m.get(k).and_then(|v| v.parse().ok())
}

/// prog id -> (run_time_ns, run_cnt) of every program `pid` holds.
fn prog_stats(pid: u32) -> HashMap<u32, (u64, u64)> {
    let mut out = HashMap::new();
    for m in fdinfos(pid) {
        if m.contains_key("prog_type")
            && let (Some(id), Some(t), Some(c)) = (
                num(&m, "prog_id"),
                num(&m, "run_time_ns"),
                num(&m, "run_cnt"),
            )
        {
            out.insert(id as u32, (t, c));
        }
    }
    out
}

/// prog id -> raw tracepoint name, from the bpf links `pid` holds.
fn raw_tp_links(pid: u32) -> HashMap<u32, String> {
    fdinfos(pid)
        .into_iter()
        .filter(|m| m.get("link_type").is_some_and(|t| t == "raw_tracepoint"))
        .filter_map(|m| Some((num(&m, "prog_id")? as u32, m.get("tp_name")?.clone())))
        .collect()
}

fn prog_id_of_fd(fd: i32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------
// The empty programs (floors), loaded once.

struct Floors {
    skel: BenchSkel<'static>,
}

impl Floors {
    fn load() -> Result<Floors> {
        // The skeleton borrows its storage: leak one, it lives as long as the run.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = BenchSkelBuilder::default()
            .open(storage)
            .context("cannot open the bench BPF object")?;
        for mut p in open.open_object_mut().progs_mut() {
            let gen_prog = p.name().to_str() == Some("gen_dirty_events");
            p.set_autoload(!gen_prog);
        }
        let skel = open.load().context("cannot load the bench BPF object")?;
        Ok(Floors { skel })
    }

    /// Attaches the empty `kind` ("raw" or "tp") program on each of `hooks`.
    fn attach(&self, kind: &str, hooks: &[&str]) -> Result<(Vec<Link>, HashMap<u32, String>)> {
        let mut links = Vec::new();
        let mut ids = HashMap::new();
        for prog in self.skel.object().progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            let Some(hook) = name.strip_prefix(&format!("floor_{kind}_")) else {
                continue;
            };
            if !hooks.contains(&hook) {
                continue;
            }
            links.push(
                prog.attach()
                    .with_context(|| format!("cannot attach {name}"))?,
            );
            let id = prog_id_of_fd(prog.as_fd().as_raw_fd())
                .with_context(|| format!("no prog id for {name}"))?;
            ids.insert(id, hook.to_string());
        }
        Ok((links, ids))
    }
}

// ---------------------------------------------------------------------------
// bpftrace scripts: the same jobs the way a bpftrace user would write them.

struct BtScript {
    text: &'static str,
    probes: usize,
    keys_max: u64,
}

/// Per-page counts need kvm-watcher's default capacity (--max-pages, 4 Mi pages).
const BT_DIRTY_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { @pages[pid, args->slot, args->offset] = count(); }",
    probes: 1,
    keys_max: 4 << 20,
};
const BT_DIRTY_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { printf(\"%llu %s %d %d %u %llu\\n\", nsecs, comm, pid, tid, args->slot, args->offset); }",
    probes: 1,
    keys_max: 4096,
};
const BT_WAKEUP_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_vcpu_wakeup { @wakeups[pid, tid] = count(); }",
    probes: 1,
    keys_max: 16384,
};
const BT_WAKEUP_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_vcpu_wakeup { printf(\"%llu %s %d %d %llu %d %d\\n\", nsecs, comm, pid, tid, args->ns, args->waited, args->valid); }",
    probes: 1,
    keys_max: 4096,
};
const BT_HALT_POLL_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_halt_poll_ns { @changes[pid, args->vcpu_id] = count(); }",
    probes: 1,
    keys_max: 16384,
};
const BT_HALT_POLL_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_halt_poll_ns { printf(\"%llu %s %d %d %d %u %u %u\\n\", nsecs, comm, pid, tid, args->grow, args->vcpu_id, args->old, args->new); }",
    probes: 1,
    keys_max: 4096,
};
/// vCPU loaded while inside KVM_RUN and on a CPU: the tracepoint backend's logic.
const BT_VCPU_LOAD: BtScript = BtScript {
    text: "tracepoint:raw_syscalls:sys_enter /args->id == 16 && args->args[1] == 0xae80/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:raw_syscalls:sys_exit /args->id == 16 && @in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @max[pid, tid] = max($d); @min[pid, tid] = min($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @max[pid, args->prev_pid] = max($d); @min[pid, args->prev_pid] = min($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 4,
    keys_max: 16384,
};
const BT_ALL_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { printf(\"%llu %s %d %d %u %llu\\n\", nsecs, comm, pid, tid, args->slot, args->offset); }
tracepoint:kvm:kvm_vcpu_wakeup { printf(\"%llu %s %d %d %llu %d %d\\n\", nsecs, comm, pid, tid, args->ns, args->waited, args->valid); }
tracepoint:kvm:kvm_halt_poll_ns { printf(\"%llu %s %d %d %d %u %u %u\\n\", nsecs, comm, pid, tid, args->grow, args->vcpu_id, args->old, args->new); }
tracepoint:raw_syscalls:sys_enter /args->id == 16 && args->args[1] == 0xae80/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:raw_syscalls:sys_exit /args->id == 16 && @in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 7,
    keys_max: 16384,
};
const BT_ALL_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { @pages[pid, args->slot, args->offset] = count(); }
tracepoint:kvm:kvm_vcpu_wakeup { @wakeups[pid, tid] = count(); }
tracepoint:kvm:kvm_halt_poll_ns { @changes[pid, args->vcpu_id] = count(); }
tracepoint:raw_syscalls:sys_enter /args->id == 16 && args->args[1] == 0xae80/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:raw_syscalls:sys_exit /args->id == 16 && @in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 7,
    keys_max: 4 << 20,
};

// ---------------------------------------------------------------------------
// Workloads.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    /// One vCPU writing 8192 pages per pass into dirty-ring-logged memory, never halting.
    Dirty,
    /// Two vCPUs halting at 5000 Hz (LAPIC timer), no dirty pages.
    Halt,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Dirty => "dirty",
            Workload::Halt => "halt",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::Dirty => "pages dirtied/s",
            Workload::Halt => "halts/s",
        }
    }

    fn vm_args(self, seconds: f64) -> Vec<String> {
        let mut v: Vec<String> = match self {
            Workload::Dirty => [
                "--vcpus",
                "1",
                "--dirty-pages",
                "8192",
                "--dirty-log",
                "ring",
            ]
            .map(String::from)
            .to_vec(),
            Workload::Halt => ["--vcpus", "2", "--halt-hz", "5000"]
                .map(String::from)
                .to_vec(),
        };
        v.push("--seconds".into());
        v.push(format!("{seconds}"));
        v
    }

    /// Work per second from the VM's report.
    fn rate(self, report: &Value) -> Result<f64> {
        let secs = report["seconds"]
            .as_f64()
            .context("report has no seconds")?;
        let field = match self {
            Workload::Dirty => "pages_written",
            Workload::Halt => "halts",
        };
        let total: u64 = report["vcpus"]
            .as_array()
            .context("report has no vcpus")?
            .iter()
            .map(|v| v[field].as_u64().unwrap_or(0))
            .sum();
        Ok(total as f64 / secs.max(1e-9))
    }
}

/// Runs the VM of `w` for `seconds` while `attach` holds whatever it started; returns its report.
fn run_vm<T>(
    env: &Env,
    w: Workload,
    seconds: f64,
    attach: impl FnOnce() -> Result<T>,
) -> Result<(Value, T)> {
    let args = w.vm_args(seconds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = env.start_vm(&args)?;
    let held = attach()?;
    std::thread::sleep(Duration::from_millis(if env.quick { 50 } else { 300 }));
    vm.signal(libc::SIGUSR1);
    let st = vm.wait_exit(Duration::from_secs_f64(seconds + 60.0))?;
    if st.status != Some(0) {
        bail!("kvm-watcher vm failed: {}", st.stderr.trim());
    }
    let report: Value = serde_json::from_str(&st.stdout).context("VM report is not JSON")?;
    Ok((report, held))
}

// ---------------------------------------------------------------------------
// Part 1: kernel cost per event.

#[derive(Clone, Copy)]
enum Who {
    FloorRaw,
    FloorTp,
    Kw(&'static [&'static str]),
    Bt(&'static BtScript),
}

struct Candidate {
    label: &'static str,
    who: Who,
}

/// One comparison: a monitor in one mode, on its hooks, against bpftrace.
struct Case {
    monitor: &'static str,
    mode: &'static str,
    hooks: &'static [&'static str],
    kw: &'static str,
    bt: &'static str,
    bt_what: &'static str,
}

/// One trial's attached candidate.
struct Attached {
    label: &'static str,
    pid: u32,
    /// prog id -> hook ("*" for all of bpftrace's programs).
    progs: HashMap<u32, String>,
    proc_: Option<Proc>,
    _links: Vec<Link>,
}

const DIRTY_CANDIDATES: &[Candidate] = &[
    Candidate {
        label: "floor_raw",
        who: Who::FloorRaw,
    },
    Candidate {
        label: "floor_tp",
        who: Who::FloorTp,
    },
    Candidate {
        label: "kw_dirty_aggregate",
        who: Who::Kw(&["dirty", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_dirty_streaming",
        who: Who::Kw(&["dirty", "--output", "json"]),
    },
    Candidate {
        label: "bt_dirty_count",
        who: Who::Bt(&BT_DIRTY_COUNT),
    },
    Candidate {
        label: "bt_dirty_printf",
        who: Who::Bt(&BT_DIRTY_PRINTF),
    },
];

const HALT_CANDIDATES: &[Candidate] = &[
    Candidate {
        label: "floor_raw",
        who: Who::FloorRaw,
    },
    Candidate {
        label: "floor_tp",
        who: Who::FloorTp,
    },
    Candidate {
        label: "kw_wakeup_aggregate",
        who: Who::Kw(&["wakeup", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_wakeup_streaming",
        who: Who::Kw(&["wakeup", "--output", "json"]),
    },
    Candidate {
        label: "kw_halt_poll_aggregate",
        who: Who::Kw(&["halt-poll", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_halt_poll_streaming",
        who: Who::Kw(&["halt-poll", "--output", "json"]),
    },
    Candidate {
        label: "kw_vcpu_load",
        who: Who::Kw(&["vcpu-load", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "bt_wakeup_count",
        who: Who::Bt(&BT_WAKEUP_COUNT),
    },
    Candidate {
        label: "bt_wakeup_printf",
        who: Who::Bt(&BT_WAKEUP_PRINTF),
    },
    Candidate {
        label: "bt_halt_poll_count",
        who: Who::Bt(&BT_HALT_POLL_COUNT),
    },
    Candidate {
        label: "bt_halt_poll_printf",
        who: Who::Bt(&BT_HALT_POLL_PRINTF),
    },
    Candidate {
        label: "bt_vcpu_load",
        who: Who::Bt(&BT_VCPU_LOAD),
    },
];

const CASES: &[Case] = &[
    Case {
        monitor: "dirty",
        mode: "aggregate",
        hooks: &["kvm_dirty_ring_push"],
        kw: "kw_dirty_aggregate",
        bt: "bt_dirty_count",
        bt_what: "count() per (pid, slot, offset), 4 Mi keys like --max-pages",
    },
    Case {
        monitor: "dirty",
        mode: "streaming",
        hooks: &["kvm_dirty_ring_push"],
        kw: "kw_dirty_streaming",
        bt: "bt_dirty_printf",
        bt_what: "printf per event",
    },
    Case {
        monitor: "wakeup",
        mode: "aggregate",
        hooks: &["kvm_vcpu_wakeup"],
        kw: "kw_wakeup_aggregate",
        bt: "bt_wakeup_count",
        bt_what: "count() per (pid, tid)",
    },
    Case {
        monitor: "wakeup",
        mode: "streaming",
        hooks: &["kvm_vcpu_wakeup"],
        kw: "kw_wakeup_streaming",
        bt: "bt_wakeup_printf",
        bt_what: "printf per event",
    },
    Case {
        monitor: "halt_poll",
        mode: "aggregate",
        hooks: &["kvm_halt_poll_ns"],
        kw: "kw_halt_poll_aggregate",
        bt: "bt_halt_poll_count",
        bt_what: "count() per (pid, vcpu_id)",
    },
    Case {
        monitor: "halt_poll",
        mode: "streaming",
        hooks: &["kvm_halt_poll_ns"],
        kw: "kw_halt_poll_streaming",
        bt: "bt_halt_poll_printf",
        bt_what: "printf per event",
    },
    Case {
        monitor: "vcpu_load",
        mode: "aggregate",
        hooks: &["sys_enter", "sys_exit", "sched_switch"],
        kw: "kw_vcpu_load",
        bt: "bt_vcpu_load",
        bt_what: "sum/max/min/count per (pid, tid) from KVM_RUN + sched_switch",
    },
];

fn attach_candidate(
    env: &Env,
    floors: &Floors,
    c: &Candidate,
    raw_hooks: &[&str],
    tp_hooks: &[&str],
) -> Result<Attached> {
    let me = std::process::id();
    Ok(match c.who {
        Who::FloorRaw | Who::FloorTp => {
            let (kind, hooks) = if matches!(c.who, Who::FloorRaw) {
                ("raw", raw_hooks)
            } else {
                ("tp", tp_hooks)
            };
            let (links, progs) = floors.attach(kind, hooks)?;
            Attached {
                label: c.label,
                pid: me,
                progs,
                proc_: None,
                _links: links,
            }
        }
        Who::Kw(args) => {
            let p = env.start_kw(c.label, args)?;
            let progs = raw_tp_links(p.pid());
            Attached {
                label: c.label,
                pid: p.pid(),
                progs,
                proc_: Some(p),
                _links: Vec::new(),
            }
        }
        Who::Bt(script) => {
            let p = env.start_bt(c.label, script)?;
            let progs = prog_stats(p.pid())
                .into_keys()
                .map(|id| (id, "*".to_string()))
                .collect();
            Attached {
                label: c.label,
                pid: p.pid(),
                progs,
                proc_: Some(p),
                _links: Vec::new(),
            }
        }
    })
}

/// label -> hook -> (run_time_ns, run_cnt)
type Snapshot = HashMap<&'static str, HashMap<String, (u64, u64)>>;

fn snapshot(att: &[Attached]) -> Snapshot {
    let mut s = Snapshot::new();
    for a in att {
        let stats = prog_stats(a.pid);
        let per = s.entry(a.label).or_default();
        for (id, hook) in &a.progs {
            if let Some((t, c)) = stats.get(id) {
                let e = per.entry(hook.clone()).or_default();
                e.0 += t;
                e.1 += c;
            }
        }
    }
    s
}

fn delta(a: &Snapshot, b: &Snapshot) -> Snapshot {
    let mut d = Snapshot::new();
    for (label, hooks) in b {
        for (hook, (t, c)) in hooks {
            let (t0, c0) = a
                .get(label)
                .and_then(|h| h.get(hook))
                .copied()
                .unwrap_or((0, 0));
            d.entry(label)
                .or_default()
                .insert(hook.clone(), (t.saturating_sub(t0), c.saturating_sub(c0)));
        }
    }
    d
}

/// One kernel-cost trial: every candidate attached (in `order`), the VM run, stats deltas.
fn kernel_trial(
    env: &Env,
    floors: &Floors,
    w: Workload,
    cands: &[Candidate],
    order_seed: u64,
    seconds: f64,
) -> Result<(Snapshot, f64)> {
    let (raw_hooks, tp_hooks): (&[&str], &[&str]) = match w {
        Workload::Dirty => (
            &["kvm_dirty_ring_push", "sys_enter", "sched_process_exit"],
            &["kvm_dirty_ring_push"],
        ),
        Workload::Halt => (
            &[
                "kvm_vcpu_wakeup",
                "kvm_halt_poll_ns",
                "sys_enter",
                "sys_exit",
                "sched_switch",
                "sched_process_exit",
            ],
            &[
                "kvm_vcpu_wakeup",
                "kvm_halt_poll_ns",
                "sys_enter",
                "sys_exit",
                "sched_switch",
            ],
        ),
    };
    let mut order: Vec<&Candidate> = cands.iter().collect();
    shuffle(&mut order, order_seed);
    let mut before = Snapshot::new();
    let (report, att) = run_vm(env, w, seconds, || {
        let mut att = Vec::new();
        for c in &order {
            att.push(attach_candidate(env, floors, c, raw_hooks, tp_hooks)?);
        }
        std::thread::sleep(Duration::from_millis(200));
        before = snapshot(&att);
        Ok(att)
    })?;
    let after = snapshot(&att);
    stop_all(att.into_iter().filter_map(|a| a.proc_).collect())?;
    Ok((delta(&before, &after), w.rate(&report)?))
}

#[derive(Serialize, Clone)]
struct CaseResult {
    monitor: &'static str,
    mode: &'static str,
    hooks: &'static [&'static str],
    bpftrace_job: &'static str,
    events_per_trial: Spread,
    floor_raw_tp_ns: Spread,
    floor_classic_tp_ns: Spread,
    kvm_watcher_ns: Spread,
    bpftrace_ns: Spread,
    ratio_to_floor: Spread,
    ratio_to_classic_floor: Spread,
    bpftrace_over_kvm_watcher: Spread,
}

#[derive(Serialize, Clone)]
struct ProgramResult {
    candidate: &'static str,
    hook: String,
    ns_per_run: Spread,
    runs_per_trial: Spread,
}

fn per_event(d: &Snapshot, label: &str, hooks: &[&str], events: u64) -> f64 {
    let Some(h) = d.get(label) else {
        return f64::NAN;
    };
    let t: u64 = h
        .iter()
        .filter(|(k, _)| k.as_str() == "*" || hooks.contains(&k.as_str()))
        .map(|(_, v)| v.0)
        .sum();
    if events == 0 {
        f64::NAN
    } else {
        t as f64 / events as f64
    }
}

fn events_on(d: &Snapshot, label: &str, hooks: &[&str]) -> u64 {
    d.get(label)
        .map(|h| {
            h.iter()
                .filter(|(k, _)| hooks.contains(&k.as_str()))
                .map(|(_, v)| v.1)
                .sum()
        })
        .unwrap_or(0)
}

fn kernel_cost(env: &Env, floors: &Floors) -> Result<(Vec<CaseResult>, Vec<ProgramResult>)> {
    let seconds = if env.quick { 0.3 } else { 3.0 };
    let mut trials: Vec<(Workload, Snapshot)> = Vec::new();
    for r in 0..env.rounds {
        let mut ws = [Workload::Dirty, Workload::Halt];
        shuffle(&mut ws, r as u64 + 11);
        for w in ws {
            let cands = match w {
                Workload::Dirty => DIRTY_CANDIDATES,
                Workload::Halt => HALT_CANDIDATES,
            };
            eprintln!(
                "  kernel cost: round {}/{}, {} workload",
                r + 1,
                env.rounds,
                w.name()
            );
            let (d, _) = kernel_trial(env, floors, w, cands, r as u64 * 7 + 3, seconds)?;
            trials.push((w, d));
        }
    }
    let mut cases = Vec::new();
    for c in CASES {
        let mut v: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (_, d) in trials.iter().filter(|(_, d)| d.contains_key(c.kw)) {
            let events = events_on(d, "floor_raw", c.hooks);
            let floor = per_event(d, "floor_raw", c.hooks, events);
            let ctp = per_event(d, "floor_tp", c.hooks, events);
            let kw = per_event(d, c.kw, c.hooks, events);
            let bt = per_event(d, c.bt, c.hooks, events);
            v.entry("events").or_default().push(events as f64);
            v.entry("floor").or_default().push(floor);
            v.entry("ctp").or_default().push(ctp);
            v.entry("kw").or_default().push(kw);
            v.entry("bt").or_default().push(bt);
            v.entry("r_floor").or_default().push(kw / floor);
            v.entry("r_ctp").or_default().push(kw / ctp);
            v.entry("r_bt").or_default().push(bt / kw);
        }
        let s = |k: &str| spread(v.get(k).map(Vec::as_slice).unwrap_or(&[]));
        cases.push(CaseResult {
            monitor: c.monitor,
            mode: c.mode,
            hooks: c.hooks,
            bpftrace_job: c.bt_what,
            events_per_trial: s("events"),
            floor_raw_tp_ns: s("floor"),
            floor_classic_tp_ns: s("ctp"),
            kvm_watcher_ns: s("kw"),
            bpftrace_ns: s("bt"),
            ratio_to_floor: s("r_floor"),
            ratio_to_classic_floor: s("r_ctp"),
            bpftrace_over_kvm_watcher: s("r_bt"),
        });
    }
    // Every program of every candidate, per hook.
    // (candidate, hook) -> (ns per run, runs) per trial
    type PerProgram = BTreeMap<(&'static str, String), (Vec<f64>, Vec<f64>)>;
    let mut progs = PerProgram::new();
    for (_, d) in &trials {
        for (label, hooks) in d {
            for (hook, (t, c)) in hooks {
                let e = progs.entry((label, hook.clone())).or_default();
                if *c > 0 {
                    e.0.push(*t as f64 / *c as f64);
                }
                e.1.push(*c as f64);
            }
        }
    }
    let programs = progs
        .into_iter()
        .map(|((candidate, hook), (ns, runs))| ProgramResult {
            candidate,
            hook,
            ns_per_run: spread(&ns),
            runs_per_trial: spread(&runs),
        })
        .collect();
    Ok((cases, programs))
}

// ---------------------------------------------------------------------------
// Part 2: guest-visible overhead.

struct GuestConfig {
    name: &'static str,
    kw: &'static [&'static [&'static str]],
    bt: Option<&'static BtScript>,
}

const ALL_SUMMARY_SEPARATE: &[&[&str]] = &[
    &["wakeup", "--summary", "-i", "1", "--output", "json"],
    &["halt-poll", "--summary", "-i", "1", "--output", "json"],
    &["dirty", "--summary", "-i", "1", "--output", "json"],
    &["vcpu-load", "-i", "1", "--output", "json"],
];
const ALL_ROWS_SEPARATE: &[&[&str]] = &[
    &["wakeup", "--output", "json"],
    &["halt-poll", "--output", "json"],
    &["dirty", "--output", "json"],
    &["vcpu-load", "-i", "1", "--output", "json"],
];

fn guest_configs(env: &Env) -> Vec<GuestConfig> {
    let (all_summary, all_rows): (
        &'static [&'static [&'static str]],
        &'static [&'static [&'static str]],
    ) = if env.has_watch {
        (
            &[&["watch", "-i", "1", "--output", "json"]],
            &[&["watch", "--rows", "-i", "1", "--output", "json"]],
        )
    } else {
        (ALL_SUMMARY_SEPARATE, ALL_ROWS_SEPARATE)
    };
    vec![
        GuestConfig {
            name: "none",
            kw: &[],
            bt: None,
        },
        GuestConfig {
            name: "wakeup rows",
            kw: &[&["wakeup", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "halt-poll rows",
            kw: &[&["halt-poll", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "dirty rows",
            kw: &[&["dirty", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "dirty --summary",
            kw: &[&["dirty", "--summary", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "vcpu-load",
            kw: &[&["vcpu-load", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "all four (summary)",
            kw: all_summary,
            bt: None,
        },
        GuestConfig {
            name: "all four (rows)",
            kw: all_rows,
            bt: None,
        },
        GuestConfig {
            name: "bpftrace all four (counts)",
            kw: &[],
            bt: Some(&BT_ALL_COUNT),
        },
        GuestConfig {
            name: "bpftrace all four (printf)",
            kw: &[],
            bt: Some(&BT_ALL_PRINTF),
        },
    ]
}

#[derive(Serialize)]
struct GuestResult {
    workload: &'static str,
    unit: &'static str,
    config: &'static str,
    rate: Spread,
    work_lost_pct: Spread,
}

fn guest_overhead(env: &Env) -> Result<Vec<GuestResult>> {
    let seconds = if env.quick { 0.3 } else { 2.5 };
    let mut configs = guest_configs(env);
    if env.quick {
        // Only what the targets need (and the unwatched baseline, first).
        configs.retain(|c| c.name == "none" || c.name.starts_with("all four"));
    }
    // (workload, config index) -> per-round rates
    let mut rates: HashMap<(&str, usize), Vec<f64>> = HashMap::new();
    for r in 0..env.rounds {
        let mut trials: Vec<(Workload, usize)> = [Workload::Dirty, Workload::Halt]
            .iter()
            .flat_map(|&w| (0..configs.len()).map(move |i| (w, i)))
            .collect();
        shuffle(&mut trials, r as u64 + 101);
        for (w, i) in trials {
            let cfg = &configs[i];
            eprintln!(
                "  guest overhead: round {}/{}, {} workload, {}",
                r + 1,
                env.rounds,
                w.name(),
                cfg.name
            );
            let (report, procs) = run_vm(env, w, seconds, || {
                let mut procs = Vec::new();
                for args in cfg.kw {
                    procs.push(env.start_kw(cfg.name, args)?);
                }
                if let Some(s) = cfg.bt {
                    procs.push(env.start_bt(&format!("bt_{}", cfg.name), s)?);
                }
                Ok(procs)
            })?;
            stop_all(procs)?;
            rates
                .entry((w.name(), i))
                .or_default()
                .push(w.rate(&report)?);
        }
    }
    let mut out = Vec::new();
    for w in [Workload::Dirty, Workload::Halt] {
        let base = rates.get(&(w.name(), 0)).cloned().unwrap_or_default();
        for (i, cfg) in configs.iter().enumerate() {
            let v = rates.get(&(w.name(), i)).cloned().unwrap_or_default();
            // Paired with the same round's unwatched run.
            let lost: Vec<f64> = v
                .iter()
                .zip(&base)
                .map(|(x, b)| 100.0 * (1.0 - x / b))
                .collect();
            out.push(GuestResult {
                workload: w.name(),
                unit: w.unit(),
                config: cfg.name,
                rate: spread(&v),
                work_lost_pct: spread(&lost),
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Part 3: the user-space pipeline.

#[derive(Serialize, serde::Deserialize, Clone, Debug, Default)]
struct PipelineTrial {
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
    fn cpu_pct(&self) -> f64 {
        100.0 * self.consumer_cpu_s / self.seconds
    }
    /// Zero lost, everything decoded, and the generator kept up with the target rate.
    fn ok(&self) -> bool {
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
fn pipeline_child(rate: f64, seconds: f64, defer_consume: bool) -> Result<()> {
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
struct PipelineResult {
    record: &'static str,
    max_rate_zero_lost: Spread,
    trials: Vec<PipelineTrial>,
    cpu_pct_at_100k: Spread,
    cpu_pct_at_1m: Spread,
}

fn pipeline(env: &Env) -> Result<PipelineResult> {
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

// ---------------------------------------------------------------------------
// Part 4: memory at ~1M distinct dirty pages.

#[derive(Serialize)]
struct MapMem {
    id: u64,
    name: String,
    map_type: u64,
    max_entries: u64,
    memlock_bytes: u64,
}

#[derive(Serialize)]
struct MemoryResult {
    vms: usize,
    vm_memory_mib: u64,
    distinct_pages: u64,
    peak_rss_mib: f64,
    rss_before_exit_mib: f64,
    maps: Vec<MapMem>,
    maps_memlock_mib: f64,
    note: &'static str,
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn memory(env: &Env) -> Result<MemoryResult> {
    // The synthetic VM caps --memory at 3820 MiB: two 2 GiB VMs give 2^20 pages.
    let (vms, mib) = if env.quick { (2, 16u64) } else { (2, 2048u64) };
    let pages_per_vm = mib * 256;
    let dir = std::env::temp_dir().join(format!("kvm-watcher-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let counts = dir.join("counts.txt");
    let kw = env.start_kw(
        "dirty (memory)",
        &[
            "dirty",
            "--summary",
            "-i",
            "1",
            "--output",
            "json",
            "--counts-file",
            counts.to_str().unwrap(),
        ],
    )?;
    let mut vmp = Vec::new();
    for _ in 0..vms {
        let mut c = env.kw(&["vm"]);
        c.args([
            "--memory",
            &mib.to_string(),
            "--dirty-pages",
            &pages_per_vm.to_string(),
            "--dirty-log",
            "ring",
            "--passes",
            "1",
            "--wait-for-signal",
        ]);
        vmp.push(Proc::start(
            "kvm-watcher vm (memory)",
            c,
            Ready {
                marker: "kvm-watcher vm: ready",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )?);
    }
    eprintln!("  memory: {vms} VMs dirtying {pages_per_vm} pages each");
    for v in &vmp {
        v.signal(libc::SIGUSR1);
    }
    for v in vmp {
        let st = v.wait_exit(Duration::from_secs(300))?;
        if st.status != Some(0) {
            bail!("kvm-watcher vm failed: {}", st.stderr.trim());
        }
    }
    std::thread::sleep(Duration::from_millis(1500)); // one summary interval
    let pid = kw.pid();
    let rss_before = status_kib(pid, "VmHWM:");
    let names: HashMap<u32, String> = libbpf_rs::query::MapInfoIter::default()
        .map(|m| (m.id, m.name.to_string_lossy().into_owned()))
        .collect();
    let mut maps: Vec<MapMem> = fdinfos(pid)
        .into_iter()
        .filter(|m| m.contains_key("map_type"))
        .map(|m| MapMem {
            id: num(&m, "map_id").unwrap_or(0),
            name: num(&m, "map_id")
                .and_then(|id| names.get(&(id as u32)).cloned())
                .unwrap_or_default(),
            map_type: num(&m, "map_type").unwrap_or(0),
            max_entries: num(&m, "max_entries").unwrap_or(0),
            memlock_bytes: num(&m, "memlock").unwrap_or(0),
        })
        .collect();
    // A map can be open more than once (skeleton fd, MapHandle): count each once.
    let mut seen = std::collections::HashSet::new();
    maps.retain(|m| seen.insert(m.id));
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock_bytes));
    let st = kw.stop(libc::SIGINT, Duration::from_secs(120))?;
    if st.status != Some(0) {
        bail!("kvm-watcher dirty failed: {}", st.stderr.trim());
    }
    let text = std::fs::read_to_string(&counts).unwrap_or_default();
    let distinct = text.lines().count().saturating_sub(1) as u64;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(MemoryResult {
        vms,
        vm_memory_mib: mib,
        distinct_pages: distinct,
        peak_rss_mib: st.maxrss_kib as f64 / 1024.0,
        rss_before_exit_mib: rss_before as f64 / 1024.0,
        maps_memlock_mib: maps.iter().map(|m| m.memlock_bytes).sum::<u64>() as f64
            / (1 << 20) as f64,
        maps,
        note: "kvm-watcher dirty --summary --counts-file, two synthetic VMs (the VM caps --memory at 3820 MiB), one pass over every page; peak RSS includes writing the counts file at exit",
    })
}

// ---------------------------------------------------------------------------
// Part 5: attach + detach.

#[derive(Serialize)]
struct AttachResult {
    tool: &'static str,
    monitor: &'static str,
    command: String,
    start_attach_ms: Spread,
    detach_exit_ms: Spread,
    total_ms: Spread,
    peak_rss_mib: Spread,
}

fn attach_times(env: &Env) -> Result<Vec<AttachResult>> {
    struct Item {
        tool: &'static str,
        monitor: &'static str,
        kw: Option<&'static [&'static str]>,
        bt: Option<&'static BtScript>,
    }
    let items = [
        Item {
            tool: "kvm-watcher",
            monitor: "wakeup",
            kw: Some(&["wakeup", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "halt_poll",
            kw: Some(&["halt-poll", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "dirty",
            kw: Some(&["dirty", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "vcpu_load",
            kw: Some(&["vcpu-load", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "bpftrace",
            monitor: "wakeup",
            kw: None,
            bt: Some(&BT_WAKEUP_PRINTF),
        },
        Item {
            tool: "bpftrace",
            monitor: "halt_poll",
            kw: None,
            bt: Some(&BT_HALT_POLL_PRINTF),
        },
        Item {
            tool: "bpftrace",
            monitor: "dirty",
            kw: None,
            bt: Some(&BT_DIRTY_COUNT),
        },
        Item {
            tool: "bpftrace",
            monitor: "vcpu_load",
            kw: None,
            bt: Some(&BT_VCPU_LOAD),
        },
    ];
    let mut res: Vec<[Vec<f64>; 3]> = items.iter().map(|_| Default::default()).collect();
    for r in 0..env.rounds {
        eprintln!("  attach/detach: round {}/{}", r + 1, env.rounds);
        let mut order: Vec<usize> = (0..items.len()).collect();
        shuffle(&mut order, r as u64 + 1001);
        for i in order {
            let it = &items[i];
            let p = match (it.kw, it.bt) {
                (Some(args), _) => env.start_kw(it.monitor, args)?,
                (_, Some(s)) => env.start_bt(&format!("bt_{}", it.monitor), s)?,
                _ => unreachable!(),
            };
            let attach = p.ready_after.as_secs_f64() * 1e3;
            let st = p.stop(libc::SIGINT, Duration::from_secs(30))?;
            res[i][0].push(attach);
            res[i][1].push(st.exit_after.as_secs_f64() * 1e3);
            res[i][2].push(st.maxrss_kib as f64 / 1024.0);
        }
    }
    Ok(items
        .iter()
        .zip(res)
        .map(|(it, [a, d, rss])| {
            let total: Vec<f64> = a.iter().zip(&d).map(|(x, y)| x + y).collect();
            AttachResult {
                tool: it.tool,
                monitor: it.monitor,
                command: match (it.kw, it.bt) {
                    (Some(args), _) => format!("kvm-watcher {}", args.join(" ")),
                    (_, Some(s)) => format!("bpftrace -e '{}'", s.text.replace('\n', " ")),
                    _ => String::new(),
                },
                start_attach_ms: spread(&a),
                detach_exit_ms: spread(&d),
                total_ms: spread(&total),
                peak_rss_mib: spread(&rss),
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Targets, table, plot.

#[derive(Serialize)]
struct TargetResult {
    target: String,
    figure: f64,
    spread: String,
    unit: &'static str,
    met: bool,
}

fn targets(
    cases: &[CaseResult],
    guest: &[GuestResult],
    pipe: &PipelineResult,
    mem: &MemoryResult,
    attach: &[AttachResult],
) -> Vec<TargetResult> {
    let mut t = Vec::new();
    for c in cases {
        let (max_floor, min_bt) = if c.mode == "aggregate" {
            (2.0, 2.0)
        } else {
            (3.0, 20.0)
        };
        t.push(TargetResult {
            target: format!(
                "{} {}: kernel cost <= {max_floor}x raw_tp floor",
                c.monitor, c.mode
            ),
            figure: c.ratio_to_floor.median,
            spread: c.ratio_to_floor.show(2),
            unit: "x floor",
            met: c.ratio_to_floor.median <= max_floor,
        });
        t.push(TargetResult {
            target: format!(
                "{} {}: >= {min_bt}x cheaper than bpftrace ({})",
                c.monitor, c.mode, c.bpftrace_job
            ),
            figure: c.bpftrace_over_kvm_watcher.median,
            spread: c.bpftrace_over_kvm_watcher.show(2),
            unit: "x cheaper",
            met: c.bpftrace_over_kvm_watcher.median >= min_bt,
        });
    }
    for g in guest.iter().filter(|g| g.config.starts_with("all four")) {
        t.push(TargetResult {
            target: format!(
                "<= 2% guest work lost, {} workload, {}",
                g.workload, g.config
            ),
            figure: g.work_lost_pct.median,
            spread: g.work_lost_pct.show(2),
            unit: "% lost",
            met: g.work_lost_pct.median <= 2.0,
        });
    }
    t.push(TargetResult {
        target: ">= 2M events/s streamed to NDJSON with 0 lost".into(),
        figure: pipe.max_rate_zero_lost.median,
        spread: pipe.max_rate_zero_lost.show(0),
        unit: "events/s",
        met: pipe.max_rate_zero_lost.median >= 2e6,
    });
    t.push(TargetResult {
        target: format!(
            "<= 48 MiB peak RSS at 1M distinct dirty pages ({} tracked)",
            mem.distinct_pages
        ),
        figure: mem.peak_rss_mib,
        spread: format!("{:.1}", mem.peak_rss_mib),
        unit: "MiB",
        met: mem.peak_rss_mib <= 48.0 && mem.distinct_pages >= 1_000_000,
    });
    for a in attach.iter().filter(|a| a.tool == "kvm-watcher") {
        t.push(TargetResult {
            target: format!("{}: start + attach + detach < 150 ms", a.monitor),
            figure: a.total_ms.median,
            spread: a.total_ms.show(1),
            unit: "ms",
            met: a.total_ms.median < 150.0,
        });
    }
    t
}

fn table(res: &Value) -> String {
    let mut s = String::new();
    let f = |v: &Value, d: usize| -> String {
        let Some(m) = v["median"].as_f64() else {
            return "n/a".into();
        };
        let (lo, hi) = (
            v["min"].as_f64().unwrap_or(m),
            v["max"].as_f64().unwrap_or(m),
        );
        if v["n"].as_u64().unwrap_or(0) > 1 {
            format!("{m:.d$} ({lo:.d$}..{hi:.d$})")
        } else {
            format!("{m:.d$}")
        }
    };
    let _ = writeln!(
        s,
        "\n== 1. Kernel cost per event (ns, median (min..max) over trials; every candidate attached in the same trial)"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<10} {:>9} {:>22} {:>22} {:>24} {:>18} {:>18}",
        "monitor",
        "mode",
        "events",
        "floor raw_tp",
        "floor classic tp",
        "kvm-watcher",
        "x floor",
        "bpftrace/ours"
    );
    for c in res["kernel_cost"]["cases"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<10} {:<10} {:>9.0} {:>22} {:>22} {:>24} {:>18} {:>18}",
            c["monitor"].as_str().unwrap_or(""),
            c["mode"].as_str().unwrap_or(""),
            c["events_per_trial"]["median"].as_f64().unwrap_or(0.0),
            f(&c["floor_raw_tp_ns"], 1),
            f(&c["floor_classic_tp_ns"], 1),
            f(&c["kvm_watcher_ns"], 1),
            f(&c["ratio_to_floor"], 2),
            f(&c["bpftrace_over_kvm_watcher"], 1),
        );
        let _ = writeln!(
            s,
            "{:<21} bpftrace ({}): {} ns",
            "",
            c["bpftrace_job"].as_str().unwrap_or(""),
            f(&c["bpftrace_ns"], 1)
        );
    }
    let _ = writeln!(
        s,
        "\n== 2. Guest-visible overhead (work rate, % lost vs the same round's unwatched run)"
    );
    for g in res["guest_overhead"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<6} {:<28} {:>28} {:<16} lost {:>22} %",
            g["workload"].as_str().unwrap_or(""),
            g["config"].as_str().unwrap_or(""),
            f(&g["rate"], 0),
            g["unit"].as_str().unwrap_or(""),
            f(&g["work_lost_pct"], 2)
        );
    }
    let p = &res["pipeline"];
    let _ = writeln!(
        s,
        "\n== 3. User-space pipeline: max {} events/s with 0 lost; consumer CPU {} % at 100k/s, {} % at 1M/s",
        f(&p["max_rate_zero_lost"], 0),
        f(&p["cpu_pct_at_100k"], 1),
        f(&p["cpu_pct_at_1m"], 1)
    );
    let m = &res["memory"];
    let _ = writeln!(
        s,
        "\n== 4. Memory: {} distinct pages tracked, peak RSS {:.1} MiB, BPF maps {:.1} MiB memlock",
        m["distinct_pages"],
        m["peak_rss_mib"].as_f64().unwrap_or(0.0),
        m["maps_memlock_mib"].as_f64().unwrap_or(0.0)
    );
    for map in m["maps"].as_array().into_iter().flatten().take(6) {
        let _ = writeln!(
            s,
            "   {:<18} {:>10} entries max {:>12} bytes",
            map["name"].as_str().unwrap_or(""),
            map["max_entries"],
            map["memlock_bytes"]
        );
    }
    let _ = writeln!(
        s,
        "\n== 5. Start + attach, detach + exit (ms), peak RSS (MiB)"
    );
    for a in res["attach"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<12} {:<10} attach {:>22} detach {:>22} total {:>22} rss {:>18}",
            a["tool"].as_str().unwrap_or(""),
            a["monitor"].as_str().unwrap_or(""),
            f(&a["start_attach_ms"], 1),
            f(&a["detach_exit_ms"], 1),
            f(&a["total_ms"], 1),
            f(&a["peak_rss_mib"], 1)
        );
    }
    let _ = writeln!(s, "\n== Targets");
    for t in res["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "[{}] {:<84} {:>24} {}",
            if t["met"].as_bool() == Some(true) {
                "MET   "
            } else {
                "MISSED"
            },
            t["target"].as_str().unwrap_or(""),
            t["spread"].as_str().unwrap_or(""),
            t["unit"].as_str().unwrap_or("")
        );
    }
    s
}

/// Grouped bars of ns/event per monitor and mode, log scale, as SVG (hand-written:
/// a few rectangles do not need a plotting crate and its dependencies).
fn plot(cases: &[CaseResult], title: &str) -> String {
    type Series = (&'static str, &'static str, fn(&CaseResult) -> f64);
    let series: [Series; 4] = [
        ("empty program, raw_tp (floor)", "#9e9e9e", |c| {
            c.floor_raw_tp_ns.median
        }),
        ("empty program, classic tracepoint", "#cfcfcf", |c| {
            c.floor_classic_tp_ns.median
        }),
        ("kvm-watcher", "#1f77b4", |c| c.kvm_watcher_ns.median),
        ("bpftrace (count / printf)", "#d62728", |c| {
            c.bpftrace_ns.median
        }),
    ];
    let (w, h) = (960.0, 520.0);
    let (left, right, top, bottom) = (70.0, 20.0, 60.0, 110.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let (lo, hi) = (1.0f64, 100_000.0f64);
    let y =
        |v: f64| top + ph * (1.0 - (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        w / 2.0,
        xml(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"40\" text-anchor=\"middle\" fill=\"#555\">kernel time per hook event, ns (log scale; BPF stats run_time_ns / run_cnt, medians)</text>",
        w / 2.0
    );
    for e in 0..=5 {
        let v = 10f64.powi(e);
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e0e0e0\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            yy + 4.0,
            v
        );
    }
    let group = pw / cases.len().max(1) as f64;
    let bw = group * 0.8 / series.len() as f64;
    for (i, c) in cases.iter().enumerate() {
        let gx = left + group * i as f64 + group * 0.1;
        for (j, (_, color, get)) in series.iter().enumerate() {
            let v = get(c);
            if !v.is_finite() || v <= 0.0 {
                continue;
            }
            let x = gx + bw * j as f64;
            let yy = y(v);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{v:.1} ns</title></rect>",
                bw - 2.0,
                top + ph - yy
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                x + bw / 2.0 - 1.0,
                yy - 3.0,
                if v >= 1000.0 {
                    format!("{:.1}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                }
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} {}</text>",
            gx + group * 0.4,
            top + ph + 18.0,
            c.monitor,
            c.mode
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>",
        top + ph
    );
    for (j, (name, color, _)) in series.iter().enumerate() {
        let x = left + 10.0 + (j % 2) as f64 * 420.0;
        let yy = h - 60.0 + (j / 2) as f64 * 20.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            yy - 10.0,
            x + 20.0,
            yy,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

// ---------------------------------------------------------------------------

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    json!({
        "kernel": sh("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_kib": status_kib_meminfo(),
        "bpftrace": sh("bpftrace", &["--version"]),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "note": "shared 2-core development machine (Firecracker guest, nested KVM through the PVM backend); other engineers' tests may run concurrently, so compare ratios within this run, not absolute times across runs",
    })
}

fn status_kib_meminfo() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn ensure_setup() -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (BPF, /dev/kvm, kernel.bpf_stats_enabled)");
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("cannot enable kernel.bpf_stats_enabled")?;
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    ensure_setup()?;
    let kw = match &cli.kvm_watcher {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("kvm-watcher"),
    };
    let has_watch = Command::new(&kw)
        .args(["watch", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let env = Env {
        kw,
        quick: cli.quick,
        rounds: cli.rounds.unwrap_or(if cli.quick { 1 } else { 5 }),
        ncpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
        has_watch,
    };
    let started = Instant::now();
    let machine_start = machine();
    eprintln!(
        "kvm-watcher-bench: {} round(s){}",
        env.rounds,
        if env.quick { ", quick" } else { "" }
    );
    let floors = Floors::load()?;

    eprintln!("1. kernel cost per event");
    let (cases, programs) = kernel_cost(&env, &floors)?;
    eprintln!("2. guest-visible overhead");
    let guest = guest_overhead(&env)?;
    eprintln!("3. user-space pipeline");
    let pipe = pipeline(&env)?;
    eprintln!("4. memory");
    let mem = memory(&env)?;
    eprintln!("5. attach + detach");
    let attach = attach_times(&env)?;
    let tg = targets(&cases, &guest, &pipe, &mem, &attach);

    let result = json!({
        "schema": 1,
        "quick": env.quick,
        "rounds": env.rounds,
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine_start,
        "loadavg_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kvm_watcher": sh(env.kw.to_str().unwrap_or("kvm-watcher"), &["--version"]),
        "git": sh("git", &["describe", "--always", "--dirty"]),
        "kernel_cost": { "cases": cases, "programs": programs },
        "guest_overhead": guest,
        "pipeline": pipe,
        "memory": mem,
        "attach": attach,
        "targets": tg,
    });
    let text = table(&result);
    println!("{text}");
    std::fs::create_dir_all(&cli.out)?;
    let json_path = cli.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&result)? + "\n")?;
    let title = format!(
        "kvm-watcher kernel cost per event ({}, {} CPUs, Linux {})",
        if env.quick { "quick run" } else { "full run" },
        env.ncpu,
        result["machine"]["kernel"].as_str().unwrap_or("?")
    );
    std::fs::write(cli.out.join("bench.svg"), plot(&cases, &title))?;
    std::fs::write(cli.out.join("bench.txt"), text)?;
    eprintln!(
        "wrote {}, bench.svg and bench.txt in {}",
        json_path.display(),
        cli.out.display()
    );
    Ok(())
}
