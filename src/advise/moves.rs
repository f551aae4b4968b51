//! vCPU placement, its second finding: a vCPU that moves between physical
//! CPUs on most of its switch-ins, many times a second. The moves are
//! vcpu-load's `cpu_migrations` (loads on another CPU than the load before,
//! counted in the kernel); the switch-ins are run-delay's (the kernel's own
//! count), or vcpu-load's loads where run-delay did not run.

use std::collections::BTreeSet;

use super::input::{Vcpu, Vm};
use super::rules::{cpus, share, vcpu_name};
use super::{Change, Finding};
use crate::output::terminal_safe;

/// A vCPU that moves this many times per second of its observed time or
/// more ...
pub const MIN_MOVES_PER_S: f64 = 100.0;
/// ... on this share of its switch-ins or more is a finding.
pub const MIN_MOVE_SHARE: f64 = 0.5;

/// A vCPU's moves per second and their share of its switch-ins.
fn rate(v: &Vcpu) -> (f64, f64) {
    let per_s = if v.observed_ns == 0 {
        0.0
    } else {
        v.cpu_migrations as f64 * 1e9 / v.observed_ns as f64
    };
    let runs = if v.switch_ins > 0 {
        v.switch_ins
    } else {
        v.loads
    };
    (per_s, share(v.cpu_migrations, runs).min(1.0))
}

/// The CPU to pin each moving vCPU to: the one it ran on longest that no
/// other of them gets; None when all of its CPUs are taken.
fn pins(moving: &[&Vcpu]) -> Vec<Option<u32>> {
    let mut taken = BTreeSet::new();
    moving
        .iter()
        .map(|v| {
            let mut by_time: Vec<(&u32, &u64)> = v.pcpus.iter().collect();
            by_time.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let cpu = by_time
                .into_iter()
                .map(|(c, _)| *c)
                .find(|c| !taken.contains(c));
            if let Some(c) = cpu {
                taken.insert(c);
            }
            cpu
        })
        .collect()
}

/// vCPUs that move to another CPU [`MIN_MOVES_PER_S`] times a second or
/// more, on [`MIN_MOVE_SHARE`] of their switch-ins or more.
pub fn rule(vm: &Vm) -> Result<Finding, String> {
    let moving: Vec<&Vcpu> = vm
        .vcpus
        .values()
        .filter(|v| {
            let (per_s, of_runs) = rate(v);
            per_s >= MIN_MOVES_PER_S && of_runs >= MIN_MOVE_SHARE
        })
        .collect();
    if moving.is_empty() {
        let (most, most_share) = vm
            .vcpus
            .values()
            .map(rate)
            .fold((0.0, 0.0), |a, r| (f64::max(a.0, r.0), f64::max(a.1, r.1)));
        return Err(format!(
            "placement: no vCPU moves to another CPU {MIN_MOVES_PER_S:.0} times a second on {:.0} % of its switch-ins or more (at most {most:.1}/s, {:.1} %)",
            MIN_MOVE_SHARE * 100.0,
            most_share * 100.0
        ));
    }
    let pin = pins(&moving);
    let domain = vm.name.as_deref().map_or("DOMAIN".into(), terminal_safe);
    let mut evidence = Vec::new();
    let mut commands = Vec::new();
    let mut per_vcpu = Vec::new();
    let mut fastest = 0.0f64;
    for (v, cpu) in moving.iter().zip(&pin) {
        let (per_s, of_runs) = rate(v);
        fastest = fastest.max(per_s);
        evidence.push(format!(
            "vCPU {} (tid {}): {per_s:.1} moves/s ({} in {:.3} s), on {:.1} % of its {} {}; ran on {} CPU(s): {}",
            vcpu_name(v),
            v.tid,
            v.cpu_migrations,
            v.observed_ns as f64 / 1e9,
            of_runs * 100.0,
            if v.switch_ins > 0 { v.switch_ins } else { v.loads },
            if v.switch_ins > 0 { "switch-ins" } else { "loads" },
            v.pcpus.len(),
            cpus(v)
        ));
        // virsh vcpupin takes the VMM's number, which is not KVM's id on
        // every topology: without the thread's name, only taskset is safe.
        commands.push(match (cpu, v.vmm_index) {
            (Some(c), Some(n)) => format!(
                "vCPU {} to CPU {c}: virsh vcpupin {domain} {n} {c} (or taskset -pc {c} {})",
                vcpu_name(v),
                v.tid
            ),
            (Some(c), None) => format!(
                "vCPU {} to CPU {c}: taskset -pc {c} {}",
                vcpu_name(v),
                v.tid
            ),
            (None, _) => format!(
                "vCPU {} to a CPU of its own: virsh vcpupin {domain} VCPU CPU (or taskset -pc CPU {})",
                vcpu_name(v),
                v.tid
            ),
        });
        per_vcpu.push(serde_json::json!({"tid": v.tid, "vcpu_id": v.vcpu_id,
            "cpu_migrations": v.cpu_migrations, "moves_per_s": per_s,
            "switch_ins": v.switch_ins, "loads": v.loads, "share": of_runs,
            "observed_ns": v.observed_ns, "pcpus": v.pcpus, "pin_cpu": cpu}));
    }
    let names: Vec<String> = moving.iter().map(|v| vcpu_name(v)).collect();
    Ok(Finding {
        rule: "placement",
        problem: format!(
            "vCPU(s) {} move to another CPU on half or more of their switch-ins, up to {fastest:.0} times a second",
            names.join(", ")
        ),
        evidence,
        // Not measured per VM: what a move costs depends on the guest's
        // working set (docs/advise.md gives the figures there are).
        cost_cpu: 0.0,
        guest_time_lost: 0.0,
        change: Change {
            setting: format!(
                "pin each to one CPU of its own: {}; or a cgroup cpuset for the VM's vCPU threads",
                commands.join("; ")
            ),
            scope: "per vCPU".into(),
        },
        predicted: "no moves: the vCPU resumes on the CPU whose caches hold its data, and KVM skips the work of a vCPU that changed CPU (moving its timers, its VMCS on Intel, the TSC checks); the time that gives back depends on the guest's working set and is not measured here".into(),
        figures: serde_json::json!({"kind": "moves", "min_moves_per_s": MIN_MOVES_PER_S,
            "min_share": MIN_MOVE_SHARE, "vcpus": per_vcpu}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU observed 2 s that moved `moves` times in `switch_ins`, on CPUs 2 and 3.
    fn vcpu(tid: u32, moves: u64, switch_ins: u64) -> Vcpu {
        let mut v = Vcpu {
            pid: 10,
            tid,
            vcpu_id: Some(tid - 1),
            vmm_index: Some(tid - 1),
            observed_ns: 2_000_000_000,
            cpu_migrations: moves,
            switch_ins,
            loads: switch_ins * 2,
            ..Vcpu::default()
        };
        v.pcpus.insert(2, 600_000_000);
        v.pcpus.insert(3, 400_000_000);
        v
    }

    fn vm(vcpus: Vec<Vcpu>) -> Vm {
        let mut vm = Vm {
            pid: 10,
            name: Some("web1".into()),
            ..Vm::default()
        };
        for v in vcpus {
            vm.vcpus.insert(v.tid, v);
        }
        vm
    }

    #[test]
    fn the_rate_threshold_s_edge() {
        // 199 moves in 2 s: 99.5/s, on every switch-in.
        let checked = rule(&vm(vec![vcpu(1, 199, 199)])).unwrap_err();
        assert!(checked.contains("at most 99.5/s, 100.0 %"), "{checked}");
        let f = rule(&vm(vec![vcpu(1, 200, 200)])).expect("100/s is a finding");
        assert_eq!(f.rule, "placement");
        assert_eq!(f.figures["kind"], "moves");
        assert_eq!(f.figures["vcpus"][0]["moves_per_s"], 100.0);
        assert!(f.evidence[0].contains("100.0 moves/s (200 in 2.000 s), on 100.0 % of its 200 switch-ins; ran on 2 CPU(s): CPU 2 (60 %), CPU 3 (40 %)"), "{:?}", f.evidence);
        assert!(
            f.change
                .setting
                .contains("virsh vcpupin web1 0 2 (or taskset -pc 2 1)"),
            "{}",
            f.change.setting
        );
        assert_eq!(f.change.scope, "per vCPU");
    }

    #[test]
    fn the_share_threshold_s_edge() {
        // 1000 moves (500/s) on 2001 switch-ins: just under half.
        assert!(rule(&vm(vec![vcpu(1, 1000, 2001)])).is_err());
        let f = rule(&vm(vec![vcpu(1, 1000, 2000)])).expect("half is a finding");
        assert_eq!(f.figures["vcpus"][0]["share"], 0.5);
        // Without run-delay's switch-ins the loads count instead.
        let mut v = vcpu(1, 1000, 0);
        v.loads = 2001;
        assert!(rule(&vm(vec![v.clone()])).is_err());
        v.loads = 2000;
        let f = rule(&vm(vec![v])).expect("half of the loads");
        assert!(
            f.evidence[0].contains("of its 2000 loads"),
            "{:?}",
            f.evidence
        );
    }

    #[test]
    fn each_moving_vcpu_gets_a_cpu_of_its_own_and_pinned_ones_none() {
        let mut pinned = vcpu(3, 0, 5000);
        pinned.pcpus.remove(&3);
        let f = rule(&vm(vec![
            vcpu(1, 900, 1000),
            vcpu(2, 900, 1000),
            vcpu(4, 900, 1000),
            pinned,
        ]))
        .expect("a finding");
        let pins: Vec<_> = f.figures["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["tid"].clone(), v["pin_cpu"].clone()))
            .collect();
        assert_eq!(
            pins,
            [
                (1.into(), 2.into()),
                (2.into(), 3.into()),
                (4.into(), serde_json::Value::Null)
            ],
            "the third has no CPU of its own left among those it ran on; the pinned vCPU is no finding"
        );
        assert!(
            f.change.setting.contains("vCPU 3 to a CPU of its own"),
            "{}",
            f.change.setting
        );
        assert!(
            f.problem.starts_with("vCPU(s) 0, 1, 3 move"),
            "{}",
            f.problem
        );
        assert_eq!(f.weight(), 0.0, "no cost counted");
    }

    #[test]
    fn vcpupin_takes_the_vmms_number_not_kvms_id() {
        // 2 sockets of 3 cores: QEMU's vCPU 3 ("CPU 3/KVM") is KVM's 4.
        let mut moved = vcpu(1, 200, 200);
        moved.vcpu_id = Some(4);
        moved.vmm_index = Some(3);
        let f = rule(&vm(vec![moved.clone()])).expect("a finding");
        assert!(
            f.change.setting.contains(
                "vCPU 4 (the VMM's 3) to CPU 2: virsh vcpupin web1 3 2 (or taskset -pc 2 1)"
            ),
            "{}",
            f.change.setting
        );
        // Without the thread's name the VMM's number is unknown: taskset only.
        moved.vmm_index = None;
        let f = rule(&vm(vec![moved])).expect("a finding");
        assert!(
            f.change
                .setting
                .contains("vCPU 4 to CPU 2: taskset -pc 2 1")
                && !f.change.setting.contains("virsh vcpupin web1"),
            "{}",
            f.change.setting
        );
    }
}
