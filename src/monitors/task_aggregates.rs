//! Per-thread aggregates that the kernel keeps in task storage where it can
//! (src/bpf/task_aggregate.bpf.h): live threads' entries are copied out by
//! the monitor's task iterator, exited threads' entries are in its hash by
//! thread id, where every entry is on kernels without task storage.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::Context;
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, OpenMapMut, OpenProgramMut, ProgramMut};

use crate::bpf::read_record;
use crate::monitors::interval::NamesThread;
use crate::monitors::ledger::Reading;
use crate::monitors::{Configure, Start, Thread};

/// A monitor's programs that keep its aggregates in task storage: its
/// BTF-typed hot path and its exit hook (`tp_btf_<name>_exit`).
pub struct InTask {
    pub program: &'static str,
    pub exit: &'static str,
}

impl InTask {
    /// Whether the programs a backend resolved to keep aggregates in task storage.
    pub fn chosen(&self, programs: &[&str]) -> bool {
        programs.contains(&self.program)
    }

    /// Sets up the object to load: the task storage map (a map type of
    /// Linux 5.11+) is created only for programs that use it, the iterator
    /// loaded only when aggregates are read from it.
    pub fn configure(
        &self,
        map: &mut OpenMapMut<'_>,
        iter: &mut OpenProgramMut<'_>,
        cx: &Configure,
    ) -> anyhow::Result<()> {
        let programs = cx.resolved.map_or(&[][..], |r| &r.programs[..]);
        let in_task = self.chosen(programs);
        map.set_autocreate(in_task || programs.contains(&self.exit))?;
        iter.set_autoload(in_task && cx.mode.aggregates());
        Ok(())
    }

    /// The aggregates of a session or an exporter: the hash, and the
    /// iterator where the entries live in task storage.
    pub fn source(
        &self,
        monitor: &'static str,
        stats: &libbpf_rs::Map<'_>,
        iter: &ProgramMut<'_>,
        cx: &Start,
    ) -> anyhow::Result<TaskAggregates> {
        let in_task = cx.mode.aggregates() && self.chosen(&cx.resolved.programs);
        TaskAggregates::new(monitor, stats, in_task.then_some(iter))
    }
}

/// Where one monitor's per-thread aggregates `T` are read from.
pub struct TaskAggregates {
    /// Entries by thread id: every one without task storage; with it,
    /// those of threads that exited.
    stats: MapHandle,
    /// The monitor's attached task iterator, when the entries live in task storage.
    iter: Option<Link>,
    /// For error messages.
    monitor: &'static str,
}

impl TaskAggregates {
    /// Reads `stats`, and with `iter` (the monitor's `iter_<name>_task`,
    /// given when its task-storage programs run) the live threads.
    fn new(
        monitor: &'static str,
        stats: &libbpf_rs::Map<'_>,
        iter: Option<&ProgramMut<'_>>,
    ) -> anyhow::Result<TaskAggregates> {
        let iter = match iter {
            Some(p) => Some(
                p.attach()
                    .with_context(|| format!("cannot attach {monitor}'s task iterator"))?,
            ),
            None => None,
        };
        Ok(TaskAggregates {
            stats: MapHandle::try_from(stats)?,
            iter,
            monitor,
        })
    }

    /// Deletes the entries of threads whose last figures were read.
    pub fn forget(&self, gone: &[Thread]) {
        for t in gone {
            let _ = self.stats.delete(&t.tid.to_ne_bytes());
        }
    }

    /// Every thread's cumulative entry, by thread id. The iterator runs
    /// first: a thread that exits meanwhile has its entry in the hash by the
    /// time the hash is read (that copy wins), so none is missing.
    fn entries<V: Copy>(&self) -> anyhow::Result<BTreeMap<u32, V>> {
        let mut out = BTreeMap::new();
        if let Some(link) = &self.iter {
            let mut bytes = Vec::new();
            libbpf_rs::Iter::new(link)
                .with_context(|| format!("cannot create {}'s task iterator", self.monitor))?
                .read_to_end(&mut bytes)
                .with_context(|| format!("cannot run {}'s task iterator", self.monitor))?;
            out.extend(parse_iterated::<V>(&bytes));
        }
        for k in self.stats.keys() {
            let (Some(tid), Some(v)) = (
                read_record::<u32>(&k),
                self.stats.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            if let Some(v) = read_record::<V>(&v) {
                out.insert(tid, v);
            }
        }
        Ok(out)
    }

    /// Every thread's entry, with the thread it names.
    pub fn read<V: NamesThread>(&self) -> anyhow::Result<Vec<Reading<V>>> {
        let entries = self.entries::<V>()?;
        Ok(entries
            .into_iter()
            .map(|(tid, e)| Reading {
                who: e.who(tid),
                counters: e,
                exited: false,
            })
            .collect())
    }
}

/// Bytes of the tid and padding before each entry in the iterator's output.
const HEAD: usize = 8;

/// The iterator's output: (tid: u32, 4 bytes of padding, entry: V), back
/// to back. A torn tail (which the kernel does not write) is ignored.
fn parse_iterated<V: Copy>(bytes: &[u8]) -> Vec<(u32, V)> {
    bytes
        .chunks_exact(HEAD + std::mem::size_of::<V>())
        .filter_map(|c| Some((read_record::<u32>(c)?, read_record::<V>(&c[HEAD..])?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct Entry {
        pid: u32,
        vcpu: i32,
        count: u64,
    }

    fn record(tid: u32, e: Entry) -> Vec<u8> {
        let mut b = tid.to_ne_bytes().to_vec();
        b.extend([0xee; 4]);
        b.extend(crate::bpf::as_bytes(&e));
        b
    }

    #[test]
    fn iterated_entries_decode_back_to_back_and_a_torn_tail_is_ignored() {
        let a = Entry {
            pid: 7,
            vcpu: 0,
            count: 5,
        };
        let b = Entry {
            pid: 7,
            vcpu: 1,
            count: u64::MAX,
        };
        let mut bytes = record(11, a);
        bytes.extend(record(12, b));
        bytes.extend(&record(13, a)[..HEAD + 3]);
        assert_eq!(parse_iterated::<Entry>(&bytes), vec![(11, a), (12, b)]);
        assert!(parse_iterated::<Entry>(&[]).is_empty());
    }
}
