//! `--vcpu ID` takes KVM's vCPU id (`struct kvm_vcpu.vcpu_id`, on x86 the
//! APIC id). On some topologies it differs from the VMM's vCPU number
//! (QEMU's `CPU n/KVM`, libvirt's vCPU n): with 2 sockets of 3 cores,
//! libvirt's vCPUs 3, 4, 5 are KVM's 4, 5, 6. An id no watched VM has would
//! match nothing for the whole run, silently: it is refused, with the ids
//! the VMs do have and the VMM's numbers where they differ.

use crate::output::terminal_safe;
use crate::procfs::{VmProcess, vmm_index};

/// Why `--vcpu id` would match nothing among `vms` (the VMs watched now),
/// or None when one of them has it, or none runs yet (one may start).
pub fn refusal(id: u32, vms: &[VmProcess]) -> Option<String> {
    if vms.is_empty() || vms.iter().any(|vm| vm.vcpu_ids.contains(&id)) {
        return None;
    }
    let listed: Vec<String> = vms
        .iter()
        .take(8)
        .map(|vm| {
            let ids: Vec<String> = vm.vcpu_ids.iter().map(u32::to_string).collect();
            format!(
                "{} {}",
                terminal_safe(&vm.display()),
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(",")
                }
            )
        })
        .collect();
    let more = if vms.len() > 8 { ", ..." } else { "" };
    // Threads whose id is known and whose VMM number differs from it.
    let differ: Vec<String> = vms
        .iter()
        .flat_map(|vm| &vm.vcpu_threads)
        .filter_map(|t| Some((vmm_index(&t.comm)?, t.vcpu_id?)))
        .filter(|(index, id)| index != id)
        .take(4)
        .map(|(index, id)| format!("the VMM's vCPU {index} is KVM's {id}"))
        .collect();
    let differ = if differ.is_empty() {
        String::new()
    } else {
        format!(" ({})", differ.join(", "))
    };
    Some(format!(
        "--vcpu {id}: no watched VM has a vCPU with that id (KVM's vCPU ids: {}{more}); --vcpu takes KVM's id, which on some topologies differs from the VMM's vCPU number (QEMU's `CPU n/KVM`, libvirt's vCPU n){differ}; see `kvm-watcher vms`",
        listed.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::VcpuThreadInfo;

    fn vm(name: &str, ids: &[u32], threads: &[(&str, Option<u32>)]) -> VmProcess {
        VmProcess {
            pid: 10,
            comm: "qemu-system-x86".into(),
            vmm: "qemu".into(),
            name: name.into(),
            namespace: None,
            uuid: None,
            domain: None,
            vms: 1,
            vcpu_ids: ids.to_vec(),
            vcpu_threads: threads
                .iter()
                .enumerate()
                .map(|(i, &(comm, vcpu_id))| VcpuThreadInfo {
                    tid: 100 + i as u32,
                    comm: comm.into(),
                    vcpu_id,
                })
                .collect(),
        }
    }

    #[test]
    fn an_id_a_vm_has_or_no_vm_yet_is_accepted() {
        let two_sockets = vm("db", &[0, 1, 2, 4, 5, 6], &[]);
        assert_eq!(refusal(4, std::slice::from_ref(&two_sockets)), None);
        assert_eq!(refusal(7, &[]), None, "a VM may start later");
        let other = vm("web", &[0, 1], &[]);
        assert_eq!(refusal(5, &[other, two_sockets]), None);
    }

    #[test]
    fn an_id_no_vm_has_is_refused_with_the_ids_and_the_vmms_numbers() {
        let db = vm(
            "db",
            &[0, 1, 2, 4, 5, 6],
            &[
                ("CPU 0/KVM", Some(0)),
                ("CPU 3/KVM", Some(4)),
                ("CPU 5/KVM", None),
            ],
        );
        let web = vm("web\x1b[31m", &[0, 1], &[]);
        let why = refusal(3, &[db, web]).unwrap();
        assert!(
            why.starts_with("--vcpu 3: no watched VM has a vCPU with that id"),
            "{why}"
        );
        assert!(why.contains("db 0,1,2,4,5,6; web"), "{why}");
        assert!(!why.contains('\x1b'), "names are made terminal-safe: {why}");
        assert!(why.contains("(the VMM's vCPU 3 is KVM's 4)"), "{why}");
        assert_eq!(why.lines().count(), 1);
    }
}
