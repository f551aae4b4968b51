//! The rules besides halt polling: waiting for a CPU, and exits that cost
//! the guest. Each returns its finding or a line saying what it checked.

use super::input::{Vcpu, Vm};
use super::{Change, Finding};

/// A vCPU waiting for a CPU this share of its observed time or more is a finding.
pub const MIN_WAIT_SHARE: f64 = 0.05;
/// A port, address or exit reason taking this share of a vCPU's time or more is a finding.
pub const MIN_EXIT_SHARE: f64 = 0.05;

pub(super) fn share(ns: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { ns as f64 / of as f64 }
}

/// KVM's id of the vCPU, with the VMM's number where it differs (libvirt's
/// and `virsh vcpupin`'s numbering), or its thread when no id is known.
pub(super) fn vcpu_name(v: &Vcpu) -> String {
    match (v.vcpu_id, v.vmm_index) {
        (Some(id), Some(n)) if id != n => format!("{id} (the VMM's {n})"),
        (Some(id), _) => id.to_string(),
        (None, _) => format!("tid {}", v.tid),
    }
}

pub(super) fn cpus(v: &Vcpu) -> String {
    let total: u64 = v.pcpus.values().sum();
    let mut c: Vec<_> = v.pcpus.iter().collect();
    c.sort_by(|a, b| b.1.cmp(a.1));
    c.iter()
        .take(4)
        .map(|(cpu, ns)| format!("CPU {cpu} ({:.0} %)", share(**ns, total) * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waiting for a CPU: the vCPUs that waited [`MIN_WAIT_SHARE`] of their
/// time or more, the tasks that ran instead, the CPUs they ran on.
pub fn run_delay(vm: &Vm) -> Result<Finding, String> {
    let waiting: Vec<&Vcpu> = vm
        .vcpus
        .values()
        .filter(|v| share(v.run_delay_ns, v.observed_ns) >= MIN_WAIT_SHARE)
        .collect();
    if waiting.is_empty() {
        let worst = vm
            .vcpus
            .values()
            .map(|v| share(v.run_delay_ns, v.observed_ns))
            .fold(0.0, f64::max);
        return Err(format!(
            "waiting for a CPU: at most {:.1} % of a vCPU's time (threshold {:.0} %); nothing to change",
            worst * 100.0,
            MIN_WAIT_SHARE * 100.0
        ));
    }
    let seconds = vm.observed_ns() as f64 / 1e9;
    let wait_ns: u64 = waiting.iter().map(|v| v.run_delay_ns).sum();
    let mut evidence = Vec::new();
    let mut own = Vec::new();
    let mut top: Option<(&super::input::Culprit, &Vcpu)> = None;
    for v in &waiting {
        let mut culprits: Vec<_> = v.culprits.values().collect();
        culprits.sort_by(|a, b| b.ns.cmp(&a.ns).then(a.tid.cmp(&b.tid)));
        let names: Vec<String> = culprits
            .iter()
            .take(3)
            .map(|c| {
                format!(
                    "{} (pid {}, tid {}{}) {:.0} %",
                    crate::output::terminal_safe(&c.comm),
                    c.pid,
                    c.tid,
                    c.vm.as_deref().map_or(String::new(), |n| format!(
                        ", VM {}",
                        crate::output::terminal_safe(n)
                    )),
                    share(c.ns, v.run_delay_ns) * 100.0
                )
            })
            .collect();
        for c in &culprits {
            if c.pid == vm.pid {
                own.push(c.tid);
            }
        }
        if let Some(c) = culprits.first()
            && top.is_none_or(|(t, _)| c.ns > t.ns)
        {
            top = Some((c, v));
        }
        evidence.push(format!(
            "vCPU {}: waited {:.3} s of {:.3} s ({:.1} %) on {}; ran instead: {}",
            vcpu_name(v),
            v.run_delay_ns as f64 / 1e9,
            v.observed_ns as f64 / 1e9,
            share(v.run_delay_ns, v.observed_ns) * 100.0,
            cpus(v),
            if names.is_empty() {
                "(not recorded)".into()
            } else {
                names.join(", ")
            }
        ));
    }
    let (setting, scope) = match top {
        Some((c, v)) if c.pid == vm.pid => (
            format!(
                "the VM's own vCPUs compete for the same CPU: give each vCPU a CPU of its own (virsh vcpupin / taskset -pc CPU {}), or fewer vCPUs than CPUs it may use",
                v.tid
            ),
            "per vCPU".to_string(),
        ),
        Some((c, v)) => {
            let cpu = v.pcpus.iter().max_by_key(|(_, ns)| **ns).map(|(c, _)| *c);
            (
                format!(
                    "move {} (pid {}) off CPU {} (taskset -apc OTHER_CPUS {}), or pin the vCPUs to CPUs nothing else runs on (virsh vcpupin; isolcpus/cpuset for the host's tasks)",
                    crate::output::terminal_safe(&c.comm),
                    c.pid,
                    cpu.map_or("?".into(), |c| c.to_string()),
                    c.pid
                ),
                "host task, per vCPU".to_string(),
            )
        }
        None => (
            "pin the vCPUs to CPUs nothing else runs on (virsh vcpupin; isolcpus/cpuset)".into(),
            "per vCPU".into(),
        ),
    };
    own.sort_unstable();
    own.dedup();
    Ok(Finding {
        rule: "run_delay",
        problem: format!(
            "{} vCPU(s) wait for a CPU {:.1} % of the time",
            waiting.len(),
            share(wait_ns, waiting.iter().map(|v| v.observed_ns).sum()) * 100.0
        ),
        evidence,
        cost_cpu: 0.0,
        guest_time_lost: wait_ns as f64 / 1e9 / seconds.max(1e-9),
        change: Change { setting, scope },
        predicted: format!(
            "up to {:.3} s/s of vCPU time back (the waits behind other tasks)",
            wait_ns as f64 / 1e9 / seconds.max(1e-9)
        ),
        figures: serde_json::json!({
            "wait_ns": wait_ns,
            "vcpus": waiting.iter().map(|v| serde_json::json!({
                "tid": v.tid, "vcpu_id": v.vcpu_id, "run_delay_ns": v.run_delay_ns,
                "observed_ns": v.observed_ns,
                "share": share(v.run_delay_ns, v.observed_ns),
                "pcpus": v.pcpus,
                "culprits": v.culprits.values().map(|c| serde_json::json!({
                    "pid": c.pid, "tid": c.tid, "comm": c.comm, "vm": c.vm, "ns": c.ns})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "own_vcpus_competing": own,
        }),
    })
}

/// Known legacy I/O ports: first port, last port, the device, what to use instead.
pub const LEGACY_PORTS: &[(u64, u64, &str, &str)] = &[
    (
        0x20,
        0x21,
        "i8259 PIC (master)",
        "the in-kernel irqchip with the local APIC / x2APIC (KVM's split or full irqchip)",
    ),
    (
        0xa0,
        0xa1,
        "i8259 PIC (slave)",
        "the in-kernel irqchip with the local APIC / x2APIC",
    ),
    (
        0x40,
        0x43,
        "i8254 PIT",
        "kvm-clock and the LAPIC TSC-deadline timer (guest clocksource=kvm-clock)",
    ),
    (
        0x60,
        0x60,
        "i8042 PS/2 controller (data)",
        "virtio-input or usb-tablet",
    ),
    (
        0x64,
        0x64,
        "i8042 PS/2 controller (status)",
        "virtio-input or usb-tablet",
    ),
    (
        0x70,
        0x71,
        "MC146818 RTC / CMOS",
        "kvm-clock for time keeping",
    ),
    (
        0x80,
        0x80,
        "POST / I/O delay port",
        "io_delay=none on the guest kernel's command line",
    ),
    (
        0x170,
        0x177,
        "IDE secondary channel",
        "virtio-blk or virtio-scsi",
    ),
    (
        0x1f0,
        0x1f7,
        "IDE primary channel",
        "virtio-blk or virtio-scsi",
    ),
    (0x2f8, 0x2ff, "16550 UART COM2", "virtio-console"),
    (
        0x3f8,
        0x3ff,
        "16550 UART COM1",
        "virtio-console (or a quieter serial console)",
    ),
    (0x3c0, 0x3df, "VGA", "virtio-gpu or bochs-display"),
    (
        0x402,
        0x402,
        "ISA debug console (SeaBIOS)",
        "drop isa-debugcon",
    ),
    (0x510, 0x511, "QEMU fw_cfg", "fw_cfg DMA (QEMU 2.9+)"),
    (
        0x604,
        0x60b,
        "ACPI PM timer (q35)",
        "kvm-clock (guest clocksource=kvm-clock)",
    ),
    (
        0xb008,
        0xb00b,
        "ACPI PM timer (PIIX)",
        "kvm-clock (guest clocksource=kvm-clock)",
    ),
    (
        0xcf8,
        0xcff,
        "PCI configuration (port I/O)",
        "MMCONFIG (the q35 machine type)",
    ),
];

/// The device behind legacy port `port`, and its replacement, if known.
pub fn legacy(port: u64) -> Option<(&'static str, &'static str)> {
    LEGACY_PORTS
        .iter()
        .find(|(lo, hi, _, _)| (*lo..=*hi).contains(&port))
        .map(|(_, _, d, r)| (*d, *r))
}

/// One port, address or reason over the threshold, over a VM's vCPUs.
#[derive(Default)]
struct Hot {
    evidence: Vec<String>,
    ns: u64,
    worst: f64,
    vcpus: Vec<serde_json::Value>,
}

impl Hot {
    fn add(&mut self, line: String, ns: u64, share: f64, vcpu: serde_json::Value) {
        self.evidence.push(line);
        self.ns += ns;
        self.worst = self.worst.max(share);
        self.vcpus.push(vcpu);
    }
}

/// Exits that cost the guest: a port, an address or an exit reason taking
/// [`MIN_EXIT_SHARE`] of a vCPU's time or more; one finding per target.
pub fn exits(vm: &Vm) -> Vec<Result<Finding, String>> {
    use std::collections::BTreeMap;
    let mut hot: BTreeMap<(String, u64), Hot> = BTreeMap::new();
    let mut worst = 0.0f64;
    for v in vm.vcpus.values() {
        for t in v.targets.values() {
            let s = share(t.vmm_ns, v.observed_ns);
            worst = worst.max(s);
            if s >= MIN_EXIT_SHARE {
                hot.entry((t.kind.clone(), t.addr)).or_default().add(
                    format!(
                        "vCPU {}: {} accesses, {:.3} s in the VMM of {:.3} s ({:.1} %)",
                        vcpu_name(v),
                        t.count,
                        t.vmm_ns as f64 / 1e9,
                        v.observed_ns as f64 / 1e9,
                        s * 100.0
                    ),
                    t.vmm_ns,
                    s,
                    serde_json::json!({"tid": v.tid, "vcpu_id": v.vcpu_id,
                        "count": t.count, "vmm_ns": t.vmm_ns, "observed_ns": v.observed_ns, "share": s}),
                );
            }
        }
        for (name, (count, ns)) in &v.exit_reasons {
            let s = share(*ns, v.observed_ns);
            worst = worst.max(s);
            if s >= MIN_EXIT_SHARE {
                hot.entry((format!("reason {name}"), 0)).or_default().add(
                    format!(
                        "vCPU {}: {count} exits, {:.3} s in KVM ({:.1} %)",
                        vcpu_name(v),
                        *ns as f64 / 1e9,
                        s * 100.0
                    ),
                    *ns,
                    s,
                    serde_json::json!({"tid": v.tid, "vcpu_id": v.vcpu_id,
                        "count": count, "ns": ns, "observed_ns": v.observed_ns, "share": s}),
                );
            }
        }
    }
    if hot.is_empty() {
        return vec![Err(format!(
            "exits: no port, address or reason takes more than {:.1} % of a vCPU's time (threshold {:.0} %); nothing to change",
            worst * 100.0,
            MIN_EXIT_SHARE * 100.0
        ))];
    }
    let seconds = vm.observed_ns() as f64 / 1e9;
    hot.into_iter()
        .map(|((kind, addr), h)| {
            let Hot {
                evidence,
                ns,
                worst,
                vcpus: per_vcpu,
            } = h;
            let what = match kind.as_str() {
                "pio" => format!("I/O port {addr:#x}"),
                "mmio" => format!("guest-physical address {addr:#x}"),
                other => other.to_string(),
            };
            let known = (kind == "pio").then(|| legacy(addr)).flatten();
            let (setting, predicted) = match known {
                Some((device, instead)) => (
                    format!("the guest uses {device} at {what}: replace it with {instead}"),
                    format!("up to {:.3} s/s of vCPU time back", ns as f64 / 1e9 / seconds.max(1e-9)),
                ),
                None => (
                    format!("find what the guest does at {what} (no known paravirtual replacement for it); make it access it less often"),
                    format!("each tenth fewer accesses gives back {:.4} s/s of vCPU time", ns as f64 / 1e10 / seconds.max(1e-9)),
                ),
            };
            Ok(Finding {
                rule: "exits",
                problem: format!(
                    "{what} takes {:.1} % of a vCPU's time{}",
                    worst * 100.0,
                    known.map_or(String::new(), |(d, _)| format!(" ({d})"))
                ),
                evidence,
                cost_cpu: 0.0,
                guest_time_lost: ns as f64 / 1e9 / seconds.max(1e-9),
                change: Change {
                    setting,
                    scope: "per VM (its device model or guest)".into(),
                },
                predicted,
                figures: serde_json::json!({"kind": kind, "addr": addr, "ns": ns,
                    "share": worst, "device": known.map(|k| k.0),
                    "replacement": known.map(|k| k.1), "vcpus": per_vcpu}),
            })
        })
        .collect()
}

/// Two vCPUs of one VM that each spent this share of their run time on
/// one CPU or more share it.
pub const MIN_SAME_CPU_SHARE: f64 = 0.8;
/// ... when each ran at least this share of the time (idle vCPUs may share).
pub const MIN_BUSY_SHARE: f64 = 0.1;

/// The CPU `v` ran on most, and its share of `v`'s run time.
fn main_cpu(v: &Vcpu) -> Option<(u32, f64)> {
    let total: u64 = v.pcpus.values().sum();
    v.pcpus
        .iter()
        .max_by_key(|(_, ns)| **ns)
        .map(|(cpu, ns)| (*cpu, share(*ns, total)))
}

/// vCPU placement: busy vCPUs of one VM that run on the same CPU most of
/// the time, with the time each waited behind the others.
pub fn placement(vm: &Vm) -> Result<Finding, String> {
    use std::collections::BTreeMap;
    let mut by_cpu: BTreeMap<u32, Vec<&Vcpu>> = BTreeMap::new();
    for v in vm.vcpus.values() {
        if share(v.run_ns, v.observed_ns) < MIN_BUSY_SHARE {
            continue;
        }
        if let Some((cpu, s)) = main_cpu(v)
            && s >= MIN_SAME_CPU_SHARE
        {
            by_cpu.entry(cpu).or_default().push(v);
        }
    }
    let Some((cpu, shared)) = by_cpu.into_iter().find(|(_, v)| v.len() >= 2) else {
        return Err(format!(
            "placement: no two busy vCPUs (running {:.0} % of the time or more) share a CPU",
            MIN_BUSY_SHARE * 100.0
        ));
    };
    let tids: Vec<u32> = shared.iter().map(|v| v.tid).collect();
    let seconds = vm.observed_ns() as f64 / 1e9;
    let mut mutual_ns = 0;
    let mut evidence = Vec::new();
    for v in &shared {
        let behind: u64 = v
            .culprits
            .values()
            .filter(|c| c.tid != v.tid && tids.contains(&c.tid))
            .map(|c| c.ns)
            .sum();
        mutual_ns += behind;
        evidence.push(format!(
            "vCPU {} (tid {}): ran {:.1} % of the time, {:.0} % of it on CPU {cpu}; waited {:.3} s, {:.3} s of it behind the VM's other vCPUs there",
            vcpu_name(v),
            v.tid,
            share(v.run_ns, v.observed_ns) * 100.0,
            main_cpu(v).map_or(0.0, |(_, s)| s) * 100.0,
            v.run_delay_ns as f64 / 1e9,
            behind as f64 / 1e9
        ));
    }
    let names: Vec<String> = shared.iter().map(|v| vcpu_name(v)).collect();
    Ok(Finding {
        rule: "placement",
        problem: format!("vCPUs {} of one VM share CPU {cpu}", names.join(", ")),
        evidence,
        cost_cpu: 0.0,
        guest_time_lost: mutual_ns as f64 / 1e9 / seconds.max(1e-9),
        change: Change {
            setting: format!(
                "give each of these vCPUs a CPU of its own: virsh vcpupin DOMAIN VCPU CPU (or taskset -pc CPU TID for threads {})",
                tids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            scope: "per vCPU".into(),
        },
        predicted: format!(
            "up to {:.3} s/s of vCPU time back (their waits behind each other)",
            mutual_ns as f64 / 1e9 / seconds.max(1e-9)
        ),
        figures: serde_json::json!({"kind": "shared_cpu", "cpu": cpu, "tids": tids, "mutual_wait_ns": mutual_ns,
            "vcpus": shared.iter().map(|v| serde_json::json!({"tid": v.tid, "vcpu_id": v.vcpu_id,
                "run_ns": v.run_ns, "run_delay_ns": v.run_delay_ns, "observed_ns": v.observed_ns,
                "pcpus": v.pcpus})).collect::<Vec<_>>()}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::input::{Culprit, Target};

    fn vcpu(run_delay_ns: u64) -> Vcpu {
        let mut v = Vcpu {
            pid: 10,
            tid: 11,
            vcpu_id: Some(0),
            observed_ns: 1_000_000_000,
            run_delay_ns,
            ..Vcpu::default()
        };
        v.pcpus.insert(1, 500_000_000);
        v.culprits.insert(
            99,
            Culprit {
                pid: 99,
                tid: 99,
                comm: "hog".into(),
                vm: None,
                ns: run_delay_ns,
            },
        );
        v
    }

    fn vm_with(v: Vcpu) -> Vm {
        let mut vm = Vm {
            pid: 10,
            ..Vm::default()
        };
        vm.vcpus.insert(v.tid, v);
        vm
    }

    #[test]
    fn waiting_threshold_edges_and_the_named_task() {
        assert!(run_delay(&vm_with(vcpu(49_999_999))).is_err());
        let f = run_delay(&vm_with(vcpu(50_000_000))).expect("at the threshold");
        assert!(
            f.change.setting.contains("hog (pid 99) off CPU 1"),
            "{}",
            f.change.setting
        );
        assert!((f.guest_time_lost - 0.05).abs() < 1e-9);
    }

    #[test]
    fn exit_threshold_edges_and_known_ports() {
        let mut v = vcpu(0);
        v.targets.insert(
            ("pio".into(), 0x3f8),
            Target {
                kind: "pio".into(),
                addr: 0x3f8,
                count: 5,
                vmm_ns: 49_999_999,
            },
        );
        let out = exits(&vm_with(v.clone()));
        assert!(out[0].is_err());
        v.targets.get_mut(&("pio".into(), 0x3f8)).unwrap().vmm_ns = 50_000_000;
        let f = exits(&vm_with(v)).remove(0).expect("at the threshold");
        assert!(
            f.problem.contains("0x3f8") && f.problem.contains("COM1"),
            "{}",
            f.problem
        );
        assert!(f.change.setting.contains("virtio-console"));
        assert_eq!(legacy(0x504), None);
        assert_eq!(
            legacy(0xcfc).map(|l| l.0),
            Some("PCI configuration (port I/O)")
        );
    }

    #[test]
    fn busy_vcpus_on_one_cpu_are_a_placement_finding() {
        let vcpu_on = |tid: u32, cpu: u32, run_ns: u64, other: u32| {
            let mut v = vcpu(100_000_000);
            v.tid = tid;
            v.vcpu_id = Some(tid);
            v.run_ns = run_ns;
            v.pcpus.clear();
            v.pcpus.insert(cpu, run_ns);
            v.culprits.clear();
            v.culprits.insert(
                other,
                Culprit {
                    pid: 10,
                    tid: other,
                    comm: "CPU x/KVM".into(),
                    vm: None,
                    ns: 80_000_000,
                },
            );
            v
        };
        let mut vm = vm_with(vcpu_on(1, 3, 500_000_000, 2));
        vm.vcpus.insert(2, vcpu_on(2, 3, 500_000_000, 1));
        let f = placement(&vm).expect("a finding");
        assert_eq!(f.figures["cpu"], 3);
        assert_eq!(f.figures["mutual_wait_ns"], 160_000_000);
        // Just under busy: nothing.
        let mut vm = vm_with(vcpu_on(1, 3, 99_999_999, 2));
        vm.vcpus.insert(2, vcpu_on(2, 3, 500_000_000, 1));
        assert!(placement(&vm).is_err());
        // On different CPUs: nothing.
        let mut vm = vm_with(vcpu_on(1, 3, 500_000_000, 2));
        vm.vcpus.insert(2, vcpu_on(2, 0, 500_000_000, 1));
        assert!(placement(&vm).is_err());
    }
}
