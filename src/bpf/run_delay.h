/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The run-delay monitor's records and map layouts: written by
 * run_delay.bpf.c, read by src/monitors/run_delay/ through the generated
 * skeleton. Included by kvm_watcher.h after the shared types (struct
 * event_header, enum limits) it builds on.
 */
#ifndef KVM_WATCHER_RUN_DELAY_H
#define KVM_WATCHER_RUN_DELAY_H

/* run-delay: why a vCPU thread became runnable without running. */
enum run_delay_cause {
	RUN_DELAY_WOKEN = 0,	 /* woken (e.g. a halted vCPU that got an interrupt) */
	RUN_DELAY_PREEMPTED = 1, /* switched out while still runnable */
	RUN_DELAY_CAUSES = 2,
};

/* One wait of a vCPU thread on a run queue, at its switch-in. */
struct run_delay_event {
	struct event_header hdr;
	__u64 delay_ns;	/* the wait by the wall clock, from the hook that saw it begin */
	__u64 sched_delay_ns; /* the kernel's sched_info figure of it (schedstat's clock) */
	__u32 cause;	/* enum run_delay_cause */
	__u32 cpu;	/* where it was switched in */
	__u32 prev_pid; /* the task that ran before it on that CPU */
	__u32 prev_tid;
	char prev_comm[TASK_COMM_LEN];
};

/*
 * Value of `run_delay_stats`, keyed by thread id: a vCPU thread's wait in
 * progress and its cumulative figures. Times are the scheduler's run-queue
 * clock. Where the kernel keeps sched_info (CONFIG_SCHED_INFO: the figures
 * of /proc/PID/task/TID/schedstat, and of the guest's steal time), switch-ins
 * and waiting time are the kernel's own, read at each switch-in; our own
 * stamps split them by cause and name the tasks that ran.
 */
struct run_delay_stats {
	__u32 pid;
	__s32 vcpu_id;
	__u64 queued_at;   /* when the wait in progress began (own stamp), 0 while not waiting */
	__u64 queued_wall; /* the same moment by CLOCK_MONOTONIC, 0 while not waiting */
	__u32 cause;	   /* of the wait in progress */
	__u32 sched_base;  /* 1 once sched_arrivals and sched_delay_ns hold the kernel's figures */
	__u64 sched_arrivals; /* the kernel's sched_info.pcount after the last switch-in seen */
	__u64 sched_delay_ns; /* the kernel's sched_info.run_delay likewise */
	__u64 switch_ins;  /* arrivals on a CPU (the kernel's count where it keeps one) */
	__u64 waits;	   /* switch-ins seen on sched_switch that ended a wait */
	__u64 delay_ns;	   /* total waiting time of the switch-ins (the kernel's, schedstat's) */
	/*
	 * The waits by cause, their length, the longest and the histogram are
	 * by the wall clock (CLOCK_MONOTONIC) from the hook that saw each wait
	 * begin to its switch-in; the kernel's clock (delay_ns) skips the time
	 * between a wake-up that preempts the running task and the switch,
	 * and charges it to the task preempted instead.
	 */
	__u64 cause_waits[RUN_DELAY_CAUSES];
	__u64 cause_ns[RUN_DELAY_CAUSES];
	__u64 unattributed_ns; /* waiting time no remembered slice covers */
	__u64 max_ns[2];   /* longest wait per interval, indexed epoch & 1 */
	__u32 epoch[2];
	__u64 hist[RUN_DELAY_HIST_SLOTS]; /* log2 buckets of microseconds */
	char comm[TASK_COMM_LEN];
};

/* One scheduler slice: who ran on a CPU from `start` (run-queue clock) on. */
struct run_delay_slice {
	__u64 start;
	__u32 pid;
	__u32 tid;
	char comm[TASK_COMM_LEN];
};

/* Value of the per-CPU `run_delay_cpu`: the CPU's last slices, a ring. */
struct run_delay_cpu {
	__u32 last; /* index of the slice running now */
	__u32 pad;
	struct run_delay_slice slice[RUN_DELAY_SLICES];
};

/* Key and value of `run_delay_culprits`: time a task ran while a vCPU waited for its CPU. */
struct run_delay_culprit_key {
	__u32 waiter; /* the waiting vCPU thread */
	__u32 tid;    /* the task that ran */
};

struct run_delay_culprit {
	__u64 ns;
	__u32 pid;
	__u32 pad;
	char comm[TASK_COMM_LEN];
};

#endif /* KVM_WATCHER_RUN_DELAY_H */
