//! Keys and refreshes on made-up snapshots.

use super::*;
use crate::monitors::Monitor;
use crate::top::snapshot::build;
use crate::top::testing::{Fake, Fig, Slot, part, vcpu, vm};

static FAKE: Fake = Fake;

fn fig(n: f64) -> Fig {
    Fig {
        n,
        pct: n / 10.0,
        ns: n,
        cpu: 0.0,
    }
}

/// VMs `web` (pid 10: vCPUs 11, 12), `db` (20: 21) and `batch` (30: 31),
/// with `rates[i]` events per second on each vCPU in that order.
fn snapshot(rates: [f64; 4]) -> Snapshot {
    let cols = FigureColumn::all(&[&FAKE], |_| true);
    let parts = vec![(
        &FAKE as &'static dyn Monitor,
        part(
            vec![
                vcpu(10, 11, 0, fig(rates[0])),
                vcpu(10, 12, 1, fig(rates[1])),
                vcpu(20, 21, 0, fig(rates[2])),
                vcpu(30, 31, 0, fig(rates[3])),
            ],
            vec![Slot {
                pid: 20,
                pages: 3.0,
            }],
        ),
    )];
    build(
        &cols,
        &parts,
        1_000_000_000,
        &[
            vm(10, "web", &[11, 12]),
            vm(20, "db", &[21]),
            vm(30, "batch", &[31]),
        ],
    )
}

fn state() -> State {
    let mut s = State::new(
        FigureColumn::all(&[&FAKE], |_| true),
        Header::default(),
        vec![],
    );
    s.refresh(snapshot([100.0, 300.0, 50.0, 10.0]));
    s
}

fn names(s: &State) -> Vec<String> {
    s.rows()
        .iter()
        .map(|r| match r.vcpu {
            Some(v) => format!("{}/{}", r.vm.name, v.tid),
            None => r.vm.name.clone(),
        })
        .collect()
}

fn keys(s: &mut State, keys: &[Key]) {
    for k in keys {
        assert!(!s.key(*k), "{k:?} quit");
    }
}

#[test]
fn vms_sort_by_name_first_then_by_any_column_busiest_first() {
    let mut s = state();
    assert_eq!(names(&s), ["batch", "db", "web"]);
    assert_eq!(
        s.selected,
        Some(RowKey::Vm(30)),
        "the first row is selected"
    );
    keys(&mut s, &[Key::Char('>')]);
    assert_eq!(s.sort, Col::Pid);
    assert_eq!(names(&s), ["web", "db", "batch"]);
    keys(&mut s, &[Key::Char('>'), Key::Char('>')]);
    assert_eq!((s.sort, s.descending), (Col::Figure(0), true));
    assert_eq!(names(&s), ["web", "db", "batch"], "400, 50, 10 per second");
    keys(&mut s, &[Key::Char('r')]);
    assert_eq!(names(&s), ["batch", "db", "web"]);
    keys(
        &mut s,
        &[
            Key::Char('<'),
            Key::Char('<'),
            Key::Char('<'),
            Key::Char('<'),
        ],
    );
    assert_eq!(s.sort, Col::Vmm, "wraps around");
}

#[test]
fn rows_without_a_figure_sort_last_both_ways() {
    let mut s = state();
    // Column ROWS (index 4): only db has per-VM rows; the others have 0.
    s.sort = Col::Figure(4);
    s.descending = true;
    assert_eq!(names(&s)[0], "db");
    // OWN (index 3) is blank for every VM: the name decides.
    s.sort = Col::Figure(3);
    assert_eq!(names(&s), ["batch", "db", "web"]);
}

#[test]
fn expanding_shows_vcpus_sorted_like_their_vms() {
    let mut s = state();
    keys(&mut s, &[Key::End, Key::Enter]);
    assert_eq!(names(&s), ["batch", "db", "web", "web/11", "web/12"]);
    s.sort = Col::Figure(0);
    s.descending = true;
    assert_eq!(names(&s), ["web", "web/12", "web/11", "db", "batch"]);
    keys(&mut s, &[Key::Char('+')]);
    assert_eq!(s.rows().len(), 7);
    keys(&mut s, &[Key::Down, Key::Down]);
    assert_eq!(s.selected, Some(RowKey::Vcpu(10, 11)));
    keys(&mut s, &[Key::Char('-')]);
    assert_eq!(s.rows().len(), 3);
    assert_eq!(
        s.selected,
        Some(RowKey::Vm(10)),
        "collapsing selects the vCPU's VM"
    );
}

#[test]
fn the_filter_keeps_matching_names_and_can_be_cancelled() {
    let mut s = state();
    keys(&mut s, &[Key::Char('/'), Key::Char('W'), Key::Char('e')]);
    assert_eq!(names(&s), ["web"], "applies while typed, ignoring case");
    assert_eq!(s.selected, Some(RowKey::Vm(10)));
    keys(&mut s, &[Key::Char('q')]);
    assert_eq!(s.current_filter(), "Weq", "q is text while typing");
    keys(&mut s, &[Key::Backspace, Key::Enter]);
    assert_eq!((s.filter.as_str(), s.editing.is_none()), ("We", true));
    keys(&mut s, &[Key::Char('/'), Key::Char('x'), Key::Esc]);
    assert_eq!(
        names(&s),
        ["web"],
        "Esc while typing keeps the filter in force"
    );
    keys(&mut s, &[Key::Esc]);
    assert_eq!(names(&s).len(), 3, "Esc clears it");
}

#[test]
fn detail_help_and_pause_toggle_and_esc_closes_them() {
    let mut s = state();
    keys(&mut s, &[Key::Char('+'), Key::Down, Key::Enter]);
    assert!(s.detail, "Enter on a vCPU opens its detail pane");
    assert_eq!(s.selected_line().unwrap().vcpu.unwrap().tid, 31);
    keys(&mut s, &[Key::Char('?')]);
    assert!(s.help && s.detail);
    keys(&mut s, &[Key::Esc]);
    assert!(!s.help && s.detail);
    keys(&mut s, &[Key::Esc]);
    assert!(!s.detail);
    keys(&mut s, &[Key::Char('p')]);
    s.refresh(snapshot([1.0, 1.0, 1.0, 9999.0]));
    assert_eq!(
        s.snapshot.vms[2].cells[0],
        Cell::Value(10.0),
        "paused: not shown"
    );
    keys(&mut s, &[Key::Char('p')]);
    s.refresh(snapshot([1.0, 1.0, 1.0, 9999.0]));
    assert_eq!(s.snapshot.vms[2].cells[0], Cell::Value(9999.0));
    assert!(s.key(Key::Char('q')) && s.key(Key::Interrupt));
}

#[test]
fn while_the_help_is_up_the_moving_keys_scroll_it_not_the_selection() {
    let mut s = state();
    keys(&mut s, &[Key::Char('+'), Key::Down]);
    let selected = s.selected;
    keys(
        &mut s,
        &[Key::Char('?'), Key::Down, Key::Down, Key::PageDown],
    );
    assert_eq!(s.selected, selected, "the selection stays");
    assert!(s.help_scroll >= 2);
    keys(&mut s, &[Key::Home]);
    assert_eq!(s.help_scroll, 0);
    keys(&mut s, &[Key::Up]);
    assert_eq!(s.help_scroll, 0, "not above the top");
    keys(&mut s, &[Key::End, Key::Char('?'), Key::Char('?')]);
    assert_eq!(s.help_scroll, 0, "it opens at the top");
}

#[test]
fn vms_that_go_keep_the_selection_near_and_new_ones_appear() {
    let mut s = state();
    keys(&mut s, &[Key::Down, Key::Down]);
    assert_eq!(s.selected, Some(RowKey::Vm(10)));
    s.expanded.insert(10);
    let mut next = snapshot([1.0; 4]);
    next.vms.retain(|v| v.pid != 10);
    s.refresh(next);
    assert_eq!(names(&s), ["batch", "db"]);
    assert_eq!(
        s.selected,
        Some(RowKey::Vm(20)),
        "the last row, where web was"
    );
    assert!(s.expanded.is_empty(), "a VM that is gone is forgotten");
    s.refresh(snapshot([1.0; 4]));
    assert_eq!(names(&s), ["batch", "db", "web"]);
    assert_eq!(
        s.selected,
        Some(RowKey::Vm(20)),
        "the selection stays on its row"
    );
}

#[test]
fn cpu_use_is_the_difference_of_two_readings() {
    let mut m = CpuMeter::default();
    assert_eq!(m.sample(10.0, 100.0), None, "one reading is not a rate");
    assert_eq!(m.sample(10.5, 102.0), Some(25.0));
    assert_eq!(m.sample(10.5, 102.0), None, "no time passed");
}

#[test]
fn warnings_are_cleaned_and_only_the_latest_kept() {
    let mut s = state();
    s.warn(vec!["a".into(), "b\x1b".into()]);
    s.warn(vec!["c".into(), "d".into()]);
    assert_eq!(s.warnings, ["b?", "c", "d"]);
}
