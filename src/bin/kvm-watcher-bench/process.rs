//! The benchmark's child processes (kvm-watcher monitors and VMs, bpftrace):
//! started, waited for until ready, stopped, with the times and peak RSS the
//! figures need.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procfs::status_kib;

/// A child process with its output drained by threads.
pub struct Proc {
    child: Child,
    name: String,
    pub ready_after: Duration,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    reaped: bool,
}

/// How a spawned process says it is ready.
pub struct Ready<'a> {
    pub marker: &'a str,
    pub on_stdout: bool,
    /// Also wait until the process holds this many perf_event fds (bpftrace attaches
    /// tracepoints through perf events after printing its "Attaching" line).
    pub perf_fds: usize,
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
    pub fn start(name: &str, mut cmd: Command, ready: Ready, keep_stdout: bool) -> Result<Proc> {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<Stopped> {
        self.reap(Instant::now(), timeout)
    }

    /// Waits for the exit a signal sent earlier (at `t0`) asked for.
    pub fn finish(mut self, t0: Instant, timeout: Duration) -> Result<Stopped> {
        self.reap(t0, timeout)
    }

    /// Sends `sig`, waits (SIGKILL after `timeout`) and collects its output.
    pub fn stop(mut self, sig: i32, timeout: Duration) -> Result<Stopped> {
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

pub struct Stopped {
    pub status: Option<i32>,
    pub exit_after: Duration,
    pub maxrss_kib: u64,
    pub stdout: String,
    pub stderr: String,
}

/// SIGINT to all, then waits for each; kvm-watcher must exit 0 (bpftrace is only warned about).
pub fn stop_all(procs: Vec<Proc>) -> Result<()> {
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
