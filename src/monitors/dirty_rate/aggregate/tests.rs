use std::time::{Duration, Instant};

use super::*;
use crate::monitors::dirty_rate::sampler::SlotCount;
use crate::monitors::dirty_rate::slots::Slot;

fn slot(id: u16, npages: u64, logging: bool) -> Slot {
    Slot {
        as_id: 0,
        id,
        base_gfn: 0x10000 * id as u64,
        npages,
        userspace_addr: 0x7f00_0000_0000 + ((id as u64) << 32),
        logging,
        readonly: false,
    }
}

fn window(pid: u32, secs: f64, counts: &[(u16, u64, u64, u64)]) -> Window {
    Window {
        pid,
        window: Duration::from_secs_f64(secs),
        elapsed_s: secs,
        ended: Instant::now(),
        ended_ns: 1_000,
        slots: counts
            .iter()
            .map(|&(id, npages, compared, changed)| SlotCount {
                slot: slot(id, npages, id == 2),
                compared,
                changed,
                nonzero: compared / 2,
            })
            .collect(),
        dropped: 0,
        unknown: 0,
        capped: false,
    }
}

fn settings(link: Option<Link>) -> Settings {
    Settings {
        rate_window: Duration::from_secs(1),
        windows: vec![
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(10),
        ],
        link,
    }
}

const TICK: Tick = Tick {
    ended: 1,
    now_ns: 5_000_000_000,
    interval_ns: 2_000_000_000,
};

#[test]
fn windows_of_an_interval_are_pooled_per_vm_and_per_slot() {
    // Two 1 s windows over slots of 1000 and 3000 pages.
    let ws = vec![
        window(7, 1.0, &[(1, 1000, 100, 10), (2, 3000, 300, 30)]),
        window(7, 1.0, &[(1, 1000, 100, 20), (2, 3000, 300, 0)]),
    ];
    let rows = Aggregator::default().tick(&ws, &settings(None), &TICK);
    assert_eq!(rows.len(), 3);
    let vm = &rows[0];
    assert_eq!(
        (vm.slot, vm.pages, vm.samples, vm.changed),
        (None, 4000, 800, 60)
    );
    // 60 of 800 changed in 1 s of 4000 pages: 300 pages/s.
    let rate = vm.rate_pages_per_s.unwrap();
    assert!((rate.estimate - 300.0).abs() < 1e-9, "{rate:?}");
    assert!(rate.low < 300.0 && rate.high > 300.0);
    assert!(vm.logging, "slot 2 logs dirty pages, so the VM does");
    assert_eq!(vm.nonzero_share, Some(0.5));
    let s1 = &rows[1];
    assert_eq!(
        (s1.slot, s1.samples, s1.changed, s1.logging),
        (Some(1), 200, 30, false)
    );
    // 30 of 200 of 1000 pages in 1 s: 150 pages/s.
    assert!((s1.rate_pages_per_s.unwrap().estimate - 150.0).abs() < 1e-9);
    assert_eq!(
        (rows[2].slot, rows[2].changed, rows[2].logging),
        (Some(2), 30, true)
    );
    // The 1 s working set is the same windows' share.
    assert_eq!(vm.working_set.len(), 1);
    assert!((vm.working_set[0].share.estimate - 60.0 / 800.0).abs() < 1e-12);
}

#[test]
fn working_sets_stay_until_their_next_window_ends() {
    let mut agg = Aggregator::default();
    let first = vec![
        window(7, 10.0, &[(1, 1000, 100, 50)]),
        window(7, 1.0, &[(1, 1000, 100, 5)]),
    ];
    agg.tick(&first, &settings(None), &TICK);
    // Next interval: only a 0.1 s and a 1 s window ended.
    let next = vec![
        window(7, 0.1, &[(1, 1000, 100, 1)]),
        window(7, 1.0, &[(1, 1000, 100, 6)]),
    ];
    let rows = agg.tick(&next, &settings(None), &TICK);
    let windows: Vec<f64> = rows[0].working_set.iter().map(|w| w.window_s).collect();
    assert_eq!(windows, vec![0.1, 1.0, 10.0]);
    assert!((rows[0].working_set[2].share.estimate - 0.5).abs() < 1e-12);
    assert!((rows[0].working_set[1].share.estimate - 0.06).abs() < 1e-12);
    // The rate comes only from the rate window's rounds.
    assert_eq!(rows[0].changed, 6);
}

#[test]
fn no_window_no_row_and_no_rate_without_the_rate_window() {
    assert!(
        Aggregator::default()
            .tick(&[], &settings(None), &TICK)
            .is_empty()
    );
    let only_ws = vec![window(7, 10.0, &[(1, 1000, 100, 50)])];
    let rows = Aggregator::default().tick(&only_ws, &settings(None), &TICK);
    assert_eq!(rows[0].rate_pages_per_s, None);
    assert_eq!(rows[0].working_set.len(), 1);
}

#[test]
fn a_link_adds_the_migration_advice() {
    // 1 GiB (262144 pages), half of it not zero, 1 % changed per second:
    // 10 MiB/s on a 100 MiB/s link converges.
    let ws = vec![window(7, 1.0, &[(1, 262_144, 10_000, 100)])];
    let link = Link {
        bytes_per_s: 100.0 * 1048576.0,
        max_downtime_s: 0.3,
    };
    let rows = Aggregator::default().tick(&ws, &settings(Some(link)), &TICK);
    let m = rows[0].migration.as_ref().unwrap();
    assert!(m.converges, "{m:?}");
    // Round 0: 512 MiB in 5.12 s; 51 MiB dirtied; then 0.51 s, 5.1 MiB: stop.
    assert_eq!(m.rounds, Some(2));
    assert!(m.text.starts_with("converges: 2 rounds"), "{}", m.text);
    assert!(rows[1].migration.is_none(), "slots get no advice");
    // On a 5 MiB/s link it does not.
    let slow = Link {
        bytes_per_s: 5.0 * 1048576.0,
        ..link
    };
    let rows = Aggregator::default().tick(&ws, &settings(Some(slow)), &TICK);
    let m = rows[0].migration.as_ref().unwrap();
    assert!(!m.converges);
    assert!(
        m.text
            .starts_with("does not converge: dirty rate 10.2 MiB/s over 1 s vs link 5.0 MiB/s"),
        "{}",
        m.text
    );
}

#[test]
fn the_table_row_escapes_the_vm_name() {
    let ws = vec![window(7, 1.0, &[(1, 1000, 100, 10)])];
    let mut rows = Aggregator::default().tick(&ws, &settings(None), &TICK);
    rows[0].vm = Some("evil\x1b[2Jname".into());
    let clock = Clock::new(crate::output::TimeFormat::Mono);
    let line = rows[0].row(&clock);
    assert!(!line.contains('\x1b'), "{line:?}");
    assert!(line.contains("all"));
    assert_eq!(rows[0].header().split_whitespace().next(), Some("PID"));
}
