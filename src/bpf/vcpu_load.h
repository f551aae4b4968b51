/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The vcpu-load monitor's records and map layouts: written by
 * vcpu_load.bpf.c, read by src/monitors/vcpu_load/ (its per-thread pairs
 * live in the shared `struct vcpu_thread`) through the generated skeleton.
 * Included by kvm_watcher.h after the shared types (struct event_header,
 * enum limits) it builds on.
 */
#ifndef KVM_WATCHER_VCPU_LOAD_H
#define KVM_WATCHER_VCPU_LOAD_H

/* Key of `vcpu_cpu_ns`: loaded time of one thread on one physical CPU. */
struct vcpu_cpu_key {
	__u32 tid;
	__u32 cpu;
};

#endif /* KVM_WATCHER_VCPU_LOAD_H */
