//! The only code that reads halt-poll's map (`halt_poll_stats`).

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::aggregate::HaltPollTotals;
use crate::bpf::{comm_to_string, read_record, types};

/// Reads the kernel's cumulative per-thread halt-poll aggregates (`halt_poll_stats`).
pub fn read_totals(map: &MapHandle) -> anyhow::Result<Vec<HaltPollTotals>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(s) = read_record::<types::halt_poll_stats>(&v) else {
            continue;
        };
        out.push(HaltPollTotals {
            pid: s.pid,
            tid,
            comm: comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            grows: s.grows,
            shrinks: s.shrinks,
            window_ns: s.window_ns,
        });
    }
    Ok(out)
}
