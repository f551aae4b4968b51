/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Benchmark-only BPF object (src/bin/kvm-watcher-bench.rs; never loaded by
 * kvm-watcher itself):
 *
 *  - floor_raw_* / floor_tp_*: empty programs on every hook the monitors use,
 *    as raw tracepoints (the attach type kvm-watcher uses) and as classic
 *    tracepoints (the attach type bpftrace uses). Their run_time_ns / run_cnt
 *    is the floor a monitor's per-event cost is compared with.
 *  - gen_dirty_events: an event source for the user-space pipeline benchmark.
 *    Run with BPF_PROG_TEST_RUN (a syscall), it emits ctx[0] dirty-page
 *    records into the ring buffer with the reserve / fill / submit code the
 *    monitors use (common.bpf.h), so user space decodes the exact records the
 *    dirty monitor streams.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define FLOOR(hook, category)                                   \
	SEC("raw_tp/" #hook)                                    \
	int floor_raw_##hook(void *ctx) { return 0; }           \
	SEC("tracepoint/" #category "/" #hook)                  \
	int floor_tp_##hook(void *ctx) { return 0; }

FLOOR(kvm_dirty_ring_push, kvm)
FLOOR(kvm_vcpu_wakeup, kvm)
FLOOR(kvm_halt_poll_ns, kvm)
FLOOR(sys_enter, raw_syscalls)
FLOOR(sys_exit, raw_syscalls)
FLOOR(sched_switch, sched)
FLOOR(sched_wakeup, sched)
FLOOR(sched_wakeup_new, sched)
FLOOR(sched_process_exit, sched)
FLOOR(kvm_exit, kvm)
FLOOR(kvm_entry, kvm)
FLOOR(kvm_userspace_exit, kvm)
FLOOR(kvm_pio, kvm)
FLOOR(kvm_mmio, kvm)
FLOOR(kvm_fpu, kvm)

struct gen_ctx {
	__u32 pid, tid;
};

static long emit_one(__u64 i, struct gen_ctx *g)
{
	struct dirty_event *e = reserve_event(MONITOR_DIRTY, sizeof(*e));

	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_DIRTY, g->pid, g->tid, 0);
	e->gfn = 0x10000 + i;
	e->rel_gfn = i;
	e->npages = 8192;
	e->userspace_addr = 0x7f0000000000ull;
	e->slot_id = 1;
	e->as_id = 0;
	submit_event(&e->hdr);
	return 0;
}

/* BPF_PROG_TEST_RUN with ctx = { records to emit }. */
SEC("raw_tp")
int gen_dirty_events(__u64 *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct gen_ctx g = { .pid = pid_tgid >> 32, .tid = (__u32)pid_tgid };
	__u32 n = ctx[0];

	if (n > 1 << 20)
		n = 1 << 20;
	bpf_loop(n, emit_one, &g, 0);
	return 0;
}

struct dirty_event _dirty_event = {};
struct monitor_counters _monitor_counters = {};
