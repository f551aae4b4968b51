//! Putting the monitors' parts of an interval together, without a kernel.

use std::collections::BTreeMap;

use super::*;
use crate::monitors::vcpu_load::VcpuLoadRow;
use crate::monitors::wakeup::WakeupTotals;
use crate::monitors::{VcpuFigures, by_name};

fn thread(tid: u32, vcpu_id: Option<u32>) -> Thread {
    Thread {
        pid: 4_000_000_000,
        tid,
        comm: format!("CPU {tid}/KVM"),
        vcpu_id,
    }
}

/// Stands in for a monitor's figures: one field, one line.
struct Marker(&'static str, u64);

impl Figures for Marker {
    fn fields(&self) -> Map<String, Value> {
        Map::from_iter([(self.0.to_string(), Value::from(self.1))])
    }
    fn lines(&self, _interval_ns: u64) -> Vec<String> {
        vec![format!("    {} {}", self.0, self.1)]
    }
}

fn wakeups(tid: u32, n: u64) -> VcpuFigures {
    VcpuFigures {
        thread: thread(tid, Some(tid)),
        figures: Box::new(WakeupTotals {
            wakeups: n,
            hist: vec![0; 40],
            ..Default::default()
        }),
    }
}

fn load(tid: u32, run_ns: u64) -> VcpuFigures {
    VcpuFigures {
        thread: thread(tid, None),
        figures: Box::new(VcpuLoadRow {
            time_ns: 0,
            pid: 4_000_000_000,
            tid,
            comm: String::new(),
            vcpu_id: None,
            vm: None,
            interval_ns: 1_000_000_000,
            count: 1,
            total_ns: run_ns,
            max_ns: None,
            min_ns: None,
            pcpu: None,
            pcpus: BTreeMap::from([(0, run_ns)]),
            cpu_migrations: 0,
        }),
    }
}

fn interval(parts: Vec<(&'static str, Part)>) -> Interval {
    Interval {
        tick: Tick {
            ended: 1,
            now_ns: 5,
            interval_ns: 1_000_000_000,
        },
        parts: parts
            .into_iter()
            .map(|(name, p)| (by_name(name).unwrap(), p))
            .collect(),
    }
}

#[test]
fn every_monitors_fields_are_present_in_registry_order_null_when_absent() {
    // vcpu-load's part comes first here: the record still follows the registry.
    let mut i = interval(vec![
        (
            "vcpu_load",
            Part {
                vcpus: vec![load(11, 300)],
                ..Part::default()
            },
        ),
        (
            "wakeup",
            Part {
                vcpus: vec![wakeups(11, 7)],
                ..Part::default()
            },
        ),
    ]);
    let records = i.vcpus(&mut VmNames::default());
    assert_eq!(records.len(), 1);
    let r = &records[0];
    let want: Vec<&str> = REGISTRY
        .iter()
        .flat_map(|m| m.vcpu_fields())
        .copied()
        .collect();
    assert_eq!(
        r.figures.keys().map(String::as_str).collect::<Vec<_>>(),
        want
    );
    assert_eq!(r.figures["wakeups"], 7);
    assert_eq!(r.figures["run_ns"], 300);
    assert!(r.figures["poll_grows"].is_null(), "halt-poll did not run");
    assert_eq!(r.vcpu_id, Some(11), "learned from the part that knew it");
    assert!(
        r.lines[0].starts_with("    halted ") && r.lines[0].contains("wake-ups 7:"),
        "wakeup's lines first"
    );
    assert!(r.lines.last().unwrap().starts_with("    run: "));
}

/// halt-poll running and seeing no window change of a vCPU another monitor
/// reported: its changes are 0 and its window unknown, not all unknown.
#[test]
fn a_running_monitor_that_saw_nothing_of_a_thread_gives_its_quiet_figures() {
    let mut i = interval(vec![
        (
            "wakeup",
            Part {
                vcpus: vec![wakeups(11, 7)],
                ..Part::default()
            },
        ),
        (
            "halt_poll",
            Part {
                quiet: Some(crate::monitors::halt_poll::quiet),
                ..Part::default()
            },
        ),
    ]);
    let records = i.vcpus(&mut VmNames::default());
    let f = &records[0].figures;
    assert_eq!(
        (&f["poll_grows"], &f["poll_shrinks"], &f["poll_window_ns"]),
        (&0.into(), &0.into(), &Value::Null)
    );
    assert!(
        records[0]
            .lines
            .iter()
            .any(|l| l.contains("no window change seen"))
    );
}

/// A vCPU halted the whole interval: wakeup reports it; vcpu-load and
/// run-delay, running, saw no load and no wait: 0, not unknown, and no
/// line of zeros in the table.
#[test]
fn a_vcpu_halted_throughout_reads_zero_loaded_and_zero_waits() {
    let mut i = interval(vec![
        (
            "wakeup",
            Part {
                vcpus: vec![wakeups(11, 0)],
                ..Part::default()
            },
        ),
        (
            "vcpu_load",
            Part {
                quiet: Some(crate::monitors::vcpu_load::quiet),
                ..Part::default()
            },
        ),
        (
            "run_delay",
            Part {
                quiet: Some(crate::monitors::run_delay::quiet),
                ..Part::default()
            },
        ),
    ]);
    let records = i.vcpus(&mut VmNames::default());
    let f = &records[0].figures;
    assert_eq!((&f["run_ns"], &f["load_count"]), (&0.into(), &0.into()));
    assert_eq!(
        (&f["run_delay_ns"], &f["run_delay_waits"]),
        (&0.into(), &0.into())
    );
    assert_eq!(f["run_delay_hist"].as_array().map(Vec::len), Some(40));
    assert!(f["exits"].is_null(), "exits did not run: {f:?}");
    assert!(
        !records[0]
            .lines
            .iter()
            .any(|l| l.contains("run:") || l.contains("run delay:")),
        "{:?}",
        records[0].lines
    );
}

#[test]
fn annotations_only_add_to_threads_another_monitor_reported() {
    let mut i = interval(vec![
        (
            "wakeup",
            Part {
                vcpus: vec![wakeups(11, 1)],
                ..Part::default()
            },
        ),
        (
            "halt_poll",
            Part {
                vcpus: vec![VcpuFigures {
                    thread: thread(12, Some(12)),
                    figures: Box::new(Marker("poll_grows", 3)),
                }],
                annotations: vec![
                    VcpuFigures {
                        thread: thread(11, Some(11)),
                        figures: Box::new(Marker("poll_grows", 0)),
                    },
                    VcpuFigures {
                        thread: thread(12, Some(12)),
                        figures: Box::new(Marker("poll_grows", 99)),
                    },
                    VcpuFigures {
                        thread: thread(13, Some(13)),
                        figures: Box::new(Marker("poll_grows", 0)),
                    },
                ],
                ..Part::default()
            },
        ),
    ]);
    let records = i.vcpus(&mut VmNames::default());
    let got: Vec<(u32, Value)> = records
        .iter()
        .map(|r| (r.tid, r.figures["poll_grows"].clone()))
        .collect();
    assert_eq!(
        got,
        [(11, 0.into()), (12, 3.into())],
        "13 had nothing but a window; 12's own figures win over its annotation"
    );
}

#[test]
fn records_are_sorted_by_vm_then_vcpu_id_then_thread() {
    let mut i = interval(vec![(
        "wakeup",
        Part {
            vcpus: vec![wakeups(30, 1), wakeups(20, 1), wakeups(25, 1)],
            ..Part::default()
        },
    )]);
    let tids: Vec<u32> = i
        .vcpus(&mut VmNames::default())
        .iter()
        .map(|r| r.tid)
        .collect();
    assert_eq!(tids, [20, 25, 30]);
}
