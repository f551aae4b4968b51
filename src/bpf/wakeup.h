/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The wake-up monitor's records and map layouts: written by wakeup.bpf.c,
 * read by src/monitors/wakeup/ through the generated skeleton. Included by
 * kvm_watcher.h after the shared types (struct event_header, enum limits) it
 * builds on.
 */
#ifndef KVM_WATCHER_WAKEUP_H
#define KVM_WATCHER_WAKEUP_H

/* kvm:kvm_vcpu_wakeup */
struct wakeup_event {
	struct event_header hdr;
	__u64 halt_ns;
	__u8 waited;
	__u8 valid;
	__u8 pad[6];
};

/* Value of `wakeup_stats`, keyed by thread id: cumulative, written only by that thread. */
struct wakeup_stats {
	__u32 pid;
	__s32 vcpu_id;
	__u64 vcpu_link; /* the vCPU's preempt-notifier link, 0 if not known (cache key) */
	__u64 wakeups;
	__u64 waited;	/* the thread slept (the others were caught by polling) */
	__u64 invalid;
	__u64 halt_ns;	/* sum of halt durations */
	/*
	 * CLOCK_MONOTONIC since which the halt in progress sleeps (the first
	 * switch-out inside it; for a halt that began before attach, the attach),
	 * 0 while no halt is in progress: user space charges it as it goes.
	 */
	__u64 halt_at;
	/*
	 * Of halt_ns, the time before attach of the halts that were in progress
	 * at attach (KVM reports a halt's whole duration at its end); seed_at is
	 * the attach while such a halt is in progress, 0 otherwise.
	 */
	__u64 before_attach_ns;
	__u64 seed_at;
	__u64 hist[HALT_HIST_SLOTS];
	char comm[TASK_COMM_LEN];
};

#endif /* KVM_WATCHER_WAKEUP_H */
