/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Per-thread aggregates in task storage (BPF_MAP_TYPE_TASK_STORAGE from
 * tracing programs: Linux 5.12+), for a monitor that otherwise keeps them in
 * a hash by thread id, `<name>_stats`. TASK_AGGREGATE(name, value_t) defines:
 *
 *   <name>_task                  the task storage map (value: value_t)
 *   tp_btf_<name>_exit           sched:sched_process_exit, BTF-typed: an
 *                                exiting thread takes its storage with it,
 *                                so its entry moves to <name>_stats first
 *                                (user space reads its last figures there,
 *                                as on kernels without task storage)
 *   <name>_entry(in_task, tid,   the current thread's entry, in task storage
 *     create)                    (`in_task`, a constant in each program:
 *                                BTF-typed programs only) or in the hash,
 *                                made (zeroed) when `create` is set
 *   iter_<name>_task             iter/task (5.8+): for each thread with an
 *                                entry, its tid (u32), 4 bytes of padding and
 *                                the entry, back to back, for user space
 *                                (src/monitors/task_aggregates.rs)
 *
 * A task-storage entry needs no hash lookup and is never the stale entry of
 * an earlier thread with the same tid.
 */
#ifndef KVM_WATCHER_TASK_AGGREGATE_BPF_H
#define KVM_WATCHER_TASK_AGGREGATE_BPF_H

#define TASK_AGGREGATE(name, value_t)                                           \
	struct {                                                                \
		__uint(type, BPF_MAP_TYPE_TASK_STORAGE);                        \
		__uint(map_flags, BPF_F_NO_PREALLOC);                           \
		__type(key, int);                                               \
		__type(value, value_t);                                         \
	} name##_task SEC(".maps");                                             \
                                                                                \
	static __always_inline value_t *name##_entry(bool in_task, __u32 tid,   \
						     bool create)               \
	{                                                                       \
		value_t *s;                                                     \
                                                                                \
		if (in_task)                                                    \
			return bpf_task_storage_get(                            \
				&name##_task, bpf_get_current_task_btf(), 0,    \
				create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);   \
		s = bpf_map_lookup_elem(&name##_stats, &tid);                   \
		if (!s && create) {                                             \
			value_t fresh = {};                                     \
                                                                                \
			bpf_map_update_elem(&name##_stats, &tid, &fresh,        \
					    BPF_NOEXIST);                       \
			s = bpf_map_lookup_elem(&name##_stats, &tid);           \
		}                                                               \
		return s;                                                       \
	}                                                                       \
                                                                                \
	SEC("tp_btf/sched_process_exit")                                        \
	int BPF_PROG(tp_btf_##name##_exit, struct task_struct *task)            \
	{                                                                       \
		value_t *s = bpf_task_storage_get(&name##_task, task, 0, 0);    \
		__u32 tid;                                                      \
                                                                                \
		if (!s)                                                         \
			return 0;                                               \
		tid = task->pid;                                                \
		bpf_map_update_elem(&name##_stats, &tid, s, BPF_ANY);           \
		bpf_task_storage_delete(&name##_task, task);                    \
		return 0;                                                       \
	}                                                                       \
                                                                                \
	SEC("iter/task")                                                        \
	int iter_##name##_task(struct bpf_iter__task *ctx)                      \
	{                                                                       \
		struct task_struct *task = ctx->task;                           \
		__u32 head[2] = {};                                             \
		value_t *s;                                                     \
                                                                                \
		if (!task)                                                      \
			return 0;                                               \
		s = bpf_task_storage_get(&name##_task, task, 0, 0);             \
		if (!s)                                                         \
			return 0;                                               \
		head[0] = task->pid;                                            \
		bpf_seq_write(ctx->meta->seq, head, sizeof(head));              \
		bpf_seq_write(ctx->meta->seq, s, sizeof(*s));                   \
		return 0;                                                       \
	}

#endif
