//! The vCPU threads: each runs KVM_RUN for one vCPU until the guest stops by
//! itself, the main thread kicks it out (SIGUSR2 plus `kvm_run.immediate_exit`),
//! or something fails; and what those threads share with the main thread.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::dirty::{Collected, RingSet};
use super::guest;
use crate::procfs::own_schedstat;

/// What the main thread and the vCPU threads share.
pub(super) struct Shared {
    go: Mutex<Option<bool>>, // None = wait, Some(true) = run, Some(false) = abort
    go_cv: Condvar,
    kick: AtomicBool,
    finished: AtomicU32,
    failed: AtomicBool,
    /// The dirty rings (`--dirty-log ring`), harvested by whichever thread needs it.
    pub rings: Mutex<Option<RingSet>>,
    /// Every dirty page collected so far.
    pub collected: Mutex<Collected>,
    /// KVM_EXIT_DIRTY_RING_FULL exits seen by the vCPU threads.
    pub ring_full: AtomicU64,
    /// Set while the main thread wants every vCPU out of KVM_RUN.
    pause: Mutex<bool>,
    pause_cv: Condvar,
    /// vCPU threads waiting in [`Shared::wait_while_paused`].
    paused: AtomicU32,
    /// Set while ended vCPU threads are to stay alive (`--linger`).
    linger: Mutex<bool>,
    linger_cv: Condvar,
    /// The thread that runs the VM (its pthread_t), woken when a vCPU
    /// thread ends; 0 before [`Shared::main_thread`].
    main: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(rings: Option<RingSet>, collected: Collected) -> Shared {
        Shared {
            go: Mutex::new(None),
            go_cv: Condvar::new(),
            kick: AtomicBool::new(false),
            finished: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            rings: Mutex::new(rings),
            collected: Mutex::new(collected),
            ring_full: AtomicU64::new(0),
            pause: Mutex::new(false),
            pause_cv: Condvar::new(),
            paused: AtomicU32::new(0),
            linger: Mutex::new(false),
            linger_cv: Condvar::new(),
            main: AtomicU64::new(0),
        }
    }

    /// The calling thread is the one to wake when a vCPU thread ends.
    pub fn main_thread(&self) {
        // SAFETY: no arguments.
        let me = unsafe { libc::pthread_self() };
        self.main.store(me as u64, Ordering::SeqCst);
    }

    /// Wakes the main thread ([`wake_signal`], blocked in every thread and
    /// taken only by the main thread's wait while the guest runs; one that
    /// comes later stays pending, harmless), so that it sees a vCPU thread
    /// end at once instead of looking every few milliseconds: a look is a
    /// wake-up on some CPU, which cuts short the halt polling of a vCPU there.
    fn wake_main(&self) {
        let main = self.main.load(Ordering::SeqCst);
        if main != 0 {
            // SAFETY: the main thread runs until the VM is stopped, after
            // every vCPU thread has been joined.
            unsafe { libc::pthread_kill(main as libc::pthread_t, wake_signal()) };
        }
    }

    /// Ended vCPU threads stay alive (asleep) until [`Shared::release`].
    pub fn linger(&self) {
        *lock(&self.linger) = true;
    }

    /// Lets lingering vCPU threads end.
    pub fn release(&self) {
        *lock(&self.linger) = false;
        self.linger_cv.notify_all();
    }

    fn wait_while_lingering(&self) {
        let mut l = lock(&self.linger);
        while *l {
            l = self
                .linger_cv
                .wait(l)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets the vCPU threads run the guest (`run`) or end without running it.
    pub fn start(&self, run: bool) {
        *lock(&self.go) = Some(run);
        self.go_cv.notify_all();
    }

    /// vCPU threads that have ended.
    pub fn finished(&self) -> u32 {
        self.finished.load(Ordering::SeqCst)
    }

    /// Whether a vCPU thread ended with an error.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Makes every vCPU thread end at its next look (call [`VcpuThread::interrupt`]
    /// to get it out of KVM_RUN).
    pub fn kick(&self) {
        self.kick.store(true, Ordering::SeqCst);
    }

    /// Asks every vCPU thread to stay out of KVM_RUN until [`Shared::resume`].
    pub fn pause(&self) {
        *lock(&self.pause) = true;
    }

    /// vCPU threads that are paused or have ended.
    pub fn paused_or_finished(&self) -> u32 {
        self.paused.load(Ordering::SeqCst) + self.finished()
    }

    pub fn resume(&self) {
        *lock(&self.pause) = false;
        self.pause_cv.notify_all();
    }

    /// For a VM dropped before it was stopped: every thread ends as soon as it
    /// looks, without running the guest if it has not started.
    pub fn abandon(&self) {
        lock(&self.go).get_or_insert(false);
        self.go_cv.notify_all();
        self.kick();
        self.resume();
        self.release();
    }

    fn wait_for_go(&self) -> bool {
        let mut g = lock(&self.go);
        loop {
            match *g {
                Some(go) => return go,
                None => g = self.go_cv.wait(g).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    fn paused_requested(&self) -> bool {
        *lock(&self.pause)
    }

    /// In a vCPU thread: while a pause is requested, count as paused and wait.
    fn wait_while_paused(&self) {
        let mut p = lock(&self.pause);
        if !*p {
            return;
        }
        self.paused.fetch_add(1, Ordering::SeqCst);
        while *p {
            p = self
                .pause_cv
                .wait(p)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.paused.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `kvm_run.immediate_exit` of a vCPU, written by the main thread to kick it.
struct ImmediateExit(*mut u8);
// SAFETY: a byte in the vCPU's kvm_run mapping, which lives as long as the VcpuFd;
// the thread owns that until it is joined, and joining consumes the VcpuThread.
unsafe impl Send for ImmediateExit {}

/// How a vCPU thread ended.
pub(super) struct VcpuEnd {
    /// Kept so the kvm_run mapping outlives any kick.
    #[allow(dead_code)]
    vcpu: VcpuFd,
    /// How the vCPU stopped (`guest`, `kick`, `not_started`), or why it failed.
    pub result: Result<&'static str>,
    /// When it left KVM_RUN for good.
    pub ended: Instant,
    /// Its own scheduler statistics over its guest run.
    pub sched: Option<SchedDelta>,
    /// The exits to this VMM it handled on purpose (`--io-exits`, `--mmio-exits`).
    pub handled: Handled,
}

/// Exits the vCPU thread handled for the guest's `--io-exits` and `--mmio-exits`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Handled {
    /// KVM_EXIT_IO: OUT to [`guest::IO_EXIT_PORT`].
    pub io: u64,
    /// KVM_EXIT_MMIO: writes to [`guest::MMIO_EXIT_GPA`].
    pub mmio: u64,
    /// KVM_EXIT_IO: IN from [`guest::IO_IN_PORT`].
    pub io_in: u64,
    /// Time from KVM_RUN's return to the next call for those exits, measured here, ns.
    pub ns: u64,
}

/// What the kernel's scheduler counted for the calling thread between two
/// readings of `/proc/thread-self/schedstat` (time on a CPU, run-queue wait,
/// switch-ins).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SchedDelta {
    pub cpu_ns: u64,
    pub wait_ns: u64,
    pub switch_ins: u64,
}

/// The thread `CPU <index>/KVM` that runs one vCPU.
pub(super) struct VcpuThread {
    handle: JoinHandle<VcpuEnd>,
    immediate_exit: ImmediateExit,
}

impl VcpuThread {
    /// Starts the thread; it sends `(index, its tid)` on `tid_tx`, then waits for
    /// [`Shared::start`].
    pub fn spawn(
        index: u32,
        mut vcpu: VcpuFd,
        shared: Arc<Shared>,
        tid_tx: mpsc::Sender<(u32, u32)>,
    ) -> Result<VcpuThread> {
        let immediate_exit = ImmediateExit(&mut vcpu.get_kvm_run().immediate_exit as *mut u8);
        let handle = std::thread::Builder::new()
            .name(format!("CPU {index}/KVM"))
            .spawn(move || vcpu_thread(index, vcpu, shared, tid_tx))
            .context("spawning a vCPU thread")?;
        Ok(VcpuThread {
            handle,
            immediate_exit,
        })
    }

    /// Makes the thread leave KVM_RUN (or not enter it): immediate_exit plus
    /// SIGUSR2 to interrupt a KVM_RUN that is already under way.
    pub fn interrupt(&self) {
        // SAFETY: see ImmediateExit; the thread has not been joined yet, so its
        // pthread_t is valid.
        unsafe {
            std::ptr::write_volatile(self.immediate_exit.0, 1);
            libc::pthread_kill(self.handle.as_pthread_t(), libc::SIGUSR2);
        }
    }

    pub fn join(self) -> Result<VcpuEnd> {
        self.handle
            .join()
            .map_err(|_| anyhow!("a vCPU thread panicked"))
    }
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// The signal a vCPU thread that ends sends the main thread (the first
/// real-time one: nothing else uses it).
pub(super) fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the (empty) SIGUSR2 handler, without SA_RESTART, so that
/// [`VcpuThread::interrupt`] makes KVM_RUN return EINTR.
pub(super) fn install_kick_handler() -> Result<()> {
    // SAFETY: installing a no-op handler on a zeroed, emptied sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("sigaction(SIGUSR2)");
        }
    }
    Ok(())
}

fn gettid() -> u32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() as u32 }
}

fn vcpu_thread(
    index: u32,
    mut vcpu: VcpuFd,
    shared: Arc<Shared>,
    tid_tx: mpsc::Sender<(u32, u32)>,
) -> VcpuEnd {
    let _ = tid_tx.send((index, gettid()));
    drop(tid_tx);
    // Read before waiting for the start, so the wait that follows the
    // start's wake-up is inside, and again as the thread ends, so every
    // wait a watcher can see while it lives is.
    let before = own_schedstat();
    let started = shared.wait_for_go();
    let mut handled = Handled::default();
    let result = if started {
        vcpu_loop(&mut vcpu, &shared, &mut handled)
    } else {
        Ok("not_started")
    };
    if result.is_err() {
        shared.failed.store(true, Ordering::SeqCst);
    }
    let ended = Instant::now();
    shared.finished.fetch_add(1, Ordering::SeqCst);
    shared.wake_main();
    shared.wait_while_lingering();
    let sched = before
        .zip(own_schedstat())
        .filter(|_| started)
        .map(|(b, a)| SchedDelta {
            cpu_ns: a.run_ns.saturating_sub(b.run_ns),
            wait_ns: a.wait_ns.saturating_sub(b.wait_ns),
            switch_ins: a.timeslices.saturating_sub(b.timeslices),
        });
    VcpuEnd {
        vcpu,
        result,
        ended,
        sched,
        handled,
    }
}

/// KVM_EXIT_DIRTY_RING_FULL.
const KVM_EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

fn vcpu_loop(vcpu: &mut VcpuFd, shared: &Shared, handled: &mut Handled) -> Result<&'static str> {
    // Consecutive KVM_EXIT_DIRTY_RING_FULL exits after which no ring had anything to harvest.
    let mut fruitless_full = 0u32;
    // When KVM_RUN last returned for an exit made on purpose.
    let mut exited_at: Option<Instant> = None;
    loop {
        if let Some(at) = exited_at.take() {
            handled.ns += at.elapsed().as_nanos() as u64;
        }
        if shared.kick.load(Ordering::SeqCst) {
            return Ok("kick");
        }
        if shared.paused_requested() {
            // Out of KVM_RUN for --swap-slots-at: wait, then clear the kick
            // (after the wait, so it cannot land after the clear), go on.
            shared.wait_while_paused();
            vcpu.set_kvm_immediate_exit(0);
            continue;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(guest::EXIT_PORT, _)) => return Ok("guest"),
            Ok(VcpuExit::IoOut(guest::FAULT_PORT, d)) => {
                let v = d.first().copied().unwrap_or(0);
                let regs = vcpu.get_regs().ok();
                bail!(
                    "the guest took unexpected exception/interrupt vector {v:#x} (esp {:#x})",
                    regs.map(|r| r.rsp).unwrap_or(0)
                );
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                shared.ring_full.fetch_add(1, Ordering::SeqCst);
                let mut rings = shared.rings.lock().unwrap();
                let got = match rings.as_mut() {
                    Some(r) => r.collect(&mut shared.collected.lock().unwrap())?,
                    None => 0,
                };
                fruitless_full = if got == 0 { fruitless_full + 1 } else { 0 };
                if fruitless_full >= 100_000 {
                    bail!(
                        "the dirty ring stays full with nothing to harvest: it overflowed and KVM cannot \
                         recover (see kvm_dirty_ring_push warnings in dmesg)"
                    );
                }
            }
            Ok(VcpuExit::IoOut(guest::YIELD_PORT, _)) | Ok(VcpuExit::Intr) => fruitless_full = 0,
            Ok(VcpuExit::IoOut(guest::IO_EXIT_PORT, _)) => {
                exited_at = Some(Instant::now());
                handled.io += 1;
            }
            Ok(VcpuExit::IoIn(guest::IO_IN_PORT, data)) => {
                data.fill(0);
                exited_at = Some(Instant::now());
                handled.io_in += 1;
            }
            Ok(VcpuExit::MmioWrite(gpa, _)) if guest::MMIO_EXITS.contains(&gpa) => {
                exited_at = Some(Instant::now());
                handled.mmio += 1;
            }
            Ok(other) => {
                let desc = format!("{other:?}");
                let regs = vcpu.get_regs().ok();
                bail!(
                    "unexpected KVM exit {desc} (rip {:#x})",
                    regs.map(|r| r.rip).unwrap_or(0)
                );
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())).context("KVM_RUN"),
        }
    }
}
