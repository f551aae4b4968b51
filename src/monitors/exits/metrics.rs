//! The exits monitor's metric families: exits by reason per vCPU, their time
//! as histograms built in the kernel, and the ports and addresses behind the
//! exits to the VMM per VM; the most frequent keys on their own, the rest `other`.

use super::Kind::{Kvm, User};
use super::counters::{ThreadExits, reasons, targets, times};
use crate::monitors::families::{Family, Kind};

pub const FAMILIES: &[Family<ThreadExits>] = &[
    Family::of(
        "vcpu_exits",
        "Exits from the guest (kvm:kvm_exit), by reason (each vCPU's most frequent reasons, the rest `other`)",
        Kind::Keyed(reasons(Kvm)),
    ),
    Family::of(
        "vcpu_exit_handling",
        "Time from an exit from the guest to the next guest entry (or the return to the VMM), log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
        Kind::KeyedHistogram(times(Kvm)),
    ),
    Family::of(
        "vcpu_userspace_exits",
        "Exits to the VMM (kvm:kvm_userspace_exit), by KVM_EXIT_* reason (each vCPU's most frequent reasons, the rest `other`)",
        Kind::Keyed(reasons(User)),
    ),
    Family::of(
        "vcpu_userspace_exit",
        "Time in the VMM after an exit to it, until the next KVM_RUN (with the kvm-only backend, serve's default: until KVM loaded the vCPU again, its way back in included), log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
        Kind::KeyedHistogram(times(User)),
    ),
    Family::of(
        "vm_io_accesses",
        "Guest accesses to I/O ports (kind pio) and MMIO addresses (kind mmio), per VM: the --metrics.top-k most used targets, the rest `other`",
        Kind::Keyed(targets(0)),
    ),
    Family::of(
        "vm_io_userspace_exits",
        "Of those accesses, exits to the VMM, per VM and target as vm_io_accesses",
        Kind::Keyed(targets(1)),
    ),
];
