//! What /proc cannot tell about a VM whose vCPU threads are outside their
//! vCPU ioctl (a suspended domain, a VM not started yet): /proc gives a
//! thread's vCPU id only while it sits in `ioctl(vcpu_fd, ...)`. The ids
//! come from the kernel's thread table instead, which learned them when the
//! threads last ran a vCPU; and a VM none of whose vCPU threads is inside
//! its ioctl for [`PAUSED_AFTER`] refreshes in a row is shown as paused.

use std::collections::HashMap;

use crate::procfs::VmProcess;

/// Refreshes in a row with no vCPU thread inside a vCPU ioctl before a VM
/// shows as paused: a running vCPU is inside KVM_RUN (halted ones too)
/// except while its VMM handles an exit, so two looks a refresh apart are
/// not fooled by one moment when all of them were out.
pub const PAUSED_AFTER: u32 = 2;

/// What the VMM column says of a paused VM.
pub const PAUSED: &str = "paused";

/// Per VM, the refreshes in a row none of its vCPU threads was inside its ioctl.
#[derive(Default)]
pub struct Paused {
    outside: HashMap<u32, u32>,
}

impl Paused {
    /// Fills in the vCPU ids /proc did not give from `known` (thread id ->
    /// KVM's vCPU id) and marks the VMs paused.
    pub fn apply(&mut self, vms: &mut [VmProcess], known: &HashMap<u32, u32>) {
        let mut outside = HashMap::new();
        for vm in vms.iter_mut() {
            let none_inside =
                !vm.vcpu_threads.is_empty() && vm.vcpu_threads.iter().all(|t| t.vcpu_id.is_none());
            for t in &mut vm.vcpu_threads {
                if t.vcpu_id.is_none() {
                    t.vcpu_id = known.get(&t.tid).copied();
                }
            }
            if none_inside {
                let n = self.outside.get(&vm.pid).copied().unwrap_or(0) + 1;
                outside.insert(vm.pid, n);
                if n >= PAUSED_AFTER {
                    vm.vmm = PAUSED.into();
                }
            }
        }
        self.outside = outside;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::testing::vm;

    /// A VM whose threads /proc shows inside their ioctl with these ids.
    fn inside(pid: u32, tids: &[u32]) -> VmProcess {
        let mut v = vm(pid, "a", tids);
        for (i, t) in v.vcpu_threads.iter_mut().enumerate() {
            t.vcpu_id = Some(i as u32);
        }
        v
    }

    #[test]
    fn ids_come_from_the_kernel_where_proc_has_none() {
        let mut p = Paused::default();
        let mut vms = vec![vm(7, "a", &[70, 71])];
        let known = HashMap::from([(70, 0), (71, 4)]);
        p.apply(&mut vms, &known);
        let ids: Vec<_> = vms[0].vcpu_threads.iter().map(|t| t.vcpu_id).collect();
        assert_eq!(ids, [Some(0), Some(4)]);
        assert_eq!(vms[0].vmm, "kvm-watcher", "not paused after one look");
    }

    #[test]
    fn a_vm_outside_its_ioctls_twice_in_a_row_is_paused_until_it_runs() {
        let mut p = Paused::default();
        let known = HashMap::new();
        let look = |p: &mut Paused, v: VmProcess| {
            let mut vms = vec![v];
            p.apply(&mut vms, &known);
            vms.remove(0).vmm
        };
        assert_eq!(look(&mut p, vm(7, "a", &[70])), "kvm-watcher");
        assert_eq!(look(&mut p, vm(7, "a", &[70])), PAUSED);
        assert_eq!(look(&mut p, vm(7, "a", &[70])), PAUSED);
        assert_eq!(look(&mut p, inside(7, &[70])), "kvm-watcher", "resumed");
        assert_eq!(look(&mut p, vm(7, "a", &[70])), "kvm-watcher");
        // One thread inside its ioctl is enough to be running.
        let mut half = inside(8, &[80, 81]);
        half.vcpu_threads[1].vcpu_id = None;
        assert_eq!(look(&mut p, half.clone()), "kvm-watcher");
        assert_eq!(look(&mut p, half), "kvm-watcher");
        // A process without vCPU threads (yet) is not called paused.
        assert_eq!(look(&mut p, vm(9, "b", &[])), "kvm-watcher");
        assert_eq!(look(&mut p, vm(9, "b", &[])), "kvm-watcher");
    }
}
