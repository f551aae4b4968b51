//! The scheduler's view of threads (migrations; their schedstat, the ground
//! truth of run time, is `kvm_watcher::procfs::schedstat`) and CPU affinity,
//! for tests that pin vCPU threads.

/// Pins thread `tid` to CPU `cpu`.
pub fn pin(tid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get
    // valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let r = libc::sched_setaffinity(tid as i32, std::mem::size_of_val(&set), &set);
        assert_eq!(
            r,
            0,
            "cannot pin thread {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The highest CPU this process may run on.
pub fn last_cpu() -> usize {
    // SAFETY: as in pin().
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&c| libc::CPU_ISSET(c, &set))
            .unwrap_or(0)
    }
}

/// The kernel's count of the times thread `tid` of process `pid` changed
/// CPU (`se.nr_migrations` in /proc/PID/task/TID/sched: every
/// set_task_cpu() to another CPU); None once it has gone.
pub fn nr_migrations(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/sched")).ok()?;
    text.lines()
        .find(|l| l.trim_start().starts_with("se.nr_migrations"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// A thread of the test that spins on one CPU until dropped: contention
/// for whatever else is pinned there.
pub struct Hog {
    /// Its thread id.
    pub tid: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hog {
    /// Starts the hog on CPU `cpu`.
    pub fn on(cpu: usize) -> Hog {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                // SAFETY: no arguments.
                let me = unsafe { libc::gettid() } as u32;
                pin(me, cpu);
                tx.send(me).unwrap();
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        };
        let tid = rx.recv().expect("the hog started");
        Hog {
            tid,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the VM's `lingering` line (its vCPU threads have ended their
/// run), then until they sleep for good: nothing moves in their schedstat
/// for 100 ms.
pub fn wait_lingering(vm: &super::VmProcess) {
    let (pid, tids) = (vm.ready.pid, &vm.ready.tids);
    let read = || -> Vec<Option<kvm_watcher::procfs::Schedstat>> {
        tids.iter()
            .map(|&t| kvm_watcher::procfs::schedstat(pid, t))
            .collect()
    };
    for _ in 0..600 {
        if vm.stderr().contains("kvm-watcher vm: lingering") {
            let mut last = read();
            for _ in 0..100 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let now = read();
                if now == last {
                    return;
                }
                last = now;
            }
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the VM never lingered; stderr:\n{}", vm.stderr());
}

/// `run-delay --summary -i 0.5 --output json` of the VMM processes `pids`,
/// attached when this returns.
pub fn run_delay_summary(pids: &[u32]) -> super::observe::Spawned {
    let mut args = vec!["run-delay", "--summary", "-i", "0.5", "--output", "json"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for p in pids {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    super::observe::watcher(&args.iter().map(String::as_str).collect::<Vec<_>>())
}
