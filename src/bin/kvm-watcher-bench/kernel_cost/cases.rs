//! What part 1 attaches in each trial (the candidates) and what it compares
//! (the cases: a monitor in one mode against its floors and bpftrace).

use crate::bpftrace::{
    BT_DIRTY_COUNT, BT_DIRTY_PRINTF, BT_EXITS_COUNT, BT_EXITS_PRINTF, BT_HALT_POLL_COUNT,
    BT_HALT_POLL_PRINTF, BT_RUN_DELAY, BT_VCPU_LOAD, BT_WAKEUP_COUNT, BT_WAKEUP_PRINTF, BtScript,
};

#[derive(Clone, Copy)]
pub enum Who {
    FloorRaw,
    FloorTp,
    Kw(&'static [&'static str]),
    Bt(&'static BtScript),
}

pub struct Candidate {
    pub label: &'static str,
    pub who: Who,
}

/// One comparison: a monitor in one mode, on its hooks, against bpftrace.
pub struct Case {
    pub monitor: &'static str,
    pub mode: &'static str,
    pub hooks: &'static [&'static str],
    pub kw: &'static str,
    pub bt: &'static str,
    pub bt_what: &'static str,
    /// The hook whose runs are the events (None: the runs of all `hooks`),
    /// e.g. ns per exit to the VMM for programs on several hooks.
    pub per: Option<&'static str>,
}

pub const DIRTY_CANDIDATES: &[Candidate] = &[
    Candidate {
        label: "floor_raw",
        who: Who::FloorRaw,
    },
    Candidate {
        label: "floor_tp",
        who: Who::FloorTp,
    },
    Candidate {
        label: "kw_dirty_aggregate",
        who: Who::Kw(&["dirty", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_dirty_streaming",
        who: Who::Kw(&["dirty", "--output", "json"]),
    },
    Candidate {
        label: "bt_dirty_count",
        who: Who::Bt(&BT_DIRTY_COUNT),
    },
    Candidate {
        label: "bt_dirty_printf",
        who: Who::Bt(&BT_DIRTY_PRINTF),
    },
];

pub const HALT_CANDIDATES: &[Candidate] = &[
    Candidate {
        label: "floor_raw",
        who: Who::FloorRaw,
    },
    Candidate {
        label: "floor_tp",
        who: Who::FloorTp,
    },
    Candidate {
        label: "kw_wakeup_aggregate",
        who: Who::Kw(&["wakeup", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_wakeup_streaming",
        who: Who::Kw(&["wakeup", "--output", "json"]),
    },
    Candidate {
        label: "kw_halt_poll_aggregate",
        who: Who::Kw(&["halt-poll", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_halt_poll_streaming",
        who: Who::Kw(&["halt-poll", "--output", "json"]),
    },
    Candidate {
        label: "kw_vcpu_load",
        who: Who::Kw(&["vcpu-load", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_run_delay_aggregate",
        who: Who::Kw(&["run-delay", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_run_delay_streaming",
        who: Who::Kw(&["run-delay", "--output", "json"]),
    },
    Candidate {
        label: "bt_wakeup_count",
        who: Who::Bt(&BT_WAKEUP_COUNT),
    },
    Candidate {
        label: "bt_wakeup_printf",
        who: Who::Bt(&BT_WAKEUP_PRINTF),
    },
    Candidate {
        label: "bt_halt_poll_count",
        who: Who::Bt(&BT_HALT_POLL_COUNT),
    },
    Candidate {
        label: "bt_halt_poll_printf",
        who: Who::Bt(&BT_HALT_POLL_PRINTF),
    },
    Candidate {
        label: "bt_vcpu_load",
        who: Who::Bt(&BT_VCPU_LOAD),
    },
    Candidate {
        label: "bt_run_delay",
        who: Who::Bt(&BT_RUN_DELAY),
    },
];

pub const EXITS_CANDIDATES: &[Candidate] = &[
    Candidate {
        label: "floor_raw",
        who: Who::FloorRaw,
    },
    Candidate {
        label: "floor_tp",
        who: Who::FloorTp,
    },
    Candidate {
        label: "kw_exits_aggregate",
        who: Who::Kw(&["exits", "--summary", "-i", "1", "--output", "json"]),
    },
    Candidate {
        label: "kw_exits_streaming",
        who: Who::Kw(&["exits", "--output", "json"]),
    },
    Candidate {
        label: "bt_exits_count",
        who: Who::Bt(&BT_EXITS_COUNT),
    },
    Candidate {
        label: "bt_exits_printf",
        who: Who::Bt(&BT_EXITS_PRINTF),
    },
];

/// The hooks of the exits monitor: ns per exit is their time per kvm_userspace_exit.
const EXITS_HOOKS: &[&str] = &[
    "kvm_exit",
    "kvm_entry",
    "kvm_userspace_exit",
    "kvm_pio",
    "kvm_mmio",
    "sys_enter",
];

pub const CASES: &[Case] = &[
    Case {
        monitor: "dirty",
        mode: "aggregate",
        hooks: &["kvm_dirty_ring_push"],
        kw: "kw_dirty_aggregate",
        bt: "bt_dirty_count",
        bt_what: "count() per (pid, slot, offset), 4 Mi keys like --max-pages",
        per: None,
    },
    Case {
        monitor: "dirty",
        mode: "streaming",
        hooks: &["kvm_dirty_ring_push"],
        kw: "kw_dirty_streaming",
        bt: "bt_dirty_printf",
        bt_what: "printf per event",
        per: None,
    },
    Case {
        monitor: "wakeup",
        mode: "aggregate",
        hooks: &["kvm_vcpu_wakeup"],
        kw: "kw_wakeup_aggregate",
        bt: "bt_wakeup_count",
        bt_what: "count() per (pid, tid)",
        per: None,
    },
    Case {
        monitor: "wakeup",
        mode: "streaming",
        hooks: &["kvm_vcpu_wakeup"],
        kw: "kw_wakeup_streaming",
        bt: "bt_wakeup_printf",
        bt_what: "printf per event",
        per: None,
    },
    Case {
        monitor: "halt_poll",
        mode: "aggregate",
        hooks: &["kvm_halt_poll_ns"],
        kw: "kw_halt_poll_aggregate",
        bt: "bt_halt_poll_count",
        bt_what: "count() per (pid, vcpu_id)",
        per: None,
    },
    Case {
        monitor: "halt_poll",
        mode: "streaming",
        hooks: &["kvm_halt_poll_ns"],
        kw: "kw_halt_poll_streaming",
        bt: "bt_halt_poll_printf",
        bt_what: "printf per event",
        per: None,
    },
    Case {
        monitor: "vcpu_load",
        mode: "aggregate",
        hooks: &["kvm_fpu", "kvm_userspace_exit", "sched_switch"],
        kw: "kw_vcpu_load",
        bt: "bt_vcpu_load",
        bt_what: "sum/max/min/count per (pid, tid) from KVM_RUN + sched_switch",
        per: None,
    },
    Case {
        monitor: "exits",
        mode: "aggregate",
        hooks: EXITS_HOOKS,
        kw: "kw_exits_aggregate",
        bt: "bt_exits_count",
        bt_what: "count() and hist() per (pid, tid, reason) from kvm_exit/kvm_entry and kvm_userspace_exit/KVM_RUN, count() per port and gpa; per exit to the VMM",
        per: Some("kvm_userspace_exit"),
    },
    Case {
        monitor: "exits",
        mode: "streaming",
        hooks: EXITS_HOOKS,
        kw: "kw_exits_streaming",
        bt: "bt_exits_printf",
        bt_what: "printf per exit at its end; per exit to the VMM",
        per: Some("kvm_userspace_exit"),
    },
    Case {
        monitor: "run_delay",
        mode: "aggregate",
        hooks: &["sched_wakeup", "sched_wakeup_new", "sched_switch"],
        kw: "kw_run_delay_aggregate",
        bt: "bt_run_delay",
        bt_what: "runqlat-style hist() + sum() of the wait per tid, every task",
        per: None,
    },
    Case {
        monitor: "run_delay",
        mode: "streaming",
        hooks: &["sched_wakeup", "sched_wakeup_new", "sched_switch"],
        kw: "kw_run_delay_streaming",
        bt: "bt_run_delay",
        bt_what: "runqlat-style hist() + sum() of the wait per tid, every task",
        per: None,
    },
];
