//! The only code that reads wakeup's map (`wakeup_stats`).

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::aggregate::WakeupTotals;
use crate::bpf::{comm_to_string, read_record, types};

/// Reads the kernel's cumulative per-thread wake-up aggregates (`wakeup_stats`).
pub fn read_totals(map: &MapHandle) -> anyhow::Result<Vec<WakeupTotals>> {
    let mut out = Vec::new();
    for k in map.keys() {
        let (Some(tid), Some(v)) = (read_record::<u32>(&k), map.lookup(&k, MapFlags::ANY)?) else {
            continue;
        };
        let Some(s) = read_record::<types::wakeup_stats>(&v) else {
            continue;
        };
        out.push(WakeupTotals {
            pid: s.pid,
            tid,
            comm: comm_to_string(&s.comm),
            vcpu_id: u32::try_from(s.vcpu_id).ok(),
            wakeups: s.wakeups,
            waited: s.waited,
            invalid: s.invalid,
            halt_ns: s.halt_ns,
            hist: s.hist.to_vec(),
        });
    }
    Ok(out)
}
