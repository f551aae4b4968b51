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
 * raw_syscalls:sys_enter (raw tracepoint, Linux 4.17+): one program for the
 * monitors that need the hook (vCPU threads for dirty and vcpu-load, the
 * end of the time in the VMM for exits): every system call of the host
 * runs it, so it runs once, and tests the syscall number once, for all.
 */
SEC("raw_tp/sys_enter")
int BPF_PROG(tp_sys_enter, struct pt_regs *regs, long id)
{
	unsigned int cmd, fd;

	if (id != NR_IOCTL)
		return 0;
	cmd = BPF_CORE_READ(regs, si);
	if (((cmd >> 8) & 0xff) != KVMIO)
		return 0;
	fd = BPF_CORE_READ(regs, di);
	vcpu_threads_ioctl(fd);
	if (exits_on_kvm_run && cmd == KVM_RUN_CMD)
		exits_kvm_run((int)fd);
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
