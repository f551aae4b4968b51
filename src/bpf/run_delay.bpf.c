/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * run-delay: how long vCPU threads wait on a host run queue, runnable but
 * not running (the guest sees it as steal), and who ran on their CPU
 * meanwhile.
 *
 * Hooks (BTF-typed tracepoints, tp_btf: no tracefs, no kprobes; Linux 5.5+.
 * Their task pointers are read with direct loads, no helper call per field:
 * sched_switch is the hottest hook of a host):
 *   sched:sched_wakeup(p), sched:sched_wakeup_new(p)  a wait begins (woken)
 *   sched:sched_switch(preempt, prev, next)           a wait begins (prev
 *       switched out while still runnable: preempted) or ends (next)
 *
 * Totals are the run queue's clock (rq->clock, read through the task's
 * cfs_rq with CO-RE): the clock the scheduler itself timestamps enqueues and
 * switches with, and /proc/PID/task/TID/schedstat counts in. Without group
 * scheduling (no se.cfs_rq) the BPF clock is used instead. Switch-ins and
 * waiting time are the kernel's own sched_info figures where it keeps them
 * (see sched_info_since()). Each wait's own length (its cause's share, the
 * histogram, the longest, the rows) is by the wall clock between the hooks
 * that saw it begin and end: the scheduler does not update its clock at a
 * switch that a wake-up's preemption asked for, so by its clock such a
 * wake-up waits ~0 and the task it preempted waits longer by as much.
 *
 * Only vCPU threads are tracked: those user space enters at attach (vCPU
 * threads of the watched VMs found in /proc), and those seen inside KVM_RUN
 * (KVM's preempt notifier registered on the task), filtered like every
 * monitor. Every CPU remembers its last RUN_DELAY_SLICES scheduler slices;
 * when a vCPU thread is switched in, the slices that overlap its wait name
 * the tasks that ran instead (a vCPU that migrated while it waited is
 * charged to the CPU it ran on at the end).
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Configuration, set by user space before load. */
/* Stream one ring-buffer record per wait of at least run_delay_min_ns. */
const volatile bool stream_run_delay = false;
const volatile __u64 run_delay_min_ns = 0;

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct run_delay_event _run_delay_event = {};
struct run_delay_stats _run_delay_stats = {};
struct run_delay_cpu _run_delay_cpu = {};
struct run_delay_culprit_key _run_delay_culprit_key = {};
struct run_delay_culprit _run_delay_culprit = {};
enum run_delay_cause _run_delay_cause = RUN_DELAY_WOKEN;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct run_delay_stats);
} run_delay_stats SEC(".maps");

/* A zeroed entry to create run_delay_stats entries from (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct run_delay_stats);
} run_delay_zero SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct run_delay_cpu);
} run_delay_cpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct run_delay_culprit_key);
	__type(value, struct run_delay_culprit);
} run_delay_culprits SEC(".maps");

/*
 * Threads that may have a run_delay_stats entry: one byte per thread id
 * modulo RUN_DELAY_MARKS, set before an entry is made (by tracked() below,
 * or by user space through the mmapped .bss for the threads it enters at
 * attach) and never cleared. A thread whose byte is 0 has no entry, so the
 * hooks, which run for every switch and wake-up of the host, skip the hash
 * lookup for the tasks that are no vCPU threads; a byte left set by a
 * thread gone, or shared with another thread id, only costs that lookup.
 * Plain byte stores: no read-modify-write that could lose a concurrent
 * mark, and no atomics (verifiers before 5.12 have only atomic add).
 */
__u8 run_delay_marks[RUN_DELAY_MARKS];

static __always_inline __u8 *run_delay_mark(__u32 tid)
{
	__u32 i = tid & (RUN_DELAY_MARKS - 1);

	barrier_var(i);
	if (i >= RUN_DELAY_MARKS)
		return NULL;
	return &run_delay_marks[i];
}

/* task_struct before Linux 5.14 called __state `state`. */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

/* The task stays runnable as it is switched out (the scheduler's task_is_running()). */
static __always_inline bool still_runnable(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return t->__state == 0;
	return ((struct task_struct___pre514 *)t)->state == 0;
}

/* The kernel's own figures of `t`: arrivals (sched_info.pcount) and waiting time (run_delay). */
static __always_inline bool sched_info_of(struct task_struct *t, __u64 *arrivals, __u64 *delay)
{
	if (!bpf_core_field_exists(t->sched_info.pcount))
		return false;
	*arrivals = t->sched_info.pcount;
	*delay = t->sched_info.run_delay;
	return true;
}

/* Remembers the kernel's figures of a thread first seen now, so its next wait is exact. */
static __always_inline void seed_sched_info(struct run_delay_stats *s, struct task_struct *t)
{
	__u64 arrivals, delay;

	if (s->sched_base || !sched_info_of(t, &arrivals, &delay))
		return;
	s->sched_arrivals = arrivals;
	s->sched_delay_ns = delay;
	s->sched_base = 1;
}

/* The entry of vCPU thread `t`, made when it is first seen inside KVM_RUN; NULL for other tasks. */
static __always_inline struct run_delay_stats *tracked(struct task_struct *t, __u32 tid)
{
	__u8 *mark = run_delay_mark(tid);
	struct run_delay_stats *s = NULL;
	struct kvm_vcpu *vcpu;
	__u32 zero = 0, pid;
	__s32 vcpu_id;
	void *fresh;

	if (!mark)
		return NULL;
	if (*mark)
		s = bpf_map_lookup_elem(&run_delay_stats, &tid);
	if (s) {
		seed_sched_info(s, t);
		if (s->vcpu_id >= 0)
			return s;
		/* Entered from /proc at attach: learn the vCPU id once it runs one. */
		vcpu = vcpu_of_task(t);
		if (!vcpu)
			return s;
		s->vcpu_id = vcpu_id_of(vcpu);
		if (passes_filters(s->pid, tid, s->vcpu_id))
			return s;
		bpf_map_delete_elem(&run_delay_stats, &tid);
		return NULL;
	}
	/* Most tasks: no preempt notifier, no vCPU (a direct load, no helper). */
	if (bpf_core_field_exists(t->preempt_notifiers) && !t->preempt_notifiers.first)
		return NULL;
	vcpu = vcpu_of_task(t);
	if (!vcpu)
		return NULL;
	pid = t->tgid;
	vcpu_id = vcpu_id_of(vcpu);
	if (!passes_filters(pid, tid, vcpu_id))
		return NULL;
	fresh = bpf_map_lookup_elem(&run_delay_zero, &zero);
	if (!fresh)
		return NULL;
	/* Marked first: a hook on another CPU that finds the entry finds the mark. */
	*mark = 1;
	bpf_map_update_elem(&run_delay_stats, &tid, fresh, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&run_delay_stats, &tid);
	if (!s)
		return NULL;
	s->pid = pid;
	s->vcpu_id = vcpu_id;
	__builtin_memcpy(s->comm, t->comm, sizeof(s->comm));
	seed_sched_info(s, t);
	return s;
}

/*
 * Charges the wait [from, now) of `waiter` to the tasks of the CPU's
 * remembered slices, newest first; what no slice covers is unattributed.
 */
static __always_inline void charge_culprits(struct run_delay_cpu *rc, struct run_delay_stats *s,
					    __u32 waiter, __u64 from, __u64 now)
{
	struct run_delay_culprit_key key = { .waiter = waiter };
	struct run_delay_culprit *c;
	__u64 end = now, covered = 0;
	__u32 idx = rc->last;

	for (int i = 0; i < RUN_DELAY_SLICES; i++) {
		__u32 k = idx & (RUN_DELAY_SLICES - 1);
		struct run_delay_slice *sl;
		__u64 start;

		barrier_var(k);
		if (k >= RUN_DELAY_SLICES)
			break;
		sl = &rc->slice[k];
		start = sl->start;

		if (!start || end <= from)
			break;
		if (start < from)
			start = from;
		if (end > start && sl->tid != waiter) {
			key.tid = sl->tid;
			c = bpf_map_lookup_elem(&run_delay_culprits, &key);
			if (!c) {
				struct run_delay_culprit fresh = { .pid = sl->pid };

				__builtin_memcpy(fresh.comm, sl->comm, sizeof(fresh.comm));
				bpf_map_update_elem(&run_delay_culprits, &key, &fresh, BPF_NOEXIST);
				c = bpf_map_lookup_elem(&run_delay_culprits, &key);
			}
			if (c) {
				__sync_fetch_and_add(&c->ns, end - start);
				covered += end - start;
			}
		}
		if (sl->start <= from)
			break;
		end = sl->start;
		idx += RUN_DELAY_SLICES - 1;
	}
	if (now - from > covered)
		s->unattributed_ns += now - from - covered;
}

/*
 * The switch-ins and waiting time of `next` since the last switch-in seen,
 * as the kernel counts them, into *arrivals and *delay; false where the
 * kernel keeps no sched_info (or counts nothing: then our stamps are used).
 * At sched_switch the kernel has not yet accounted this arrival
 * (sched_info_arrive() runs in prepare_task_switch()): it is added here the
 * way the kernel will, from sched_info.last_queued. The difference also
 * holds arrivals no sched_switch event fired for, which the kernel counts
 * (on our development hosts a switch away from a thread of PID 1, the
 * machine's own agent, fires no event: 1 to 15 % of a vCPU's arrivals).
 */
static __always_inline bool sched_info_since(struct run_delay_stats *s, struct task_struct *next,
					     __u64 lq, __u64 clock, __u64 *arrivals, __u64 *delay)
{
	__u64 pc, rd;

	if (!sched_info_of(next, &pc, &rd))
		return false;
	if (!s->sched_base) {
		s->sched_arrivals = pc;
		s->sched_delay_ns = rd;
		s->sched_base = 1;
	}
	if (lq) {
		pc++;
		if (clock > lq)
			rd += clock - lq;
	}
	if (!pc)
		return false;
	*arrivals = pc > s->sched_arrivals ? pc - s->sched_arrivals : 0;
	*delay = rd > s->sched_delay_ns ? rd - s->sched_delay_ns : 0;
	s->sched_arrivals = pc;
	s->sched_delay_ns = rd;
	return true;
}

/*
 * `next` (thread `tid`, entry `s`) is switched in at `clock` (the run
 * queue's) and `now` (the wall clock), after `prev`.
 */
static __always_inline void switched_in(struct run_delay_stats *s, __u32 tid, __u64 clock,
					__u64 now, struct run_delay_cpu *rc,
					struct task_struct *prev, struct task_struct *next)
{
	struct monitor_counters *counters = counters_of(MONITOR_RUN_DELAY);
	__u64 from = s->queued_at, lq = 0, delay, arrivals = 1, wall = s->queued_wall, len;
	__u32 cause = s->cause & 1, e = epoch, slot = e & 1;
	struct run_delay_event *ev;
	bool stamped;

	s->queued_at = 0;
	s->queued_wall = 0;
	/*
	 * The scheduler's own enqueue stamp, where it keeps one, when it is
	 * earlier: it saw the thread runnable before a hook here did.
	 */
	if (bpf_core_field_exists(next->sched_info.last_queued))
		lq = next->sched_info.last_queued;
	if (lq && (!from || lq < from))
		from = lq;
	stamped = from && clock >= from;
	if (!sched_info_since(s, next, lq, clock, &arrivals, &delay)) {
		arrivals = 1;
		delay = stamped ? clock - from : 0;
	}
	s->switch_ins += arrivals;
	if (!arrivals || (!stamped && !delay))
		return;
	s->waits++;
	s->delay_ns += delay;
	/* The wait by the wall clock where a hook saw it begin, else the kernel's. */
	len = wall && now >= wall ? now - wall : delay;
	/*
	 * Indexes are checked right where they are used (barrier_var keeps the
	 * compiler from moving the check away): verifiers before Linux 6.2
	 * lose their bounds otherwise.
	 */
	barrier_var(cause);
	if (cause < RUN_DELAY_CAUSES) {
		s->cause_waits[cause]++;
		s->cause_ns[cause] += len;
	}
	s->hist[hist_bucket(len / 1000, RUN_DELAY_HIST_SLOTS)]++;
	barrier_var(slot);
	if (slot < 2) {
		if (s->epoch[slot] != e) {
			s->epoch[slot] = e;
			s->max_ns[slot] = len;
		} else if (len > s->max_ns[slot]) {
			s->max_ns[slot] = len;
		}
	}
	if (rc && stamped)
		charge_culprits(rc, s, tid, from, clock);
	if (!stream_run_delay) {
		if (counters)
			counters->events++;
		return;
	}
	if (len < run_delay_min_ns)
		return;
	ev = reserve_event(MONITOR_RUN_DELAY, sizeof(*ev));
	if (!ev)
		return;
	fill_header(&ev->hdr, MONITOR_RUN_DELAY, s->pid, tid, s->vcpu_id);
	/* The switch runs in prev's context: the header's comm is the vCPU's own. */
	__builtin_memcpy(ev->hdr.comm, s->comm, sizeof(ev->hdr.comm));
	ev->delay_ns = len;
	ev->sched_delay_ns = delay;
	ev->cause = cause;
	ev->cpu = bpf_get_smp_processor_id();
	ev->prev_pid = prev->tgid;
	ev->prev_tid = prev->pid;
	__builtin_memcpy(ev->prev_comm, prev->comm, sizeof(ev->prev_comm));
	submit_event(&ev->hdr);
}

static __always_inline int on_wakeup(struct task_struct *p)
{
	__u32 tid = p->pid;
	struct run_delay_stats *s = tracked(p, tid);
	__u64 clock, now;

	if (!s || s->queued_at)
		return 0;
	/* Stamped first, as the switch-in is: the wait's two ends at like points. */
	now = bpf_ktime_get_ns();
	/* Woken before it got off its CPU: it never left, there is no wait. */
	if (bpf_core_field_exists(p->on_cpu) && p->on_cpu)
		return 0;
	clock = rq_clock_of(true, p);
	if (!clock)
		return 0;
	s->queued_at = clock;
	s->queued_wall = now;
	s->cause = RUN_DELAY_WOKEN;
	return 0;
}

/* sched:sched_wakeup (BTF-typed tracepoint, Linux 5.5+) */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(tp_run_delay_wakeup, struct task_struct *p)
{
	return on_wakeup(p);
}

/* sched:sched_wakeup_new (BTF-typed tracepoint, Linux 5.5+) */
SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(tp_run_delay_wakeup_new, struct task_struct *p)
{
	return on_wakeup(p);
}

/*
 * sched:sched_switch (BTF-typed tracepoint, Linux 5.5+), from the one
 * program there (kvm_watcher.bpf.c).
 */
static __always_inline void run_delay_switch(bool preempt, struct task_struct *prev,
					     struct task_struct *next)
{
	__u32 zero = 0, prev_tid = prev->pid, next_tid = next->pid;
	struct run_delay_cpu *rc = bpf_map_lookup_elem(&run_delay_cpu, &zero);
	struct run_delay_stats *s;
	__u64 clock = rq_clock_of(true, next), now = 0;

	if (!clock)
		clock = rq_clock_of(true, prev);
	if (!clock)
		return;
	s = tracked(prev, prev_tid);
	if (s) {
		/* The wall clock is read only for tracked threads, once per switch. */
		now = bpf_ktime_get_ns();
		/*
		 * A preempted task stays on its run queue even when it was about
		 * to sleep (its state already set): it waits all the same.
		 */
		if (preempt || still_runnable(prev)) {
			s->queued_at = clock;
			s->queued_wall = now;
			s->cause = RUN_DELAY_PREEMPTED;
		} else {
			s->queued_at = 0;
			s->queued_wall = 0;
		}
	}
	s = tracked(next, next_tid);
	if (s) {
		if (!now)
			now = bpf_ktime_get_ns();
		switched_in(s, next_tid, clock, now, rc, prev, next);
	}
	if (rc) {
		__u32 idx = (rc->last + 1) & (RUN_DELAY_SLICES - 1);
		struct run_delay_slice *sl;

		barrier_var(idx);
		if (idx < RUN_DELAY_SLICES) {
			sl = &rc->slice[idx];
			sl->start = clock;
			sl->pid = next->tgid;
			sl->tid = next_tid;
			__builtin_memcpy(sl->comm, next->comm, sizeof(sl->comm));
			rc->last = idx;
		}
	}
}
