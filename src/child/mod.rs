//! Child processes that never outlive their caller.
//!
//! [`Spawn`] starts a command with its stdout and stderr read by background
//! threads (so a chatty child never blocks on a full pipe), waits until it
//! prints a marker, and hands back a [`Running`] child. Waiting for it gives
//! its [`Exit`]: status and collected output. A [`Running`] child that is
//! dropped without being waited for is killed and reaped; so is one that
//! does not get ready.
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use kvm_watcher::child::{Spawn, Stream};
//!
//! let mut cmd = Command::new("kvm-watcher");
//! cmd.args(["wakeup", "--output", "json"]);
//! let watcher = Spawn::new(cmd)
//!     .ready_on(Stream::Stderr, "kvm-watcher: watching")
//!     .start()?;
//! // ... run a guest ...
//! let exit = watcher.stop(libc::SIGINT, Duration::from_secs(10))?;
//! println!("{}", exit.stdout);
//! # Ok::<(), kvm_watcher::child::Error>(())
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a timed wait looks whether the child has exited when the
/// kernel cannot say (no pidfd: Linux before 5.3), and after a SIGKILL.
const POLL: Duration = Duration::from_micros(500);

/// A wait that calls nothing while the child runs.
const NO_POLL: Option<(Duration, fn(u32))> = None;

/// Lines longer than this are looked at (for the marker) in pieces.
const MAX_LINE: u64 = 64 * 1024;

mod error;

pub use error::{Error, Exit};

/// One of the child's output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How to start a child process: a builder around a [`Command`].
///
/// By default stdin is `/dev/null`, stdout and stderr are collected in full,
/// and [`Spawn::start`] returns as soon as the child is running.
#[derive(Debug)]
pub struct Spawn {
    cmd: Command,
    name: String,
    ready: Option<(Stream, String)>,
    ready_within: Duration,
    fail_on: Option<String>,
    echo: Option<String>,
    discard_stdout: bool,
    keep: usize,
}

impl Spawn {
    /// Prepares to start `cmd` (its stdin, stdout and stderr are set by [`Spawn::start`]).
    pub fn new(cmd: Command) -> Spawn {
        Spawn {
            name: cmd.get_program().to_string_lossy().into_owned(),
            cmd,
            ready: None,
            ready_within: Duration::from_secs(60),
            fail_on: None,
            echo: None,
            discard_stdout: false,
            keep: usize::MAX,
        }
    }

    /// The name errors call the child by (default: the program).
    pub fn name(mut self, name: impl Into<String>) -> Spawn {
        self.name = name.into();
        self
    }

    /// [`Spawn::start`] waits until a line on `stream` contains `marker`.
    pub fn ready_on(mut self, stream: Stream, marker: impl Into<String>) -> Spawn {
        self.ready = Some((stream, marker.into()));
        self
    }

    /// How long [`Spawn::start`] waits for the marker (default 60 s).
    pub fn ready_within(mut self, timeout: Duration) -> Spawn {
        self.ready_within = timeout;
        self
    }

    /// A stderr line containing `pattern` before the marker means the child
    /// failed: [`Spawn::start`] returns [`Error::Failed`] with that line.
    pub fn fail_on(mut self, pattern: impl Into<String>) -> Spawn {
        self.fail_on = Some(pattern.into());
        self
    }

    /// Copies the child's stderr lines that contain `pattern` to this
    /// process's stderr as they come (except the marker or failure line). They
    /// are collected as well.
    pub fn echo_stderr(mut self, pattern: impl Into<String>) -> Spawn {
        self.echo = Some(pattern.into());
        self
    }

    /// Sends stdout to `/dev/null` instead of collecting it, unless the marker
    /// is looked for there.
    pub fn discard_stdout(mut self) -> Spawn {
        self.discard_stdout = true;
        self
    }

    /// Keeps at most the first `bytes` of each stream; the rest is read and
    /// dropped.
    pub fn keep_at_most(mut self, bytes: usize) -> Spawn {
        self.keep = bytes;
        self
    }

    /// Starts the child and, if a marker was set, waits for it. If the marker
    /// does not come (in time, before the child's output ends, or after a
    /// [`Spawn::fail_on`] line) the child is killed and reaped, and the error
    /// holds its [`Exit`].
    pub fn start(self) -> Result<Running, Error> {
        let Spawn {
            mut cmd,
            name,
            ready,
            ready_within,
            fail_on,
            echo,
            discard_stdout,
            keep,
        } = self;
        let (marker_out, marker_err) = match &ready {
            Some((Stream::Stdout, m)) => (Some(m.clone()), None),
            Some((Stream::Stderr, m)) => (None, Some(m.clone())),
            None => (None, None),
        };
        let stdout = if discard_stdout && marker_out.is_none() {
            Stdio::null()
        } else {
            Stdio::piped()
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                name: name.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let waiting = ready.is_some();
        let out = child.stdout.take().map(|s| {
            Collector::start(
                s,
                Watch {
                    events: marker_out.as_ref().map(|_| tx.clone()),
                    marker: marker_out,
                    fail_on: None,
                    echo: None,
                    keep,
                },
            )
        });
        let fail_on = fail_on.filter(|_| waiting);
        let err = child.stderr.take().map(|s| {
            Collector::start(
                s,
                Watch {
                    events: (marker_err.is_some() || fail_on.is_some()).then(|| tx.clone()),
                    marker: marker_err,
                    fail_on,
                    echo,
                    keep,
                },
            )
        });
        drop(tx);
        let mut running = Running {
            child,
            name,
            ready_line: None,
            stdout: out,
            stderr: err,
            reaped: false,
        };
        let Some((_, marker)) = ready else {
            return Ok(running);
        };
        match rx.recv_timeout(ready_within) {
            Ok(Event::Ready(line)) => {
                running.ready_line = Some(line);
                Ok(running)
            }
            Ok(Event::Failed(line)) => {
                let exit = running.kill_and_reap()?;
                Err(Error::Failed {
                    name: running.name.clone(),
                    line,
                    exit,
                })
            }
            Err(RecvTimeoutError::Timeout) => {
                let exit = running.kill_and_reap()?;
                Err(Error::Timeout {
                    name: running.name.clone(),
                    marker,
                    waited: ready_within,
                    exit,
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Its output ended without the marker: it is exiting (or has
                // closed its output, then it is killed after a grace period).
                let exit = running.reap(Some(deadline(Duration::from_secs(5))), NO_POLL)?;
                let exit = Box::new(exit);
                Err(Error::Exited {
                    name: running.name.clone(),
                    marker,
                    exit,
                })
            }
        }
    }
}

/// A started child process. Dropped without [`Running::wait`],
/// [`Running::wait_or_kill`] or [`Running::stop`], it is killed (SIGKILL)
/// and reaped.
#[derive(Debug)]
pub struct Running {
    child: Child,
    name: String,
    ready_line: Option<String>,
    stdout: Option<Collector>,
    stderr: Option<Collector>,
    reaped: bool,
}

impl Running {
    /// The process id (it stays this child's until it is reaped, which only
    /// waiting or dropping does).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name errors call it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The line that contained the marker, if one was waited for.
    pub fn ready_line(&self) -> Option<&str> {
        self.ready_line.as_deref()
    }

    /// Sends signal `sig` to the child.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: kill(2) on our own child, which is not reaped yet (so the pid
        // cannot belong to another process).
        if unsafe { libc::kill(self.pid() as libc::pid_t, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// True while the child has not exited. Once this says false the child is
    /// reaped (a wait still returns its exit status): signal it no more.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the child has written on stderr so far (as kept, see
    /// [`Spawn::keep_at_most`]).
    pub fn stderr_so_far(&self) -> String {
        self.stderr
            .as_ref()
            .map(Collector::so_far)
            .unwrap_or_default()
    }

    /// Waits, without a time limit, for the child to exit.
    pub fn wait(mut self) -> Result<Exit, Error> {
        self.reap(None, NO_POLL)
    }

    /// Waits up to `timeout` for the child to exit; then kills it with SIGKILL
    /// ([`Exit::killed`]) and reaps it.
    pub fn wait_or_kill(mut self, timeout: Duration) -> Result<Exit, Error> {
        self.reap(Some(deadline(timeout)), NO_POLL)
    }

    /// [`Running::wait_or_kill`], calling `poll(pid)` about every `every`
    /// while the child runs (e.g. to sample `/proc/<pid>/status`).
    pub fn wait_or_kill_polling(
        mut self,
        timeout: Duration,
        every: Duration,
        poll: impl FnMut(u32),
    ) -> Result<Exit, Error> {
        self.reap(Some(deadline(timeout)), Some((every, poll)))
    }

    /// Sends `sig`, then [`Running::wait_or_kill`].
    pub fn stop(self, sig: i32, timeout: Duration) -> Result<Exit, Error> {
        // The child may have exited already; the wait tells.
        let _ = self.signal(sig);
        self.wait_or_kill(timeout)
    }

    fn kill_and_reap(&mut self) -> Result<Box<Exit>, Error> {
        let _ = self.child.kill();
        let mut exit = self.reap(None, NO_POLL)?;
        exit.killed = true;
        Ok(Box::new(exit))
    }

    /// Waits for the exit (SIGKILL at `deadline`), calling `poll`'s
    /// function about once per its period, then collects the output.
    fn reap(
        &mut self,
        deadline: Option<Instant>,
        mut poll: Option<(Duration, impl FnMut(u32))>,
    ) -> Result<Exit, Error> {
        let wait_error = |source| Error::Wait {
            name: self.name.clone(),
            source,
        };
        let pid = self.pid();
        let mut killed = false;
        let status = match deadline {
            None => self.child.wait().map_err(wait_error)?,
            Some(deadline) => {
                let exited = ExitFd::open(pid);
                loop {
                    if let Some((_, f)) = poll.as_mut() {
                        f(pid);
                    }
                    if let Some(status) = self.child.try_wait().map_err(wait_error)? {
                        break status;
                    }
                    let now = Instant::now();
                    if !killed && now >= deadline {
                        let _ = self.child.kill();
                        killed = true;
                    }
                    let mut until = if killed { now + POLL } else { deadline };
                    if let Some((every, _)) = &poll {
                        until = until.min(now + *every);
                    }
                    exited.wait_until(until);
                }
            }
        };
        let at = Instant::now();
        self.reaped = true;
        let stdout = self
            .stdout
            .take()
            .map(Collector::finish)
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .map(Collector::finish)
            .unwrap_or_default();
        Ok(Exit {
            status,
            killed,
            at,
            stdout,
            stderr,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pidfd of the child, readable once it has exited: a timed wait sleeps
/// in the kernel until the exit or the time is up. (Looking every half
/// millisecond instead woke the waiter 2,000 times a second; on a vCPU's
/// CPU each such wake-up ends KVM's halt polling early.)
struct ExitFd(Option<rustix::fd::OwnedFd>);

impl ExitFd {
    fn open(pid: u32) -> ExitFd {
        let fd = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            });
        ExitFd(fd)
    }

    /// Returns at `until` at the latest, or when the child has exited (or
    /// a signal came); without a pidfd, after [`POLL`] at the latest.
    fn wait_until(&self, until: Instant) {
        let left = until.saturating_duration_since(Instant::now());
        match &self.0 {
            Some(fd) => {
                let timeout = rustix::event::Timespec::try_from(left).ok();
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let _ = rustix::event::poll(&mut fds, timeout.as_ref());
            }
            None => std::thread::sleep(left.min(POLL)),
        }
    }
}

fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    // A timeout too large for an Instant is as good as none.
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400))
}

/// What a stream's reader thread tells [`Spawn::start`] (once at most).
enum Event {
    Ready(String),
    Failed(String),
}

/// What a stream's reader looks for.
struct Watch {
    marker: Option<String>,
    fail_on: Option<String>,
    echo: Option<String>,
    keep: usize,
    events: Option<Sender<Event>>,
}

/// A thread reading one stream to its end, keeping what it reads.
#[derive(Debug)]
struct Collector {
    kept: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Collector {
    fn start(stream: impl Read + Send + 'static, mut watch: Watch) -> Collector {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let buf = Arc::clone(&kept);
        let thread = std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                {
                    // Kept before it is looked at: once the marker is seen,
                    // its line is in what the child wrote so far.
                    let mut k = buf.lock().unwrap_or_else(PoisonError::into_inner);
                    let room = watch.keep.saturating_sub(k.len());
                    k.extend_from_slice(&line[..line.len().min(room)]);
                }
                watch.look_at(&line);
            }
        });
        Collector { kept, thread }
    }

    fn so_far(&self) -> String {
        let k = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&k).into_owned()
    }

    /// Waits for the end of the stream (the child has exited and no other
    /// process holds the pipe) and returns what was kept.
    fn finish(self) -> String {
        let Collector { kept, thread } = self;
        let _ = thread.join();
        let k = std::mem::take(&mut *kept.lock().unwrap_or_else(PoisonError::into_inner));
        String::from_utf8_lossy(&k).into_owned()
    }
}

impl Watch {
    fn look_at(&mut self, raw: &[u8]) {
        if self.events.is_none() && self.echo.is_none() {
            return;
        }
        let text = String::from_utf8_lossy(raw);
        let line = text.trim_end_matches(['\n', '\r']);
        if let Some(tx) = &self.events {
            let event = if self
                .marker
                .as_ref()
                .is_some_and(|m| line.contains(m.as_str()))
            {
                Some(Event::Ready(line.to_string()))
            } else if self
                .fail_on
                .as_ref()
                .is_some_and(|p| line.contains(p.as_str()))
            {
                Some(Event::Failed(line.to_string()))
            } else {
                None
            };
            if let Some(event) = event {
                let _ = tx.send(event);
                self.events = None;
                return;
            }
        }
        if self
            .echo
            .as_ref()
            .is_some_and(|p| line.contains(p.as_str()))
        {
            let _ = writeln!(io::stderr(), "{line}");
        }
    }
}

#[cfg(test)]
mod tests;
