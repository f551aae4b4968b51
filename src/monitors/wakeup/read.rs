//! The only code that reads wakeup's aggregates: the `wakeup_stats` hash,
//! and where the kernel keeps live threads' aggregates in task storage
//! (`wakeup_task`), the task iterator that copies them out.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::Context;
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use super::aggregate::WakeupTotals;
use crate::bpf::{KvmWatcherSkel, comm_to_string, read_record, types};

/// The wake-up variant that keeps aggregates in task storage (see
/// src/bpf/wakeup.bpf.c).
pub const IN_TASK_PROGRAM: &str = "tp_btf_vcpu_wakeup";
/// Its exit hook, which moves an exiting thread's entry into the hash.
pub const IN_TASK_EXIT_PROGRAM: &str = "tp_btf_wakeup_exit";

/// Where the per-thread aggregates are read from.
pub struct Source {
    /// Every thread's entry without task storage; with it, threads that
    /// exited (moved there by the exit hook).
    stats: MapHandle,
    /// The attached `iter_wakeup_task`, when aggregates live in task storage.
    task_iter: Option<Link>,
}

impl Source {
    /// The source for the programs `programs` resolved to.
    pub fn new(skel: &KvmWatcherSkel<'_>, programs: &[&str]) -> anyhow::Result<Source> {
        let task_iter = match programs.contains(&IN_TASK_PROGRAM) {
            true => Some(
                skel.progs
                    .iter_wakeup_task
                    .attach()
                    .context("cannot attach wakeup's task iterator")?,
            ),
            false => None,
        };
        Ok(Source {
            stats: MapHandle::try_from(&skel.maps.wakeup_stats)?,
            task_iter,
        })
    }

    /// The hash (for deleting the entries of threads that exited).
    pub fn stats(&self) -> &MapHandle {
        &self.stats
    }

    /// The kernel's cumulative per-thread wake-up aggregates. The task
    /// iterator runs first: a thread that exits meanwhile has its entry in
    /// the hash by the time the hash is read (the hash's copy wins), so no
    /// thread is missing from a reading.
    pub fn read_totals(&self) -> anyhow::Result<Vec<WakeupTotals>> {
        let mut by_tid = BTreeMap::new();
        if let Some(link) = &self.task_iter {
            let mut bytes = Vec::new();
            libbpf_rs::Iter::new(link)
                .context("cannot create wakeup's task iterator")?
                .read_to_end(&mut bytes)
                .context("cannot run wakeup's task iterator")?;
            for r in parse_task_records(&bytes) {
                by_tid.insert(r.tid, r);
            }
        }
        for k in self.stats.keys() {
            let (Some(tid), Some(v)) = (
                read_record::<u32>(&k),
                self.stats.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            if let Some(s) = read_record::<types::wakeup_stats>(&v) {
                by_tid.insert(tid, totals(tid, &s));
            }
        }
        Ok(by_tid.into_values().collect())
    }
}

/// The task iterator's output: back-to-back `struct wakeup_task_record`s.
fn parse_task_records(bytes: &[u8]) -> Vec<WakeupTotals> {
    bytes
        .chunks_exact(std::mem::size_of::<types::wakeup_task_record>())
        .filter_map(read_record::<types::wakeup_task_record>)
        .map(|r| totals(r.tid, &r.stats))
        .collect()
}

fn totals(tid: u32, s: &types::wakeup_stats) -> WakeupTotals {
    WakeupTotals {
        pid: s.pid,
        tid,
        comm: comm_to_string(&s.comm),
        vcpu_id: u32::try_from(s.vcpu_id).ok(),
        wakeups: s.wakeups,
        waited: s.waited,
        invalid: s.invalid,
        halt_ns: s.halt_ns,
        hist: s.hist.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tid: u32, pid: u32, wakeups: u64) -> Vec<u8> {
        let mut r = types::wakeup_task_record {
            tid,
            ..Default::default()
        };
        r.stats.pid = pid;
        r.stats.vcpu_id = 2;
        r.stats.wakeups = wakeups;
        for (c, b) in r.stats.comm.iter_mut().zip(b"CPU") {
            *c = *b as i8;
        }
        crate::bpf::as_bytes(&r).to_vec()
    }

    #[test]
    fn task_records_decode_back_to_back_and_ignore_a_torn_tail() {
        let mut bytes = record(11, 7, 5);
        bytes.extend(record(12, 7, 9));
        bytes.extend(&record(13, 7, 1)[..10]);
        let got = parse_task_records(&bytes);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].tid, got[0].pid, got[0].wakeups), (11, 7, 5));
        assert_eq!(
            (got[1].tid, got[1].vcpu_id, got[1].wakeups),
            (12, Some(2), 9)
        );
        assert_eq!(got[1].comm, "CPU");
    }
}
