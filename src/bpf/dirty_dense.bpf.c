/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * dirty's dense storage: per memslot place, arrays indexed by the page's
 * offset in the slot (rel_gfn) instead of a page hash.
 *
 * Used from dirty.bpf.c's hooks (kvm:kvm_dirty_ring_push, Linux 5.11+;
 * mark_page_dirty_in_slot by fentry or kprobe) on Linux 5.12+: the bitmap
 * needs BPF atomic OR. User space (src/monitors/dirty/dense.rs) makes the
 * storage when a slot appears in `dirty_slot_stats`, puts its maps at index
 * `sid` of the outer maps below, then enters the place and `sid` in
 * `dirty_slot_sids`. Until then, and for a slot that moved, pages go to
 * `dirty_counts` (the hash) and user space merges them.
 *
 * Per storage:
 *   dirty_bitmaps[sid]      1 bit per page: written since user space last
 *                           took the word (it swaps each word with 0, so a
 *                           page set between read and reset is never lost).
 *   dirty_page_counts[sid]  one u64 per page, only for --counts-file.
 *   dirty_sid_writes[sid]   logged writes, per CPU.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Dense storage is used (Linux 5.12+; set by user space). */
const volatile bool dirty_dense = false;
/* Keep a count per page in dense storage (--counts-file). */
const volatile bool dirty_dense_counts = false;

struct dirty_sid _dirty_sid = {};

/* Inner maps: user space creates them with the slot's size, these flags and types. */
struct dirty_words {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE | BPF_F_INNER_MAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, DIRTY_SIDS);
	__type(key, __u32);
	__array(values, struct dirty_words);
} dirty_bitmaps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, DIRTY_SIDS);
	__type(key, __u32);
	__array(values, struct dirty_words);
} dirty_page_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DIRTY_SIDS);
	__type(key, __u32);
	__type(value, __u64);
} dirty_sid_writes SEC(".maps");

/* Keyed by struct dirty_slot_key; written by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIRTY_SIDS);
	__type(key, struct dirty_slot_key);
	__type(value, struct dirty_sid);
} dirty_slot_sids SEC(".maps");

/*
 * Bumped whenever a page goes to the hash while dense storage is on: user
 * space looks for new slots (and pages to merge) when it changes.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dirty_slow SEC(".maps");

static __always_inline struct dirty_sid *dense_of(__u32 pid, __u32 slot)
{
	struct dirty_slot_key key = { .pid = pid, .slot = slot };

	if (!dirty_dense)
		return NULL;
	return bpf_map_lookup_elem(&dirty_slot_sids, &key);
}

/*
 * Counts one write to page `rel` of storage `d`. Returns false, having
 * written nothing, if the storage is not all there (the caller then counts
 * the page in the hash). `cas` is false in programs for kernels before 5.12,
 * which must not contain the atomic OR at all.
 */
static __always_inline bool count_dense(bool cas, struct dirty_sid *d, __u64 rel)
{
	__u32 sid, word, page = rel;
	void *bitmap, *counts = NULL;
	__u64 *w, *c = NULL, *writes, bit;

	if (!cas || !d || rel >= d->npages)
		return false;
	sid = d->sid;
	word = rel / 64;
	bitmap = bpf_map_lookup_elem(&dirty_bitmaps, &sid);
	if (!bitmap)
		return false;
	w = bpf_map_lookup_elem(bitmap, &word);
	writes = bpf_map_lookup_elem(&dirty_sid_writes, &sid);
	if (!w || !writes)
		return false;
	if (dirty_dense_counts) {
		counts = bpf_map_lookup_elem(&dirty_page_counts, &sid);
		if (!counts)
			return false;
		c = bpf_map_lookup_elem(counts, &page);
		if (!c)
			return false;
		__sync_fetch_and_add(c, 1);
	}
	bit = 1ull << (rel & 63);
	/* A page already marked costs a load, not a locked write. */
	if (!(*w & bit))
		__sync_fetch_and_or(w, bit);
	*writes += 1;
	return true;
}

/* Tells user space a page went to the hash. */
static __always_inline void note_slow(void)
{
	__u32 zero = 0;
	__u64 *n;

	if (!dirty_dense)
		return;
	n = bpf_map_lookup_elem(&dirty_slow, &zero);
	if (n)
		*n += 1;
}
