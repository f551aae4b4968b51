/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The exits monitor's records and map layouts: written by exits.bpf.c, read
 * by src/monitors/exits/ through the generated skeleton. Included by
 * kvm_watcher.h after the shared types (struct event_header, enum limits) it
 * builds on.
 */
#ifndef KVM_WATCHER_EXITS_H
#define KVM_WATCHER_EXITS_H

/* exits: which clock an exit's figures are of. */
enum exits_kind {
	EXITS_KVM = 0,	/* kvm:kvm_exit's reason; time in KVM until the next guest entry */
	EXITS_USER = 1, /* kvm:kvm_userspace_exit's reason; time in the VMM until the next KVM_RUN */
};

/*
 * What a user-space exit was about: for KVM_EXIT_IO the port in the exit's
 * own kvm_run (an IN's kvm_pio fires only once the VMM answered), else the
 * last kvm_pio (OUT) or kvm_mmio before it.
 */
enum exits_target_kind {
	EXITS_TARGET_NONE = 0,
	EXITS_TARGET_PIO = 1,  /* an I/O port */
	EXITS_TARGET_MMIO = 2, /* a guest-physical address */
};

/*
 * The reason of a user-space exit that failed: errno -EINTR is KVM_EXIT_INTR
 * (a signal or immediate_exit), other errors are EXITS_USER_ERROR + errno.
 */
#define EXITS_USER_ERROR 0x10000

/* Key of `exits_stats`: one reason of one vCPU thread. */
struct exits_key {
	__u32 tid;
	__u32 kind;   /* enum exits_kind */
	__u32 reason; /* kvm_exit: the vendor's exit code; user: KVM_EXIT_* */
	__u32 pad;
};

/* Value of `exits_stats`: cumulative, written only by that thread. */
struct exits_stats {
	__u32 pid;
	__s32 vcpu_id;
	__u64 count;	/* exits */
	__u64 timed;	/* exits whose end was seen (ns and hist count these) */
	__u64 ns;	/* total time until their end */
	__u64 max_ns[2]; /* per interval, indexed epoch & 1 */
	__u32 epoch[2];
	__u64 hist[EXITS_HIST_SLOTS]; /* log2 buckets of nanoseconds */
	char comm[TASK_COMM_LEN];
};

/* Value of `exits_threads`, keyed by thread id: the exits in progress. */
struct exits_thread {
	__u32 pid;
	__s32 vcpu_id;
	__u64 exit_at;	   /* kvm_exit seen, no guest entry yet; 0 otherwise */
	__u64 user_at;	   /* back in the VMM since, no KVM_RUN yet; 0 otherwise */
	__u32 reason;	   /* of the kvm_exit in progress */
	__u32 user_reason; /* of the user-space exit in progress */
	__u64 target;	   /* port or gpa of the last OUT or kvm_mmio in this KVM_RUN, or the exit's port */
	__u32 target_kind; /* enum exits_target_kind of `target` */
	__u32 user_target_kind; /* the user-space exit in progress was about `user_target` */
	__u64 user_target;
	__u64 vcpu;	   /* its struct kvm_vcpu, 0 while not known */
	char comm[TASK_COMM_LEN];
};

/* Key of `exits_targets`: an I/O port or guest-physical address one vCPU thread used. */
struct exits_target_key {
	__u32 tid;
	__u32 kind; /* enum exits_target_kind */
	__u64 addr; /* port, or guest-physical address */
};

struct exits_target {
	__u32 pid;
	__u32 writes;	 /* accesses that were writes */
	__u64 count;	 /* kvm_pio/kvm_mmio accesses (in-kernel devices too) */
	__u64 user_exits; /* of them, exits to the VMM */
	__u64 vmm_ns;	 /* time in the VMM for those, until the next KVM_RUN */
};

/* One exit, at its end (rows only). */
struct exits_event {
	struct event_header hdr;
	__u64 ns;	   /* its time in KVM (kind EXITS_KVM) or in the VMM (EXITS_USER) */
	__u32 kind;	   /* enum exits_kind */
	__u32 reason;
	__u64 target;	   /* user-space exits: port or gpa */
	__u32 target_kind; /* enum exits_target_kind */
	__u32 pad;
};

#endif /* KVM_WATCHER_EXITS_H */
