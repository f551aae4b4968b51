//! Putting a refresh together from made-up parts.

use super::*;
use crate::top::testing::{Fake, Fig, Plain, Slot, part, vcpu, vm};

static FAKE: Fake = Fake;
static PLAIN: Plain = Plain;

fn columns(running: bool) -> Vec<FigureColumn> {
    FigureColumn::all(&[&FAKE, &PLAIN], |_| running)
}

fn fig(n: f64, pct: f64, ns: f64) -> Fig {
    Fig {
        n,
        pct,
        ns,
        cpu: 1.0,
    }
}

#[test]
fn vm_rows_follow_each_columns_rule() {
    let cols = columns(true);
    assert_eq!(cols.len(), 5, "the plain monitor has no column");
    let parts = vec![(
        &FAKE as &'static dyn Monitor,
        part(
            vec![
                vcpu(10, 11, 0, fig(100.0, 90.0, 2000.0)),
                vcpu(10, 12, 1, fig(300.0, 50.0, 8000.0)),
            ],
            vec![
                Slot {
                    pid: 10,
                    pages: 5.0,
                },
                Slot {
                    pid: 10,
                    pages: 7.0,
                },
            ],
        ),
    )];
    let s = build(&cols, &parts, 500_000_000, &[vm(10, "a", &[11, 12, 13])]);
    assert_eq!(s.vms.len(), 1);
    let v = &s.vms[0];
    assert_eq!(
        v.vcpus.len(),
        3,
        "the idle thread /proc shows has a row too"
    );
    assert_eq!(
        v.vcpus[0].cells[0],
        Cell::Value(200.0),
        "a rate of the half-second interval"
    );
    assert_eq!(
        v.vcpus[2].cells[0],
        Cell::Value(0.0),
        "idle: the column's idle cell"
    );
    assert_eq!(v.vcpus[2].cells[2], Cell::Blank);
    assert_eq!(
        v.vcpus[0].cells[4],
        Cell::Blank,
        "per-VM columns are empty for vCPUs"
    );
    assert_eq!(v.cells[0], Cell::Value(800.0), "Sum");
    assert_eq!(
        v.cells[1],
        Cell::Value(140.0 / 3.0),
        "Mean over every vCPU, the idle one as 0"
    );
    assert_eq!(v.cells[2], Cell::Value(8000.0), "Max");
    assert_eq!(v.cells[3], Cell::Blank, "Blank");
    assert_eq!(
        v.cells[4],
        Cell::Value(12.0),
        "Rows: the VM's rows added up"
    );
    assert_eq!(v.sections.len(), 1);
    assert_eq!(v.sections[0].title, "slots");
    assert_eq!(v.sections[0].lines, ["slot: 5 pages", "slot: 7 pages"]);
    assert_eq!(
        v.vcpus[0].sections,
        [Section {
            title: "fake".into(),
            lines: vec!["fake: 100 events".into(), "  cpu 1".into()],
        }],
        "summary lines, their shared indentation removed"
    );
    assert_eq!(v.vcpus[0].vcpu_id, Some(0), "the vCPU id the monitor knows");
}

#[test]
fn shares_of_a_vm_add_up_parts_and_wholes() {
    let a = Cell::Share {
        part: 1.0,
        whole: 4.0,
    };
    let b = Cell::Share {
        part: 3.0,
        whole: 4.0,
    };
    assert_eq!(add(&add(&Cell::Blank, &a), &b).number(), Some(50.0));
    assert_eq!(add(&Cell::Text("x".into()), &Cell::Blank), Cell::Blank);
}

#[test]
fn columns_of_a_monitor_that_does_not_run_are_blank_and_marked() {
    let cols = columns(false);
    assert!(cols.iter().all(|c| !c.running));
    let s = build(&cols, &[], 1_000_000_000, &[vm(10, "a", &[11])]);
    assert!(s.vms[0].cells.iter().all(|c| *c == Cell::Blank));
    assert!(s.vms[0].vcpus[0].cells.iter().all(|c| *c == Cell::Blank));
}

#[test]
fn vms_that_exited_are_gone_and_new_ones_appear() {
    let cols = columns(true);
    let parts = vec![(
        &FAKE as &'static dyn Monitor,
        part(
            vec![
                vcpu(10, 11, 0, fig(1.0, 1.0, 1.0)),
                vcpu(20, 21, 0, fig(1.0, 1.0, 1.0)),
            ],
            vec![Slot {
                pid: 20,
                pages: 1.0,
            }],
        ),
    )];
    // pid 20 has exited: its last figures are not shown; pid 30 is new.
    let s = build(
        &cols,
        &parts,
        1_000_000_000,
        &[vm(10, "a", &[11]), vm(30, "c", &[])],
    );
    let pids: Vec<u32> = s.vms.iter().map(|v| v.pid).collect();
    assert_eq!(pids, [10, 30]);
    assert!(s.vms[1].vcpus.is_empty());
    assert_eq!(
        s.vms[1].cells[4],
        Cell::Value(0.0),
        "a running monitor saw nothing of it"
    );
}

#[test]
fn names_from_the_guest_side_are_not_sent_raw() {
    let cols = columns(true);
    let s = build(&cols, &[], 1, &[vm(10, "evil\x1b[2Jname\n", &[11])]);
    assert_eq!(s.vms[0].name, "evil?[2Jname?");
}

#[test]
fn a_vm_that_exited_shows_its_last_figures_then_goes() {
    let parts = vec![(
        &FAKE as &'static dyn Monitor,
        part(vec![vcpu(20, 21, 0, fig(5.0, 1.0, 1.0))], vec![]),
    )];
    let before = [vm(10, "a", &[11]), vm(20, "b", &[21]), vm(30, "c", &[31])];
    let shown = with_exited(vec![vm(10, "a", &[11])], &before, &parts);
    let got: Vec<(u32, &str)> = shown.iter().map(|v| (v.pid, v.vmm.as_str())).collect();
    assert_eq!(
        got,
        [(10, "kvm-watcher"), (20, "exited")],
        "c exited without figures: gone at once"
    );
    let s = build(&columns(true), &parts, 1_000_000_000, &shown);
    assert_eq!(s.vms[1].cells[0], Cell::Value(5.0), "b's last interval");
    let again = with_exited(vec![vm(10, "a", &[11])], &shown, &parts);
    assert_eq!(again.len(), 2, "while figures of it come, it stays");
    let next = with_exited(vec![vm(10, "a", &[11])], &again, &[]);
    assert_eq!(next.len(), 1, "and then it is gone");
}
