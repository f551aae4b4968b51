/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * `kvm-watcher doctor`: one tiny program per hook and attach type. Doctor
 * loads and attaches each alone, reads how often it fired, and detaches it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Hits of the probe that is attached now. */
__u64 hits = 0;

#define PROBE(sec, name)                                  \
	SEC(sec)                                          \
	int name(void *ctx)                               \
	{                                                 \
		__sync_fetch_and_add(&hits, 1);           \
		return 0;                                 \
	}

/* Tracepoints, each as tp_btf, raw_tp and classic tracepoint. */
PROBE("tp_btf/kvm_vcpu_wakeup", tp_btf_kvm_vcpu_wakeup)
PROBE("raw_tp/kvm_vcpu_wakeup", raw_tp_kvm_vcpu_wakeup)
PROBE("tracepoint/kvm/kvm_vcpu_wakeup", tracepoint_kvm_vcpu_wakeup)
PROBE("tp_btf/kvm_halt_poll_ns", tp_btf_kvm_halt_poll_ns)
PROBE("raw_tp/kvm_halt_poll_ns", raw_tp_kvm_halt_poll_ns)
PROBE("tracepoint/kvm/kvm_halt_poll_ns", tracepoint_kvm_halt_poll_ns)
PROBE("tp_btf/kvm_dirty_ring_push", tp_btf_kvm_dirty_ring_push)
PROBE("raw_tp/kvm_dirty_ring_push", raw_tp_kvm_dirty_ring_push)
PROBE("tracepoint/kvm/kvm_dirty_ring_push", tracepoint_kvm_dirty_ring_push)
PROBE("tp_btf/kvm_exit", tp_btf_kvm_exit)
PROBE("raw_tp/kvm_exit", raw_tp_kvm_exit)
PROBE("tracepoint/kvm/kvm_exit", tracepoint_kvm_exit)
PROBE("tp_btf/kvm_entry", tp_btf_kvm_entry)
PROBE("raw_tp/kvm_entry", raw_tp_kvm_entry)
PROBE("tracepoint/kvm/kvm_entry", tracepoint_kvm_entry)
PROBE("tp_btf/kvm_userspace_exit", tp_btf_kvm_userspace_exit)
PROBE("raw_tp/kvm_userspace_exit", raw_tp_kvm_userspace_exit)
PROBE("tracepoint/kvm/kvm_userspace_exit", tracepoint_kvm_userspace_exit)
PROBE("tp_btf/kvm_pio", tp_btf_kvm_pio)
PROBE("raw_tp/kvm_pio", raw_tp_kvm_pio)
PROBE("tracepoint/kvm/kvm_pio", tracepoint_kvm_pio)
PROBE("tp_btf/kvm_mmio", tp_btf_kvm_mmio)
PROBE("raw_tp/kvm_mmio", raw_tp_kvm_mmio)
PROBE("tracepoint/kvm/kvm_mmio", tracepoint_kvm_mmio)
PROBE("tp_btf/sched_switch", tp_btf_sched_switch)
PROBE("raw_tp/sched_switch", raw_tp_sched_switch)
PROBE("tracepoint/sched/sched_switch", tracepoint_sched_switch)
PROBE("tp_btf/sched_wakeup", tp_btf_sched_wakeup)
PROBE("raw_tp/sched_wakeup", raw_tp_sched_wakeup)
PROBE("tracepoint/sched/sched_wakeup", tracepoint_sched_wakeup)
PROBE("tp_btf/sched_wakeup_new", tp_btf_sched_wakeup_new)
PROBE("raw_tp/sched_wakeup_new", raw_tp_sched_wakeup_new)
PROBE("tracepoint/sched/sched_wakeup_new", tracepoint_sched_wakeup_new)
PROBE("tp_btf/sched_process_exit", tp_btf_sched_process_exit)
PROBE("raw_tp/sched_process_exit", raw_tp_sched_process_exit)
PROBE("tracepoint/sched/sched_process_exit", tracepoint_sched_process_exit)
PROBE("tp_btf/sys_enter", tp_btf_sys_enter)
PROBE("raw_tp/sys_enter", raw_tp_sys_enter)
PROBE("tracepoint/raw_syscalls/sys_enter", tracepoint_sys_enter)
PROBE("tp_btf/kvm_fpu", tp_btf_kvm_fpu)
PROBE("raw_tp/kvm_fpu", raw_tp_kvm_fpu)
PROBE("tracepoint/kvm/kvm_fpu", tracepoint_kvm_fpu)

/* Kernel functions, each as fentry and kprobe. */
PROBE("fentry/kvm_vcpu_halt", fentry_kvm_vcpu_halt)
PROBE("kprobe/kvm_vcpu_halt", kprobe_kvm_vcpu_halt)
PROBE("fentry/kvm_vcpu_block", fentry_kvm_vcpu_block)
PROBE("kprobe/kvm_vcpu_block", kprobe_kvm_vcpu_block)
PROBE("fentry/mark_page_dirty_in_slot", fentry_mark_page_dirty_in_slot)
PROBE("kprobe/mark_page_dirty_in_slot", kprobe_mark_page_dirty_in_slot)
PROBE("kprobe/kvm_vcpu_mark_page_dirty", kprobe_kvm_vcpu_mark_page_dirty)
PROBE("kretprobe/kvm_vcpu_gfn_to_memslot", kretprobe_kvm_vcpu_gfn_to_memslot)
PROBE("fentry/kvm_arch_vcpu_load", fentry_kvm_arch_vcpu_load)
PROBE("kprobe/kvm_arch_vcpu_load", kprobe_kvm_arch_vcpu_load)
PROBE("fentry/kvm_arch_vcpu_put", fentry_kvm_arch_vcpu_put)
PROBE("kprobe/kvm_arch_vcpu_put", kprobe_kvm_arch_vcpu_put)

/* The BPF task iterator (Linux 5.8+, needs BTF): vcpu-load runs one at attach. */
PROBE("iter/task", iter_task)
