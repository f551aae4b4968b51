//! run-delay's metric families: the run-delay histogram built in the kernel,
//! and waits and waiting time by cause.

use super::Waits;
use crate::monitors::families::{Family, Get};
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::Hist;

/// Threads that waited.
fn waited(w: &Waits) -> bool {
    w.totals.waits > 0
}

pub const FAMILIES: &[Family<Waits>] = &[
    Family::<Waits>::histogram(
        "vcpu_run_delay",
        "Waits of vCPU threads on a run queue, runnable but not running, by the wall clock from wake-up or preemption to switch-in, log2 buckets built in the kernel; per VM (per vCPU with --metrics.vcpu-histograms)",
        |w| Hist { sum: (w.totals.cause_ns[0] + w.totals.cause_ns[1]) as f64 / 1e9, count: w.totals.waits, buckets: buckets(&w.totals.hist) },
    ).only(waited),
    Family::<Waits>::counter(
        "vcpu_delay",
        "Time vCPU threads waited on a run queue, runnable but not running (libvirt's vcpu.N.delay, KubeVirt's kubevirt_vmi_vcpu_delay_seconds_total), since kvm-watcher saw the thread",
        &[("", Get::Nanos(|w| w.totals.delay_ns))],
    ).only(waited),
    Family::<Waits>::counters(
        "vcpu_run_delay_waits",
        "Waits of vCPU threads on a run queue, by cause (woken or preempted)",
        "cause",
        &[("woken", Get::Count(|w| w.totals.cause_waits[0])), ("preempted", Get::Count(|w| w.totals.cause_waits[1]))],
    ).only(waited),
    Family::<Waits>::counters(
        "vcpu_run_delay_cause",
        "Time vCPU threads waited on a run queue by the wall clock, by cause (woken or preempted)",
        "cause",
        &[("woken", Get::Nanos(|w| w.totals.cause_ns[0])), ("preempted", Get::Nanos(|w| w.totals.cause_ns[1]))],
    ).only(waited),
];
