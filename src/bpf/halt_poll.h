/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The halt-poll monitor's records and map layouts: written by
 * halt_poll.bpf.c, read by src/monitors/halt_poll/ through the generated
 * skeleton. Included by kvm_watcher.h after the shared types (struct
 * event_header, enum limits) it builds on.
 */
#ifndef KVM_WATCHER_HALT_POLL_H
#define KVM_WATCHER_HALT_POLL_H

/* kvm:kvm_halt_poll_ns */
struct halt_poll_event {
	struct event_header hdr;
	__u32 old_ns;
	__u32 new_ns;
	__u8 grow;
	__u8 pad[7];
};

/* Value of `halt_poll_stats`, keyed by thread id: cumulative, written only by that thread. */
struct halt_poll_stats {
	__u32 pid;
	__s32 vcpu_id;
	__u64 grows;
	__u64 shrinks;
	__u64 window_ns; /* the window after the last change */
	char comm[TASK_COMM_LEN];
};

#endif /* KVM_WATCHER_HALT_POLL_H */
