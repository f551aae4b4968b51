//! The two host workloads of part 6, run inside the benchmark itself (no VM,
//! no perf): a tight loop of a cheap syscall, and two threads on one CPU
//! ping-ponging a byte through a pair of pipes. Each returns how many
//! operations it did in how long; both run pinned to one CPU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A host workload that is not a VM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Load {
    /// `syscall(SYS_getppid)` in a loop: every call passes
    /// raw_syscalls:sys_enter and sys_exit once.
    Syscall,
    /// A round trip of one byte between two threads on one CPU through two
    /// pipes: two context switches (sched_switch), two wake-ups
    /// (sched_wakeup) and four syscalls (a write and a read on each side).
    PingPong,
}

impl Load {
    pub const ALL: [Load; 2] = [Load::Syscall, Load::PingPong];

    pub fn name(self) -> &'static str {
        match self {
            Load::Syscall => "syscall",
            Load::PingPong => "context_switch",
        }
    }

    /// What one operation is.
    pub fn op(self) -> &'static str {
        match self {
            Load::Syscall => "ns per getppid() syscall",
            Load::PingPong => {
                "ns per context switch (half a pipe round trip: 1 switch, 1 wake-up, 2 syscalls)"
            }
        }
    }

    /// Runs for about `d` on `cpu`: (operations, seconds).
    pub fn run(self, cpu: usize, d: Duration) -> Result<(u64, f64)> {
        let _pin = Pinned::to(cpu)?;
        match self {
            Load::Syscall => Ok(syscalls(d)),
            Load::PingPong => ping_pong(cpu, d),
        }
    }

    /// Nanoseconds per operation of a trial.
    pub fn ns_per_op(self, (ops, secs): (u64, f64)) -> f64 {
        if ops == 0 {
            return f64::NAN;
        }
        secs * 1e9 / ops as f64
    }
}

/// getppid() through syscall(2): glibc caches nothing for it, and the raw
/// syscall keeps any wrapper out of the loop. The clock is read every 1024
/// calls, so its cost is in the noise.
fn syscalls(d: Duration) -> (u64, f64) {
    let t0 = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..1024 {
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        n += 1024;
        let e = t0.elapsed();
        if e >= d {
            return (n, e.as_secs_f64());
        }
    }
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Context switches per operation of a ping-pong round trip.
pub const SWITCHES_PER_ROUND_TRIP: u64 = 2;

/// This thread and a partner, both on `cpu`, pass one byte back and forth:
/// each blocks in read() until the other writes, so every pass is a switch.
/// Returns (context switches, seconds); a 0 byte tells the partner to stop.
fn ping_pong(cpu: usize, d: Duration) -> Result<(u64, f64)> {
    let (mut a_rx, mut b_tx) = pipe()?;
    let (mut b_rx, mut a_tx) = pipe()?;
    let partner = std::thread::spawn(move || -> Result<()> {
        let _pin = Pinned::to(cpu)?;
        let mut b = [0u8];
        loop {
            b_rx.read_exact(&mut b)?;
            if b[0] == 0 {
                return Ok(());
            }
            b_tx.write_all(&b)?;
        }
    });
    let mut run = || -> Result<(u64, f64)> {
        let mut b = [1u8];
        // One round trip before the clock starts: the partner is running.
        a_tx.write_all(&b)?;
        a_rx.read_exact(&mut b)?;
        let t0 = Instant::now();
        let mut n = 0u64;
        loop {
            for _ in 0..64 {
                a_tx.write_all(&b)?;
                a_rx.read_exact(&mut b)?;
            }
            n += 64;
            let e = t0.elapsed();
            if e >= d {
                return Ok((n * SWITCHES_PER_ROUND_TRIP, e.as_secs_f64()));
            }
        }
    };
    let r = run();
    // Stops the partner whatever happened (a closed pipe ends it too).
    let _ = a_tx.write_all(&[0]);
    drop(a_tx);
    partner
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong partner panicked"))?
        .context("ping-pong partner")?;
    r
}

/// The calling thread pinned to one CPU until dropped (then back on all it had).
struct Pinned {
    before: libc::cpu_set_t,
}

impl Pinned {
    fn to(cpu: usize) -> Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; the calls get its real size.
        unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of_val(&before), &mut before) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
                bail!(
                    "cannot pin to CPU {cpu}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(Pinned { before })
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the mask read in `to`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of_val(&self.before), &self.before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both workloads run, count operations and give a plausible time per
    /// operation (a syscall or a switch takes more than 1 ns and less than 1 ms).
    #[test]
    fn workloads_count_operations() {
        for l in Load::ALL {
            let r = l.run(0, Duration::from_millis(5)).unwrap();
            assert!(r.0 > 0, "{l:?}: no operations");
            let ns = l.ns_per_op(r);
            assert!(ns > 1.0 && ns < 1e6, "{l:?}: {ns} ns per op");
        }
    }

    #[test]
    fn a_trial_without_operations_has_no_time_per_operation() {
        assert!(Load::Syscall.ns_per_op((0, 1.0)).is_nan());
        assert_eq!(Load::PingPong.ns_per_op((4, 1e-6)), 250.0);
    }
}
