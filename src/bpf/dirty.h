/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The dirty monitor's records and map layouts: written by dirty.bpf.c and
 * dirty_dense.bpf.c, read by src/monitors/dirty/ through the generated
 * skeleton. Included by kvm_watcher.h after the shared types (struct
 * event_header, enum limits) it builds on.
 */
#ifndef KVM_WATCHER_DIRTY_H
#define KVM_WATCHER_DIRTY_H

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

#endif /* KVM_WATCHER_DIRTY_H */
