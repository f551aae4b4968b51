//! Screens drawn on ratatui's TestBackend at fixed sizes.

use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::*;
use crate::monitors::Monitor;
use crate::top::snapshot::{FigureColumn, build};
use crate::top::state::{Header, Key};
use crate::top::testing::{Fake, Fig, Plain, Slot, part, vcpu, vm};

static FAKE: Fake = Fake;
static PLAIN: Plain = Plain;

fn state(running: bool) -> State {
    let cols = FigureColumn::all(&[&FAKE, &PLAIN], |_| running);
    let parts = vec![(
        &FAKE as &'static dyn Monitor,
        part(
            vec![vcpu(
                10,
                11,
                0,
                Fig {
                    n: 1500.0,
                    pct: 42.0,
                    ns: 200_000.0,
                    cpu: 1.0,
                },
            )],
            vec![Slot {
                pid: 10,
                pages: 8.0,
            }],
        ),
    )];
    let parts = if running { parts } else { vec![] };
    let snap = build(&cols, &parts, 1_000_000_000, &[vm(10, "web", &[11])]);
    let header = Header {
        time: "12:34:56".into(),
        kernel: "6.1.0".into(),
        backends: vec![("fake", "tracepoint")],
        lost: 0,
        cpu_percent: Some(0.5),
        rss: Some(12 << 20),
    };
    let mut s = State::new(cols, header, vec!["plain: not here".into()]);
    s.refresh(snap);
    s
}

fn screen(state: &mut State, w: u16, h: u16) -> Vec<String> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| draw(f, state)).unwrap();
    let buf = t.backend().buffer().clone();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect())
        .collect()
}

#[test]
fn the_screen_at_80x24_has_the_header_the_table_and_the_status_line() {
    let mut s = state(true);
    let lines = screen(&mut s, 80, 24);
    assert_eq!(
        lines[0].trim_end(),
        "kvm-watcher top 12:34:56  interval 1.000 s  lost 0  own CPU 0.5%  mem 12.0 MiB"
    );
    assert_eq!(lines[1].trim_end(), "kernel 6.1.0  tracepoint: fake");
    assert!(lines[2].starts_with("VMs 1  sort NAME ^"));
    assert!(lines[3].contains("NAME") && lines[3].contains("SUM/s") && lines[3].contains("ROWS"));
    let row: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(
        row,
        [
            ">",
            "+",
            "web",
            "10",
            "1",
            "1500",
            "42.0",
            "200us",
            "8",
            "kvm-watcher"
        ]
    );
    assert_eq!(lines[23].trim_end(), "plain: not here");
    assert_eq!(s.page, 24 - 3 - 1 - 1, "rows of the table body");
}

#[test]
fn columns_that_do_not_fit_scroll_and_say_so() {
    let mut s = state(true);
    let lines = screen(&mut s, 50, 10);
    assert!(
        lines[2].contains("columns 1-3 of 7 (<- ->)"),
        "{}",
        lines[2]
    );
    assert!(!lines[3].contains("MAX"));
    s.key(Key::Right);
    s.key(Key::Right);
    s.key(Key::Right);
    let lines = screen(&mut s, 50, 10);
    assert!(
        lines[3].contains("MAX") && !lines[3].contains("SUM/s"),
        "{}",
        lines[3]
    );
    assert!(
        lines[3].contains("NAME") && lines[3].contains("PID"),
        "NAME and PID stay"
    );
}

#[test]
fn a_monitor_that_does_not_run_shows_dashes() {
    let mut s = state(false);
    let lines = screen(&mut s, 100, 8);
    let row: Vec<&str> = lines[4].split_whitespace().collect();
    assert_eq!(
        row,
        [
            ">",
            "+",
            "web",
            "10",
            "1",
            "-",
            "-",
            "-",
            "-",
            "-",
            "kvm-watcher"
        ]
    );
}

#[test]
fn the_detail_pane_shows_the_monitors_sections_of_the_selected_vcpu() {
    let mut s = state(true);
    s.key(Key::Enter);
    s.key(Key::Down);
    s.key(Key::Char('d'));
    let lines = screen(&mut s, 80, 24);
    let all = lines.join("\n");
    assert!(all.contains("vCPU 0 of web (tid 11, CPU 0/KVM)"), "{all}");
    assert!(
        all.contains("fake:") && all.contains("fake: 1500 events"),
        "{all}"
    );
    assert!(
        all.contains("slots") && all.contains("slot: 8 pages"),
        "{all}"
    );
    assert!(lines[5].starts_with(">   vCPU 0"), "{}", lines[5]);
}

#[test]
fn help_lists_the_keys_and_every_column() {
    let mut s = state(true);
    s.key(Key::Char('?'));
    let all = screen(&mut s, 80, 24).join("\n");
    for needle in [
        "help (? or Esc",
        "filter by VM name",
        "SUM/s",
        "fake: sum",
        "ROWS",
    ] {
        assert!(all.contains(needle), "no {needle} in\n{all}");
    }
}

#[test]
fn a_help_taller_than_the_screen_scrolls_to_its_last_line() {
    let mut s = state(true);
    s.key(Key::Char('?'));
    let top = screen(&mut s, 80, 12).join("\n");
    assert!(top.contains("Up/Down scroll, 1-10 of"), "{top}");
    assert!(
        top.contains("Keys") && !top.contains("the VMM (for a vCPU"),
        "{top}"
    );
    s.key(Key::End);
    let bottom = screen(&mut s, 80, 12).join("\n");
    assert!(bottom.contains("the VMM (for a vCPU"), "{bottom}");
    assert!(!bottom.contains("Keys"), "{bottom}");
}

#[test]
fn the_filter_being_typed_is_in_the_status_line() {
    let mut s = state(true);
    s.key(Key::Char('/'));
    s.key(Key::Char('w'));
    let lines = screen(&mut s, 80, 24);
    assert!(lines[23].starts_with("filter by VM name: w_"));
    assert!(lines[2].contains("filter \"w\""));
}

#[test]
fn long_vm_names_widen_the_name_column_then_end_in_an_ellipsis() {
    let cols = FigureColumn::all(&[&FAKE, &PLAIN], |_| true);
    let header = Header {
        time: "12:34:56".into(),
        kernel: "6.1.0".into(),
        backends: vec![("fake", "tracepoint")],
        lost: 0,
        cpu_percent: None,
        rss: None,
    };
    let libvirt = "kw,lv test-2131-ltop";
    let openstack = "x".repeat(60);
    let snap = build(
        &cols,
        &[],
        1_000_000_000,
        &[vm(10, libvirt, &[11]), vm(20, &openstack, &[21])],
    );
    let mut s = State::new(cols, header, vec![]);
    s.refresh(snap);
    let lines = screen(&mut s, 120, 10);
    let row = |pid: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().any(|w| w == pid))
            .unwrap_or_else(|| panic!("no row of {pid}: {lines:#?}"))
            .clone()
    };
    // The whole libvirt name, then its PID after the column's 40 places.
    let name_at = row("10").find("kw,lv").unwrap();
    assert!(row("10").contains(libvirt), "{lines:#?}");
    let cut = format!("{}…", "x".repeat(37));
    assert!(row("20").contains(&format!("{cut} ")), "{lines:#?}");
    assert_eq!(row("20").find(&cut), Some(name_at), "{lines:#?}");
}
