/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * wakeup: one record per vCPU wake-up from kvm:kvm_vcpu_wakeup(ns, waited,
 * valid). The tracepoint carries no vCPU id; it comes from vcpu_threads,
 * filled either by the vCPU ioctl path (vcpu_threads.bpf.c, tracepoints only)
 * or by the halt function itself:
 *   kvm_vcpu_halt(struct kvm_vcpu *)   Linux 5.17+
 *   kvm_vcpu_block(struct kvm_vcpu *)  before 5.17
 *
 * Per-thread aggregates (summaries, metrics) live in one of two places, both
 * read by user space through src/monitors/wakeup/read.rs:
 *   task storage  tp_btf/kvm_vcpu_wakeup (BPF_MAP_TYPE_TASK_STORAGE from
 *                 tracing programs, Linux 5.12+; KVM's BTF): the entry hangs
 *                 off the waking task, found without a hash lookup; user
 *                 space reads live threads with a task iterator (iter/task,
 *                 5.8+) and finds exited ones in wakeup_stats, where
 *                 tp_btf/sched_process_exit moves the entry before the task
 *                 (and its storage) goes away (task_aggregate.bpf.h).
 *   wakeup_stats  raw_tp/kvm_vcpu_wakeup: a hash keyed by thread id (any
 *                 kernel; 5.10, or no BTF for KVM).
 *
 * A halt is reported when it ends; to charge a long halt to the intervals it
 * spans, its entry also says since when a halt in progress sleeps (halt_at):
 *   sched:sched_switch  a vCPU thread switched out voluntarily while its vCPU
 *                       is blocking (kvm_vcpu_block's stat.generic.blocking,
 *                       Linux 5.16+; any voluntary switch-out of a loaded
 *                       vCPU before) starts sleeping in a halt
 *   iter/task           at attach, vCPUs already blocking are halted from now
 *   kvm_vcpu_wakeup     the halt ended (its full duration is added; of a
 *                       halt seeded at attach, the part before the attach
 *                       also to before_attach_ns)
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Configuration, set by user space before load. */
/* Stream one ring-buffer record per wake-up. */
const volatile bool stream_wakeup = false;
/* Keep per-thread wake-up aggregates in the kernel (summaries, metrics). */
const volatile bool aggregate_wakeup = false;

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct wakeup_event _wakeup_event = {};
struct wakeup_stats _wakeup_stats = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct wakeup_stats);
} wakeup_stats SEC(".maps");

/* The live threads' aggregates where the kernel has task storage (see above). */
TASK_AGGREGATE(wakeup, struct wakeup_stats)

/*
 * The current thread's registered preempt-notifier link, 0 if none: a plain
 * load from a BTF-typed task (`in_task`), a CO-RE probe read otherwise.
 */
static __always_inline __u64 current_notifier_link(bool in_task)
{
	struct task_struct *task;

	if (in_task) {
		task = bpf_get_current_task_btf();
		if (!bpf_core_field_exists(task->preempt_notifiers))
			return 0;
		return (__u64)task->preempt_notifiers.first;
	}
	task = (struct task_struct *)bpf_get_current_task();
	if (!bpf_core_field_exists(task->preempt_notifiers))
		return 0;
	return (__u64)BPF_CORE_READ(task, preempt_notifiers.first);
}

static __always_inline void add_wakeup(struct wakeup_stats *s, __u64 ns, bool waited, bool valid)
{
	struct monitor_counters *c = counters_of(MONITOR_WAKEUP);

	s->wakeups++;
	if (waited)
		s->waited++;
	if (!valid)
		s->invalid++;
	s->halt_ns += ns;
	if (s->seed_at) {
		/* A halt in progress at attach: what of it came before the attach. */
		__u64 since_seed = bpf_ktime_get_ns() - s->seed_at;

		if (ns > since_seed)
			s->before_attach_ns += ns - since_seed;
		s->seed_at = 0;
	}
	s->halt_at = 0;
	s->hist[hist_bucket(ns / 1000, HALT_HIST_SLOTS)]++;
	/* Without rows, aggregated wake-ups are the events. */
	if (c && !stream_wakeup)
		c->events++;
}

/*
 * The thread's aggregate entry if it is still running the vCPU it had when
 * the entry was made: the entry exists only for threads that passed the
 * filters, and the same notifier link means the same vCPU, so neither the
 * filters nor the vCPU id need resolving again (one read instead of five).
 * A task-storage entry belongs to this very task; a hash entry may be left
 * by an earlier thread with the same id, hence its pid check.
 */
static __always_inline struct wakeup_stats *cached_wakeup_stats(bool in_task, __u32 pid, __u32 tid)
{
	struct wakeup_stats *s = wakeup_entry(in_task, tid, false);

	if (!s || (!in_task && s->pid != pid) || !s->vcpu_link)
		return NULL;
	return current_notifier_link(in_task) == s->vcpu_link ? s : NULL;
}

static __always_inline void aggregate_wakeup_event(bool in_task, __u32 pid, __u32 tid,
						   __s32 vcpu_id, __u64 ns, bool waited, bool valid)
{
	struct wakeup_stats *s = wakeup_entry(in_task, tid, true);

	if (!s) {
		/* Table full, or no memory for the task's storage: said, not silent. */
		struct monitor_counters *c = counters_of(MONITOR_WAKEUP);

		if (c)
			c->lost++;
		return;
	}
	/* A fresh entry, or one an earlier thread with this id left. */
	if (s->pid != pid || !s->wakeups)
		bpf_get_current_comm(s->comm, sizeof(s->comm));
	s->pid = pid;
	s->vcpu_id = vcpu_id;
	/* Cache the vCPU only when the notifier says which one it is. */
	s->vcpu_link = vcpu_of_task((struct task_struct *)bpf_get_current_task()) ?
			       current_notifier_link(in_task) :
			       0;
	add_wakeup(s, ns, waited, valid);
}

static __always_inline int on_vcpu_wakeup(bool in_task, __u64 ns, bool waited, bool valid)
{
	__u64 pid_tgid;
	__u32 pid, tid;
	__s32 vcpu_id;
	struct wakeup_event *e;

	/* The common case: a thread counted before, on the same vCPU. */
	if (in_task && aggregate_wakeup && !stream_wakeup) {
		struct wakeup_stats *s = cached_wakeup_stats(true, 0, 0);

		if (s) {
			add_wakeup(s, ns, waited, valid);
			return 0;
		}
	}
	pid_tgid = bpf_get_current_pid_tgid();
	pid = pid_tgid >> 32;
	tid = (__u32)pid_tgid;
	if (!in_task && aggregate_wakeup && !stream_wakeup) {
		struct wakeup_stats *s = cached_wakeup_stats(false, pid, tid);

		if (s) {
			add_wakeup(s, ns, waited, valid);
			return 0;
		}
	}
	vcpu_id = current_vcpu_id(tid);
	if (!passes_filters(pid, tid, vcpu_id))
		return 0;
	if (aggregate_wakeup)
		aggregate_wakeup_event(in_task, pid, tid, vcpu_id, ns, waited, valid);
	if (!stream_wakeup)
		return 0;
	e = reserve_event(MONITOR_WAKEUP, sizeof(*e));
	if (!e)
		return 0;
	fill_header(&e->hdr, MONITOR_WAKEUP, pid, tid, vcpu_id);
	e->halt_ns = ns;
	e->waited = waited;
	e->valid = valid;
	submit_event(&e->hdr);
	return 0;
}

/* kvm:kvm_vcpu_wakeup, BTF-typed (Linux 5.5+; task storage from it 5.12+) */
SEC("tp_btf/kvm_vcpu_wakeup")
int BPF_PROG(tp_btf_vcpu_wakeup, __u64 ns, bool waited, bool valid)
{
	return on_vcpu_wakeup(true, ns, waited, valid);
}

/* kvm:kvm_vcpu_wakeup (raw tracepoint; the tracepoint exists since Linux 3.x) */
SEC("raw_tp/kvm_vcpu_wakeup")
int BPF_PROG(tp_vcpu_wakeup, __u64 ns, bool waited, bool valid)
{
	return on_vcpu_wakeup(false, ns, waited, valid);
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

/* Whether the vCPU is inside kvm_vcpu_block() (true where KVM does not say). */
static __always_inline bool vcpu_blocking(struct kvm_vcpu *vcpu)
{
	if (!KVM_BTF || !bpf_core_field_exists(vcpu->stat.generic.blocking))
		return true;
	return BPF_CORE_READ(vcpu, stat.generic.blocking) != 0;
}

/* A thread's entry, in task storage (`in_task`) or in the hash, made when `create` is set. */
static __always_inline struct wakeup_stats *wakeup_entry_of(bool in_task, struct task_struct *task,
							     __u32 tid, bool create)
{
	struct wakeup_stats *s;

	if (in_task)
		return bpf_task_storage_get(&wakeup_task, task, 0,
					    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	s = bpf_map_lookup_elem(&wakeup_stats, &tid);
	if (!s && create) {
		struct wakeup_stats fresh = {};

		bpf_map_update_elem(&wakeup_stats, &tid, &fresh, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&wakeup_stats, &tid);
	}
	return s;
}

/*
 * `task` sleeps in a halt (or is halted at attach: `seed`): its halt in
 * progress is charged from now on, unless it already is. A thread seen for
 * the first time gets its entry here (an idle vCPU may not wake up for
 * minutes).
 */
static __always_inline void halt_sleeps(bool in_task, struct task_struct *task, bool seed)
{
	struct wakeup_stats *s;
	struct kvm_vcpu *vcpu;
	__u32 pid, tid;
	__s32 vcpu_id;

	vcpu = vcpu_of_task(task);
	if (!vcpu || !vcpu_blocking(vcpu))
		return;
	pid = BPF_CORE_READ(task, tgid);
	tid = BPF_CORE_READ(task, pid);
	s = wakeup_entry_of(in_task, task, tid, false);
	if (!s || s->pid != pid) {
		vcpu_id = vcpu_id_of(vcpu);
		if (!passes_filters(pid, tid, vcpu_id))
			return;
		s = wakeup_entry_of(in_task, task, tid, true);
		if (!s) {
			struct monitor_counters *c = counters_of(MONITOR_WAKEUP);

			if (c)
				c->lost++;
			return;
		}
		if (s->pid != pid || !s->wakeups)
			BPF_CORE_READ_STR_INTO(&s->comm, task, comm);
		s->pid = pid;
		s->vcpu_id = vcpu_id;
	}
	if (!s->halt_at) {
		s->halt_at = bpf_ktime_get_ns();
		if (seed)
			s->seed_at = s->halt_at;
	}
}

/*
 * sched:sched_switch (raw tracepoint, Linux 4.17+): aggregates in the hash.
 * With task storage (5.12+) the one BTF-typed program there calls
 * halt_sleeps() (kvm_watcher.bpf.c).
 */
SEC("raw_tp/sched_switch")
int BPF_PROG(tp_wakeup_switch, bool preempt, struct task_struct *prev)
{
	if (aggregate_wakeup && !preempt)
		halt_sleeps(false, prev, false);
	return 0;
}

/* At attach, the vCPUs halted already (task iterator, Linux 5.8+). */
SEC("iter/task")
int iter_wakeup_seed_task(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;

	if (task)
		halt_sleeps(true, task, true);
	return 0;
}

SEC("iter/task")
int iter_wakeup_seed(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;

	if (task)
		halt_sleeps(false, task, true);
	return 0;
}
