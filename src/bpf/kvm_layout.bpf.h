/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Reading KVM's own structures (struct kvm, its memslots, struct kvm_vcpu)
 * with CO-RE where KVM has BTF and at fixed offsets where it has none. No
 * maps and no globals, so any object can include it: the monitors' (through
 * common.bpf.h) and the memslot iterator's (memslots.bpf.c).
 */
#ifndef KVM_WATCHER_KVM_LAYOUT_BPF_H
#define KVM_WATCHER_KVM_LAYOUT_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define KVM_MEM_LOG_DIRTY_PAGES (1u << 0)

/*
 * Kernels whose KVM types are in no BTF at all (KVM built as a module without
 * module BTF, e.g. Debian 11's 5.10): CO-RE cannot relocate reads of
 * struct kvm_vcpu or struct kvm_memory_slot there (libbpf would poison them
 * and the load would fail), so every such read is guarded by KVM_BTF and the
 * dead branch is removed at load time. Without BTF these fixed x86-64
 * offsets are used; they hold for Linux 4.x up to 5.16 (the memslot layout
 * changed in 5.17), read off 5.10's kvm.ko: vcpu->vcpu_id at 0x24 in
 * kvm_vcpu_block(), memslot->base_gfn at 0, ->npages at 8,
 * ->userspace_addr at 0x48 and ->flags at 0x50 in gfn_to_hva_memslot(), and
 * ->id right after flags. struct kvm_vcpu has begun with `struct kvm *kvm;
 * struct preempt_notifier preempt_notifier;` since 2.6.23.
 *
 * The memslot tables, read off 5.10's gfn_to_memslot() and
 * kvm_vcpu_gfn_to_memslot(): kvm->memslots[as_id] at 0x30 + 8 * as_id, two
 * address spaces (`array_index_nospec(as_id, 2)`); in struct kvm_memslots
 * (5.7 to 5.16) the generation at 0, used_slots at 0x40c and the array
 * memslots[] at 0x410, of 0x58-byte struct kvm_memory_slot. The kernel
 * matrix (scripts/kernel-matrix) checks every one of them against ground
 * truth.
 */
#define KVM_BTF bpf_core_type_exists(struct kvm_vcpu)
#define NOBTF_VCPU_PREEMPT_NOTIFIER 8
#define NOBTF_VCPU_ID 0x24
#define NOBTF_SLOT_BASE_GFN 0
#define NOBTF_SLOT_NPAGES 8
#define NOBTF_SLOT_USERSPACE_ADDR 0x48
#define NOBTF_SLOT_FLAGS 0x50
#define NOBTF_SLOT_ID 0x54
#define NOBTF_SLOT_SIZE 0x58
#define NOBTF_KVM_MEMSLOTS 0x30
#define NOBTF_ADDRESS_SPACES 2
#define NOBTF_MEMSLOTS_GENERATION 0
#define NOBTF_MEMSLOTS_USED 0x40c
#define NOBTF_MEMSLOTS_ARRAY 0x410

/* Reads `size` bytes at `base + off` (fixed-offset reads without BTF). */
static __always_inline __u64 read_at(const void *base, __u32 off, __u32 size)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, size, base + off);
	return v;
}

/*
 * Memslot layout before Linux 5.17: an array (sorted by base_gfn, the first
 * `used_slots` entries in use) indexed through id_to_index[].
 */
struct kvm_memslots___old {
	short id_to_index[512];
	int used_slots;
	struct kvm_memory_slot memslots[];
} __attribute__((preserve_access_index));

/* The memslot layout for both the 5.17+ hash table and the older array. */
struct memslot_info {
	__u64 base_gfn;
	__u64 npages;
	__u64 userspace_addr;
};

static __always_inline int read_memslot(const struct kvm_memory_slot *ms, struct memslot_info *info)
{
	if (!ms)
		return -1;
	if (!KVM_BTF) {
		info->base_gfn = read_at(ms, NOBTF_SLOT_BASE_GFN, 8);
		info->npages = read_at(ms, NOBTF_SLOT_NPAGES, 8);
		info->userspace_addr = read_at(ms, NOBTF_SLOT_USERSPACE_ADDR, 8);
		return 0;
	}
	info->base_gfn = BPF_CORE_READ(ms, base_gfn);
	info->npages = BPF_CORE_READ(ms, npages);
	info->userspace_addr = BPF_CORE_READ(ms, userspace_addr);
	return 0;
}

/* The number of address spaces of a `struct kvm` (x86: 2 with SMM, else 1). */
static __always_inline __u32 address_spaces(void)
{
	if (!KVM_BTF)
		return NOBTF_ADDRESS_SPACES;
	return bpf_core_field_size(((struct kvm *)0)->memslots) / sizeof(void *);
}

/* The active memslots of address space `as_id` of `kvm`, or NULL. */
static __always_inline struct kvm_memslots *memslots_of(struct kvm *kvm, __u32 as_id)
{
	struct kvm_memslots *slots = NULL;
	__u64 off;

	if (as_id >= address_spaces() || as_id >= 4)
		return NULL;
	if (KVM_BTF)
		off = bpf_core_field_offset(kvm->memslots);
	else
		off = NOBTF_KVM_MEMSLOTS;
	if (bpf_probe_read_kernel(&slots, sizeof(slots), (void *)kvm + off + as_id * sizeof(void *)))
		return NULL;
	return slots;
}

/* The generation of memslots `slots` (odd bit 63: an update is in progress). */
static __always_inline __u64 memslots_generation(struct kvm_memslots *slots)
{
	if (!KVM_BTF)
		return read_at(slots, NOBTF_MEMSLOTS_GENERATION, 8);
	return BPF_CORE_READ(slots, generation);
}

#endif /* KVM_WATCHER_KVM_LAYOUT_BPF_H */
