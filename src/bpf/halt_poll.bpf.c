/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * halt-poll: one record per halt-polling window change, from
 * kvm:kvm_halt_poll_ns(grow, vcpu_id, new, old) (Linux 4.3+), which carries
 * the vCPU id itself.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* kvm:kvm_halt_poll_ns (raw tracepoint) */
SEC("raw_tp/kvm_halt_poll_ns")
int BPF_PROG(tp_halt_poll_ns, bool grow, unsigned int vcpu_id, unsigned int new_ns,
	     unsigned int old_ns)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	struct halt_poll_event *e;

	if (!stream_halt_poll || !passes_filters(pid, tid, (__s32)vcpu_id))
		return 0;
	e = reserve_event(MONITOR_HALT_POLL, sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_HALT_POLL, pid, tid, (__s32)vcpu_id);
	e->grow = grow;
	e->old_ns = old_ns;
	e->new_ns = new_ns;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
