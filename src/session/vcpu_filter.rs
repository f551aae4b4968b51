//! `--vcpu` takes KVM's vCPU id (`N` or `kvm:N`: `struct kvm_vcpu.vcpu_id`,
//! on x86 the APIC id) or the VMM's vCPU number (`vmm:N`: QEMU's `CPU n/KVM`,
//! libvirt's vCPU n). On some topologies they differ: with 2 sockets of 3
//! cores, libvirt's vCPUs 3, 4, 5 are KVM's 4, 5, 6. The kernel filters by
//! KVM's id, so `vmm:N` is turned into it from the VMM's thread names and the
//! vCPU each thread is running. An id no watched VM has would match nothing
//! for the whole run, silently: it is refused, with the ids the VMs do have
//! and the VMM's numbers where they differ.

use crate::output::terminal_safe;
use crate::procfs::{VmProcess, vmm_index};

/// What `--vcpu` names, in whose numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuChoice {
    /// KVM's vCPU id (`N`, `kvm:N`).
    Kvm(u32),
    /// The VMM's vCPU number (`vmm:N`).
    Vmm(u32),
}

impl VcpuChoice {
    /// The id the kernel filters by, once the choice is KVM's.
    pub fn kvm(self) -> Option<u32> {
        match self {
            VcpuChoice::Kvm(id) => Some(id),
            VcpuChoice::Vmm(_) => None,
        }
    }
}

impl std::fmt::Display for VcpuChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuChoice::Kvm(id) => write!(f, "{id}"),
            VcpuChoice::Vmm(n) => write!(f, "vmm:{n}"),
        }
    }
}

/// Parses `--vcpu`: `N`, `kvm:N` or `vmm:N`, N at most `i32::MAX` (the
/// kernel's vCPU ids are signed).
pub fn parse(s: &str) -> Result<VcpuChoice, String> {
    let (make, digits): (fn(u32) -> VcpuChoice, &str) = if let Some(n) = s.strip_prefix("vmm:") {
        (VcpuChoice::Vmm, n)
    } else if let Some(n) = s.strip_prefix("kvm:") {
        (VcpuChoice::Kvm, n)
    } else {
        (VcpuChoice::Kvm, s)
    };
    match digits.parse::<u32>() {
        Ok(n) if n <= i32::MAX as u32 => Ok(make(n)),
        _ => Err(format!(
            "`{}` is not a vCPU: give KVM's id as N or kvm:N, or the VMM's vCPU number as vmm:N (N from 0 to {})",
            s.escape_debug(),
            i32::MAX
        )),
    }
}

/// Why `vmm:n` cannot be turned into KVM's id among `vms` (the VMs watched now).
#[derive(Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// The VMM's vCPU thread is there but not inside `KVM_RUN` (a paused or
    /// starting VM), so its KVM id is not known yet: try again shortly.
    NotRunning(String),
    /// No watched VM has it, or the VMs disagree: a usage error.
    Refused(String),
}

/// KVM's id of the VMM's vCPU `n` in `vms`.
pub fn vmm_to_kvm(n: u32, vms: &[VmProcess]) -> Result<u32, Unresolved> {
    let threads: Vec<_> = vms
        .iter()
        .flat_map(|vm| vm.vcpu_threads.iter().map(move |t| (vm, t)))
        .filter(|(_, t)| vmm_index(&t.comm) == Some(n))
        .collect();
    if threads.is_empty() {
        let names: Vec<String> = vms
            .iter()
            .take(8)
            .map(|vm| terminal_safe(&vm.display()).into_owned())
            .collect();
        return Err(Unresolved::Refused(if vms.is_empty() {
            format!(
                "--vcpu vmm:{n}: no KVM VM is running, and the VMM's vCPU numbers are read from its threads; give KVM's id (--vcpu N) or start the VM first"
            )
        } else {
            format!(
                "--vcpu vmm:{n}: no watched VM ({}) has a vCPU thread its VMM numbers {n} (QEMU's `CPU {n}/KVM`); see `kvm-watcher vms`",
                names.join(", ")
            )
        }));
    }
    if let Some((vm, t)) = threads.iter().find(|(_, t)| t.vcpu_id.is_none()) {
        return Err(Unresolved::NotRunning(format!(
            "--vcpu vmm:{n}: thread {} of {} is not inside KVM_RUN (the VM is paused or starting), so KVM's id of it is not known; give KVM's id (--vcpu N) or the thread (--tid {})",
            t.tid,
            terminal_safe(&vm.display()),
            t.tid
        )));
    }
    let mut ids: Vec<u32> = threads.iter().filter_map(|(_, t)| t.vcpu_id).collect();
    ids.sort_unstable();
    ids.dedup();
    match ids[..] {
        [id] => Ok(id),
        _ => Err(Unresolved::Refused(format!(
            "--vcpu vmm:{n}: the watched VMs number it differently in KVM ({}); choose one VM with --vm or -p",
            threads
                .iter()
                .take(8)
                .map(|(vm, t)| format!(
                    "{}: KVM's {}",
                    terminal_safe(&vm.display()),
                    t.vcpu_id.unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

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
        "--vcpu {id}: no watched VM has a vCPU with that id (KVM's vCPU ids: {}{more}); --vcpu N takes KVM's id, which on some topologies differs from the VMM's vCPU number (QEMU's `CPU n/KVM`, libvirt's vCPU n; --vcpu vmm:n){differ}; see `kvm-watcher vms`",
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

    #[test]
    fn vcpu_takes_kvms_id_or_the_vmms_number() {
        assert_eq!(parse("3"), Ok(VcpuChoice::Kvm(3)));
        assert_eq!(parse("kvm:4"), Ok(VcpuChoice::Kvm(4)));
        assert_eq!(parse("vmm:3"), Ok(VcpuChoice::Vmm(3)));
        assert_eq!(parse("2147483647"), Ok(VcpuChoice::Kvm(i32::MAX as u32)));
        for bad in ["", "vmm:", "cpu:0", "-1", "2147483648", "vmm:x", "3 "] {
            let why = parse(bad).unwrap_err();
            assert!(why.contains("give KVM's id as N or kvm:N"), "{bad}: {why}");
        }
        assert!(!parse("\x1b[2J").unwrap_err().contains('\x1b'));
        assert_eq!(VcpuChoice::Vmm(3).to_string(), "vmm:3");
        assert_eq!(VcpuChoice::Vmm(3).kvm(), None);
    }

    #[test]
    fn the_vmms_number_turns_into_kvms_id() {
        let db = vm(
            "db",
            &[0, 1, 2, 4, 5, 6],
            &[
                ("CPU 0/KVM", Some(0)),
                ("CPU 3/KVM", Some(4)),
                ("CPU 5/KVM", None),
            ],
        );
        let web = vm(
            "web",
            &[0, 1],
            &[("CPU 0/KVM", Some(0)), ("CPU 1/KVM", Some(1))],
        );
        assert_eq!(vmm_to_kvm(3, std::slice::from_ref(&db)), Ok(4));
        assert_eq!(
            vmm_to_kvm(0, &[db.clone(), web.clone()]),
            Ok(0),
            "the same id in both"
        );
        match vmm_to_kvm(5, std::slice::from_ref(&db)) {
            Err(Unresolved::NotRunning(why)) => {
                assert!(
                    why.contains("thread 102 of db is not inside KVM_RUN"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        match vmm_to_kvm(7, &[db.clone(), web]) {
            Err(Unresolved::Refused(why)) => {
                assert!(why.contains("no watched VM (db, web)"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        match vmm_to_kvm(1, &[]) {
            Err(Unresolved::Refused(why)) => assert!(why.contains("no KVM VM is running"), "{why}"),
            other => panic!("{other:?}"),
        }
        let other = vm("other", &[0, 3], &[("CPU 3/KVM", Some(3))]);
        match vmm_to_kvm(3, &[db, other]) {
            Err(Unresolved::Refused(why)) => {
                assert!(why.contains("db: KVM's 4, other: KVM's 3"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
}
