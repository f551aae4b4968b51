//! The exits monitor's metric families: exits by reason per vCPU, their time
//! as histograms built in the kernel, and the ports and addresses behind the
//! exits to the VMM per VM; the most frequent keys on their own, the rest `other`.

use super::Kind::{Kvm, User};
use super::counters::{ThreadExits, reasons, targets, times};
use crate::monitors::families::{Family, Kind};

pub const FAMILIES: &[Family<ThreadExits>] = &[
    Family {
        name: "vcpu_exits",
        help: "Exits from the guest (kvm:kvm_exit), by reason (each vCPU's most frequent reasons, the rest `other`)",
        kind: Kind::Keyed(reasons(Kvm)),
    },
    Family {
        name: "vcpu_exit_handling",
        help: "Time from an exit from the guest to the next guest entry (or the return to the VMM), log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
        kind: Kind::KeyedHistogram(times(Kvm)),
    },
    Family {
        name: "vcpu_userspace_exits",
        help: "Exits to the VMM (kvm:kvm_userspace_exit), by KVM_EXIT_* reason (each vCPU's most frequent reasons, the rest `other`)",
        kind: Kind::Keyed(reasons(User)),
    },
    Family {
        name: "vcpu_userspace_exit",
        help: "Time in the VMM after an exit to it, until the next KVM_RUN, log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
        kind: Kind::KeyedHistogram(times(User)),
    },
    Family {
        name: "vm_io_accesses",
        help: "Guest accesses to I/O ports (kind pio) and MMIO addresses (kind mmio), per VM: the --metrics.top-k most used targets, the rest `other`",
        kind: Kind::Keyed(targets(0)),
    },
    Family {
        name: "vm_io_userspace_exits",
        help: "Of those accesses, exits to the VMM, per VM and target as vm_io_accesses",
        kind: Kind::Keyed(targets(1)),
    },
];
