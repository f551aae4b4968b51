//! bpftrace scripts: the same jobs the way a bpftrace user would write them.

#[derive(Debug)]
pub struct BtScript {
    pub text: &'static str,
    pub probes: usize,
    pub keys_max: u64,
}

impl BtScript {
    /// The command line that runs it, on one line, for the JSON.
    pub fn command(&self) -> String {
        format!("bpftrace -e '{}'", self.text.replace('\n', " "))
    }
}

/// Per-page counts need kvm-watcher's default capacity (--max-pages, 4 Mi pages).
pub const BT_DIRTY_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { @pages[pid, args->slot, args->offset] = count(); }",
    probes: 1,
    keys_max: 4 << 20,
};
pub const BT_DIRTY_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { printf(\"%llu %s %d %d %u %llu\\n\", nsecs, comm, pid, tid, args->slot, args->offset); }",
    probes: 1,
    keys_max: 4096,
};
pub const BT_WAKEUP_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_vcpu_wakeup { @wakeups[pid, tid] = count(); }",
    probes: 1,
    keys_max: 16384,
};
pub const BT_WAKEUP_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_vcpu_wakeup { printf(\"%llu %s %d %d %llu %d %d\\n\", nsecs, comm, pid, tid, args->ns, args->waited, args->valid); }",
    probes: 1,
    keys_max: 4096,
};
pub const BT_HALT_POLL_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_halt_poll_ns { @changes[pid, args->vcpu_id] = count(); }",
    probes: 1,
    keys_max: 16384,
};
pub const BT_HALT_POLL_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_halt_poll_ns { printf(\"%llu %s %d %d %d %u %u %u\\n\", nsecs, comm, pid, tid, args->grow, args->vcpu_id, args->old, args->new); }",
    probes: 1,
    keys_max: 4096,
};
/// vCPU loaded while inside KVM_RUN and on a CPU: the tracepoint backend's logic.
pub const BT_VCPU_LOAD: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_fpu /args->load == 1 && !@in[tid]/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:kvm:kvm_userspace_exit /@in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @max[pid, tid] = max($d); @min[pid, tid] = min($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @max[pid, args->prev_pid] = max($d); @min[pid, args->prev_pid] = min($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 4,
    keys_max: 16384,
};
/// Run-queue wait per thread, the way runqlat does it: from wake-up or
/// preemption (switched out while runnable) to switch-in, every task.
pub const BT_RUN_DELAY: BtScript = BtScript {
    text: "tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new { @qt[args->pid] = nsecs; }
tracepoint:sched:sched_switch { if (args->prev_state == 0) { @qt[args->prev_pid] = nsecs; } $t = @qt[args->next_pid]; if ($t) { $d = nsecs - $t; @wait[args->next_pid] = hist($d / 1000); @total[args->next_pid] = sum($d); delete(@qt[args->next_pid]); } }",
    probes: 3,
    keys_max: 16384,
};
/// Exits by reason with their time, the exits monitor's job: from the guest
/// (kvm_exit to kvm_entry or the return to the VMM), to the VMM
/// (kvm_userspace_exit to the next KVM_RUN), and the ports behind them.
pub const BT_EXITS_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_exit { @es[tid] = nsecs; @er[tid] = args->exit_reason; @exits[pid, tid, args->exit_reason] = count(); }
tracepoint:kvm:kvm_entry /@es[tid]/ { @kvm_ns[pid, tid, @er[tid]] = hist(nsecs - @es[tid]); delete(@es[tid]); }
tracepoint:kvm:kvm_userspace_exit { @us[tid] = nsecs; @ur[tid] = args->reason; @user[pid, tid, args->reason] = count(); }
tracepoint:raw_syscalls:sys_enter /args->id == 16 && args->args[1] == 0xae80 && @us[tid]/ { @vmm_ns[pid, tid, @ur[tid]] = hist(nsecs - @us[tid]); delete(@us[tid]); }
tracepoint:kvm:kvm_pio { @ports[pid, tid, args->port] = count(); }
tracepoint:kvm:kvm_mmio { @gpas[pid, tid, args->gpa] = count(); }",
    probes: 6,
    keys_max: 16384,
};
pub const BT_EXITS_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_exit { @es[tid] = nsecs; @er[tid] = args->exit_reason; }
tracepoint:kvm:kvm_entry /@es[tid]/ { printf(\"%llu %d %d kvm %u %llu\\n\", nsecs, pid, tid, @er[tid], nsecs - @es[tid]); delete(@es[tid]); }
tracepoint:kvm:kvm_userspace_exit { @us[tid] = nsecs; @ur[tid] = args->reason; }
tracepoint:raw_syscalls:sys_enter /args->id == 16 && args->args[1] == 0xae80 && @us[tid]/ { printf(\"%llu %d %d vmm %u %llu\\n\", nsecs, pid, tid, @ur[tid], nsecs - @us[tid]); delete(@us[tid]); }
tracepoint:kvm:kvm_pio { @port[tid] = args->port; }
tracepoint:kvm:kvm_mmio { @gpa[tid] = args->gpa; }",
    probes: 6,
    keys_max: 4096,
};
pub const BT_ALL_PRINTF: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { printf(\"%llu %s %d %d %u %llu\\n\", nsecs, comm, pid, tid, args->slot, args->offset); }
tracepoint:kvm:kvm_vcpu_wakeup { printf(\"%llu %s %d %d %llu %d %d\\n\", nsecs, comm, pid, tid, args->ns, args->waited, args->valid); }
tracepoint:kvm:kvm_halt_poll_ns { printf(\"%llu %s %d %d %d %u %u %u\\n\", nsecs, comm, pid, tid, args->grow, args->vcpu_id, args->old, args->new); }
tracepoint:kvm:kvm_fpu /args->load == 1 && !@in[tid]/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:kvm:kvm_userspace_exit /@in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 7,
    keys_max: 16384,
};
pub const BT_ALL_COUNT: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_dirty_ring_push { @pages[pid, args->slot, args->offset] = count(); }
tracepoint:kvm:kvm_vcpu_wakeup { @wakeups[pid, tid] = count(); }
tracepoint:kvm:kvm_halt_poll_ns { @changes[pid, args->vcpu_id] = count(); }
tracepoint:kvm:kvm_fpu /args->load == 1 && !@in[tid]/ { @in[tid] = 1; @start[tid] = nsecs; }
tracepoint:kvm:kvm_userspace_exit /@in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }",
    probes: 7,
    keys_max: 4 << 20,
};
/// The jobs of `kvm-watcher serve`'s default monitors the way a bpftrace user
/// would write them (part 6, host tax): vcpu-load and vCPU identity from
/// KVM_RUN (kvm_fpu to kvm_userspace_exit), exits' time in the VMM up to the
/// next KVM_RUN's load (serve's kvm-only backend), run-delay filtered to the
/// vCPU threads seen that way, and counts of the KVM tracepoints. Its hooks
/// on every switch and wake-up of the host are kvm-watcher's.
pub const BT_SERVE_SET: BtScript = BtScript {
    text: "tracepoint:kvm:kvm_fpu /args->load == 1/ { if (@us[tid]) { @vmm_ns[pid, tid, @ur[tid]] = hist(nsecs - @us[tid]); delete(@us[tid]); } if (!@in[tid]) { @in[tid] = 1; @start[tid] = nsecs; @vcpu[tid] = 1; } }
tracepoint:kvm:kvm_userspace_exit /@in[tid]/ { $d = nsecs - @start[tid]; @total[pid, tid] = sum($d); @n[pid, tid] = count(); delete(@in[tid]); delete(@start[tid]); }
tracepoint:sched:sched_switch /@in[args->prev_pid]/ { $d = nsecs - @start[args->prev_pid]; @total[pid, args->prev_pid] = sum($d); @n[pid, args->prev_pid] = count(); }
tracepoint:sched:sched_switch /@in[args->next_pid]/ { @start[args->next_pid] = nsecs; }
tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new /@vcpu[args->pid]/ { @qt[args->pid] = nsecs; }
tracepoint:sched:sched_switch { if (args->prev_state == 0 && @vcpu[args->prev_pid]) { @qt[args->prev_pid] = nsecs; } $t = @qt[args->next_pid]; if ($t) { $w = nsecs - $t; @wait[args->next_pid] = hist($w / 1000); @waited[args->next_pid] = sum($w); delete(@qt[args->next_pid]); } }
tracepoint:kvm:kvm_vcpu_wakeup { @wakeups[pid, tid] = count(); }
tracepoint:kvm:kvm_halt_poll_ns { @changes[pid, args->vcpu_id] = count(); }
tracepoint:kvm:kvm_dirty_ring_push { @pages[pid, args->slot, args->offset] = count(); }
tracepoint:kvm:kvm_exit { @es[tid] = nsecs; @er[tid] = args->exit_reason; @exits[pid, tid, args->exit_reason] = count(); }
tracepoint:kvm:kvm_entry /@es[tid]/ { @kvm_ns[pid, tid, @er[tid]] = hist(nsecs - @es[tid]); delete(@es[tid]); }
tracepoint:kvm:kvm_userspace_exit { @us[tid] = nsecs; @ur[tid] = args->reason; @user[pid, tid, args->reason] = count(); }
tracepoint:kvm:kvm_pio { @ports[pid, tid, args->port] = count(); }
tracepoint:kvm:kvm_mmio { @gpas[pid, tid, args->gpa] = count(); }",
    probes: 15,
    keys_max: 65536,
};
