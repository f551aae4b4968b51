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

/* kvm:kvm_vcpu_wakeup */
struct wakeup_event {
	struct event_header hdr;
	__u64 halt_ns;
	__u8 waited;
	__u8 valid;
	__u8 pad[6];
};

/* kvm:kvm_halt_poll_ns */
struct halt_poll_event {
	struct event_header hdr;
	__u32 old_ns;
	__u32 new_ns;
	__u8 grow;
	__u8 pad[7];
};

/* One dirtied guest page. */
struct dirty_event {
	struct event_header hdr;
	__u64 gfn;
	__u64 rel_gfn;
	__u64 npages;
	__u64 userspace_addr;
	__u32 slot_id; /* memslot id without the address-space bits */
	__u32 as_id;   /* address space (1 = SMM on x86) */
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
	__u64 hist[HALT_HIST_SLOTS];
	char comm[TASK_COMM_LEN];
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

/*
 * Key of `dirty_counts`: one guest page of one VM, in the memslot that held it.
 * Keyed by gfn, not by the offset in the slot: a VMM that deletes a slot and
 * reuses its id elsewhere (QEMU does, for ROMs and BARs) gets new pages.
 */
struct dirty_key {
	__u32 pid;
	__u32 slot; /* as_id << 16 | slot id, as KVM encodes it */
	__u64 gfn;  /* guest frame number */
};

/* Value of `dirty_counts`. */
struct dirty_count {
	__u64 count;   /* writes logged to this page since start */
	__u64 rel_gfn; /* gfn minus the memslot's base_gfn: kvm_dirty_ring_push's offset */
	__u32 epoch;   /* last summary interval this page was written in */
	__u32 pad;
};

/* Key and value of `dirty_slot_stats`: cumulative per-slot figures for --summary. */
struct dirty_slot_key {
	__u32 pid;
	__u32 slot;
};

struct dirty_slot_stats {
	__u64 writes;	     /* cumulative logged writes */
	__u64 distinct_total; /* pages first seen since start (exact while `dirty_counts` has room) */
	/* The slot as last seen (a reused slot id shows its latest place): */
	__u64 npages;
	__u64 base_gfn;
	__u64 userspace_addr;
	/* The tracepoint backend's memslots generation these were read at; 0 otherwise. */
	__u64 generation;
};

/*
 * Value of `dirty_slot_sids` (keyed like `dirty_slot_stats`): the dense
 * storage user space made for a slot at one place. Written by user space
 * once; the kernel only refreshes `generation`.
 */
struct dirty_sid {
	__u64 base_gfn;
	__u64 npages;
	__u64 generation; /* tracepoint backend: memslots generation the place was confirmed at */
	__u64 userspace_addr;
	__u32 sid;	  /* index in dirty_bitmaps, dirty_page_counts, dirty_sid_writes */
	__u32 pad;
};

/* Key of `dirty_epoch_pages`: distinct pages of a slot first written in interval `epoch`. */
struct dirty_epoch_key {
	__u32 pid;
	__u32 slot;
	__u32 epoch;
	__u32 pad;
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

/* Key of `vcpu_cpu_ns`: loaded time of one thread on one physical CPU. */
struct vcpu_cpu_key {
	__u32 tid;
	__u32 cpu;
};

/* run-delay: why a vCPU thread became runnable without running. */
enum run_delay_cause {
	RUN_DELAY_WOKEN = 0,	 /* woken (e.g. a halted vCPU that got an interrupt) */
	RUN_DELAY_PREEMPTED = 1, /* switched out while still runnable */
	RUN_DELAY_CAUSES = 2,
};

/* One wait of a vCPU thread on a run queue, at its switch-in. */
struct run_delay_event {
	struct event_header hdr;
	__u64 delay_ns;
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
	__u32 cause;	   /* of the wait in progress */
	__u32 sched_base;  /* 1 once sched_arrivals and sched_delay_ns hold the kernel's figures */
	__u64 sched_arrivals; /* the kernel's sched_info.pcount after the last switch-in seen */
	__u64 sched_delay_ns; /* the kernel's sched_info.run_delay likewise */
	__u64 switch_ins;  /* arrivals on a CPU (the kernel's count where it keeps one) */
	__u64 waits;	   /* switch-ins seen on sched_switch that ended a wait */
	__u64 delay_ns;	   /* total waiting time of the switch-ins */
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
	__s32 vcpu_fd;	   /* the descriptor KVM_RUN named `vcpu` by, -1 if none */
	__u32 pad;
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

#endif /* KVM_WATCHER_H */
