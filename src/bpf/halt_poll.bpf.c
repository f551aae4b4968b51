/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * halt-poll: one record per halt-polling window change, from
 * kvm:kvm_halt_poll_ns(grow, vcpu_id, new, old) (Linux 4.3+), which carries
 * the vCPU id itself.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Configuration, set by user space before load. */
/* Stream one ring-buffer record per window change. */
const volatile bool stream_halt_poll = false;
/* Keep per-thread halt-poll aggregates in the kernel (summaries, metrics). */
const volatile bool aggregate_halt_poll = false;

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct halt_poll_event _halt_poll_event = {};
struct halt_poll_stats _halt_poll_stats = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct halt_poll_stats);
} halt_poll_stats SEC(".maps");

static __always_inline void aggregate_halt_poll_event(__u32 pid, __u32 tid, __s32 vcpu_id,
						      bool grow, __u32 new_ns)
{
	struct halt_poll_stats *s = bpf_map_lookup_elem(&halt_poll_stats, &tid);

	if (!s) {
		struct halt_poll_stats fresh = { .pid = pid, .vcpu_id = vcpu_id };

		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		bpf_map_update_elem(&halt_poll_stats, &tid, &fresh, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&halt_poll_stats, &tid);
		if (!s)
			return;
	}
	if (grow)
		s->grows++;
	else
		s->shrinks++;
	s->window_ns = new_ns;
	{
		struct monitor_counters *c = counters_of(MONITOR_HALT_POLL);

		/* Without rows, aggregated window changes are the events. */
		if (c && !stream_halt_poll)
			c->events++;
	}
}

/* kvm:kvm_halt_poll_ns (raw tracepoint) */
SEC("raw_tp/kvm_halt_poll_ns")
int BPF_PROG(tp_halt_poll_ns, bool grow, unsigned int vcpu_id, unsigned int new_ns,
	     unsigned int old_ns)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	struct halt_poll_event *e;

	if (!passes_filters(pid, tid, (__s32)vcpu_id))
		return 0;
	if (aggregate_halt_poll)
		aggregate_halt_poll_event(pid, tid, (__s32)vcpu_id, grow, new_ns);
	if (!stream_halt_poll)
		return 0;
	e = reserve_event(MONITOR_HALT_POLL, sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_HALT_POLL, pid, tid, (__s32)vcpu_id);
	e->grow = grow;
	e->old_ns = old_ns;
	e->new_ns = new_ns;
	submit_event(&e->hdr);
	return 0;
}
