/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kvm-watcher's BPF object: one object, one ring buffer, one file per monitor.
 * User space (src/session/load.rs) turns on only the programs of the backends it
 * picked (src/backend.rs) before loading.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "vcpu_load.bpf.c"
#include "vcpu_threads.bpf.c"
#include "wakeup.bpf.c"
#include "halt_poll.bpf.c"
#include "dirty.bpf.c"

/*
 * Never used by a program: these globals make libbpf-cargo emit the record
 * and map layouts into the skeleton, so user space shares them instead of
 * copying them.
 */
struct wakeup_event _wakeup_event = {};
struct halt_poll_event _halt_poll_event = {};
struct dirty_event _dirty_event = {};
struct dirty_key _dirty_key = {};
struct dirty_count _dirty_count = {};
struct dirty_slot_key _dirty_slot_key = {};
struct dirty_slot_stats _dirty_slot_stats = {};
struct dirty_epoch_key _dirty_epoch_key = {};
struct vcpu_thread _vcpu_thread = {};
struct vcpu_cpu_key _vcpu_cpu_key = {};
struct monitor_counters _monitor_counters = {};
struct wakeup_stats _wakeup_stats = {};
struct halt_poll_stats _halt_poll_stats = {};
enum monitor_kind _monitor_kind = MONITOR_WAKEUP;
enum limits _limits = HALT_HIST_SLOTS;
