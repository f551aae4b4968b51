//! wakeup's metric families: wake-ups by how they ended, the time halted,
//! and the halt-duration histogram built in the kernel.

use super::WakeupTotals;
use crate::monitors::families::{Family, Get};
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::Hist;

pub const FAMILIES: &[Family<WakeupTotals>] = &[
    Family::counters(
        "vcpu_wakeups",
        "vCPU wake-ups from halt, by whether the thread slept (waited) or polling caught it",
        "waited",
        &[
            ("true", Get::Count(|t| t.waited)),
            ("false", Get::Count(|t| t.polled())),
        ],
    ),
    Family::counter(
        "vcpu_halt",
        "Time vCPUs spent halted (polling plus sleeping), a halt in progress counted as it goes",
        &[("", Get::Nanos(|t| t.halted_ns))],
    ),
    Family::histogram(
        "vcpu_halt_duration",
        "Halt durations (polling plus sleeping), log2 buckets built in the kernel; per VM (per vCPU with --metrics.vcpu-histograms)",
        |t| Hist {
            sum: t.halt_ns as f64 / 1e9,
            count: t.wakeups,
            buckets: buckets(&t.hist),
        },
    ),
];
