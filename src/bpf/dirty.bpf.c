/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * dirty: guest pages written while KVM logs dirty pages.
 *
 * Every page is first counted in the kernel, exactly, whether or not the
 * ring buffer has room; only then, if the user asked for rows, a record is
 * reserved. On Linux 5.12+ a page of a slot that has dense storage
 * (dirty_dense.bpf.c) is counted there; other pages are counted in the
 * `dirty_counts` hash (atomic add, keyed by pid, slot and gfn).
 *
 * Backends (user space picks one, see BACKENDS in src/monitors/dirty/mod.rs):
 *   fentry     mark_page_dirty_in_slot(kvm, memslot, gfn)  Linux 5.16+;
 *              (memslot, gfn) before. Only slots with KVM_MEM_LOG_DIRTY_PAGES.
 *   kprobe     the same function.
 *   tracepoint kvm:kvm_dirty_ring_push(ring, slot, offset), Linux 5.11+, fires
 *              only for VMs that use the dirty ring. The memslot is resolved
 *              from the ring's vCPU -> kvm -> memslots with CO-RE.
 *
 * Compiled as part of kvm_watcher.bpf.c.
 */

/* Configuration, set by user space before load. */
/* Stream one ring-buffer record per logged write. */
const volatile bool stream_dirty = false;
/* Count dirty pages per (pid, slot, page in the slot) and per slot in the kernel. */
const volatile bool count_dirty = false;
/*
 * --summary: track distinct pages per interval (needs BPF cmpxchg, Linux 5.12+;
 * without it only cumulative per-page and per-slot counts are kept).
 */
const volatile bool dirty_summary = false;
/* mark_page_dirty_in_slot() takes `struct kvm *` first since Linux 5.16. */
const volatile bool mark_dirty_has_kvm = true;

/* Never used by a program: make the skeleton carry these layouts to user space. */
struct dirty_event _dirty_event = {};
struct dirty_key _dirty_key = {};
struct dirty_count _dirty_count = {};
struct dirty_slot_key _dirty_slot_key = {};
struct dirty_slot_stats _dirty_slot_stats = {};
struct dirty_epoch_key _dirty_epoch_key = {};

/* Resized by user space (--max-pages); allocated as pages are first seen. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dirty_key);
	__type(value, struct dirty_count);
} dirty_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct dirty_slot_key);
	__type(value, struct dirty_slot_stats);
} dirty_slot_stats SEC(".maps");

/* --summary: user space reads an interval's entries after it ends, then deletes them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct dirty_epoch_key);
	__type(value, __u64);
} dirty_epoch_pages SEC(".maps");

/* The memslot `id` of `slots`, or NULL. */
static __always_inline const struct kvm_memory_slot *memslot_by_id(struct kvm_memslots *slots,
								   __u32 id)
{
	if (!slots)
		return NULL;

	if (bpf_core_field_exists(slots->id_hash)) {
		/* 5.17+: DECLARE_HASHTABLE(id_hash, 7), hash_32(id, 7). */
		__u32 bits = 7, bucket = (id * 0x61C88647u) >> (32 - bits);
		int node_idx = BPF_CORE_READ(slots, node_idx);
		__u64 node_off = bpf_core_field_offset(struct kvm_memory_slot, id_node) +
				 (node_idx & 1) * sizeof(struct hlist_node);
		struct hlist_node *node = NULL;

		bpf_probe_read_kernel(&node, sizeof(node),
				      (void *)slots + bpf_core_field_offset(slots->id_hash) +
					      bucket * sizeof(struct hlist_head));
		for (int i = 0; i < 8 && node; i++) {
			const struct kvm_memory_slot *ms = (void *)node - node_off;

			if ((__u32)BPF_CORE_READ(ms, id) == id)
				return ms;
			node = BPF_CORE_READ(node, next);
		}
		return NULL;
	} else {
		struct kvm_memslots___old *old = (void *)slots;
		short idx = -1;

		if (id >= 512)
			return NULL;
		bpf_probe_read_kernel(&idx, sizeof(idx),
				      (void *)old + bpf_core_field_offset(old->id_to_index) +
					      id * sizeof(short));
		if (idx < 0 || idx >= 512)
			return NULL;
		return (void *)old + bpf_core_field_offset(old->memslots) +
		       idx * bpf_core_type_size(struct kvm_memory_slot);
	}
}

/*
 * `cas` is a compile-time constant: false in programs for kernels before 5.12,
 * whose verifier rejects any BPF atomic other than a plain add ("BPF_STX uses
 * reserved fields") even in code that can never run, so those programs must
 * not contain the --summary compare-and-swap at all.
 */
/*
 * Counts one write to page `v` (NULL: `dirty_counts` is full) of slot `s`
 * (NULL: `dirty_slot_stats` is full); `e` is the summary interval read before
 * any new entry was made.
 */
static __always_inline void count_write(bool cas, __u32 pid, __u32 slot, __u32 e,
					struct dirty_count *v, struct dirty_slot_stats *s,
					bool new_page)
{
	bool first_in_epoch = false;

	if (v) {
		__sync_fetch_and_add(&v->count, 1);
		if (cas && dirty_summary) {
			/* Exactly one writer moves the page into this interval. */
			__u32 seen = v->epoch;

			first_in_epoch = seen != e &&
					 __sync_val_compare_and_swap(&v->epoch, seen, e) == seen;
		}
	} else {
		struct monitor_counters *c = counters_of(MONITOR_DIRTY);

		if (c)
			c->map_full++;
	}
	if (s) {
		__sync_fetch_and_add(&s->writes, 1);
		if (new_page)
			__sync_fetch_and_add(&s->distinct_total, 1);
	}
	if (first_in_epoch) {
		struct dirty_epoch_key ekey = { .pid = pid, .slot = slot, .epoch = e };
		__u64 *distinct = bpf_map_lookup_elem(&dirty_epoch_pages, &ekey);

		if (!distinct) {
			__u64 zero = 0;

			bpf_map_update_elem(&dirty_epoch_pages, &ekey, &zero, BPF_NOEXIST);
			distinct = bpf_map_lookup_elem(&dirty_epoch_pages, &ekey);
		}
		if (distinct)
			__sync_fetch_and_add(distinct, 1);
	}
}

/*
 * The common case of the summary: page and slot already known. Counts the
 * write and returns true without walking to the memslot (that walk costs
 * about as much as everything else here): while the memslots `generation`
 * is the one the slot's place was read at, base_gfn + rel_gfn is the page.
 * Returns false if either entry is missing or any memslot changed since.
 */
static __always_inline bool count_known_page(__u32 pid, __u32 slot, __u64 rel_gfn, __u64 generation)
{
	struct dirty_slot_key skey = { .pid = pid, .slot = slot };
	struct dirty_slot_stats *s = bpf_map_lookup_elem(&dirty_slot_stats, &skey);
	struct dirty_key key = { .pid = pid, .slot = slot };
	struct dirty_count *v;
	__u32 e = epoch;

	/* The slot's place is known only while no memslot changed since it was read. */
	if (!s || s->generation != generation)
		return false;
	barrier(); /* generation before base_gfn: see refresh_slot() */
	key.gfn = s->base_gfn + rel_gfn;
	v = bpf_map_lookup_elem(&dirty_counts, &key);
	if (!v)
		return false;
	count_write(true, pid, slot, e, v, s, false);
	return true;
}

/*
 * Brings slot totals `s` up to the slot's current place. Writers store the
 * place before the generation, readers load the generation first (x86 keeps
 * stores and loads in order), so a matching generation vouches for base_gfn.
 */
static __always_inline void refresh_slot(struct dirty_slot_stats *s, const struct memslot_info *info,
					 __u64 generation)
{
	if (s->generation == generation && s->base_gfn == info->base_gfn &&
	    s->npages == info->npages && s->userspace_addr == info->userspace_addr)
		return;
	s->generation = 0;
	barrier();
	s->npages = info->npages;
	s->base_gfn = info->base_gfn;
	s->userspace_addr = info->userspace_addr;
	barrier();
	s->generation = generation;
}

/* `generation`: the memslots generation `info` was read at (tracepoint backend), else 0. */
static __always_inline void count_dirty_page(bool cas, __u32 pid, __u32 slot, __u64 gfn, __u64 rel_gfn,
					     const struct memslot_info *info, __u64 generation)
{
	struct dirty_key key = { .pid = pid, .slot = slot, .gfn = gfn };
	struct dirty_slot_key skey = { .pid = pid, .slot = slot };
	struct dirty_count *v;
	struct dirty_slot_stats *s;
	__u32 e = epoch;
	bool new_page = false;

	v = bpf_map_lookup_elem(&dirty_counts, &key);
	if (!v) {
		struct dirty_count fresh = { .rel_gfn = rel_gfn, .epoch = e - 1 };

		/* Only one CPU's insert of a page succeeds: that one counts it as new. */
		new_page = bpf_map_update_elem(&dirty_counts, &key, &fresh, BPF_NOEXIST) == 0;
		v = bpf_map_lookup_elem(&dirty_counts, &key);
	}
	s = bpf_map_lookup_elem(&dirty_slot_stats, &skey);
	if (!s) {
		struct dirty_slot_stats fresh = {
			.npages = info->npages,
			.base_gfn = info->base_gfn,
			.userspace_addr = info->userspace_addr,
			.generation = generation,
		};

		bpf_map_update_elem(&dirty_slot_stats, &skey, &fresh, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&dirty_slot_stats, &skey);
	} else {
		refresh_slot(s, info, generation);
	}
	count_write(cas, pid, slot, e, v, s, new_page);
}

/* Counts, then streams, one dirtied page. `slot` is as_id << 16 | id. */
/* `d`: the slot's dense storage if the caller looked it up already, else NULL. */
static __always_inline void on_dirty_page(bool cas, __s32 vcpu_id, __u32 slot, __u64 rel_gfn,
					  const struct memslot_info *info, __u64 generation,
					  struct dirty_sid *d)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	__u64 gfn = info->base_gfn + rel_gfn;
	struct dirty_event *e;

	if (!passes_filters(pid, tid, vcpu_id))
		return;
	if (count_dirty) {
		if (!d)
			d = dense_of(pid, slot);
		if (d && d->base_gfn == info->base_gfn && d->npages == info->npages &&
		    d->userspace_addr == info->userspace_addr && count_dense(cas, d, rel_gfn)) {
			/* The place is confirmed at this generation: the fast path may trust it. */
			if (generation && d->generation != generation)
				d->generation = generation;
		} else {
			count_dirty_page(cas, pid, slot, gfn, rel_gfn, info, generation);
			note_slow();
		}
	}
	if (!stream_dirty) {
		struct monitor_counters *c = counters_of(MONITOR_DIRTY);

		/* Without rows, counted pages are the events. */
		if (c)
			c->events++;
		return;
	}
	e = reserve_event(MONITOR_DIRTY, sizeof(*e));
	if (!e)
		return;
	fill_header(&e->hdr, MONITOR_DIRTY, pid, tid, vcpu_id);
	e->gfn = gfn;
	e->rel_gfn = rel_gfn;
	e->npages = info->npages;
	e->userspace_addr = info->userspace_addr;
	e->slot_id = slot & 0xffff;
	e->as_id = slot >> 16;
	submit_event(&e->hdr);
}

/* kvm:kvm_dirty_ring_push(ring, slot, offset) (raw tracepoint, Linux 5.11+) */
SEC("raw_tp/kvm_dirty_ring_push")
int BPF_PROG(tp_dirty_ring_push, struct kvm_dirty_ring *ring, __u32 slot, __u64 offset)
{
	/* Every dirty ring is embedded in its vCPU. */
	struct kvm_vcpu *vcpu =
		(void *)ring - bpf_core_field_offset(struct kvm_vcpu, dirty_ring);
	struct kvm_memslots *slots = memslots_of(BPF_CORE_READ(vcpu, kvm), slot >> 16);
	__u64 generation, pid_tgid;
	__u32 pid;
	struct memslot_info info;
	struct dirty_sid *d;

	if (!slots)
		return 0;
	generation = BPF_CORE_READ(slots, generation);
	pid_tgid = bpf_get_current_pid_tgid();
	pid = pid_tgid >> 32;
	d = count_dirty ? dense_of(pid, slot) : NULL;
	if (d && d->generation == generation) {
		/*
		 * The slot's place, confirmed at this generation, is in its dense
		 * storage entry: no memslot walk, for summaries or rows.
		 */
		if (!stream_dirty && filter_vcpu < 0) {
			struct monitor_counters *c;

			if (!passes_filters(pid, (__u32)pid_tgid, -1))
				return 0;
			if (count_dense(true, d, offset)) {
				c = counters_of(MONITOR_DIRTY);
				if (c)
					c->events++;
				return 0;
			}
		}
		info.base_gfn = d->base_gfn;
		info.npages = d->npages;
		info.userspace_addr = d->userspace_addr;
	} else {
		/*
		 * Summary without dense storage for the slot: a page seen before,
		 * in a slot that has not moved since, needs neither the memslot
		 * walk nor the vCPU id.
		 */
		if (!d && count_dirty && !stream_dirty && filter_vcpu < 0) {
			struct monitor_counters *c;

			if (!passes_filters(pid, (__u32)pid_tgid, -1))
				return 0;
			if (count_known_page(pid, slot, offset, generation)) {
				c = counters_of(MONITOR_DIRTY);
				if (c)
					c->events++;
				return 0;
			}
		}
		if (read_memslot(memslot_by_id(slots, slot & 0xffff), &info))
			return 0;
	}
	on_dirty_page(true, BPF_CORE_READ(vcpu, vcpu_id), slot, offset, &info, generation, d);
	return 0;
}

static __always_inline void on_mark_page_dirty(bool cas, const struct kvm_memory_slot *ms, __u64 gfn)
{
	struct memslot_info info;
	__u32 slot, flags, id, as_id = 0;

	if (!ms)
		return;
	if (KVM_BTF) {
		flags = BPF_CORE_READ(ms, flags);
		id = (__u16)BPF_CORE_READ(ms, id);
		if (bpf_core_field_exists(ms->as_id))
			as_id = BPF_CORE_READ(ms, as_id);
	} else {
		/* Before 5.11 memslots carry no as_id: address space 0 is assumed. */
		flags = read_at(ms, NOBTF_SLOT_FLAGS, 4);
		id = (__u16)read_at(ms, NOBTF_SLOT_ID, 2);
	}
	if (!(flags & KVM_MEM_LOG_DIRTY_PAGES))
		return;
	if (read_memslot(ms, &info))
		return;
	slot = as_id << 16 | id;
	on_dirty_page(cas, current_vcpu_id((__u32)bpf_get_current_pid_tgid()), slot, gfn - info.base_gfn,
		      &info, 0, NULL);
}

SEC("fentry/mark_page_dirty_in_slot")
int BPF_PROG(fentry_mark_page_dirty)
{
	/* Read the arguments by position: their number changed in 5.16. */
	if (mark_dirty_has_kvm)
		on_mark_page_dirty(true, (void *)ctx[1], ctx[2]);
	else
		on_mark_page_dirty(true, (void *)ctx[0], ctx[1]);
	return 0;
}

SEC("kprobe/mark_page_dirty_in_slot")
int BPF_KPROBE(kprobe_mark_page_dirty)
{
	if (mark_dirty_has_kvm)
		on_mark_page_dirty(true, (void *)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
	else
		on_mark_page_dirty(true, (void *)PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
	return 0;
}

/*
 * The kprobe for kernels before 5.12 (no BPF compare-and-swap, so no
 * --summary there): the kprobe backend's quirk (src/monitors/dirty/mod.rs) picks it instead of kprobe_mark_page_dirty.
 * mark_page_dirty_in_slot() took (memslot, gfn) then.
 */
SEC("kprobe/mark_page_dirty_in_slot")
int BPF_KPROBE(kprobe_mark_page_dirty_nocas)
{
	if (mark_dirty_has_kvm)
		on_mark_page_dirty(false, (void *)PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
	else
		on_mark_page_dirty(false, (void *)PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
	return 0;
}

/*
 * Kernels before 5.12 (Debian 11's 5.10): kvm_vcpu_mark_page_dirty(vcpu, gfn),
 * the path of every guest write the MMU logs, has its own inlined copy of
 * mark_page_dirty_in_slot(), so the probe above sees only writes KVM makes on
 * the VMM's behalf. These two complete it: the kprobe notes the gfn, and the
 * memslot comes from the return value of the kvm_vcpu_gfn_to_memslot() call
 * kvm_vcpu_mark_page_dirty() makes next on the same thread.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} pending_dirty_gfn SEC(".maps");

SEC("kprobe/kvm_vcpu_mark_page_dirty")
int BPF_KPROBE(kprobe_vcpu_mark_page_dirty, void *vcpu, __u64 gfn)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	if (pid_watched((__u32)(bpf_get_current_pid_tgid() >> 32)))
		bpf_map_update_elem(&pending_dirty_gfn, &tid, &gfn, BPF_ANY);
	return 0;
}

SEC("kretprobe/kvm_vcpu_gfn_to_memslot")
int BPF_KRETPROBE(kretprobe_gfn_to_memslot, void *ms)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *pending = bpf_map_lookup_elem(&pending_dirty_gfn, &tid);
	__u64 gfn;

	if (!pending)
		return 0;
	gfn = *pending;
	bpf_map_delete_elem(&pending_dirty_gfn, &tid);
	on_mark_page_dirty(false, ms, gfn);
	return 0;
}
