/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * halt-poll: one record per halt-polling window change, from
 * kvm:kvm_halt_poll_ns(grow, vcpu_id, new, old) (Linux 4.3+), which carries
 * the vCPU id itself.
 *
 * Per-thread aggregates: in task storage with the BTF-typed program
 * (tp_btf_halt_poll_ns, Linux 5.12+, task_aggregate.bpf.h), where a thread
 * counted before needs neither the filters nor a lookup by thread id; in
 * the hash halt_poll_stats with the raw one (tp_halt_poll_ns).
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

/* The live threads' aggregates where the kernel has task storage. */
TASK_AGGREGATE(halt_poll, struct halt_poll_stats)

static __always_inline void add_halt_poll(struct halt_poll_stats *s, bool grow, __u32 new_ns)
{
	struct monitor_counters *c = counters_of(MONITOR_HALT_POLL);

	if (grow)
		s->grows++;
	else
		s->shrinks++;
	s->window_ns = new_ns;
	/* Without rows, aggregated window changes are the events. */
	if (c && !stream_halt_poll)
		c->events++;
}

static __always_inline int on_halt_poll_ns(bool in_task, bool grow, __s32 vcpu_id, __u32 new_ns,
					   __u32 old_ns)
{
	__u64 pid_tgid;
	__u32 pid, tid;
	struct halt_poll_event *e;

	/* A thread counted before for this vCPU passed the filters then. */
	if (in_task && aggregate_halt_poll && !stream_halt_poll) {
		struct halt_poll_stats *s = halt_poll_entry(true, 0, false);

		if (s && s->pid && s->vcpu_id == vcpu_id) {
			add_halt_poll(s, grow, new_ns);
			return 0;
		}
	}
	pid_tgid = bpf_get_current_pid_tgid();
	pid = pid_tgid >> 32;
	tid = (__u32)pid_tgid;
	if (!passes_filters(pid, tid, vcpu_id))
		return 0;
	if (aggregate_halt_poll) {
		struct halt_poll_stats *s = halt_poll_entry(in_task, tid, true);

		if (s) {
			if (s->pid != pid || !s->comm[0])
				bpf_get_current_comm(s->comm, sizeof(s->comm));
			s->pid = pid;
			s->vcpu_id = vcpu_id;
			add_halt_poll(s, grow, new_ns);
		} else {
			/* Table full, or no memory for the task's storage: said, not silent. */
			struct monitor_counters *c = counters_of(MONITOR_HALT_POLL);

			if (c)
				c->lost++;
		}
	}
	if (!stream_halt_poll)
		return 0;
	e = reserve_event(MONITOR_HALT_POLL, sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_HALT_POLL, pid, tid, vcpu_id);
	e->grow = grow;
	e->old_ns = old_ns;
	e->new_ns = new_ns;
	submit_event(&e->hdr);
	return 0;
}

/* kvm:kvm_halt_poll_ns, BTF-typed (Linux 5.5+; task storage from it 5.12+) */
SEC("tp_btf/kvm_halt_poll_ns")
int BPF_PROG(tp_btf_halt_poll_ns, bool grow, unsigned int vcpu_id, unsigned int new_ns,
	     unsigned int old_ns)
{
	return on_halt_poll_ns(true, grow, (__s32)vcpu_id, new_ns, old_ns);
}

/* kvm:kvm_halt_poll_ns (raw tracepoint) */
SEC("raw_tp/kvm_halt_poll_ns")
int BPF_PROG(tp_halt_poll_ns, bool grow, unsigned int vcpu_id, unsigned int new_ns,
	     unsigned int old_ns)
{
	return on_halt_poll_ns(false, grow, (__s32)vcpu_id, new_ns, old_ns);
}
