//! The benchmark's child processes (kvm-watcher monitors and VMs, bpftrace),
//! started and stopped through `kvm_watcher::child`, with the times and peak
//! RSS the figures need.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kvm_watcher::child::{Running, Spawn, Stream};

use crate::procfs::{perf_fds, status_kib};

/// How much of each output stream is kept (the rest is read and dropped).
const KEEP: usize = 1 << 20;

/// A started tool; killed and reaped if dropped before it is stopped.
pub struct Proc {
    run: Running,
    /// From spawning it to its being ready.
    pub ready_after: Duration,
}

/// How a spawned process says it is ready.
pub struct Ready<'a> {
    pub marker: &'a str,
    pub on_stdout: bool,
    /// Also wait until the process holds this many perf_event fds (bpftrace attaches
    /// tracepoints through perf events after printing its "Attaching" line).
    pub perf_fds: usize,
}

/// How a process ended.
pub struct Stopped {
    /// The exit code; None if a signal ended it.
    pub status: Option<i32>,
    /// From the stop (or the start of the wait) to the exit.
    pub exit_after: Duration,
    /// The last VmHWM read before the exit.
    pub maxrss_kib: u64,
    pub stdout: String,
    pub stderr: String,
}

impl Proc {
    /// Starts `cmd` (stdout to /dev/null unless `ready.on_stdout` or `keep_stdout`) and
    /// waits up to 60 s until it is ready.
    pub fn start(name: &str, cmd: Command, ready: Ready, keep_stdout: bool) -> Result<Proc> {
        let t0 = Instant::now();
        let stream = if ready.on_stdout {
            Stream::Stdout
        } else {
            Stream::Stderr
        };
        let mut spawn = Spawn::new(cmd)
            .name(name)
            .ready_on(stream, ready.marker)
            .ready_within(Duration::from_secs(60))
            .keep_at_most(KEEP);
        if !keep_stdout {
            spawn = spawn.discard_stdout();
        }
        let run = match spawn.start() {
            Ok(run) => run,
            Err(e) => match e.exit() {
                Some(exit) => bail!("{e}; stderr: {}", exit.stderr.trim()),
                None => return Err(e.into()),
            },
        };
        if ready.perf_fds > 0 {
            let deadline = t0 + Duration::from_secs(60);
            while perf_fds(run.pid()) < ready.perf_fds && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        Ok(Proc {
            run,
            ready_after: t0.elapsed(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.run.pid()
    }

    pub fn name(&self) -> &str {
        self.run.name()
    }

    pub fn signal(&self, sig: i32) {
        // A process that has exited already is noticed by the wait.
        let _ = self.run.signal(sig);
    }

    /// Waits up to `timeout` for the process to exit by itself (a guest's
    /// whole run: its peak RSS is looked at every 20 ms, not every half
    /// millisecond, so that the bench does not wake up 2,000 times a second
    /// next to the vCPUs it measures).
    pub fn wait_exit(self, timeout: Duration) -> Result<Stopped> {
        self.reap(Instant::now(), timeout, Duration::from_millis(20))
    }

    /// Waits for the exit a signal sent earlier (at `t0`) asked for.
    pub fn finish(self, t0: Instant, timeout: Duration) -> Result<Stopped> {
        self.reap(t0, timeout, Duration::from_micros(500))
    }

    /// Sends `sig`, waits (SIGKILL after `timeout`) and collects its output.
    pub fn stop(self, sig: i32, timeout: Duration) -> Result<Stopped> {
        let t0 = Instant::now();
        self.signal(sig);
        self.reap(t0, timeout, Duration::from_micros(500))
    }

    /// Waits until `t0 + timeout` (then SIGKILL), reading the peak RSS
    /// about every `every`, and collects the output.
    fn reap(self, t0: Instant, timeout: Duration, every: Duration) -> Result<Stopped> {
        let name = self.name().to_string();
        // Peak RSS is the last VmHWM read before the exit: rusage's ru_maxrss is no
        // use here, it also holds the RSS of this process, which the child's
        // pre-exec image shared (vfork-style spawn).
        let mut hwm_kib = 0;
        let exit =
            self.run
                .wait_or_kill_polling(timeout.saturating_sub(t0.elapsed()), every, |pid| {
                    hwm_kib = hwm_kib.max(status_kib(pid, "VmHWM:"))
                })?;
        if exit.killed {
            eprintln!("kvm-watcher-bench: warning: {name} did not exit within {timeout:?}, killed");
        }
        Ok(Stopped {
            status: exit.status.code(),
            exit_after: exit.at.duration_since(t0),
            maxrss_kib: hwm_kib,
            stdout: exit.stdout,
            stderr: exit.stderr,
        })
    }
}

/// SIGINT to all, then waits for each; kvm-watcher must exit 0 (bpftrace is only warned about).
pub fn stop_all(procs: Vec<Proc>) -> Result<()> {
    let t0 = Instant::now();
    for p in &procs {
        p.signal(libc::SIGINT);
    }
    for p in procs {
        let name = p.name().to_string();
        let bt = name.starts_with("bt_") || name.starts_with("bpftrace");
        let st = p.finish(t0, Duration::from_secs(if bt { 15 } else { 60 }))?;
        if st.status != Some(0) && !bt {
            bail!("{name} failed ({:?}): {}", st.status, st.stderr.trim());
        }
    }
    Ok(())
}
