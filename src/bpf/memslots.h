/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Records of the memslot iterator (memslots.bpf.c), shared with user space
 * (src/memslots.rs) through the generated skeleton. Each record starts with
 * its kind in its first byte.
 */
#ifndef KVM_WATCHER_MEMSLOTS_H
#define KVM_WATCHER_MEMSLOTS_H

enum memslot_record_kind {
	/* A file of a VM: the records up to the next MEMSLOT_REC_FILE are its own. */
	MEMSLOT_REC_FILE = 1,
	/* One memslot of one address space. */
	MEMSLOT_REC_SLOT = 2,
	/* The end of an address space: how many slots it had, and whether all were read. */
	MEMSLOT_REC_END = 3,
};

/* Flags of a MEMSLOT_REC_FILE or MEMSLOT_REC_END record. */
enum memslot_flags {
	/* FILE: an earlier file of this pass shows the same VM; no slots follow. */
	MEMSLOTS_ALIAS = 1,
	/* END: the VM has more slots than the iterator reads for one file. */
	MEMSLOTS_TRUNCATED = 2,
	/* END: the memslots changed while they were read: read them again. */
	MEMSLOTS_CHANGED = 4,
};

enum memslot_limits {
	/* Address spaces read per VM (x86 has 2: normal and SMM). */
	MEMSLOT_MAX_AS = 2,
	/*
	 * Slots read per VM, all address spaces together: everything one file
	 * writes must fit in the iterator's 32 KiB buffer (bpf_seq_read()).
	 */
	MEMSLOT_MAX_PER_VM = 1000,
	/* Array layout (before 5.17): slots read per address space (5.10: 509 + 3 internal). */
	MEMSLOT_MAX_ARRAY = 512,
	/* Hash layout (5.17+): buckets of kvm_memslots.id_hash, and slots read per bucket. */
	MEMSLOT_HASH_BUCKETS = 128,
	MEMSLOT_MAX_CHAIN = 16,
};

/*
 * MEMSLOT_REC_FILE. `vm` numbers the distinct struct kvm of one pass
 * (0, 1, ...) in the order they were met: it tells the files of one VM from
 * those of another without showing a kernel address.
 */
struct memslot_file_record {
	__u8 kind;
	__u8 pad[3];
	__u32 flags; /* MEMSLOTS_ALIAS */
	__u32 pid;   /* process (tgid) holding the file */
	__u32 fd;    /* its file descriptor */
	__u32 vm;
	__u32 pad2;
};

/* MEMSLOT_REC_SLOT */
struct memslot_slot_record {
	__u8 kind;
	__u8 as_id;
	__u16 id;
	__u32 flags; /* KVM_MEM_* */
	__u64 base_gfn;
	__u64 npages;
	__u64 userspace_addr;
};

/* MEMSLOT_REC_END */
struct memslot_end_record {
	__u8 kind;
	__u8 as_id;
	__u16 pad;
	__u32 flags; /* MEMSLOTS_TRUNCATED, MEMSLOTS_CHANGED */
	__u32 count; /* slots read */
	__u32 pad2;
};

#endif /* KVM_WATCHER_MEMSLOTS_H */
