//! Running the synthetic VM: the vCPU threads start (after SIGUSR1 with
//! `--wait-for-signal`), then the main thread collects the dirty log, swaps
//! slots for `--swap-slots-at`, and ends the run at the time limit, when every
//! vCPU has stopped by itself, or at SIGINT/SIGTERM.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::report::MemslotReport;
use super::vcpu::{self, Shared, VcpuThread};
use super::{DirtyLog, SyntheticVm, dirty, guest};

/// What happened while the guest ran, for [`SyntheticVm::stop`].
pub(super) struct Outcome {
    /// When the vCPUs were let go (after SIGUSR1 with `--wait-for-signal`).
    pub started: Instant,
    /// A signal other than SIGUSR1 came first: the guest never ran.
    pub aborted: bool,
    /// Why the main thread gave up early (dirty-log collection or the slot swap
    /// failed); reported once the vCPUs are stopped.
    pub error: Option<anyhow::Error>,
    /// With `--swap-slots-at`: the guest time of the swap and the memslots before it.
    pub swapped: Option<(f64, Vec<MemslotReport>)>,
    /// With `--timeline`: (CLOCK_MONOTONIC ns, the guest's page writes so far).
    pub timeline: Vec<[u64; 2]>,
}

impl SyntheticVm {
    /// Starts one thread per vCPU and runs the guest until the time limit, until
    /// every vCPU has stopped by itself, or until SIGINT/SIGTERM. The vCPUs keep
    /// going until [`SyntheticVm::stop`], which also reports what went wrong
    /// while they ran.
    ///
    /// SIGUSR1, SIGINT and SIGTERM stay blocked in the calling thread afterwards:
    /// one that arrives later stays pending instead of killing the process
    /// before it reports.
    pub fn run(&mut self) -> Result<()> {
        if self.vcpus.is_empty() {
            bail!("this synthetic VM has already run");
        }
        let signals = take_signals()?;
        self.shared.main_thread();
        if self.config.linger {
            self.shared.linger();
        }
        self.spawn_vcpus()?;
        let aborted = self.config.wait_for_signal && !self.wait_for_start(&signals);
        let mut outcome = Outcome {
            started: Instant::now(),
            aborted,
            error: None,
            swapped: None,
            timeline: Vec::new(),
        };
        self.shared.start(!aborted);
        if !aborted {
            let watched = self.watch(&mut outcome);
            outcome.error = watched.err();
        }
        self.outcome = Some(outcome);
        Ok(())
    }

    fn spawn_vcpus(&mut self) -> Result<()> {
        let n = self.config.vcpus;
        let (tid_tx, tid_rx) = mpsc::channel();
        for (i, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            self.threads.push(VcpuThread::spawn(
                i as u32,
                vcpu,
                self.shared.clone(),
                tid_tx.clone(),
            )?);
        }
        drop(tid_tx);
        let mut tids = vec![0u32; n as usize];
        for _ in 0..n {
            let (i, tid) = tid_rx
                .recv()
                .context("a vCPU thread died before starting")?;
            tids[i as usize] = tid;
        }
        self.comms = tids
            .iter()
            .enumerate()
            .map(|(i, tid)| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_else(|_| format!("CPU {i}/KVM"))
            })
            .collect();
        self.tids = tids;
        Ok(())
    }

    /// `--wait-for-signal`: prints the ready line, then waits for SIGUSR1 (true)
    /// or SIGINT/SIGTERM (false: the guest is not to run).
    fn wait_for_start(&self, signals: &libc::sigset_t) -> bool {
        let join = |v: &[u32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let vcpu_ids: Vec<u32> = (0..self.tids.len()).map(|i| self.vcpu_id(i)).collect();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "kvm-watcher vm: ready pid={} tids={} vcpu_ids={}",
            std::process::id(),
            join(&self.tids),
            join(&vcpu_ids)
        );
        let _ = err.flush();
        drop(err);
        loop {
            match wait_signal(signals, None) {
                Some(libc::SIGUSR1) => return true,
                Some(_) => return false,
                None => continue,
            }
        }
    }

    /// The main thread while the guest runs: dirty-log collections every tick,
    /// the slot swap when due, and the end of the run. An error ends it early.
    fn watch(&mut self, outcome: &mut Outcome) -> Result<()> {
        let n = self.config.vcpus;
        let started = outcome.started;
        let end = self.config.run_for.map(|l| started + l);
        // Without dirty logging there is nothing to collect, and no reason
        // to wake: every wake-up of this thread is one on some CPU, which
        // cuts short the halt polling of a vCPU there.
        let tick = match self.config.dirty_log {
            DirtyLog::Ring => Some(Duration::from_millis(20)),
            DirtyLog::Bitmap => Some(Duration::from_millis(100)),
            DirtyLog::Off => None,
        };
        let mut next_collect = tick.map(|t| started + t);
        let mut swap_at = self.config.swap_slots_at.map(|t| started + t);
        let mut next_note = self.config.timeline.map(|_| started);
        let woken_by = watch_signals();
        loop {
            if self.shared.finished() == n || self.shared.failed() {
                self.note_writes(&mut outcome.timeline, &mut next_note, true);
                return Ok(());
            }
            let now = Instant::now();
            if end.is_some_and(|e| now >= e) {
                self.note_writes(&mut outcome.timeline, &mut next_note, true);
                return Ok(());
            }
            if next_note.is_some_and(|t| now >= t) {
                self.note_writes(&mut outcome.timeline, &mut next_note, false);
                continue;
            }
            if swap_at.is_some_and(|t| now >= t) {
                swap_at = None;
                let paused_at = now.saturating_duration_since(started).as_secs_f64();
                let swapped = self.swap_slots(paused_at, &mut outcome.swapped);
                self.shared.resume();
                swapped?;
                continue;
            }
            if let (Some(due), Some(t)) = (next_collect, tick)
                && now >= due
            {
                self.collect_dirty()?;
                next_collect = Some(due + t);
                continue;
            }
            // Until the next thing due, if any; a vCPU thread that ends
            // wakes this one (Shared::wake_main).
            let wait = [next_collect, end, swap_at, next_note]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now));
            if let Some(sig) = wait_signal(&woken_by, wait)
                && sig != libc::SIGUSR1
                && sig != vcpu::wake_signal()
            {
                // SIGINT / SIGTERM: stop early, still report
                self.note_writes(&mut outcome.timeline, &mut next_note, true);
                return Ok(());
            }
        }
    }

    /// `--timeline`: notes the time and the guest's page writes so far (all
    /// vCPUs' counters, read from guest memory as the guest runs) when due,
    /// or now if `last` (the run ends).
    fn note_writes(&self, timeline: &mut Vec<[u64; 2]>, next: &mut Option<Instant>, last: bool) {
        let (Some(every), Some(due)) = (self.config.timeline, *next) else {
            return;
        };
        let now = Instant::now();
        if !last && now < due {
            return;
        }
        let written: u64 = (0..self.config.vcpus)
            .map(|i| {
                let area = guest::area(u64::from(i));
                self.memory.sys.read_u64(area + guest::AREA_PAGES_WRITTEN)
            })
            .sum();
        timeline.push([crate::output::monotonic_ns(), written]);
        *next = Some((due + every).max(now));
    }

    /// `--swap-slots-at`: pauses the vCPUs, collects the dirty log, lets data
    /// slots 1 and 2 trade places; the caller resumes the vCPUs.
    fn swap_slots(
        &mut self,
        paused_at: f64,
        swapped: &mut Option<(f64, Vec<MemslotReport>)>,
    ) -> Result<()> {
        pause_vcpus(&self.shared, &self.threads, self.config.vcpus)?;
        self.collect_dirty()?;
        *swapped = Some((paused_at, self.memory.memslots.clone()));
        self.memory.swap_slots(&self.vm)?;
        if let Some(b) = &mut self.shared.collected.lock().unwrap().by_gfn {
            b.bases = self.memory.slot_bases();
        }
        Ok(())
    }

    /// One dirty-log collection: KVM_GET_DIRTY_LOG on every logged slot, or a
    /// harvest of every dirty ring.
    pub(super) fn collect_dirty(&self) -> Result<()> {
        let shared = &self.shared;
        match self.config.dirty_log {
            DirtyLog::Off => Ok(()),
            DirtyLog::Bitmap => dirty::collect_bitmaps(
                &self.vm,
                &self.memory.logged,
                &mut shared.collected.lock().unwrap(),
            ),
            DirtyLog::Ring => {
                let mut rings = shared.rings.lock().unwrap();
                rings
                    .as_mut()
                    .unwrap()
                    .collect(&mut shared.collected.lock().unwrap())
                    .map(|_| ())
            }
        }
    }
}

/// Takes every running vCPU out of KVM_RUN and waits until each is paused or
/// has finished.
fn pause_vcpus(shared: &Shared, threads: &[VcpuThread], n: u32) -> Result<()> {
    shared.pause();
    for t in threads {
        t.interrupt();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.paused_or_finished() < n {
        if Instant::now() > deadline {
            bail!("the vCPUs did not leave KVM_RUN within 5 s for --swap-slots-at");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The signals the main thread takes synchronously: start, stop, stop.
pub(super) fn stop_signals() -> libc::sigset_t {
    sigset(&[libc::SIGUSR1, libc::SIGINT, libc::SIGTERM])
}

/// The signals the main thread takes while the guest runs: those, and a
/// vCPU thread's word that it ended ([`vcpu::wake_signal`]).
fn watch_signals() -> libc::sigset_t {
    sigset(&[
        libc::SIGUSR1,
        libc::SIGINT,
        libc::SIGTERM,
        vcpu::wake_signal(),
    ])
}

/// Blocks [`watch_signals`] in this thread, to be taken synchronously with
/// [`wait_signal`] (the vCPU threads inherit the mask), and installs the
/// SIGUSR2 handler that interrupts KVM_RUN in a vCPU thread. Returns
/// [`stop_signals`].
fn take_signals() -> Result<libc::sigset_t> {
    // SAFETY: blocking signals in this thread.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &watch_signals(), std::ptr::null_mut()) }
        != 0
    {
        bail!("pthread_sigmask failed");
    }
    vcpu::install_kick_handler()?;
    Ok(stop_signals())
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: plain libc sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Waits up to `timeout` for one of `set`; returns the signal or None on timeout.
pub(super) fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<libc::c_int> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as _,
        tv_nsec: t.subsec_nanos() as _,
    });
    // SAFETY: valid set and timespec pointers.
    let r = unsafe {
        match &ts {
            Some(ts) => libc::sigtimedwait(set, std::ptr::null_mut(), ts),
            None => libc::sigwaitinfo(set, std::ptr::null_mut()),
        }
    };
    if r > 0 { Some(r) } else { None }
}
