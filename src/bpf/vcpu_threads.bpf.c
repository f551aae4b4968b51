/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which thread runs which vCPU, learned from tracepoints only: at
 * raw_syscalls:sys_enter for an ioctl of type KVMIO on a "kvm-vcpu:<id>" file,
 * the file's private_data is the struct kvm_vcpu (read with CO-RE). Entries
 * are forgotten when the thread exits. With --backend tracepoint for
 * vcpu-load, the same hooks mark the thread as inside a vCPU ioctl.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* raw_syscalls:sys_enter (raw tracepoint, Linux 4.17+) */
SEC("raw_tp/sys_enter")
int BPF_PROG(tp_sys_enter, struct pt_regs *regs, long id)
{
	__u64 pid_tgid;
	__u32 pid, tid;
	unsigned int cmd;
	struct kvm_vcpu *vcpu;
	struct vcpu_thread *t;

	if (id != NR_IOCTL)
		return 0;
	cmd = BPF_CORE_READ(regs, si);
	if (((cmd >> 8) & 0xff) != KVMIO)
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	pid = pid_tgid >> 32;
	tid = (__u32)pid_tgid;
	if (!pid_watched(pid))
		return 0;
	vcpu = vcpu_of_fd(BPF_CORE_READ(regs, di));
	if (!vcpu)
		return 0;
	t = remember_vcpu_thread(pid, tid, vcpu, (struct task_struct *)bpf_get_current_task());
	if (t && load_from_ioctls) {
		t->in_ioctl = 1;
		vcpu_load_begin(t, tid, bpf_get_smp_processor_id(), bpf_ktime_get_ns());
	}
	return 0;
}

/* Leaving a vCPU ioctl puts the vCPU (tracepoint backend of vcpu-load). */
static __always_inline void on_ioctl_exit(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);

	if (!t || !t->in_ioctl)
		return;
	vcpu_load_end(t, tid, bpf_ktime_get_ns());
	t->in_ioctl = 0;
}

/* raw_syscalls:sys_exit, BTF-typed (Linux 5.5+): the syscall number is a plain load. */
SEC("tp_btf/sys_exit")
int BPF_PROG(tp_btf_sys_exit, struct pt_regs *regs, long ret)
{
	if (regs->orig_ax == NR_IOCTL)
		on_ioctl_exit();
	return 0;
}

/* raw_syscalls:sys_exit (raw tracepoint, Linux 4.17+) */
SEC("raw_tp/sys_exit")
int BPF_PROG(tp_sys_exit, struct pt_regs *regs, long ret)
{
	if (BPF_CORE_READ(regs, orig_ax) == NR_IOCTL)
		on_ioctl_exit();
	return 0;
}

/*
 * sched:sched_process_exit (raw tracepoint, Linux 4.17+): mark exiting
 * threads. User space reports their last figures, then deletes the entry.
 */
SEC("raw_tp/sched_process_exit")
int BPF_PROG(tp_process_exit, struct task_struct *task)
{
	__u32 tid = BPF_CORE_READ(task, pid);
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);

	if (t)
		t->exited = 1;
	return 0;
}
