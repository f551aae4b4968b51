//! The exits monitor's ring-buffer record: one row per exit, at its end
//! (the next guest entry, or the next KVM_RUN after an exit to the VMM).

use serde::Serialize;

use super::reasons::Reasons;
use crate::bpf::{read_record, types};
use crate::monitors::{common_of, vcpu_cell};
use crate::output::{Clock, Common, Row, terminal_safe as printable};

/// One exit.
#[derive(Clone, Debug, Serialize)]
pub struct ExitRow {
    /// Common fields (the time is the exit's end).
    #[serde(flatten)]
    pub common: Common,
    /// `kvm` (an exit from the guest, timed in KVM) or `vmm` (an exit to the
    /// VMM, timed there).
    pub kind: &'static str,
    /// The vendor's exit code, or KVM_EXIT_*.
    pub reason: u32,
    /// Its name.
    pub reason_name: String,
    /// Its time, ns.
    pub ns: u64,
    /// Exits to the VMM: `pio` or `mmio` when kvm:kvm_pio or kvm:kvm_mmio named what it was about.
    pub target: Option<&'static str>,
    /// The port or guest-physical address.
    pub addr: Option<u64>,
}

/// Decodes a `struct exits_event`, naming its reason with `reasons`.
pub fn decode(bytes: &[u8], reasons: &Reasons) -> Option<ExitRow> {
    let e: types::exits_event = read_record(bytes)?;
    let user = e.kind == types::exits_kind::EXITS_USER.0;
    let target = match e.target_kind {
        k if k == types::exits_target_kind::EXITS_TARGET_PIO.0 => Some("pio"),
        k if k == types::exits_target_kind::EXITS_TARGET_MMIO.0 => Some("mmio"),
        _ => None,
    };
    Some(ExitRow {
        common: common_of(&e.hdr),
        kind: if user { "vmm" } else { "kvm" },
        reason: e.reason,
        reason_name: if user {
            reasons.user(e.reason)
        } else {
            reasons.kvm(e.reason)
        },
        ns: e.ns,
        target,
        addr: target.map(|_| e.target),
    })
}

impl Row for ExitRow {
    fn monitor(&self) -> &'static str {
        "exits"
    }

    fn header(&self) -> String {
        format!(
            "{:<15} {:<16} {:>15} {:>7} {:<4} {:<24} {:>11} {:<20} VM",
            "TIME", "COMM", "PID/TID", "VCPU_ID", "IN", "REASON", "TIME(us)", "PORT/GPA"
        )
    }

    fn row(&self, clock: &Clock) -> String {
        let target = match (self.target, self.addr) {
            (Some("pio"), Some(a)) => format!("port {a:#x}"),
            (Some(_), Some(a)) => format!("mmio {a:#x}"),
            _ => "-".into(),
        };
        format!(
            "{:<15} {:<16} {:>15} {:>7} {:<4} {:<24} {:>11.3} {:<20} {}",
            clock.format(self.common.time_ns),
            printable(&self.common.comm),
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            self.kind,
            printable(&self.reason_name),
            self.ns as f64 / 1e3,
            target,
            printable(self.common.vm.as_deref().unwrap_or("-")),
        )
    }
}
