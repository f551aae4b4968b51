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
