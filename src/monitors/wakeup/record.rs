//! wakeup's ring-buffer record: one row per `kvm:kvm_vcpu_wakeup`.

use serde::Serialize;

use crate::bpf::{read_record, types};
use crate::monitors::{common_of, vcpu_cell};
use crate::output::{Clock, Common, Row};

/// One `kvm:kvm_vcpu_wakeup`.
#[derive(Clone, Debug, Serialize)]
pub struct WakeupRow {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// How long the halt lasted (polling plus blocking), ns.
    pub halt_ns: u64,
    /// The thread really slept (false: polling caught the wake-up).
    pub waited: bool,
    /// The wake-up was a real one.
    pub valid: bool,
}

/// Decodes a `struct wakeup_event`.
pub fn decode(bytes: &[u8]) -> Option<WakeupRow> {
    let e: types::wakeup_event = read_record(bytes)?;
    Some(WakeupRow {
        common: common_of(&e.hdr),
        halt_ns: e.halt_ns,
        waited: e.waited != 0,
        valid: e.valid != 0,
    })
}

impl Row for WakeupRow {
    fn monitor(&self) -> &'static str {
        "wakeup"
    }

    fn header(&self) -> String {
        let base = format!(
            "{:<15} {:>13} {:<16} {:>15} {:>7} {:<9} {:<7}",
            "TIME", "DUR_HALT(ms)", "COMM", "PID/TID", "VCPU_ID", "WAIT/POLL", "VALID"
        );
        format!("{base} VM")
    }

    fn row(&self, clock: &Clock) -> String {
        let base = format!(
            "{:<15} {:>13.6} {:<16} {:>15} {:>7} {:<9} {:<7}",
            clock.format(self.common.time_ns),
            self.halt_ns as f64 / 1e6,
            self.common.comm,
            format!("{}/{}", self.common.pid, self.common.tid),
            vcpu_cell(self.common.vcpu_id),
            if self.waited { "wait" } else { "poll" },
            if self.valid { "valid" } else { "invalid" },
        );
        format!("{base} {}", self.common.vm.as_deref().unwrap_or("-"))
    }
}
