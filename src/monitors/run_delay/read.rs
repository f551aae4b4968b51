//! The only code that reads run-delay's maps: per-thread waits
//! (`run_delay_stats`) and who ran while they waited (`run_delay_culprits`),
//! topped up with the kernel's schedstat for arrivals no hook saw.

use std::ptr::NonNull;

use libbpf_rs::{AsRawLibbpf, MapCore, MapFlags, MapHandle, libbpf_sys};

use super::aggregate::{CulpritReading, RunDelayTotals};
use crate::bpf::{KvmWatcherSkel, as_bytes, comm_to_string, read_record, types};
use crate::monitors::Filter;
use crate::procfs::{VmProcess, schedstat};

/// Every tracked thread's cumulative figures.
pub fn read_totals(map: &MapHandle) -> anyhow::Result<Vec<RunDelayTotals>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(s) = read_record::<types::run_delay_stats>(&v) else {
            continue;
        };
        // What the kernel counted since the last switch-in the hooks saw:
        // arrivals no sched_switch event fired for (their waits reach the
        // entry only at the next one seen). Read after the entry, so an
        // arrival in between is counted once.
        let (unseen_ins, unseen_ns) = if s.sched_base != 0 {
            schedstat(s.pid, tid).map_or((0, 0), |k| {
                (
                    k.timeslices.saturating_sub(s.sched_arrivals),
                    k.wait_ns.saturating_sub(s.sched_delay_ns),
                )
            })
        } else {
            (0, 0)
        };
        out.push(RunDelayTotals {
            pid: s.pid,
            tid,
            comm: comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            switch_ins: s.switch_ins + unseen_ins,
            waits: s.waits,
            delay_ns: s.delay_ns + unseen_ns,
            cause_waits: s.cause_waits,
            cause_ns: s.cause_ns,
            unattributed_ns: s.unattributed_ns,
            epoch: s.epoch,
            max_ns: s.max_ns,
            hist: s.hist.to_vec(),
        });
    }
    Ok(out)
}

/// Every (waiting thread, task that ran) pair's cumulative time.
pub fn read_culprits(map: &MapHandle) -> anyhow::Result<Vec<CulpritReading>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(key), Some(v)) = (
            read_record::<types::run_delay_culprit_key>(&k),
            map.lookup(&k, MapFlags::ANY)?,
        ) else {
            continue;
        };
        if let Some(c) = read_record::<types::run_delay_culprit>(&v) {
            out.push(CulpritReading {
                waiter: key.waiter,
                tid: key.tid,
                pid: c.pid,
                comm: comm_to_string(&c.comm),
                ns: c.ns,
            });
        }
    }
    Ok(out)
}

/// Deletes the culprit entries whose waiting thread or culprit is in `tids`.
pub fn forget_culprits(map: &MapHandle, tids: &[u32]) {
    if tids.is_empty() {
        return;
    }
    for k in map.keys() {
        if read_record::<types::run_delay_culprit_key>(&k)
            .is_some_and(|c| tids.contains(&c.waiter) || tids.contains(&c.tid))
        {
            let _ = map.delete(&k);
        }
    }
}

const MARKS: usize = types::limits::RUN_DELAY_MARKS.0 as usize;

/// run-delay's per-thread marks in the loaded object's .bss (see
/// src/bpf/run_delay.bpf.c): the hooks look up only the threads whose byte
/// is set, so a thread's byte is set before its entry is made.
pub struct Marks {
    base: NonNull<u8>,
}

impl Marks {
    /// The marks of loaded `skel`, through libbpf's mapping of its .bss
    /// (shared with the kernel; the object outlives every reader).
    pub fn of(skel: &KvmWatcherSkel<'_>) -> anyhow::Result<Marks> {
        const { assert!(MARKS.is_power_of_two()) };
        let map = skel.maps.bss.as_libbpf_object();
        let mut size = 0;
        // SAFETY: `map` is the .bss of a loaded object; libbpf returns its
        // mapping (or null) and writes its size.
        let base = unsafe { libbpf_sys::bpf_map__initial_value(map.as_ptr(), &mut size) };
        let off = std::mem::offset_of!(types::bss, run_delay_marks);
        if base.is_null() || (size as usize) < off + MARKS {
            anyhow::bail!("run-delay: the BPF object's .bss is not mapped");
        }
        // SAFETY: `off + MARKS <= size`: the marks lie inside the mapping.
        let base = unsafe { base.cast::<u8>().add(off) };
        Ok(Marks {
            base: NonNull::new(base).ok_or_else(|| anyhow::anyhow!("null .bss"))?,
        })
    }

    /// Marks thread `tid` as one that may have an entry.
    pub fn mark(&self, tid: u32) {
        let i = tid as usize & (MARKS - 1);
        // SAFETY: `i < MARKS`, inside the mapping `of` checked; a byte store
        // like the BPF side's (volatile: the kernel reads it concurrently).
        unsafe { self.base.as_ptr().add(i).write_volatile(1) }
    }
}

/// Enters the vCPU threads of `vms` that pass `filter` (a thread whose vCPU
/// is not known yet is entered too; the kernel drops it if its vCPU turns
/// out to be filtered), so their first wait is seen even if they have not
/// run a vCPU since attach. Entries the kernel made already are kept.
pub fn enter_threads(map: &MapHandle, marks: &Marks, vms: &[VmProcess], filter: &Filter) {
    for vm in vms {
        for t in &vm.vcpu_threads {
            if !filter.admits(vm.pid, t.tid, t.vcpu_id) {
                continue;
            }
            let mut entry = types::run_delay_stats {
                pid: vm.pid,
                vcpu_id: t.vcpu_id.map_or(-1, |v| v as i32),
                ..Default::default()
            };
            for (dst, src) in entry.comm.iter_mut().zip(t.comm.bytes().take(15)) {
                *dst = src as i8;
            }
            marks.mark(t.tid);
            let _ = map.update(&t.tid.to_ne_bytes(), as_bytes(&entry), MapFlags::NO_EXIST);
        }
    }
}
