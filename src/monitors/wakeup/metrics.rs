//! wakeup's metric families: wake-ups by how they ended, the time halted,
//! and the halt-duration histogram built in the kernel.

use super::WakeupTotals;
use crate::monitors::families::{Family, Get, Kind, every};
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::Hist;

pub const FAMILIES: &[Family<WakeupTotals>] = &[
    Family {
        name: "vcpu_wakeups",
        help: "vCPU wake-ups from halt, by whether the thread slept (waited) or polling caught it",
        only: every,
        kind: Kind::Counter {
            split: "waited",
            values: &[
                ("true", Get::Count(|t| t.waited)),
                ("false", Get::Count(|t| t.polled())),
            ],
        },
    },
    Family {
        name: "vcpu_halt",
        help: "Time vCPUs spent halted (polling plus sleeping), a halt in progress counted as it goes",
        only: every,
        kind: Kind::Counter {
            split: "",
            values: &[("", Get::Nanos(|t| t.halted_ns))],
        },
    },
    Family {
        name: "vcpu_halt_duration",
        help: "Halt durations (polling plus sleeping), log2 buckets built in the kernel; per VM (per vCPU with --metrics.vcpu-histograms)",
        only: every,
        kind: Kind::Histogram(|t| Hist {
            sum: t.halt_ns as f64 / 1e9,
            count: t.wakeups,
            buckets: buckets(&t.hist),
        }),
    },
];
