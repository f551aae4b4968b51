/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * exits: VM exits of each vCPU thread by reason, with the time KVM spends on
 * each until the next guest entry, and exits to the VMM by reason, with the
 * time the VMM spends until it calls KVM_RUN again; aggregated here per
 * thread and reason (count, total, per-interval maximum, log2 histogram of
 * nanoseconds), and the I/O ports and guest-physical addresses behind them.
 *
 * Hooks (raw tracepoints: no tracefs, no kprobes; Linux 4.17+):
 *   kvm:kvm_exit (x86, Linux 2.6.31+)     an exit from the guest begins
 *   kvm:kvm_entry (x86, Linux 2.6.31+)    the guest is entered again: it ends
 *   kvm:kvm_userspace_exit (Linux 2.6.32+) KVM_RUN returns to the VMM: the
 *       exit in progress ends there, time in the VMM begins
 *   raw_syscalls:sys_enter (Linux 4.17+ as raw tp)  ioctl(KVM_RUN): it ends
 *       (kvm_watcher.bpf.c); or, with the kvm-only backend, which leaves the
 *       host's system calls alone, kvm:kvm_fpu (x86): the next KVM_RUN has
 *       loaded the vCPU (the kernel's way back in then counts as the VMM's)
 *   kvm:kvm_pio (x86, 2.6.31+), kvm:kvm_mmio (2.6.31+)  accesses to ports
 *       and addresses; what a user-space exit is about: the last OUT or
 *       address of the same KVM_RUN
 *
 * An exit to the VMM for port I/O (KVM_EXIT_IO) is credited to the port in
 * its own struct kvm_run (vcpu->run->io, UAPI), read at kvm_userspace_exit:
 * kvm_pio fires for an OUT before the exit, but for an IN only when KVM
 * completes it in the next KVM_RUN, after the VMM answered, so "the last
 * kvm_pio" would name the port before. This needs no vendor code (VMX's exit
 * qualification and SVM's exit_info_1 hold the same port) and works where
 * kvm_exit does not fire. The vCPU is learned from kvm_exit's vcpu argument,
 * or from the preempt notifier while the vCPU is loaded (the start of
 * KVM_RUN, kvm_pio, kvm_mmio); it also gives the
 * thread its vcpu_id. An exit made before it is known (a vCPU inside
 * KVM_RUN at attach) gets its port at the next KVM_RUN, from the same
 * kvm_run. Without KVM BTF (no offset of vcpu->run) the last OUT of the same
 * KVM_RUN names the port: right for OUT exits, none for IN exits.
 *
 * kvm_exit's arguments changed in Linux 5.13 (or so): before, (exit_reason,
 * vcpu, isa); since, (vcpu, isa) and the tracepoint reads the reason from the
 * vendor's state. A kernel pointer is never below 2^32 and an exit reason
 * always is, so the first argument tells which; the newer form reads the
 * reason as the tracepoint does: struct vcpu_svm's vmcb->control.exit_code
 * (kvm_amd) or struct vcpu_vmx's exit_reason (kvm_intel), through CO-RE
 * against the module's BTF. Without that BTF the exit is counted with
 * reason EXITS_REASON_UNKNOWN.
 *
 * On hosts whose KVM backend never fires kvm_exit/kvm_entry (nested PVM),
 * only the user-space exits are seen; user space says so.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Configuration, set by user space before load. */
/* Stream one ring-buffer record per exit, at its end. */
const volatile bool stream_exits = false;
/* Set by user space for the kvm-only backend: kvm:kvm_fpu ends the time in the VMM. */
const volatile bool exits_on_kvm_run = false;

#define KVM_EXIT_IO_REASON 2
/* struct kvm_run (UAPI, fixed layout): exit_reason, and io.port of the union. */
#define KVM_RUN_EXIT_REASON 8
#define KVM_RUN_IO_PORT 34
#define KVM_EXIT_MMIO_REASON 6
#define KVM_EXIT_INTR_REASON 10
#define KVM_ISA_VMX 1
#define KVM_ISA_SVM 2
/* An exit whose reason could not be read (no vendor BTF). */
#define EXITS_REASON_UNKNOWN 0xfffffffe
#define EINTR_ERRNO 4

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct exits_key _exits_key = {};
struct exits_stats _exits_stats = {};
struct exits_thread _exits_thread = {};
struct exits_target_key _exits_target_key = {};
struct exits_target _exits_target = {};
struct exits_event _exits_event = {};
enum exits_kind _exits_kind = EXITS_KVM;
enum exits_target_kind _exits_target_kind = EXITS_TARGET_NONE;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct exits_key);
	__type(value, struct exits_stats);
} exits_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct exits_thread);
} exits_threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct exits_target_key);
	__type(value, struct exits_target);
} exits_targets SEC(".maps");

/* A zeroed entry to create exits_stats entries from (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exits_stats);
} exits_zero SEC(".maps");

/* The vendors' state, as much as the reason needs (CO-RE: matched by name). */
struct vmcb_control_area___exits {
	__u32 exit_code;
} __attribute__((preserve_access_index));

struct vmcb___exits {
	struct vmcb_control_area___exits control;
} __attribute__((preserve_access_index));

struct vcpu_svm___exits {
	struct vmcb___exits *vmcb;
} __attribute__((preserve_access_index));

union vmx_exit_reason___exits {
	__u32 full;
} __attribute__((preserve_access_index));

struct vcpu_vmx___exits {
	union vmx_exit_reason___exits exit_reason;
} __attribute__((preserve_access_index));

/* Linux before 5.12 kept the VMX exit reason as a plain u32. */
struct vcpu_vmx___exits_old {
	__u32 exit_reason;
} __attribute__((preserve_access_index));

/* The exit reason the newer kvm_exit reads from `vcpu` of vendor `isa`. */
static __always_inline __u32 vendor_exit_reason(void *vcpu, __u64 isa)
{
	if (isa == KVM_ISA_SVM && bpf_core_type_exists(struct vcpu_svm___exits)) {
		struct vcpu_svm___exits *svm = vcpu;

		return BPF_CORE_READ(svm, vmcb, control.exit_code);
	}
	if (isa == KVM_ISA_VMX && bpf_core_type_exists(union vmx_exit_reason___exits) &&
	    bpf_core_type_exists(struct vcpu_vmx___exits)) {
		struct vcpu_vmx___exits *vmx = vcpu;

		return BPF_CORE_READ(vmx, exit_reason.full);
	}
	if (isa == KVM_ISA_VMX && bpf_core_type_exists(struct vcpu_vmx___exits_old)) {
		struct vcpu_vmx___exits_old *vmx = vcpu;

		return BPF_CORE_READ(vmx, exit_reason);
	}
	return EXITS_REASON_UNKNOWN;
}

/* Thread `t` runs `vcpu` (NULL: not known here): its vcpu_id too, once known. */
static __always_inline void exits_learn_vcpu(struct exits_thread *t, struct kvm_vcpu *vcpu)
{
	if (!vcpu || t->vcpu == (__u64)vcpu)
		return;
	t->vcpu = (__u64)vcpu;
	t->vcpu_id = vcpu_id_of(vcpu);
}

/*
 * The current thread's entry, made on its first exit or KVM_RUN (`vcpu`, if
 * not NULL, is the vCPU it runs); NULL for threads filtered out.
 */
static __always_inline struct exits_thread *exits_thread_of(__u32 tid, bool create,
							    struct kvm_vcpu *vcpu)
{
	struct exits_thread *t = bpf_map_lookup_elem(&exits_threads, &tid);
	struct exits_thread fresh = {};
	__u32 pid;

	if (t || !create)
		return t;
	pid = bpf_get_current_pid_tgid() >> 32;
	fresh.pid = pid;
	fresh.vcpu = (__u64)vcpu;
	fresh.vcpu_id = vcpu ? vcpu_id_of(vcpu) : current_vcpu_id(tid);
	if (!passes_filters(pid, tid, fresh.vcpu_id))
		return NULL;
	bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	bpf_map_update_elem(&exits_threads, &tid, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&exits_threads, &tid);
}

/*
 * The current thread's entry (made when missing) at a hook that runs while
 * its vCPU is loaded: the vCPU is learned from the preempt notifier if not
 * known yet.
 */
static __always_inline struct exits_thread *exits_loaded_thread(__u32 tid)
{
	struct exits_thread *t = exits_thread_of(tid, true, NULL);

	if (t && !t->vcpu)
		exits_learn_vcpu(t, vcpu_of_task((struct task_struct *)bpf_get_current_task()));
	return t;
}

/* The entry of (tid, kind, reason), made when missing; NULL if the map is full. */
static __always_inline struct exits_stats *exits_entry(struct exits_thread *t, __u32 tid,
						       __u32 kind, __u32 reason)
{
	struct exits_key key = { .tid = tid, .kind = kind, .reason = reason };
	struct exits_stats *s = bpf_map_lookup_elem(&exits_stats, &key);
	__u32 zero = 0;
	void *fresh;

	if (s) {
		/* Made before the thread's vCPU was known. */
		if (s->vcpu_id < 0)
			s->vcpu_id = t->vcpu_id;
		return s;
	}
	fresh = bpf_map_lookup_elem(&exits_zero, &zero);
	if (!fresh)
		return NULL;
	bpf_map_update_elem(&exits_stats, &key, fresh, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&exits_stats, &key);
	if (!s) {
		struct monitor_counters *c = counters_of(MONITOR_EXITS);

		if (c)
			c->map_full++;
		return NULL;
	}
	s->pid = t->pid;
	s->vcpu_id = t->vcpu_id;
	__builtin_memcpy(s->comm, t->comm, sizeof(s->comm));
	return s;
}

/* Counts the start of an exit of (kind, reason). */
static __always_inline void exit_begins(struct exits_thread *t, __u32 tid, __u32 kind,
					__u32 reason)
{
	struct exits_stats *s = exits_entry(t, tid, kind, reason);

	if (s)
		s->count++;
}

/* An exit of (kind, reason) that began at `from` ends at `now`. */
static __always_inline void exit_ends(struct exits_thread *t, __u32 tid, __u32 kind,
				      __u32 reason, __u64 from, __u64 now, __u32 target_kind,
				      __u64 target)
{
	struct exits_stats *s = exits_entry(t, tid, kind, reason);
	struct monitor_counters *c = counters_of(MONITOR_EXITS);
	__u64 ns = now > from ? now - from : 0;
	__u32 e = epoch, slot = e & 1;
	struct exits_event *ev;

	if (!s)
		return;
	s->timed++;
	s->ns += ns;
	s->hist[hist_bucket(ns, EXITS_HIST_SLOTS)]++;
	if (s->epoch[slot] != e) {
		s->epoch[slot] = e;
		s->max_ns[slot] = ns;
	} else if (ns > s->max_ns[slot]) {
		s->max_ns[slot] = ns;
	}
	if (!stream_exits) {
		if (c)
			c->events++;
		return;
	}
	ev = reserve_event(MONITOR_EXITS, sizeof(*ev));
	if (!ev)
		return;
	fill_header(&ev->hdr, MONITOR_EXITS, t->pid, tid, t->vcpu_id);
	ev->ns = ns;
	ev->kind = kind;
	ev->reason = reason;
	ev->target = target;
	ev->target_kind = target_kind;
	submit_event(&ev->hdr);
}

/* The exit from the guest in progress, if any, ends at `now`. */
static __always_inline void kvm_exit_ends(struct exits_thread *t, __u32 tid, __u64 now)
{
	if (!t->exit_at)
		return;
	exit_ends(t, tid, EXITS_KVM, t->reason, t->exit_at, now, EXITS_TARGET_NONE, 0);
	t->exit_at = 0;
}

/* kvm:kvm_exit (raw tracepoint; x86) */
SEC("raw_tp/kvm_exit")
int tp_exits_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 a0 = ctx->args[0], a1 = ctx->args[1];
	/* Before Linux 5.13 the reason comes first; since, the vCPU and the vendor. */
	struct kvm_vcpu *vcpu = a0 >> 32 ? (struct kvm_vcpu *)a0 : NULL;
	struct exits_thread *t = vcpu ? exits_thread_of(tid, true, vcpu) : exits_loaded_thread(tid);
	__u32 reason;

	if (!t)
		return 0;
	if (vcpu && !t->vcpu)
		exits_learn_vcpu(t, vcpu);
	reason = vcpu ? vendor_exit_reason(vcpu, a1) : (__u32)a0;
	t->exit_at = bpf_ktime_get_ns();
	t->reason = reason;
	exit_begins(t, tid, EXITS_KVM, reason);
	return 0;
}

/* kvm:kvm_entry (raw tracepoint; x86) */
SEC("raw_tp/kvm_entry")
int tp_exits_entry(void *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct exits_thread *t = exits_thread_of(tid, false, NULL);

	if (t)
		kvm_exit_ends(t, tid, bpf_ktime_get_ns());
	return 0;
}

/* The entry of port or address `addr` of thread `t`, made when missing; NULL if the map is full. */
static __always_inline struct exits_target *exits_target_of(struct exits_thread *t, __u32 tid,
							    __u32 kind, __u64 addr)
{
	struct exits_target_key key = { .tid = tid, .kind = kind, .addr = addr };
	struct exits_target *g = bpf_map_lookup_elem(&exits_targets, &key);
	struct exits_target fresh = { .pid = t->pid };
	struct monitor_counters *c;

	if (g)
		return g;
	bpf_map_update_elem(&exits_targets, &key, &fresh, BPF_NOEXIST);
	g = bpf_map_lookup_elem(&exits_targets, &key);
	if (g)
		return g;
	c = counters_of(MONITOR_EXITS);
	if (c)
		c->map_full++;
	return NULL;
}

/* The user-space exit in progress of thread `t` was about `addr`. */
static __always_inline void exits_credit(struct exits_thread *t, __u32 tid, __u32 kind,
					 __u64 addr)
{
	struct exits_target *g = exits_target_of(t, tid, kind, addr);

	t->user_target_kind = kind;
	t->user_target = addr;
	if (g)
		g->user_exits++;
}

/*
 * The port of the KVM_EXIT_IO exit thread `t` is making, from its vCPU's
 * kvm_run; false when the vCPU or vcpu->run is not known.
 */
static __always_inline bool exits_io_port(struct exits_thread *t, __u64 *port)
{
	struct kvm_vcpu *vcpu = (struct kvm_vcpu *)t->vcpu;
	void *run;

	if (!vcpu || !KVM_BTF)
		return false;
	run = BPF_CORE_READ(vcpu, run);
	if (!run || read_at(run, KVM_RUN_EXIT_REASON, 4) != KVM_EXIT_IO_REASON)
		return false;
	*port = read_at(run, KVM_RUN_IO_PORT, 2);
	return true;
}

/* kvm:kvm_userspace_exit(reason, errno) (raw tracepoint) */
SEC("raw_tp/kvm_userspace_exit")
int BPF_PROG(tp_exits_userspace, __u32 reason, int err)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct exits_thread *t = exits_thread_of(tid, true, NULL);
	__u64 now = bpf_ktime_get_ns();
	__u64 port;

	if (!t)
		return 0;
	kvm_exit_ends(t, tid, now);
	if (err == -EINTR_ERRNO)
		reason = KVM_EXIT_INTR_REASON;
	else if (err < 0)
		reason = EXITS_USER_ERROR + (__u32)(-err);
	t->user_at = now;
	t->user_reason = reason;
	t->user_target_kind = EXITS_TARGET_NONE;
	t->user_target = 0;
	if (reason == KVM_EXIT_IO_REASON && KVM_BTF) {
		/*
		 * The port is in the exit (an IN's kvm_pio fires only after the
		 * VMM answered); a vCPU not known yet gets it at the next KVM_RUN.
		 */
		t->target_kind = EXITS_TARGET_NONE;
		if (exits_io_port(t, &port)) {
			t->target_kind = EXITS_TARGET_PIO;
			t->target = port;
		}
	}
	if ((reason == KVM_EXIT_IO_REASON && t->target_kind == EXITS_TARGET_PIO) ||
	    (reason == KVM_EXIT_MMIO_REASON && t->target_kind == EXITS_TARGET_MMIO))
		exits_credit(t, tid, t->target_kind, t->target);
	t->target_kind = EXITS_TARGET_NONE;
	exit_begins(t, tid, EXITS_USER, reason);
	return 0;
}

/*
 * The current thread's entry at the start of a KVM_RUN (`task`): made when
 * missing, its vCPU learned when not known yet (or another one now), so
 * that a thread that was outside KVM_RUN at attach has its vcpu_id from its
 * first KVM_RUN on. At ioctl(fd, KVM_RUN) the vCPU is not loaded yet and
 * the descriptor names it; at kvm:kvm_fpu (`fd` -1, kvm-only backend) it is
 * loaded and its preempt notifier names it. NULL for threads filtered out.
 */
static __always_inline struct exits_thread *exits_kvm_run_thread(__u32 tid,
								 struct task_struct *task, int fd)
{
	struct exits_thread *t = exits_thread_of(tid, false, NULL);
	struct kvm_vcpu *vcpu;

	if (!t && !pid_watched(bpf_get_current_pid_tgid() >> 32))
		return NULL;
	if (fd < 0)
		vcpu = vcpu_of_task_known(task, t ? t->vcpu : 0);
	else
		vcpu = t && t->vcpu ? (struct kvm_vcpu *)t->vcpu : vcpu_of_fd(fd);
	if (!t)
		return exits_thread_of(tid, true, vcpu);
	exits_learn_vcpu(t, vcpu);
	return t;
}

/*
 * The start of a KVM_RUN ends the time in the VMM: at ioctl(fd, KVM_RUN)
 * itself (raw_syscalls:sys_enter, which every system call of the host then
 * runs; kvm_watcher.bpf.c), or with the kvm-only backend at kvm:kvm_fpu
 * (`fd` -1, the one program there), where KVM has loaded the vCPU, so that
 * time then includes the kernel's way into KVM_RUN up to the load (about
 * 10 us per exit on a nested host).
 */
static __always_inline void exits_kvm_run(struct task_struct *task, int fd)
{
	struct exits_thread *t;
	__u64 now, port;
	__u32 tid;

	tid = (__u32)bpf_get_current_pid_tgid();
	t = exits_kvm_run_thread(tid, task, fd);
	if (!t || !t->user_at)
		return;
	/* An I/O exit made before the vCPU was known: its kvm_run still holds it. */
	if (t->user_reason == KVM_EXIT_IO_REASON && t->user_target_kind == EXITS_TARGET_NONE &&
	    exits_io_port(t, &port))
		exits_credit(t, tid, EXITS_TARGET_PIO, port);
	now = bpf_ktime_get_ns();
	exit_ends(t, tid, EXITS_USER, t->user_reason, t->user_at, now, t->user_target_kind,
		  t->user_target);
	if (t->user_target_kind != EXITS_TARGET_NONE) {
		struct exits_target_key key = { .tid = tid, .kind = t->user_target_kind,
						.addr = t->user_target };
		struct exits_target *g = bpf_map_lookup_elem(&exits_targets, &key);

		if (g && now > t->user_at)
			g->vmm_ns += now - t->user_at;
	}
	t->user_at = 0;
}

/*
 * Counts an access to port or address `addr`; remembers it for the
 * user-space exit unless it is a port read (kvm_pio of an IN fires when KVM
 * completes it: after the VMM answered, or for an in-kernel device, with no
 * exit to the VMM at all).
 */
static __always_inline void exits_access(__u32 kind, __u64 addr, bool write)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct exits_thread *t = exits_loaded_thread(tid);
	struct exits_target *g;

	if (!t)
		return;
	if (kind != EXITS_TARGET_PIO || write) {
		t->target_kind = kind;
		t->target = addr;
	}
	g = exits_target_of(t, tid, kind, addr);
	if (!g)
		return;
	g->count++;
	if (write)
		g->writes++;
}

/* kvm:kvm_pio(rw, port, size, count, data) (raw tracepoint; x86): rw 1 is a write (OUT). */
SEC("raw_tp/kvm_pio")
int tp_exits_pio(struct bpf_raw_tracepoint_args *ctx)
{
	exits_access(EXITS_TARGET_PIO, ctx->args[1] & 0xffff, ctx->args[0] == 1);
	return 0;
}

/* kvm:kvm_mmio(type, len, gpa, val) (raw tracepoint): type 2 is KVM_TRACE_MMIO_WRITE. */
SEC("raw_tp/kvm_mmio")
int tp_exits_mmio(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 type = ctx->args[0];

	/* A read KVM completes after the VMM answered is counted once, when asked. */
	if (type == 1)
		return 0;
	exits_access(EXITS_TARGET_MMIO, ctx->args[2], type == 2);
	return 0;
}
