/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Types shared by the BPF programs and kvm-watcher's user space. User space
 * never copies these layouts by hand: every type here is referenced by a
 * global in kvm_watcher.bpf.c, so libbpf-cargo emits it into the generated
 * skeleton (`crate::bpf::types`).
 */
#ifndef KVM_WATCHER_H
#define KVM_WATCHER_H

#define TASK_COMM_LEN 16

/*
 * Which monitor a record or counter belongs to. Each monitor's Rust half
 * takes its kind from the skeleton (`types::monitor_kind`).
 */
enum monitor_kind {
	MONITOR_WAKEUP = 0,
	MONITOR_HALT_POLL = 1,
	MONITOR_DIRTY = 2,
	MONITOR_VCPU_LOAD = 3,
	MONITOR_RUN_DELAY = 4,
	MONITOR_EXITS = 5,
	/* dirty-rate samples guest memory from user space: no program, no record. */
	MONITOR_DIRTY_RATE = 6,
	MONITOR_COUNT = 7,
};

/* Per-CPU, per-monitor counters (array map `counters`, index = monitor_kind). */
struct monitor_counters {
	__u64 events;	      /* records that passed the filters and reached the ring buffer */
	__u64 lost;	      /* records dropped because the ring buffer was full; in summaries,
			       * events whose per-thread entry could not be made */
	__u64 map_full;	      /* dirty pages not counted because `dirty_counts` was full */
	__u64 unknown_vcpu;   /* events whose thread had no known vCPU */
};

/* Fields every ring-buffer record starts with. */
struct event_header {
	__u32 kind; /* enum monitor_kind */
	__u32 pid;  /* VMM process (tgid) */
	__u32 tid;  /* vCPU thread */
	__s32 vcpu_id; /* -1 when unknown */
	__u64 time_ns; /* CLOCK_MONOTONIC */
	char comm[TASK_COMM_LEN];
};

/*
 * Sizes both halves share. An enum, not #defines, so that the skeleton
 * carries them to user space (`types::limits`).
 */
enum limits {
	/*
	 * Buckets of the halt-duration histogram, in microseconds: bucket 0
	 * counts halts under 2 us, bucket i > 0 halts of [2^i, 2^(i+1)) us.
	 */
	HALT_HIST_SLOTS = 40,
	/* Buckets of the run-delay histogram, in microseconds, like the halt histogram. */
	RUN_DELAY_HIST_SLOTS = 40,
	/* Scheduler slices each CPU remembers to name who ran while a vCPU waited (a power of 2). */
	RUN_DELAY_SLICES = 64,
	/* Bytes of run-delay's per-thread marks (a power of 2; src/bpf/run_delay.bpf.c). */
	RUN_DELAY_MARKS = 65536,
	/*
	 * Buckets of the exit-latency histogram, in nanoseconds (exits are
	 * often handled in under 2 us): bucket 0 counts under 2 ns, bucket
	 * i > 0 [2^i, 2^(i+1)) ns.
	 */
	EXITS_HIST_SLOTS = 40,
	/*
	 * Dense dirty storages (one per memslot place) the kernel can index:
	 * entries of dirty_bitmaps, dirty_page_counts and dirty_sid_writes.
	 */
	DIRTY_SIDS = 1024,
};

/*
 * Value of `vcpu_threads`, keyed by thread id: who the thread is, and its
 * load/put accounting. Only the thread itself writes its entry.
 */
struct vcpu_thread {
	__u64 vcpu;	   /* struct kvm_vcpu * (identity only, never dereferenced by user space) */
	__u32 pid;
	__s32 vcpu_id;
	__u32 in_ioctl;	   /* inside a vCPU ioctl (tracepoint-derived load/put) */
	__u32 loaded_cpu;  /* CPU of the last load: the one it is loaded on while loaded_at != 0 */
	__u32 exited;	   /* the thread has exited; user space reports it once more, then deletes it */
	__u32 dirty_ring_size; /* its VM's dirty ring size in bytes, 0 without a dirty ring */
	__u64 loaded_at;   /* CLOCK_MONOTONIC of the last load, 0 while put */
	__u64 count;	   /* cumulative load->put pairs */
	__u64 total_ns;	   /* cumulative loaded time */
	__u64 max_ns[2];   /* per interval, indexed epoch & 1 */
	__u64 min_ns[2];
	__u32 epoch[2];
	char comm[TASK_COMM_LEN];
	/*
	 * Odd while vcpu-load updates the pair fields and vcpu_cpu_ns: user space
	 * reads both between two equal, even values for a consistent snapshot.
	 */
	__u32 seq;
	__u32 cpu_known;   /* loaded_cpu holds the CPU of a load seen since attach */
	/*
	 * Cumulative loads on another CPU than the load before (KVM's own test
	 * for a vCPU that moved: vcpu->cpu != cpu in kvm_arch_vcpu_load()).
	 */
	__u64 cpu_migrations;
};

/*
 * Each monitor's own records and map layouts, in its own header (as
 * memslots.h holds the memslot iterator's).
 */
#include "wakeup.h"
#include "halt_poll.h"
#include "dirty.h"
#include "vcpu_load.h"
#include "run_delay.h"
#include "exits.h"

#endif /* KVM_WATCHER_H */
