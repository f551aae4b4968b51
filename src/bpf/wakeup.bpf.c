/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * wakeup: one record per vCPU wake-up from kvm:kvm_vcpu_wakeup(ns, waited,
 * valid). The tracepoint carries no vCPU id; it comes from vcpu_threads,
 * filled either by the vCPU ioctl path (vcpu_threads.bpf.c, tracepoints only)
 * or by the halt function itself:
 *   kvm_vcpu_halt(struct kvm_vcpu *)   Linux 5.17+
 *   kvm_vcpu_block(struct kvm_vcpu *)  before 5.17
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* kvm:kvm_vcpu_wakeup (raw tracepoint; the tracepoint exists since Linux 3.x) */
SEC("raw_tp/kvm_vcpu_wakeup")
int BPF_PROG(tp_vcpu_wakeup, __u64 ns, bool waited, bool valid)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	__s32 vcpu_id = current_vcpu_id(tid);
	struct wakeup_event *e;

	if (!stream_wakeup || !passes_filters(pid, tid, vcpu_id))
		return 0;
	e = reserve_event(MONITOR_WAKEUP, sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_WAKEUP, pid, tid, vcpu_id);
	e->halt_ns = ns;
	e->waited = waited;
	e->valid = valid;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline void on_vcpu_halt(struct kvm_vcpu *vcpu)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32;

	if (pid_watched(pid))
		remember_vcpu_thread(pid, (__u32)pid_tgid, vcpu,
				     (struct task_struct *)bpf_get_current_task());
}

SEC("fentry/kvm_vcpu_halt")
int BPF_PROG(fentry_vcpu_halt, struct kvm_vcpu *vcpu)
{
	on_vcpu_halt(vcpu);
	return 0;
}

SEC("fentry/kvm_vcpu_block")
int BPF_PROG(fentry_vcpu_block, struct kvm_vcpu *vcpu)
{
	on_vcpu_halt(vcpu);
	return 0;
}

SEC("kprobe/kvm_vcpu_halt")
int BPF_KPROBE(kprobe_vcpu_halt, struct kvm_vcpu *vcpu)
{
	on_vcpu_halt(vcpu);
	return 0;
}

SEC("kprobe/kvm_vcpu_block")
int BPF_KPROBE(kprobe_vcpu_block, struct kvm_vcpu *vcpu)
{
	on_vcpu_halt(vcpu);
	return 0;
}
