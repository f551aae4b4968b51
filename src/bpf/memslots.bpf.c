/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * `kvm-watcher vms --slots`: the memslots of every VM, read from KVM.
 *
 * iter/task_file (BPF task-file iterator, Linux 5.8+): one run visits every
 * open file of every process (threads that share their leader's file table
 * are skipped by the kernel). A file is a VM when it is an anonymous inode
 * named "kvm-vm" (what KVM_CREATE_VM returns); its private_data is the
 * struct kvm, whose active memslots of each address space are written out:
 * the 5.17+ hash table (id_hash, node_idx) or the older array (memslots[],
 * used_slots), with CO-RE where KVM has BTF and the fixed offsets of
 * kvm_layout.bpf.h where it has none (Debian 11's 5.10).
 *
 * Two programs, one loaded: list_memslots_loop walks the hash table's
 * buckets under bpf_loop() (Linux 5.17+, as is the hash table), so the
 * verifier checks one bucket instead of all of them; list_memslots, for
 * kernels without bpf_loop() (the array), has a bounded loop only.
 *
 * Nothing locks the memslots here (KVM readers hold kvm->srcu): each
 * address space's generation and table pointer are read before and after,
 * and a change is flagged so that user space reads again.
 *
 * Loaded on its own (its own skeleton), so listing memslots loads nothing
 * else. User space: src/memslots.rs.
 */
#include "kvm_layout.bpf.h"
#include "memslots.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ANON_INODE_FS_MAGIC 0x09041934

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct memslot_file_record _memslot_file_record = {};
struct memslot_slot_record _memslot_slot_record = {};
struct memslot_end_record _memslot_end_record = {};
enum memslot_record_kind _memslot_record_kind = MEMSLOT_REC_FILE;
enum memslot_flags _memslot_flags = MEMSLOTS_ALIAS;
enum memslot_limits _memslot_limits = MEMSLOT_MAX_AS;

/* The VM number of each struct kvm met in this pass (cleared by user space). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} vm_numbers SEC(".maps");

/* Distinct VMs met in this pass (reset by user space). */
__u32 next_vm = 0;
/*
 * Slots written for the current file. Kept in memory rather than in a
 * register: the verifier does not track it, so paths that read different
 * numbers of slots are recognised as equivalent instead of multiplying.
 */
__u32 slots_written = 0;

/* An anonymous inode named "kvm-vm": a file KVM_CREATE_VM returned. */
static __always_inline bool is_vm_file(struct file *file)
{
	const unsigned char *name = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	char n[8] = {};

	if (BPF_CORE_READ(file, f_inode, i_sb, s_magic) != ANON_INODE_FS_MAGIC)
		return false;
	if (bpf_probe_read_kernel(n, sizeof(n) - 1, name))
		return false;
	return n[0] == 'k' && n[1] == 'v' && n[2] == 'm' && n[3] == '-' && n[4] == 'v' &&
	       n[5] == 'm' && n[6] == 0;
}

/* Writes slot `ms` of address space `as_id`, unless the per-VM budget is spent. */
static __always_inline void write_slot(struct seq_file *seq, const void *ms, __u32 as_id)
{
	struct memslot_slot_record rec = { .kind = MEMSLOT_REC_SLOT, .as_id = as_id };
	struct memslot_info info;

	if (slots_written >= MEMSLOT_MAX_PER_VM)
		return;
	if (read_memslot(ms, &info))
		return;
	rec.base_gfn = info.base_gfn;
	rec.npages = info.npages;
	rec.userspace_addr = info.userspace_addr;
	if (KVM_BTF) {
		const struct kvm_memory_slot *slot = ms;

		rec.flags = BPF_CORE_READ(slot, flags);
		rec.id = (__u16)BPF_CORE_READ(slot, id);
	} else {
		rec.flags = read_at(ms, NOBTF_SLOT_FLAGS, 4);
		rec.id = (__u16)read_at(ms, NOBTF_SLOT_ID, 2);
	}
	bpf_seq_write(seq, &rec, sizeof(rec));
	slots_written++;
}

/* One address space's walk of id_hash, bucket by bucket under bpf_loop(). */
struct hash_walk {
	struct seq_file *seq;
	void *heads;
	__u64 node_off;
	__u32 as_id;
	__u32 flags;
};

static long write_bucket(__u64 b, void *data)
{
	struct hash_walk *w = data;
	struct hlist_node *node = NULL;

	if (b >= MEMSLOT_HASH_BUCKETS)
		return 1;
	bpf_probe_read_kernel(&node, sizeof(node), w->heads + b * sizeof(struct hlist_head));
	for (__u32 j = 0; j < MEMSLOT_MAX_CHAIN && node; j++) {
		write_slot(w->seq, (void *)node - w->node_off, w->as_id);
		node = BPF_CORE_READ(node, next);
	}
	if (node)
		w->flags |= MEMSLOTS_TRUNCATED;
	return 0;
}

/*
 * 5.17+: every slot of the hash table id_hash, through id_node[node_idx],
 * the buckets under bpf_loop() (5.17+ too): the verifier checks one bucket.
 * (As bounded loops over 128 buckets of each address space, Debian's 6.1 and
 * 6.12 refused the program as too large.)
 */
static __always_inline __u32 write_hashed_slots(struct seq_file *seq, struct kvm_memslots *slots,
						__u32 as_id)
{
	int node_idx = BPF_CORE_READ(slots, node_idx);
	struct hash_walk w = {
		.seq = seq,
		.heads = (void *)slots + bpf_core_field_offset(slots->id_hash),
		.node_off = bpf_core_field_offset(struct kvm_memory_slot, id_node) +
			    (node_idx & 1) * sizeof(struct hlist_node),
		.as_id = as_id,
	};

	bpf_loop(MEMSLOT_HASH_BUCKETS, write_bucket, &w, 0);
	return w.flags;
}

/* Before 5.17: the first used_slots entries of the array memslots[]. */
static __always_inline __u32 write_array_slots(struct seq_file *seq, struct kvm_memslots *slots,
					       __u32 as_id)
{
	struct kvm_memslots___old *old = (void *)slots;
	__u64 used, size;
	void *array;

	if (KVM_BTF) {
		used = (__u32)BPF_CORE_READ(old, used_slots);
		array = (void *)old + bpf_core_field_offset(old->memslots);
		size = bpf_core_type_size(struct kvm_memory_slot);
	} else {
		used = (__u32)read_at(slots, NOBTF_MEMSLOTS_USED, 4);
		array = (void *)slots + NOBTF_MEMSLOTS_ARRAY;
		size = NOBTF_SLOT_SIZE;
	}
	for (__u32 i = 0; i < MEMSLOT_MAX_ARRAY; i++) {
		if (i >= used)
			break;
		write_slot(seq, array + i * size, as_id);
	}
	return used > MEMSLOT_MAX_ARRAY ? MEMSLOTS_TRUNCATED : 0;
}

/*
 * Every slot of address space `as_id` of `kvm`, then its end record.
 * `with_loop` (a constant): the program may call bpf_loop(), which the hash
 * table needs.
 */
static __always_inline void write_address_space(struct seq_file *seq, struct kvm *kvm, __u32 as_id,
						bool with_loop)
{
	struct memslot_end_record end = { .kind = MEMSLOT_REC_END, .as_id = as_id };
	struct kvm_memslots *slots = memslots_of(kvm, as_id);
	__u32 before = slots_written;
	__u64 generation;

	if (slots) {
		generation = memslots_generation(slots);
		if (KVM_BTF && bpf_core_field_exists(slots->id_hash))
			/* The hash table without bpf_loop() (no mainline kernel): shown as truncated. */
			end.flags = with_loop ? write_hashed_slots(seq, slots, as_id)
					      : MEMSLOTS_TRUNCATED;
		else
			end.flags = write_array_slots(seq, slots, as_id);
		/* Bit 63 of the generation: KVM is installing these slots. */
		if (memslots_of(kvm, as_id) != slots || memslots_generation(slots) != generation ||
		    generation >> 63)
			end.flags |= MEMSLOTS_CHANGED;
	}
	if (slots_written >= MEMSLOT_MAX_PER_VM)
		end.flags |= MEMSLOTS_TRUNCATED;
	end.count = slots_written - before;
	bpf_seq_write(seq, &end, sizeof(end));
}

/* One file: a VM's slots, or a note that an earlier file showed its VM. */
static __always_inline int write_file(struct bpf_iter__task_file *ctx, bool with_loop)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct memslot_file_record rec = { .kind = MEMSLOT_REC_FILE };
	struct kvm *kvm;
	__u64 key;
	__u32 *known;

	if (!task || !file || !is_vm_file(file))
		return 0;
	kvm = BPF_CORE_READ(file, private_data);
	if (!kvm)
		return 0;
	rec.pid = BPF_CORE_READ(task, tgid);
	rec.fd = ctx->fd;
	key = (__u64)kvm;
	known = bpf_map_lookup_elem(&vm_numbers, &key);
	if (known) {
		rec.vm = *known;
		rec.flags = MEMSLOTS_ALIAS;
		bpf_seq_write(seq, &rec, sizeof(rec));
		return 0;
	}
	rec.vm = next_vm++;
	bpf_map_update_elem(&vm_numbers, &key, &rec.vm, BPF_NOEXIST);
	bpf_seq_write(seq, &rec, sizeof(rec));
	slots_written = 0;
	for (__u32 as_id = 0; as_id < MEMSLOT_MAX_AS; as_id++) {
		if (as_id >= address_spaces())
			break;
		write_address_space(seq, kvm, as_id, with_loop);
	}
	return 0;
}

/*
 * Linux 5.17+ (bpf_loop, and the hash table): user space loads this one
 * first, and list_memslots where the kernel refuses it.
 */
SEC("iter/task_file")
int list_memslots_loop(struct bpf_iter__task_file *ctx)
{
	return write_file(ctx, true);
}

/* Linux 5.8 to 5.16 (the array; no bpf_loop): a bounded loop only. */
SEC("iter/task_file")
int list_memslots(struct bpf_iter__task_file *ctx)
{
	return write_file(ctx, false);
}
