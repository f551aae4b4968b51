/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Which thread runs which vCPU, learned from tracepoints only: at the start
 * of each KVM_RUN (kvm:kvm_fpu) KVM has loaded the vCPU, and the thread's
 * preempt notifier leads to the struct kvm_vcpu (read with CO-RE). Entries
 * are forgotten when the thread exits. With --backend tracepoint for
 * vcpu-load, the same hooks mark the thread as inside a vCPU ioctl until
 * KVM_RUN returns (kvm:kvm_userspace_exit).
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Set by user space for the monitors that read vcpu_threads (dirty, vcpu-load). */
const volatile bool learn_vcpu_threads = false;

/*
 * Learns the vCPU thread `task` is at the start of a KVM_RUN, where a monitor
 * uses vcpu_threads; called by the one program on kvm:kvm_fpu
 * (kvm_watcher.bpf.c). With the tracepoint backend of vcpu-load, the thread is
 * inside a vCPU ioctl from here, its vCPU loaded.
 */
static __always_inline void vcpu_threads_run(struct task_struct *task)
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
	t = bpf_map_lookup_elem(&vcpu_threads, &tid);
	vcpu = vcpu_of_task_known(task, t && !t->exited ? t->vcpu : 0);
	if (!vcpu)
		return;
	t = remember_vcpu_thread(pid, tid, vcpu, task);
	if (t && load_from_ioctls) {
		t->in_ioctl = 1;
		vcpu_load_begin(t, tid, bpf_get_smp_processor_id(), bpf_ktime_get_ns());
	}
}

/*
 * kvm:kvm_userspace_exit (raw tracepoint): KVM_RUN returns to the VMM, KVM
 * has put the vCPU; the tracepoint backend of vcpu-load puts it here.
 */
SEC("raw_tp/kvm_userspace_exit")
int tp_vcpu_run_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);

	if (!t || !t->in_ioctl)
		return 0;
	vcpu_load_end(t, tid, bpf_ktime_get_ns());
	t->in_ioctl = 0;
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
