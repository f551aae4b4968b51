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

/* Set by user space for the monitors that read vcpu_threads (dirty, vcpu-load). */
const volatile bool learn_vcpu_threads = false;

/*
 * Learns the vCPU thread behind an ioctl of type KVMIO on descriptor `fd` of
 * the current thread, where a monitor uses vcpu_threads; called by the one
 * program on raw_syscalls:sys_enter (kvm_watcher.bpf.c).
 */
static __always_inline void vcpu_threads_ioctl(unsigned int fd)
{
	__u64 pid_tgid;
	__u32 pid, tid;
	struct kvm_vcpu *vcpu;
	struct vcpu_thread *t;

	if (!learn_vcpu_threads)
		return;
	pid_tgid = bpf_get_current_pid_tgid();
	pid = pid_tgid >> 32;
	tid = (__u32)pid_tgid;
	if (!pid_watched(pid))
		return;
	vcpu = vcpu_of_fd(fd);
	if (!vcpu)
		return;
	t = remember_vcpu_thread(pid, tid, vcpu, (struct task_struct *)bpf_get_current_task());
	if (t && load_from_ioctls) {
		t->in_ioctl = 1;
		vcpu_load_begin(t, tid, bpf_get_smp_processor_id(), bpf_ktime_get_ns());
	}
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
