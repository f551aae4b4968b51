//! The vCPU-thread table every monitor shares (`vcpu_threads`, kernel half:
//! src/bpf/vcpu_threads.bpf.c and common.bpf.h): the only code that decodes it.

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::bpf::{read_record, types};
use crate::monitors::interval::names_thread;

/// One entry: the thread id, its raw key and its value.
pub struct Entry {
    /// Thread id.
    pub tid: u32,
    /// The raw key, to read or delete the entry again.
    pub key: Vec<u8>,
    /// The value.
    pub thread: types::vcpu_thread,
}

names_thread!(types::vcpu_thread);

/// Reads the entry under `key`.
pub fn read(threads: &MapHandle, key: &[u8]) -> anyhow::Result<Option<types::vcpu_thread>> {
    Ok(threads
        .lookup(key, MapFlags::ANY)?
        .and_then(|v| read_record::<types::vcpu_thread>(&v)))
}

/// Every entry of the table.
pub fn read_all(threads: &MapHandle) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for key in threads.keys() {
        if let (Some(tid), Some(thread)) = (read_record::<u32>(&key), read(threads, &key)?) {
            out.push(Entry { tid, key, thread });
        }
    }
    Ok(out)
}

/// Deletes the entry of thread `tid`.
pub fn forget(threads: &MapHandle, tid: u32) {
    let _ = threads.delete(&tid.to_ne_bytes());
}

/// The threads the kernel saw exit.
pub fn exited(threads: &MapHandle) -> Vec<u32> {
    read_all(threads)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.thread.exited != 0)
        .map(|e| e.tid)
        .collect()
}

/// Forgets the entries of a tid-keyed aggregate map once their thread has
/// exited and its last figures were read: a thread found gone after one
/// reading is deleted after the next one, which has everything it did.
#[derive(Default)]
pub struct ExitedThreads {
    gone: Vec<Vec<u8>>,
}

impl ExitedThreads {
    /// Call right after reading `map`; returns the threads it deleted.
    pub fn sweep(&mut self, map: &MapHandle) -> Vec<u32> {
        let mut deleted = Vec::new();
        for k in self.gone.drain(..) {
            let _ = map.delete(&k);
            deleted.extend(read_record::<u32>(&k));
        }
        self.gone = map
            .keys()
            .filter(|k| {
                read_record::<u32>(k)
                    // /proc/TID exists for every live thread, listed or not.
                    .is_some_and(|tid| !crate::procfs::process_alive(tid))
            })
            .collect();
        deleted
    }
}
