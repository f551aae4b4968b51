//! vcpu-load's metric families: run time per physical CPU, load/put pairs
//! and moves between CPUs (one counter per vCPU).

use super::Load;
use crate::monitors::families::{Family, Get, Kind, every};

/// Threads that completed a load/put pair.
fn loaded(l: &Load) -> bool {
    l.count > 0
}

pub const FAMILIES: &[Family<Load>] = &[
    Family {
        name: "vcpu_run",
        help: "Time the vCPU was loaded (kvm_arch_vcpu_load to _put); per physical CPU (a pcpu label) with --metrics.pcpu",
        only: every,
        kind: Kind::NanosBy {
            label: "pcpu",
            split: |e| e.pcpu,
            values: |l| l.cpus.iter().map(|(c, n)| (*c, *n)).collect(),
        },
    },
    Family::<Load>::counter(
        "vcpu_loads",
        "Completed vCPU load/put pairs",
        &[("", Get::Count(|l| l.count))],
    )
    .only(loaded),
    Family::<Load>::counter(
        "vcpu_cpu_migrations",
        "vCPU loads on another physical CPU than the load before (moves between CPUs)",
        &[("", Get::Count(|l| l.cpu_migrations))],
    )
    .only(loaded),
];
