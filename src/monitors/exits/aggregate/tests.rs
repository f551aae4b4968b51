//! The exits monitor's interval step from recorded readings.

use super::*;
use crate::monitors::exits::counters::by_thread;
use crate::monitors::exits::reasons::{Reasons, Vendor};
use crate::monitors::ledger::{Ledger, interval};

const US: u64 = 1000;

fn reading(tid: u32, kind: Kind, reason: u32, count: u64, ns: u64) -> ExitTotals {
    let mut hist = vec![0; 40];
    hist[10] = count;
    ExitTotals {
        pid: 100,
        tid,
        comm: format!("CPU {tid}/KVM"),
        vcpu_id: Some(tid - 10),
        kind,
        reason,
        count,
        timed: count,
        ns,
        hist,
        ..Default::default()
    }
}

fn tick(ended: u32) -> Tick {
    Tick {
        ended,
        now_ns: ended as u64 * 1_000_000_000,
        interval_ns: 1_000_000_000,
    }
}

/// A session's use of the ledger: readings in, the interval's figures out.
struct ExitsTracker {
    reasons: Reasons,
    ledger: Ledger<ThreadExits>,
    /// Threads that have exited.
    gone: Vec<u32>,
}

impl ExitsTracker {
    fn tick(
        &mut self,
        totals: Vec<ExitTotals>,
        targets: Vec<TargetReading>,
        tick: &Tick,
    ) -> Vec<ExitsInterval> {
        let rows = by_thread(Vec::new(), totals, targets, &self.reasons)
            .into_iter()
            .map(|t| (t.thread.clone(), t))
            .collect();
        intervals(
            interval(&mut self.ledger, tick.now_ns, rows, &self.gone),
            tick,
        )
    }
}

fn svm() -> ExitsTracker {
    ExitsTracker {
        reasons: Reasons::builtin(Some(Vendor::Svm)),
        ledger: Ledger::default(),
        gone: Vec::new(),
    }
}

fn target(tid: u32, kind: TargetKind, addr: u64, count: u64, vmm_ns: u64) -> TargetReading {
    TargetReading {
        tid,
        pid: 100,
        kind,
        addr,
        count,
        writes: count,
        user_exits: count,
        vmm_ns,
    }
}

#[test]
fn intervals_are_differences_by_reason_named_and_ordered_by_time() {
    let mut tr = svm();
    let mut io = reading(11, Kind::Kvm, 0x7b, 10, 50 * US);
    io.epoch = [1, 0];
    io.max_ns = [9 * US, 0];
    let hlt = reading(11, Kind::Kvm, 0x78, 2, 800 * US);
    let rows = tr.tick(vec![io.clone(), hlt.clone()], vec![], &tick(1));
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.kvm[0].name, "hlt", "most time first");
    assert_eq!(r.kvm[1].name, "io");
    assert_eq!(r.kvm[1].max_ns, Some(9 * US));
    assert_eq!(r.kvm[1].mean_ns, Some(5 * US));
    assert_eq!(r.kvm_totals(), Some((12, 850 * US)));
    assert_eq!(r.kvm_fires, Some(true));

    let mut io2 = reading(11, Kind::Kvm, 0x7b, 30, 150 * US);
    io2.epoch = [1, 2];
    io2.max_ns = [9 * US, 7 * US];
    io2.hist[10] = 30;
    let rows = tr.tick(vec![io2, hlt], vec![], &tick(2));
    let r = &rows[0];
    assert_eq!(r.kvm.len(), 1, "hlt did not happen again");
    assert_eq!((r.kvm[0].count, r.kvm[0].ns), (20, 100 * US));
    assert_eq!(r.kvm[0].max_ns, Some(7 * US), "this interval's slot only");
    assert_eq!(r.kvm[0].hist[10], 20);
    assert!((r.kvm[0].share - 100e3 / 1e9).abs() < 1e-12);
}

#[test]
fn exits_to_the_vmm_without_any_from_the_guest_are_labelled_not_zeroed() {
    let mut tr = svm();
    let io = reading(11, Kind::User, 2, 700, 350 * US);
    let rows = tr.tick(
        vec![io],
        vec![target(11, TargetKind::Pio, 0x504, 700, 350 * US)],
        &tick(1),
    );
    let r = &rows[0];
    assert_eq!(r.kvm_fires, Some(false));
    assert_eq!(r.kvm_totals(), None);
    let f = r.fields();
    assert_eq!(f["exits_kvm_exit_fires"], false);
    assert!(f["exits"].is_null() && f["exits_by_reason"].is_null());
    assert_eq!(f["exits_user"], 700);
    assert_eq!(f["exits_user_by_reason"][0]["name"], "IO");
    assert_eq!(f["exits_targets"][0]["addr"], 0x504);
    assert_eq!(f["exits_targets"][0]["kind"], "pio");
    let lines = r.lines(1_000_000_000).join("\n");
    assert!(lines.contains("kvm:kvm_exit does not fire"), "{lines}");
    assert!(lines.contains("port 0x504"), "{lines}");
    assert_eq!(r.top_cells(1_000_000_000)[0], Cell::Blank);
}

#[test]
fn signals_alone_tell_nothing_about_kvm_exit() {
    let mut tr = svm();
    let rows = tr.tick(
        vec![reading(11, Kind::User, 10, 3, 3 * US)],
        vec![],
        &tick(1),
    );
    assert_eq!(rows[0].kvm_fires, None);
    assert_eq!(rows[0].kvm_totals(), Some((0, 0)));
}

#[test]
fn targets_are_the_top_few_by_time_in_the_vmm() {
    let mut tr = svm();
    let io = reading(11, Kind::User, 2, 100, 100 * US);
    let targets: Vec<TargetReading> = (0..8)
        .map(|i| target(11, TargetKind::Pio, 0x500 + i, 10, i * US))
        .collect();
    let rows = tr.tick(vec![io], targets, &tick(1));
    let t = &rows[0].targets;
    assert_eq!(t.len(), TOP_TARGETS);
    assert_eq!(t[0].addr, 0x507);
    assert_eq!(t[4].addr, 0x503);
}

#[test]
fn a_reused_thread_id_of_another_process_starts_again() {
    let mut tr = svm();
    tr.tick(vec![reading(11, Kind::Kvm, 0x7b, 10, 10)], vec![], &tick(1));
    let mut other = reading(11, Kind::Kvm, 0x7b, 4, 4);
    other.pid = 200;
    let rows = tr.tick(vec![other], vec![], &tick(2));
    assert_eq!(rows[0].kvm[0].count, 4);
    tr.gone.push(11);
    tr.tick(Vec::new(), Vec::new(), &tick(3));
    assert!(tr.ledger.is_empty());
}

#[test]
fn an_in_exit_is_shown_in_its_interval_before_its_access_completes() {
    let mut tr = svm();
    // The IN's exit to the VMM is counted; KVM completes the access (its
    // kvm_pio) only in the next KVM_RUN, after this reading.
    let mut port = target(11, TargetKind::Pio, 0x505, 0, 40 * US);
    port.user_exits = 1;
    let rows = tr.tick(
        vec![reading(11, Kind::User, 2, 1, 40 * US)],
        vec![port.clone()],
        &tick(1),
    );
    let t = &rows[0].targets;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!((t[0].addr, t[0].count, t[0].user_exits), (0x505, 0, 1));
    port.count = 1;
    let rows = tr.tick(
        vec![reading(11, Kind::User, 2, 1, 40 * US)],
        vec![port],
        &tick(2),
    );
    assert!(rows.is_empty(), "nothing new: {rows:?}");
}
