//! dirty's interval step from recorded readings.

use super::*;
use crate::bpf::types;

fn slot(pid: u32, slot: u32, writes: u64) -> SlotReading {
    SlotReading {
        pid,
        slot,
        stats: types::dirty_slot_stats {
            writes,
            npages: 8192,
            base_gfn: 0x10000,
            userspace_addr: 0x7f00_0000_0000,
            ..Default::default()
        },
    }
}

fn tick(ended: u32) -> Tick {
    Tick {
        ended,
        now_ns: ended as u64 * 1_000_000_000,
        interval_ns: 500_000_000,
    }
}

#[test]
fn per_slot_writes_are_differences_and_distinct_pages_come_per_interval() {
    let mut s = SlotSummary::new(true);
    let readings = [slot(7, 1, 100), slot(7, 2, 40), slot(7, 1 << 16, 3)];
    let distinct = HashMap::from([((7, 1), 25), ((7, 2), 40)]);
    let rows = s.tick(&readings, &distinct, &tick(1));
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.as_id, r.slot_id, r.writes, r.distinct_pages))
        .collect();
    assert_eq!(
        got,
        [
            (0, 1, 100, Some(25)),
            (0, 2, 40, Some(40)),
            (1, 0, 3, Some(0))
        ],
        "sorted by address space and slot; the SMM slot has no distinct pages this time"
    );

    let rows = s.tick(
        &[slot(7, 1, 150), slot(7, 2, 40), slot(7, 1 << 16, 3)],
        &HashMap::from([((7, 1), 10)]),
        &tick(2),
    );
    assert_eq!(
        rows.len(),
        1,
        "slots without writes or new pages have no row"
    );
    assert_eq!((rows[0].writes, rows[0].distinct_pages), (50, Some(10)));
    assert_eq!(rows[0].interval_ns, 500_000_000);
}

#[test]
fn without_per_interval_tracking_distinct_pages_are_null() {
    let mut s = SlotSummary::new(false);
    let rows = s.tick(&[slot(7, 1, 5)], &HashMap::new(), &tick(1));
    assert_eq!(rows[0].distinct_pages, None);
    assert!(
        rows[0]
            .line()
            .ends_with("5 writes, distinct pages n/a (Linux 5.12+)")
    );
}

#[test]
fn a_slot_of_another_vm_with_the_same_id_is_counted_apart() {
    let mut s = SlotSummary::new(true);
    s.tick(&[slot(7, 1, 100)], &HashMap::new(), &tick(1));
    let rows = s.tick(
        &[slot(7, 1, 100), slot(8, 1, 30)],
        &HashMap::new(),
        &tick(2),
    );
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].pid, rows[0].writes), (8, 30));
}

#[test]
fn the_summary_line_gives_the_rate_of_distinct_pages() {
    let mut s = SlotSummary::new(true);
    // 256 pages of 4 KiB in half a second: 2 MiB/s.
    let rows = s.tick(
        &[slot(7, 1, 300)],
        &HashMap::from([((7, 1), 256)]),
        &tick(1),
    );
    assert_eq!(
        rows[0].line(),
        "    slot 1 (gfn 0x10000, 8192 pages): 300 writes, 256 distinct pages, 2.00 MiB/s"
    );
    assert!((dirty_mib_s(256, 500_000_000) - 2.0).abs() < 1e-9);
}

#[test]
fn top_cells_are_rates_and_distinct_pages_of_the_slot() {
    let mut s = SlotSummary::new(true);
    let rows = s.tick(
        &[slot(7, 1, 100)],
        &HashMap::from([((7, 1), 256)]),
        &tick(1),
    );
    let cells = rows[0].top_cells();
    assert_eq!(cells.len(), COLUMNS.len());
    assert_eq!(
        cells,
        [Cell::Value(200.0), Cell::Value(256.0), Cell::Value(2.0)],
        "100 writes and 1 MiB of distinct pages in half a second"
    );
    let mut old = SlotSummary::new(false);
    let rows = old.tick(&[slot(7, 1, 100)], &HashMap::new(), &tick(1));
    assert_eq!(
        rows[0].top_cells()[1..],
        [Cell::Blank, Cell::Blank],
        "no distinct pages before 5.12"
    );
}
