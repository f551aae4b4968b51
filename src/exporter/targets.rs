//! The VMs `serve --vm NAME` and `-p PID` export, followed while it runs: a
//! VM that restarts under the same name (a new pid) is exported again, and
//! a pid given with -p that exits is warned about once.

use std::collections::BTreeSet;
use std::path::Path;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::output::{terminal_safe, warn};

/// What `serve` was asked to export, and the pids the kernel lets through.
pub struct Targets {
    vms: Vec<String>,
    given: Vec<u32>,
    allowed: MapHandle,
    /// Pids in the kernel's filter now.
    pids: BTreeSet<u32>,
    warned: BTreeSet<u32>,
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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
    /// VMs it began to export (their identities, known while they run).
    pub fn refresh(&mut self) -> Vec<(u32, crate::procfs::VmId)> {
        let mut found = Vec::new();
        if self.vms.is_empty() && self.given.is_empty() {
            return found; // every VM is exported
        }
        for &pid in &self.given {
            if !alive(pid) && self.warned.insert(pid) {
                warn(&format!(
                    "--pid {pid} exited; nothing more is exported for it (a VM that restarts gets a new pid: use --vm NAME to follow it)"
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
                        eprintln!(
                            "kvm-watcher: VM {} runs as pid {}: exporting it",
                            terminal_safe(&vm.display()),
                            vm.pid
                        );
                    }
                    Err(e) => warn(&format!("cannot watch pid {}: {e}", vm.pid)),
                }
            }
        }
        found
    }
}
