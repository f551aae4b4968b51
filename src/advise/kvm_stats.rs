//! KVM's own halt-polling statistics of a VM, where the host exposes them:
//! debugfs (`/sys/kernel/debug/kvm/<pid>-<fd>/`, when mounted) holds each
//! VM's figures summed over its vCPUs. Read at both ends of a live run,
//! their difference is what KVM measured over it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// KVM's counters of one VM (all its vCPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltStats {
    /// `halt_poll_success_ns`.
    pub success_ns: u64,
    /// `halt_poll_fail_ns`.
    pub fail_ns: u64,
    /// `halt_successful_poll`.
    pub successful: u64,
    /// `halt_attempted_poll`.
    pub attempted: u64,
    /// `halt_exits`.
    pub halts: u64,
}

impl HaltStats {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &HaltStats) -> HaltStats {
        HaltStats {
            success_ns: self.success_ns.saturating_sub(before.success_ns),
            fail_ns: self.fail_ns.saturating_sub(before.fail_ns),
            successful: self.successful.saturating_sub(before.successful),
            attempted: self.attempted.saturating_sub(before.attempted),
            halts: self.halts.saturating_sub(before.halts),
        }
    }
}

const DEBUGFS_KVM: &str = "/sys/kernel/debug/kvm";

/// Every VM's counters in debugfs, by VMM pid (a process's VMs added up);
/// empty when debugfs is not mounted or not readable.
pub fn read_all() -> BTreeMap<u32, HaltStats> {
    let mut out: BTreeMap<u32, HaltStats> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(DEBUGFS_KVM) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(e.path().join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let (Some(s), Some(f), Some(ok), Some(att), Some(h)) = (
            read("halt_poll_success_ns"),
            read("halt_poll_fail_ns"),
            read("halt_successful_poll"),
            read("halt_attempted_poll"),
            read("halt_exits"),
        ) else {
            continue;
        };
        let t = out.entry(pid).or_default();
        t.success_ns += s;
        t.fail_ns += f;
        t.successful += ok;
        t.attempted += att;
        t.halts += h;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_never_goes_negative() {
        let a = HaltStats {
            success_ns: 5,
            fail_ns: 1,
            successful: 2,
            attempted: 3,
            halts: 9,
        };
        let b = HaltStats {
            success_ns: 15,
            fail_ns: 0,
            successful: 4,
            attempted: 7,
            halts: 19,
        };
        assert_eq!(
            b.since(&a),
            HaltStats {
                success_ns: 10,
                fail_ns: 0,
                successful: 2,
                attempted: 4,
                halts: 10
            }
        );
    }
}
