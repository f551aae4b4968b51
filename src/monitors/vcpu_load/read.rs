//! The only code that reads vcpu-load's maps: the load/put fields of the
//! shared thread table and `vcpu_cpu_ns`.

use std::collections::HashMap;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::bpf::{as_bytes, read_record, types};
use crate::monitors::threads;

/// One thread's consistent reading: its entry and its loaded time per CPU.
#[derive(Clone, Debug)]
pub struct Reading {
    /// Thread id.
    pub tid: u32,
    /// Its thread-table entry.
    pub thread: types::vcpu_thread,
    /// Cumulative loaded time per CPU, ns (the open pair not included).
    pub cpus: Vec<(u32, u64)>,
}

/// Reads of a thread's entry before its snapshot is taken as it is.
const SNAPSHOT_ATTEMPTS: usize = 8;

/// Thread `tid`'s cumulative loaded time on each CPU, one lookup per CPU.
fn cpu_times_of(cpu_ns: &MapHandle, tid: u32) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for cpu in 0..libbpf_rs::num_possible_cpus()? as u32 {
        let key = types::vcpu_cpu_key { tid, cpu };
        if let Some(v) = cpu_ns.lookup(as_bytes(&key), MapFlags::ANY)? {
            out.push((cpu, read_record::<u64>(&v).unwrap_or(0)));
        }
    }
    Ok(out)
}

/// Every thread's cumulative loaded time on each CPU.
pub fn cpu_times(cpu_ns: &MapHandle) -> anyhow::Result<HashMap<u32, Vec<(u32, u64)>>> {
    let mut out: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    for k in cpu_ns.keys() {
        let (Some(key), Some(v)) = (
            read_record::<types::vcpu_cpu_key>(&k),
            cpu_ns.lookup(&k, MapFlags::ANY)?,
        ) else {
            continue;
        };
        out.entry(key.tid)
            .or_default()
            .push((key.cpu, read_record::<u64>(&v).unwrap_or(0)));
    }
    Ok(out)
}

/// Each thread's entry and its per-CPU times as one snapshot: the times read
/// between two equal, even `seq` values of the entry (the kernel makes `seq`
/// odd while it changes either). All entries first, then all per-CPU times,
/// then each entry again; a thread that moved on meanwhile is read again,
/// its per-CPU times key by key.
pub fn snapshot(threads: &MapHandle, cpu_ns: &MapHandle) -> anyhow::Result<Vec<Reading>> {
    let first = threads::read_all(threads)?;
    let mut cpu_of_thread = cpu_times(cpu_ns)?;
    let mut out = Vec::with_capacity(first.len());
    for e in first {
        let (tid, mut t) = (e.tid, e.thread);
        let mut cpus = cpu_of_thread.remove(&tid).unwrap_or_default();
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let Some(again) = threads::read(threads, &e.key)? else {
                break;
            };
            if again.seq == t.seq && t.seq % 2 == 0 {
                break;
            }
            t = again;
            cpus = cpu_times_of(cpu_ns, tid)?;
        }
        out.push(Reading {
            tid,
            thread: t,
            cpus,
        });
    }
    Ok(out)
}

/// Deletes the kernel entries of threads that exited (their last figures reported).
pub fn forget(threads: &MapHandle, cpu_ns: &MapHandle, tids: &[u32]) {
    if tids.is_empty() {
        return;
    }
    for tid in tids {
        threads::forget(threads, *tid);
    }
    for k in cpu_ns.keys() {
        if read_record::<types::vcpu_cpu_key>(&k).is_some_and(|c| tids.contains(&c.tid)) {
            let _ = cpu_ns.delete(&k);
        }
    }
}
