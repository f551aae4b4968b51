//! dirty's ring-buffer record: one row per logged guest write.

use serde::Serialize;

use crate::bpf::{read_record, types};
use crate::monitors::{common_of, vcpu_cell};
use crate::output::{Clock, Common, Row};

/// One dirtied page.
#[derive(Clone, Debug, Serialize)]
pub struct DirtyRow {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// Guest frame number.
    pub gfn: u64,
    /// gfn minus the memslot's base_gfn.
    pub rel_gfn: u64,
    /// Memslot id (without the address-space bits).
    pub slot_id: u32,
    /// Address space (1 = SMM on x86).
    pub as_id: u32,
    /// Pages in the memslot.
    pub npages: u64,
    /// Host virtual address where the memslot starts.
    pub userspace_addr: u64,
}

/// Decodes a `struct dirty_event`.
pub fn decode(bytes: &[u8]) -> Option<DirtyRow> {
    let e: types::dirty_event = read_record(bytes)?;
    Some(DirtyRow {
        common: common_of(&e.hdr),
        gfn: e.gfn,
        rel_gfn: e.rel_gfn,
        slot_id: e.slot_id,
        as_id: e.as_id,
        npages: e.npages,
        userspace_addr: e.userspace_addr,
    })
}

impl Row for DirtyRow {
    fn monitor(&self) -> &'static str {
        "dirty"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:>7} {:>12} {:>10} {:>10} {:>18} {:>7}",
            "TIME",
            "COMM",
            "PID/TID",
            "VCPU_ID",
            "GFN(hex)",
            "REL_GFN",
            "NPAGES",
            "USERSPACE_ADDR",
            "SLOT_ID"
        );
        format!("{base} VM")
    }

    fn row(&self, clock: &Clock) -> String {
        let base = format!(
            "{:<15} {:<16} {:>15} {:>7} {:>12x} {:>10x} {:>10} {:>#18x} {:>7}",
            clock.format(self.common.time_ns),
            self.common.comm,
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            self.gfn,
            self.rel_gfn,
            self.npages,
            self.userspace_addr,
            self.slot_id,
        );
        format!("{base} {}", self.common.vm.as_deref().unwrap_or("-"))
    }
}
