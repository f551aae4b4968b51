/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Maps, configuration and helpers every monitor shares: the ring buffer, the
 * per-CPU counters, the in-kernel filters and the vCPU-thread table.
 */
#ifndef KVM_WATCHER_COMMON_BPF_H
#define KVM_WATCHER_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "kvm_watcher.h"
#include "kvm_layout.bpf.h"
#include "task_aggregate.bpf.h"

#if defined(__TARGET_ARCH_x86)
#define NR_IOCTL 16
#else
#error "kvm-watcher: x86 only (its hooks are x86 KVM's tracepoints)"
#endif
#define KVM_RUN_CMD 0xae80

/* --- Configuration, set by user space before load. --------------------- */

/* When true only tgids in `allowed_pids` are watched. */
const volatile bool filter_pids = false;
/* Only this thread id when non-zero. */
const volatile __u32 filter_tid = 0;
/* Only this vCPU id when >= 0. */
const volatile __s32 filter_vcpu = -1;
/*
 * Each monitor's own configuration lives in its .bpf.c file, next to the
 * programs that read it.
 */

/* --- State shared with user space. ------------------------------------- */

/*
 * Summary interval number. User space increments it at every interval
 * boundary; per-interval figures live in two slots indexed `epoch & 1`, so
 * the slot user space reads is no longer written. It starts at 1 so that a
 * freshly zeroed slot (epoch 0) never looks current.
 */
__u32 epoch = 1;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* resized by user space (--ringbuf-size) */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MONITOR_COUNT);
	__type(key, __u32);
	__type(value, struct monitor_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} allowed_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct vcpu_thread);
} vcpu_threads SEC(".maps");

static __always_inline struct monitor_counters *counters_of(__u32 kind)
{
	return bpf_map_lookup_elem(&counters, &kind);
}

static __always_inline bool pid_watched(__u32 pid)
{
	if (!filter_pids)
		return true;
	return bpf_map_lookup_elem(&allowed_pids, &pid) != NULL;
}

/* The in-kernel filters: --pid, --tid, --vcpu. */
static __always_inline bool passes_filters(__u32 pid, __u32 tid, __s32 vcpu_id)
{
	if (filter_tid && tid != filter_tid)
		return false;
	if (filter_vcpu >= 0 && vcpu_id != filter_vcpu)
		return false;
	return pid_watched(pid);
}

/*
 * Reserves a record, counting it as an event or as lost. The record pointer
 * is tested exactly once on each path: verifiers before Linux 6.2 do not
 * learn that a ring-buffer record is non-NULL from a second test, and reject
 * the program with "Unreleased reference" when the caller tests it again.
 */
static __always_inline void *reserve_event(__u32 kind, __u64 size)
{
	struct monitor_counters *c = counters_of(kind);
	void *rec = bpf_ringbuf_reserve(&events, size, 0);

	if (!rec) {
		if (c)
			c->lost++;
		return NULL;
	}
	if (c)
		c->events++;
	return rec;
}

/*
 * Waking the reader costs far more than writing a record: an irq_work and a
 * wake-up, under nested virtualization a self-IPI too (scripts/bench measured
 * ~4.7 us per dirty record with a wake-up each, ~0.5 us without). The default
 * adaptive submit wakes the reader for almost every record whenever it keeps
 * up, so records wake it at most once per WAKEUP_EVERY_NS (10 ms), or when
 * the ring fills past a quarter. Only the records that cross that mark wake
 * it: a reader that lags behind is awake already, and waking it for every
 * record while the ring stays over the mark (as a plain "over a quarter full"
 * test would) made each record cost a wake-up exactly when records pile up.
 * A record submitted without a wake-up waits until the next record that
 * wakes, or at most the reader's poll timeout.
 */
#define WAKEUP_EVERY_NS 10000000ull
__u64 last_wakeup_ns = 0;

/* Submits a record reserved with reserve_event() (its header filled). */
static __always_inline void submit_event(struct event_header *hdr)
{
	__u64 flags = BPF_RB_NO_WAKEUP;
	__u64 mark = bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) / 4;
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);

	/* Records are at most 256 bytes: one of them ends in [mark, mark + 256). */
	if (hdr->time_ns - last_wakeup_ns >= WAKEUP_EVERY_NS ||
	    (avail >= mark && avail < mark + 256)) {
		last_wakeup_ns = hdr->time_ns;
		flags = BPF_RB_FORCE_WAKEUP;
	}
	bpf_ringbuf_submit(hdr, flags);
}

static __always_inline void fill_header(struct event_header *hdr, __u32 kind, __u32 pid,
					__u32 tid, __s32 vcpu_id)
{
	hdr->kind = kind;
	hdr->pid = pid;
	hdr->tid = tid;
	hdr->vcpu_id = vcpu_id;
	if (vcpu_id < 0) {
		struct monitor_counters *c = counters_of(kind);

		if (c)
			c->unknown_vcpu++;
	}
	hdr->time_ns = bpf_ktime_get_ns();
	bpf_get_current_comm(hdr->comm, sizeof(hdr->comm));
}

/* vcpu->vcpu_id, with or without KVM BTF. */
static __always_inline __s32 vcpu_id_of(struct kvm_vcpu *vcpu)
{
	if (KVM_BTF)
		return BPF_CORE_READ(vcpu, vcpu_id);
	return (__s32)read_at(vcpu, NOBTF_VCPU_ID, 4);
}

/*
 * The vCPU `task` has loaded, or NULL. While a vCPU is loaded (vcpu_load() to
 * vcpu_put(), i.e. inside a vCPU ioctl) KVM keeps a preempt notifier
 * registered on its thread: task->preempt_notifiers holds
 * &vcpu->preempt_notifier.link. The vCPU's VM must share the task's mm, which
 * rules out any other user of preempt notifiers (without KVM BTF that check
 * is skipped: KVM is the only user of preempt notifiers in the kernel). A
 * vCPU the thread was seen with before (`known`, 0: none) needs no check, so
 * at each KVM_RUN of a thread already seen this is one read.
 */
static __always_inline struct kvm_vcpu *vcpu_of_task_known(struct task_struct *task, __u64 known)
{
	struct hlist_node *node;
	struct kvm_vcpu *vcpu;

	if (!bpf_core_field_exists(task->preempt_notifiers))
		return NULL;
	node = BPF_CORE_READ(task, preempt_notifiers.first);
	if (!node)
		return NULL;
	if (!KVM_BTF)
		return (void *)node - NOBTF_VCPU_PREEMPT_NOTIFIER;
	vcpu = (void *)node - bpf_core_field_offset(struct kvm_vcpu, preempt_notifier.link);
	if ((__u64)vcpu == known)
		return vcpu;
	if (BPF_CORE_READ(vcpu, kvm, mm) != BPF_CORE_READ(task, mm))
		return NULL;
	return vcpu;
}

/*
 * Whether `task` has a preempt notifier registered (KVM's, while it has a
 * vCPU loaded): a plain load from a BTF-typed task (`btf`), a probe read
 * otherwise. Kernels without preempt notifiers have no KVM; there every
 * task passes.
 */
static __always_inline bool has_notifier(bool btf, struct task_struct *task)
{
	if (!bpf_core_field_exists(task->preempt_notifiers))
		return true;
	if (btf)
		return task->preempt_notifiers.first != NULL;
	return BPF_CORE_READ(task, preempt_notifiers.first) != NULL;
}

/* The vCPU `task` has loaded, or NULL (see vcpu_of_task_known()). */
static __always_inline struct kvm_vcpu *vcpu_of_task(struct task_struct *task)
{
	return vcpu_of_task_known(task, 0);
}

/*
 * Whether loaded `vcpu` is inside KVM_RUN, not another vCPU ioctl (a VMM
 * reading or setting registers loads the vCPU too): vcpu->wants_to_run,
 * Linux 6.10+ with KVM BTF. Elsewhere a loaded vCPU is taken to be running,
 * as it nearly always is.
 */
static __always_inline bool vcpu_in_run(struct kvm_vcpu *vcpu)
{
	if (KVM_BTF && bpf_core_field_exists(vcpu->wants_to_run))
		return BPF_CORE_READ(vcpu, wants_to_run);
	return true;
}

/* vCPU id of the current thread, -1 if it is not inside a vCPU ioctl. */
static __always_inline __s32 current_vcpu_id(__u32 tid)
{
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);
	struct kvm_vcpu *vcpu;

	if (t && !t->exited)
		return t->vcpu_id;
	vcpu = vcpu_of_task((struct task_struct *)bpf_get_current_task());
	return vcpu ? vcpu_id_of(vcpu) : -1;
}

/*
 * Records that thread `tid` (`task`) of process `pid` runs `vcpu`, creating or
 * refreshing its vcpu_threads entry. Returns the entry, or NULL if the table
 * is full.
 */
static __always_inline struct vcpu_thread *remember_vcpu_thread(__u32 pid, __u32 tid,
								struct kvm_vcpu *vcpu,
								struct task_struct *task)
{
	struct vcpu_thread *t = bpf_map_lookup_elem(&vcpu_threads, &tid);

	if (t && t->vcpu == (__u64)vcpu && !t->exited)
		return t;
	if (!t || t->exited) {
		struct vcpu_thread fresh = {};

		bpf_map_update_elem(&vcpu_threads, &tid, &fresh, BPF_ANY);
		t = bpf_map_lookup_elem(&vcpu_threads, &tid);
		if (!t)
			return NULL;
	}
	t->vcpu = (__u64)vcpu;
	t->pid = pid;
	t->vcpu_id = vcpu_id_of(vcpu);
	if (KVM_BTF && bpf_core_field_exists(((struct kvm *)0)->dirty_ring_size))
		t->dirty_ring_size = BPF_CORE_READ(vcpu, kvm, dirty_ring_size);
	BPF_CORE_READ_STR_INTO(&t->comm, task, comm);
	return t;
}

/*
 * The struct kvm_vcpu behind file descriptor `fd` of the current task, or
 * NULL when the descriptor is not a KVM vCPU (its anon inode is named
 * "kvm-vcpu:<id>").
 */
static __always_inline struct kvm_vcpu *vcpu_of_fd(unsigned int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *file = NULL;
	const unsigned char *name;
	char prefix[9] = {};

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	name = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	if (bpf_probe_read_kernel(prefix, sizeof(prefix), name))
		return NULL;
	if (prefix[0] != 'k' || prefix[1] != 'v' || prefix[2] != 'm' || prefix[3] != '-' ||
	    prefix[4] != 'v' || prefix[5] != 'c' || prefix[6] != 'p' || prefix[7] != 'u' ||
	    prefix[8] != ':')
		return NULL;
	return BPF_CORE_READ(file, private_data);
}

/*
 * The clock of the run queue `t` is on (rq->clock, through its cfs_rq): the
 * clock the scheduler stamps enqueues and switches with. Plain loads from a
 * BTF-typed task (`btf`), probe reads otherwise. The BPF clock without group
 * scheduling (no se.cfs_rq); 0 if it cannot be read.
 */
static __always_inline __u64 rq_clock_of(bool btf, struct task_struct *t)
{
	struct cfs_rq *cfs;

	if (!bpf_core_field_exists(t->se.cfs_rq))
		return bpf_ktime_get_ns();
	cfs = btf ? t->se.cfs_rq : BPF_CORE_READ(t, se.cfs_rq);
	if (!cfs)
		return 0;
	return btf ? cfs->rq->clock : BPF_CORE_READ(cfs, rq, clock);
}

/* floor(log2(v)) for v > 0, 0 for 0: the bucket of a log2 histogram. */
static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFull) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

/*
 * The bucket of `v` in a log2 histogram of `slots` buckets, the last one
 * taking everything larger: an index the verifier can bound. Clamped with a
 * 64-bit compare on a 64-bit value: clang otherwise compares the 32-bit
 * log2 in a 32-bit register, and verifiers before Linux 6.12 lose the upper
 * half's bounds on the way (Debian's 5.10 and 6.1 refuse the index: "math
 * between map_value pointer and register with unbounded min value").
 */
static __always_inline __u64 hist_bucket(__u64 v, __u64 slots)
{
	__u64 b = log2_u64(v);

	barrier_var(b);
	if (b > slots - 1)
		b = slots - 1;
	return b;
}

#endif /* KVM_WATCHER_COMMON_BPF_H */
