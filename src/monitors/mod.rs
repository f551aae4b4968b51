//! The user-space half of each monitor, one module per monitor, named like
//! its kernel half in src/bpf/: decode ring-buffer records or read the
//! in-kernel aggregates, and turn them into rows.

pub mod dirty;
pub mod halt_poll;
pub mod vcpu_load;
pub mod wakeup;

use crate::bpf::{comm_to_string, read_record, types};
use crate::output::{Common, Output};
use crate::procfs::VmNames;

/// The fields every record starts with.
pub fn common_of(hdr: &types::event_header) -> Common {
    Common {
        time_ns: hdr.time_ns,
        pid: hdr.pid,
        tid: hdr.tid,
        comm: comm_to_string(&hdr.comm),
        vcpu_id: u32::try_from(hdr.vcpu_id).ok(),
        vm: None,
    }
}

/// The VCPU_ID column.
pub fn vcpu_cell(vcpu_id: Option<u32>) -> String {
    vcpu_id.map_or_else(|| "?".to_string(), |v| v.to_string())
}

/// Decodes one ring-buffer record and writes it to `out` with its VM's name.
/// Returns false for a record of no known kind.
pub fn write_record(data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
    match read_record::<u32>(data) {
        Some(0) => wakeup::decode(data).map(|mut r| {
            r.common.vm = names.get(r.common.pid);
            out.record(&r);
        }),
        Some(1) => halt_poll::decode(data).map(|mut r| {
            r.common.vm = names.get(r.common.pid);
            out.record(&r);
        }),
        Some(2) => dirty::decode(data).map(|mut r| {
            r.common.vm = names.get(r.common.pid);
            out.record(&r);
        }),
        _ => None,
    }
    .is_some()
}
