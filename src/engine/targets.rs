//! The VMs `--vm NAME` and `-p PID` ask for, followed while `serve` or
//! `top` runs: a VM that restarts under the same name (a new pid) is
//! watched again, and a pid given with -p that exits is warned about once.

use std::collections::BTreeSet;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::output::warn;

/// What was asked for, and the pids the kernel lets through.
pub struct Targets {
    vms: Vec<String>,
    given: Vec<u32>,
    allowed: MapHandle,
    /// Pids in the kernel's filter now.
    pids: BTreeSet<u32>,
    warned: BTreeSet<u32>,
}

fn alive(pid: u32) -> bool {
    crate::procfs::process_alive(pid)
}

impl Targets {
    /// `pids`: the ones resolved at start (from `given` and `vms`), already
    /// in `allowed`, the kernel's pid filter.
    pub fn new(vms: Vec<String>, given: Vec<u32>, pids: &[u32], allowed: MapHandle) -> Self {
        Targets {
            vms,
            given,
            allowed,
            pids: pids.iter().copied().collect(),
            warned: BTreeSet::new(),
        }
    }

    /// Notes exits and restarts; called about once a second. Returns the
    /// VMs it began to watch (their identities, known while they run).
    pub fn refresh(&mut self) -> Vec<(u32, crate::procfs::VmId)> {
        let mut found = Vec::new();
        if self.vms.is_empty() && self.given.is_empty() {
            return found; // every VM is exported
        }
        for &pid in &self.given {
            if !alive(pid) && self.warned.insert(pid) {
                warn(&format!(
                    "--pid {pid} exited; nothing more is watched for it (a VM that restarts gets a new pid: use --vm NAME to follow it)"
                ));
            }
        }
        let gone: Vec<u32> = self.pids.iter().copied().filter(|p| !alive(*p)).collect();
        for pid in gone {
            // Its pid may be reused by an unrelated process.
            let _ = self.allowed.delete(&pid.to_ne_bytes());
            self.pids.remove(&pid);
        }
        if self.vms.is_empty() {
            return found;
        }
        for vm in crate::procfs::list_vms() {
            if self.vms.iter().any(|n| vm.id().matches(n)) && !self.pids.contains(&vm.pid) {
                match self
                    .allowed
                    .update(&vm.pid.to_ne_bytes(), &[1u8], MapFlags::ANY)
                {
                    Ok(()) => {
                        self.pids.insert(vm.pid);
                        found.push((vm.pid, vm.id()));
                    }
                    Err(e) => warn(&format!("cannot watch pid {}: {e}", vm.pid)),
                }
            }
        }
        found
    }

    /// Whether the VM in process `pid` is watched now (without `--vm` and
    /// `-p`, every VM is).
    pub fn wants(&self, pid: u32) -> bool {
        (self.vms.is_empty() && self.given.is_empty()) || self.pids.contains(&pid)
    }
}
