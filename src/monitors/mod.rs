//! The user-space half of each monitor, one module per monitor, named like
//! its kernel half in src/bpf/: decode ring-buffer records or read the
//! in-kernel aggregates, and turn them into rows.

pub mod dirty;
pub mod halt_poll;
pub mod vcpu_load;
pub mod wakeup;

use crate::bpf::{comm_to_string, types};
use crate::output::Common;

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
