/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * vcpu-load: how long each vCPU thread holds a physical CPU.
 *
 * A vCPU is "loaded" from kvm_arch_vcpu_load() to kvm_arch_vcpu_put(). Pairs
 * are aggregated here, per thread: cumulative count and time (user space takes
 * deltas, so nothing is lost between read and reset), per-interval max/min in
 * two slots indexed by `epoch & 1`, cumulative time per physical CPU, and
 * the loads that land on another CPU than the load before (moves).
 *
 * Backends (user space picks one, see BACKENDS in src/monitors/vcpu_load/mod.rs):
 *   fentry     kvm_arch_vcpu_load/put   (fentry: Linux 5.5+, vendor-neutral)
 *   kprobe     kvm_arch_vcpu_load/put
 *   tracepoint kvm:kvm_fpu/kvm_userspace_exit (KVM_RUN, vcpu_threads.bpf.c)
 *              + sched:sched_switch: loaded while inside KVM_RUN and on a CPU;
 *              a switch-in that fired no event opens at the scheduler's own
 *              stamp of it (see load_unseen()).
 *
 * Every backend: a task iterator (iter/task, Linux 5.8+), run once right
 * after the others are attached, opens the pair of every vCPU that is loaded
 * at that moment, so a busy vCPU counts from the first instant. Kernels that
 * cannot run it find such a vCPU at its next load (switch-in), as user space
 * warns.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/*
 * Configuration, set by user space before load: derive load/put from vCPU
 * KVM_RUN + sched_switch (tracepoint backend; vcpu_threads.bpf.c reads it too).
 */
const volatile bool load_from_ioctls = false;

/* Never used by a program: make the skeleton carry this layout to user space. */
struct vcpu_cpu_key _vcpu_cpu_key = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct vcpu_cpu_key);
	__type(value, __u64);
} vcpu_cpu_ns SEC(".maps");

static __always_inline bool thread_watched(struct vcpu_thread *t, __u32 tid)
{
	return passes_filters(t->pid, tid, t->vcpu_id);
}

static __always_inline void vcpu_load_begin(struct vcpu_thread *t, __u32 tid, __u32 cpu,
					    __u64 now)
{
	if (!thread_watched(t, tid))
		return;
	/*
	 * A pair still open (its switch-out was no put: see tp_sched_switch)
	 * continues; restarting it would drop time user space already showed
	 * as open on its CPU.
	 */
	if (t->loaded_at)
		return;
	t->seq++;
	barrier();
	/* A move: the state is at hand already, no lookup. */
	if (t->cpu_known && t->loaded_cpu != cpu)
		t->cpu_migrations++;
	t->cpu_known = 1;
	t->loaded_cpu = cpu;
	t->loaded_at = now;
	barrier();
	t->seq++;
}

static __always_inline void vcpu_load_end(struct vcpu_thread *t, __u32 tid, __u64 now)
{
	struct vcpu_cpu_key key = { .tid = tid };
	__u64 start = t->loaded_at, dur, *cpu_ns;
	__u32 e = epoch, slot = e & 1;

	if (!start || now < start)
		return;
	dur = now - start;
	key.cpu = t->loaded_cpu;
	t->seq++; /* odd: see struct vcpu_thread */
	barrier();
	cpu_ns = bpf_map_lookup_elem(&vcpu_cpu_ns, &key);
	if (!cpu_ns) {
		__u64 zero = 0;

		bpf_map_update_elem(&vcpu_cpu_ns, &key, &zero, BPF_NOEXIST);
		cpu_ns = bpf_map_lookup_elem(&vcpu_cpu_ns, &key);
	}
	if (cpu_ns)
		*cpu_ns += dur;
	if (t->epoch[slot] != e) {
		t->epoch[slot] = e;
		t->max_ns[slot] = dur;
		t->min_ns[slot] = dur;
	} else {
		if (dur > t->max_ns[slot])
			t->max_ns[slot] = dur;
		if (dur < t->min_ns[slot])
			t->min_ns[slot] = dur;
	}
	/* The time before clearing loaded_at, so an open pair is never missed. */
	t->total_ns += dur;
	t->count++;
	t->loaded_at = 0;
	barrier();
	t->seq++;
	{
		struct monitor_counters *c = counters_of(MONITOR_VCPU_LOAD);

		if (c)
			c->events++;
	}
}

/*
 * KVM loads every vCPU once more on whatever thread destroys the VM (x86:
 * kvm_unload_vcpu_mmus() from the last close, usually the exiting VMM's
 * main thread). That is no vCPU running: fentry/kprobe skip it, so they count
 * the same pairs as the tracepoint backend (vCPU ioctls + sched_switch).
 */
static __always_inline bool vm_dying(struct kvm_vcpu *vcpu, struct task_struct *task)
{
	if (BPF_CORE_READ(task, flags) & 0x4 /* PF_EXITING */)
		return true;
	if (KVM_BTF && bpf_core_field_exists(((struct kvm *)0)->users_count))
		return BPF_CORE_READ(vcpu, kvm, users_count.refs.counter) == 0;
	return false;
}

/*
 * Both ends are stamped first thing, before any lookup: the time from the
 * function's entry to the stamp is then alike at the load and at the put,
 * and cancels out of the pair's time. Stamped after the load's bookkeeping,
 * pairs read short by it (in the kernel matrix's Linux guest, whose host
 * CPU is emulated, an idle vCPU's pairs were 42 us a pair shorter than
 * ftrace's function tracer on the same two functions; 2 us stamped first).
 */
static __always_inline void on_arch_vcpu_load(struct kvm_vcpu *vcpu, int cpu)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	struct vcpu_thread *t;

	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	if (!pid_watched(pid) || vm_dying(vcpu, task))
		return;
	t = remember_vcpu_thread(pid, tid, vcpu, task);
	if (t)
		vcpu_load_begin(t, tid, cpu, now);
}

static __always_inline void on_arch_vcpu_put(void)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);

	if (t)
		vcpu_load_end(t, tid, now);
}

/* kvm_arch_vcpu_load(struct kvm_vcpu *vcpu, int cpu): every KVM version, all vendors. */
SEC("fentry/kvm_arch_vcpu_load")
int BPF_PROG(fentry_vcpu_load, struct kvm_vcpu *vcpu, int cpu)
{
	on_arch_vcpu_load(vcpu, cpu);
	return 0;
}

/* kvm_arch_vcpu_put(struct kvm_vcpu *vcpu): every KVM version, all vendors. */
SEC("fentry/kvm_arch_vcpu_put")
int BPF_PROG(fentry_vcpu_put, struct kvm_vcpu *vcpu)
{
	on_arch_vcpu_put();
	return 0;
}

SEC("kprobe/kvm_arch_vcpu_load")
int BPF_KPROBE(kprobe_vcpu_load, struct kvm_vcpu *vcpu, int cpu)
{
	on_arch_vcpu_load(vcpu, cpu);
	return 0;
}

SEC("kprobe/kvm_arch_vcpu_put")
int BPF_KPROBE(kprobe_vcpu_put, struct kvm_vcpu *vcpu)
{
	on_arch_vcpu_put();
	return 0;
}

/*
 * Tracepoint backend: the switch-out of `prev` (thread `tid`, entry `t`),
 * whose vCPU is loaded although no switch-in opened its pair. Some switches
 * fire no sched_switch: on some hosts a task leaves its CPU untraced (an
 * init process's threads were seen doing it), and the vCPU thread that
 * runs next is switched in unseen. The scheduler stamped that arrival all
 * the same (sched_info.last_arrival, on the run queue's clock), so the pair
 * opens there: as long before `now` as the run queue's clock advanced since.
 */
static __always_inline void load_unseen(bool btf, struct vcpu_thread *t, __u32 tid,
					struct task_struct *prev, __u64 now)
{
	__u64 arrival, clock, ran;

	if (!bpf_core_field_exists(prev->sched_info.last_arrival) ||
	    !bpf_core_field_exists(prev->se.cfs_rq))
		return;
	arrival = btf ? prev->sched_info.last_arrival : BPF_CORE_READ(prev, sched_info.last_arrival);
	clock = rq_clock_of(btf, prev);
	if (!arrival || clock <= arrival)
		return;
	ran = clock - arrival;
	if (ran >= now)
		return;
	vcpu_load_begin(t, tid, bpf_get_smp_processor_id(), now - ran);
}

/*
 * Tracepoint backend: a vCPU thread inside a vCPU ioctl is put when switched
 * out and loaded when switched in, as KVM's preempt notifiers do. Most
 * switches on a host are of other threads; they return after one look at
 * each task's notifier list, without looking the threads up.
 */
static __always_inline void on_sched_switch(bool btf, struct task_struct *prev,
					    struct task_struct *next)
{
	/*
	 * The clock is read only for a switch that puts or loads a vCPU (the
	 * same instant for both): a switch of two tasks that are no vCPU
	 * threads, most switches of a host, costs two loads and no helper call.
	 */
	__u64 now = 0;
	struct vcpu_thread *t;
	__u32 tid;

	/*
	 * Put only if the vCPU really is loaded (KVM's preempt notifier is
	 * registered on prev): a switch-out inside the ioctl but before
	 * vcpu_load() or after vcpu_put() is no put, and counting it made this
	 * backend report more pairs than fentry/kprobe whenever the thread was
	 * preempted in those windows. The pair then ends at the next real
	 * switch-out or when KVM_RUN returns.
	 */
	if (has_notifier(btf, prev)) {
		tid = btf ? prev->pid : BPF_CORE_READ(prev, pid);
		t = bpf_map_lookup_elem(&vcpu_threads, &tid);
		if (t && t->in_ioctl &&
		    (!bpf_core_field_exists(prev->preempt_notifiers) || vcpu_of_task(prev))) {
			now = bpf_ktime_get_ns();
			if (!t->loaded_at)
				load_unseen(btf, t, tid, prev, now);
			vcpu_load_end(t, tid, now);
		}
	}
	/*
	 * Without a notifier, next has no vCPU loaded: it is no vCPU thread, or
	 * one whose pair is still open (its switch-out was no put) or that
	 * will be loaded at its next vcpu_load(); nothing to begin here.
	 */
	if (!has_notifier(btf, next))
		return;
	tid = btf ? next->pid : BPF_CORE_READ(next, pid);
	t = bpf_map_lookup_elem(&vcpu_threads, &tid);
	if (!t || t->exited) {
		/*
		 * A thread first seen here may already be inside a vCPU ioctl
		 * (it entered before we attached): it is if KVM's preempt
		 * notifier is registered on it.
		 */
		struct kvm_vcpu *vcpu = vcpu_of_task(next);
		__u32 pid = BPF_CORE_READ(next, tgid);

		if (!vcpu || !pid_watched(pid))
			return;
		t = remember_vcpu_thread(pid, tid, vcpu, next);
		/* In another vCPU ioctl: loaded from its next KVM_RUN. */
		if (!t || !vcpu_in_run(vcpu))
			return;
		t->in_ioctl = 1;
	}
	if (t->in_ioctl) {
		if (!now)
			now = bpf_ktime_get_ns();
		vcpu_load_begin(t, tid, bpf_get_smp_processor_id(), now);
	}
}

/*
 * sched:sched_switch (raw tracepoint, Linux 4.17+); where it is BTF-typed
 * (5.5+) the one program there calls on_sched_switch() (kvm_watcher.bpf.c).
 */
SEC("raw_tp/sched_switch")
int BPF_PROG(tp_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	on_sched_switch(false, prev, next);
	return 0;
}

/* task->cpu before Linux 5.16 (then moved to task->thread_info.cpu). */
struct task_struct___cpu {
	unsigned int cpu;
} __attribute__((preserve_access_index));

/* The CPU `task` runs on (task_cpu()). */
static __always_inline __u32 task_cpu_of(struct task_struct *task)
{
	struct task_struct___cpu *old = (void *)task;

	if (bpf_core_field_exists(old->cpu))
		return BPF_CORE_READ(old, cpu);
	if (bpf_core_field_exists(task->thread_info.cpu))
		return BPF_CORE_READ(task, thread_info.cpu);
	return 0;
}

/* Voluntary and involuntary context switches of `task` so far. */
static __always_inline __u64 switches_of(struct task_struct *task)
{
	return BPF_CORE_READ(task, nvcsw) + BPF_CORE_READ(task, nivcsw);
}

/* Target of a locked instruction: a full memory barrier on x86. */
__u32 seed_fence = 0;

/*
 * iter/task (BPF task iterator, Linux 5.8+), every backend. User space runs
 * it once, right after the other programs are attached: each vCPU thread
 * that has its vCPU loaded now (KVM's preempt notifier is registered on it
 * and it is on a CPU) gets its pair opened at this instant, on its CPU, as
 * if its load had been seen. With the tracepoint backend every thread with a
 * loaded vCPU is also marked inside its vCPU ioctl, so its switch-out or
 * the return of KVM_RUN puts it and a switch-in loads it.
 *
 * The live programs run meanwhile: a pair they opened already is left as it
 * is (vcpu_load_begin refuses). A thread on another CPU can switch out or
 * leave its ioctl between the checks and the opening, and its put then found
 * nothing to close: after opening, the thread is checked again (behind a full
 * barrier) and a pair it may have missed is taken back, unless a live
 * program closed it already.
 */
SEC("iter/task")
int seed_vcpu_load(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct kvm_vcpu *vcpu;
	struct vcpu_thread *t;
	__u64 switches, opened = 0;
	__u32 pid, tid;

	if (!task)
		return 0;
	vcpu = vcpu_of_task(task);
	if (!vcpu)
		return 0;
	pid = BPF_CORE_READ(task, tgid);
	tid = BPF_CORE_READ(task, pid);
	if (!pid_watched(pid) || vm_dying(vcpu, task))
		return 0;
	t = remember_vcpu_thread(pid, tid, vcpu, task);
	if (!t)
		return 0;
	if (load_from_ioctls) {
		/* The tracepoint backend counts KVM_RUN only, not other vCPU ioctls. */
		if (!vcpu_in_run(vcpu))
			return 0;
		t->in_ioctl = 1;
	}
	switches = switches_of(task);
	if (BPF_CORE_READ(task, on_cpu)) {
		__u64 now = bpf_ktime_get_ns();

		vcpu_load_begin(t, tid, task_cpu_of(task), now);
		if (t->loaded_at == now)
			opened = now;
	}
	__sync_fetch_and_add(&seed_fence, 1);
	if (vcpu_of_task(task) != vcpu) {
		/* It left its vCPU ioctl meanwhile. */
		if (load_from_ioctls)
			t->in_ioctl = 0;
	} else if (switches_of(task) == switches && BPF_CORE_READ(task, on_cpu)) {
		return 0;
	}
	if (opened && t->loaded_at == opened) {
		t->seq++;
		barrier();
		t->loaded_at = 0;
		barrier();
		t->seq++;
	}
	return 0;
}
