//! The only code that reads the exits monitor's maps: per thread and reason
//! (`exits_stats`), the ports and addresses behind exits to the VMM
//! (`exits_targets`), and the threads with exits in progress (`exits_threads`).

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::aggregate::{ExitTotals, Kind, TargetKind, TargetReading};
use crate::bpf::{comm_to_string, read_record, types};
use crate::monitors::Thread;
use crate::monitors::interval::{NamesThread, names_thread};

/// Every (thread, kind, reason)'s cumulative figures.
pub fn read_totals(map: &MapHandle) -> anyhow::Result<Vec<ExitTotals>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(key), Some(v)) = (
            read_record::<types::exits_key>(&k),
            map.lookup(&k, MapFlags::ANY)?,
        ) else {
            continue;
        };
        let Some(s) = read_record::<types::exits_stats>(&v) else {
            continue;
        };
        out.push(ExitTotals {
            pid: s.pid,
            tid: key.tid,
            comm: comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            kind: if key.kind == types::exits_kind::EXITS_USER.0 {
                Kind::User
            } else {
                Kind::Kvm
            },
            reason: key.reason,
            count: s.count,
            timed: s.timed,
            ns: s.ns,
            epoch: s.epoch,
            max_ns: s.max_ns,
            hist: s.hist.to_vec(),
        });
    }
    Ok(out)
}

/// Every (thread, port or address)'s cumulative figures.
pub fn read_targets(map: &MapHandle) -> anyhow::Result<Vec<TargetReading>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(key), Some(v)) = (
            read_record::<types::exits_target_key>(&k),
            map.lookup(&k, MapFlags::ANY)?,
        ) else {
            continue;
        };
        let Some(t) = read_record::<types::exits_target>(&v) else {
            continue;
        };
        let kind = if key.kind == types::exits_target_kind::EXITS_TARGET_PIO.0 {
            TargetKind::Pio
        } else {
            TargetKind::Mmio
        };
        out.push(TargetReading {
            tid: key.tid,
            pid: t.pid,
            kind,
            addr: key.addr,
            count: t.count,
            writes: t.writes as u64,
            user_exits: t.user_exits,
            vmm_ns: t.vmm_ns,
        });
    }
    Ok(out)
}

/// Deletes every entry of threads `tids` from the three maps.
pub fn forget(stats: &MapHandle, targets: &MapHandle, threads: &MapHandle, tids: &[u32]) {
    if tids.is_empty() {
        return;
    }
    for map in [stats, targets] {
        for k in map.keys() {
            // Both keys begin with the thread id.
            if read_record::<u32>(&k).is_some_and(|tid| tids.contains(&tid)) {
                let _ = map.delete(&k);
            }
        }
    }
    for tid in tids {
        let _ = threads.delete(&tid.to_ne_bytes());
    }
}

names_thread!(types::exits_thread);

/// The threads of `threads` (the exits in progress), each named.
pub fn read_threads(map: &MapHandle) -> anyhow::Result<Vec<Thread>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(t) = read_record::<types::exits_thread>(&v) else {
            continue;
        };
        out.push(t.who(tid));
    }
    Ok(out)
}
