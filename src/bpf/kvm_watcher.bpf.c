/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kvm-watcher's BPF object: one object, one ring buffer, one file per monitor.
 * User space (src/session/load.rs) turns on only the programs of the backends it
 * picked (each monitor's table in src/monitors/<name>/mod.rs) before loading.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "vcpu_load.bpf.c"
#include "vcpu_threads.bpf.c"
#include "wakeup.bpf.c"
#include "halt_poll.bpf.c"
#include "dirty_dense.bpf.c"
#include "dirty.bpf.c"
#include "run_delay.bpf.c"
#include "exits.bpf.c"

/*
 * kvm:kvm_fpu (raw tracepoint; x86): KVM loads the guest's FPU state right
 * after it loaded the vCPU at the start of every KVM_RUN (load 1) and puts it
 * back at the end (load 0), on the vCPU's own thread. One program for the
 * monitors that need the start of a KVM_RUN (vCPU threads for dirty and
 * vcpu-load, the end of the time in the VMM for exits). Unlike
 * raw_syscalls:sys_enter it fires for nothing but vCPUs, so the rest of the
 * host pays nothing for it. An INIT's reset inside KVM_RUN puts and loads
 * the state again; the monitors treat the repeated load as the run it is in.
 */
SEC("raw_tp/kvm_fpu")
int tp_kvm_fpu(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task;

	if (!ctx->args[0])
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	vcpu_threads_run(task);
	if (exits_on_kvm_run)
		exits_kvm_run(task, -1);
	return 0;
}

/* Set by user space: the monitors whose part of tp_btf_sched_switch runs. */
const volatile bool switch_vcpu_load = false;
const volatile bool switch_wakeup = false;
const volatile bool switch_run_delay = false;

/*
 * sched:sched_switch (BTF-typed, Linux 5.5+), the hottest hook of a host:
 * one program for the monitors that need it (run-delay, vcpu-load, and
 * wakeup's halts in progress with task storage), where one each made the
 * kernel dispatch three programs on every context switch. Each part is on
 * when its monitor runs on it and turns away tasks that are no vCPU
 * threads with plain loads first. A part that is off is dead code the
 * verifier drops (the wakeup part's task storage on kernels before 5.12).
 */
SEC("tp_btf/sched_switch")
int BPF_PROG(tp_btf_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	if (switch_run_delay)
		run_delay_switch(preempt, prev, next);
	if (switch_vcpu_load)
		on_sched_switch(true, prev, next);
	/* A vCPU thread sleeping in a halt has its vCPU loaded. */
	if (switch_wakeup && aggregate_wakeup && !preempt && has_notifier(true, prev))
		halt_sleeps(true, prev, false);
	return 0;
}

/*
 * raw_syscalls:sys_enter (raw tracepoint, Linux 4.17+): ioctl(KVM_RUN) ends
 * the time in the VMM for exits (its tracepoint backend), before the
 * kernel's way back into KVM, which the kvm-only backend counts as the
 * VMM's. Every system call of the host runs it; it tests the number and the
 * command first.
 */
SEC("raw_tp/sys_enter")
int BPF_PROG(tp_sys_enter, struct pt_regs *regs, long id)
{
	if (id != NR_IOCTL || BPF_CORE_READ(regs, si) != KVM_RUN_CMD)
		return 0;
	exits_kvm_run((struct task_struct *)bpf_get_current_task(),
		      (int)BPF_CORE_READ(regs, di));
	return 0;
}

/*
 * Never used by a program: these globals make libbpf-cargo emit the shared
 * layouts and enums into the skeleton, so user space shares them instead of
 * copying them. Each monitor's file does the same for its own types.
 */
struct vcpu_thread _vcpu_thread = {};
struct monitor_counters _monitor_counters = {};
enum monitor_kind _monitor_kind = MONITOR_WAKEUP;
enum limits _limits = HALT_HIST_SLOTS;
