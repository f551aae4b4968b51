//! dirty: the pages the guest dirtied against the dirty log KVM handed it,
//! tracefs's ring pushes, and (slots that move) its per-gfn counts.

use std::collections::{BTreeMap, HashMap};

use crate::common;
use crate::matrix::{Cell, Matrix, emit};
use crate::scenario::{Outcome, Run, Scenario, check_identity, run_scenario};
use crate::util::{diff, multiset, s, u};

impl Matrix {
    /// Scenario 3: Dirty pages, bitmap then ring.
    pub fn dirty_bitmap_and_ring(&self) {
        let pages = 300;
        for mode in ["bitmap", "ring"] {
            let mut vm = s(&[
                "--vcpus",
                "2",
                "--first-vcpu-id",
                "1",
                "--slots",
                "3",
                "--passes",
                "4",
                "--dirty-log",
                mode,
            ]);
            vm.extend(["--dirty-pages".into(), pages.to_string()]);
            let ring = mode == "ring";
            if ring && !self.has_ring {
                for b in self.all_runs("dirty") {
                    emit(&Cell {
                        monitor: "dirty",
                        backend: b.into(),
                        mode,
                        status: "unavailable",
                        ms: 0,
                        detail: "no dirty ring before Linux 5.11 (KVM_CAP_DIRTY_LOG_RING)".into(),
                    });
                }
                continue;
            }
            let sc = Scenario {
                vm_args: vm,
                watchers: self.watchers_for("dirty", "dirty", &[]),
                trace_events: if ring {
                    vec!["kvm_dirty_ring_push"]
                } else {
                    vec![]
                },
                trace_first: false,
                schedstat: false,
            };
            let outcome = run_scenario(&sc, &self.tmp);
            if ring {
                self.evaluate(
                    "dirty",
                    "ring",
                    outcome,
                    &|r, o| check_dirty(r, o, true, pages),
                    &[],
                );
            } else {
                self.evaluate(
                    "dirty",
                    "bitmap",
                    outcome,
                    &|r, o| self.check_dirty_bitmap(r, o, pages),
                    &["tracepoint"],
                );
            }
        }
    }

    /// The tracepoint backend sees only dirty-ring VMs: on a bitmap VM it
    /// must say so and show nothing.
    fn check_dirty_bitmap(&self, r: &Run, o: &Outcome, pages: u64) -> Result<String, String> {
        if r.label.ends_with(" tracepoint")
            || (r.label.ends_with(" default")
                && self.defaults.get("dirty").map(String::as_str) == Some("tracepoint"))
        {
            ensure!(r.ok, "{} failed: {}", r.label, r.stderr.trim());
            ensure!(
                r.rows("dirty").is_empty(),
                "rows from a bitmap VM on the tracepoint backend"
            );
            ensure!(
                r.stderr.contains("no dirty ring"),
                "no warning that bitmap VMs are invisible: {}",
                r.stderr.trim()
            );
            return Err("EXPECTED-UNAVAILABLE".into());
        }
        check_dirty(r, o, false, pages)
    }

    /// Scenario 4: Dirty pages of slots whose ids move: the guest's slots 1 and 2 trade
    /// places halfway, and the summaries' counts must keep every (slot, gfn)
    /// apart. Each backend is checked against the guest's dirty log alone.
    pub fn dirty_moved(&self) {
        let has_ring = self.has_ring;
        let mode = if has_ring { "ring" } else { "bitmap" };
        let vm = s(&[
            "--vcpus",
            "2",
            "--slots",
            "3",
            "--dirty-pages",
            "60",
            "--halt-hz",
            "100",
            "--seconds",
            "2",
            "--swap-slots-at",
            "1",
            "--dirty-log",
            mode,
        ]);
        let sc = Scenario {
            vm_args: vm,
            watchers: self.watchers_for("dirty", "dirty", &["--summary", "-i", "0.3"]),
            trace_events: vec![],
            trace_first: false,
            schedstat: false,
        };
        self.evaluate(
            "dirty",
            "moved",
            run_scenario(&sc, &self.tmp),
            &|r, o| check_dirty_moved(r, o, has_ring),
            &self.all_runs("dirty"),
        );
    }
}

fn check_dirty(run: &Run, o: &Outcome, ring: bool, pages: u64) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    let r = &o.report;
    let rows = run.rows("dirty");
    ensure!(!rows.is_empty(), "no dirty rows");
    let slots: HashMap<u64, _> = r.memslots.iter().map(|m| (m.slot as u64, m)).collect();
    let mut set = std::collections::BTreeSet::new();
    for row in &rows {
        check_identity(row, r)?;
        let slot = slots
            .get(&u(&row["slot_id"]))
            .ok_or(format!("unknown slot in {row}"))?;
        ensure!(
            u(&row["gfn"]) == slot.base_gfn + u(&row["rel_gfn"]),
            "gfn != base_gfn + rel_gfn in {row}"
        );
        ensure!(u(&row["npages"]) == slot.npages, "npages in {row}");
        ensure!(
            u(&row["userspace_addr"]) == slot.userspace_addr,
            "userspace_addr in {row}"
        );
        ensure!(u(&row["as_id"]) == 0, "as_id in {row}");
        set.insert((u(&row["slot_id"]) as u32, u(&row["rel_gfn"])));
    }
    let harvested: std::collections::BTreeSet<(u32, u64)> = r.dirty.pages.iter().cloned().collect();
    ensure!(
        set == harvested,
        "dirtied set ({} pages) vs the VM's dirty log ({} pages)",
        set.len(),
        harvested.len()
    );
    ensure!(
        set.len() as u64 == pages * r.vcpus.len() as u64,
        "{} distinct pages, expected {}",
        set.len(),
        pages * r.vcpus.len() as u64
    );
    let mut detail = format!("{} rows, {} pages = dirty log", rows.len(), set.len());
    if ring {
        let ours = multiset(rows.iter().map(|r| {
            (
                u(&r["tid"]) as u32,
                u(&r["slot_id"]) as u32,
                u(&r["rel_gfn"]),
            )
        }));
        let theirs = multiset(o.trace.ring_pushes.iter().cloned());
        ensure!(
            ours == theirs,
            "rows vs tracefs kvm_dirty_ring_push: {}",
            diff(&ours, &theirs)
        );
        detail.push_str(" = tracefs ring pushes");
    } else {
        ensure!(
            r.dirty.harvested <= rows.len() as u64,
            "KVM reported {} dirty bits, more than {} rows",
            r.dirty.harvested,
            rows.len()
        );
    }
    if let Some(f) = &run.counts_file {
        let sum: u64 = common::counts_file(f)?.iter().map(|c| c.count).sum();
        ensure!(
            sum == rows.len() as u64,
            "counts file sums to {sum}, rows {}",
            rows.len()
        );
        detail.push_str(", counts file exact");
    }
    let s = run.summary()?;
    ensure!(u(&s["lost"]["dirty"]) == 0, "lost events: {s}");
    Ok(detail)
}

/// Summary counts of a VM whose slots 1 and 2 traded places: the counts file
/// holds every (slot, gfn) the guest's dirty log named, with rel_gfn relative
/// to the place that held it (ring: the same count, entry for entry; bitmap:
/// at least the collections that found the page dirty), and the last summary
/// shows each slot at its new place.
fn check_dirty_moved(run: &Run, o: &Outcome, ring: bool) -> Result<String, String> {
    ensure!(run.ok, "{} failed: {}", run.label, run.stderr.trim());
    let r = &o.report;
    let swap = r
        .swapped
        .as_ref()
        .ok_or("the guest did not swap its slots")?;
    let truth: BTreeMap<(u32, u64), u64> = r
        .dirty
        .page_counts
        .as_ref()
        .ok_or("no per-gfn ground truth")?
        .iter()
        .map(|&(slot, gfn, n)| ((slot, gfn), n))
        .collect();
    // Pages of slots 1 and 2 were written at both places, those of slot 3 at one.
    let places: usize = r
        .dirty
        .pages
        .iter()
        .map(|&(slot, _)| if slot == 1 || slot == 2 { 2 } else { 1 })
        .sum();
    ensure!(
        truth.len() == places,
        "the guest wrote {} (slot, gfn) pages, not {places}: not every page at every place",
        truth.len()
    );
    let f = run.counts_file.as_ref().ok_or("no counts file")?;
    let counts = common::counts_file(f)?;
    let mut seen = BTreeMap::new();
    for c in &counts {
        let place = r
            .slot_holding(c.slot, c.gfn)
            .ok_or(format!("{c:?}: gfn in no place of its slot"))?;
        ensure!(c.rel_gfn == c.gfn - place.base_gfn, "rel_gfn of {c:?}");
        ensure!(
            seen.insert((c.slot, c.gfn), c.count).is_none(),
            "the counts file names slot {} gfn {:#x} twice",
            c.slot,
            c.gfn
        );
    }
    ensure!(
        seen.keys().eq(truth.keys()),
        "counts file pages ({}) vs the dirty log's ({})",
        seen.len(),
        truth.len()
    );
    for (k, n) in &truth {
        let got = seen[k];
        ensure!(
            if ring { got == *n } else { got >= *n },
            "slot {} gfn {:#x}: counted {got}, the dirty log says {n}",
            k.0,
            k.1
        );
    }
    let mut last = HashMap::new();
    for row in run.rows("dirty_summary") {
        last.insert(u(&row["slot_id"]) as u32, u(&row["base_gfn"]));
    }
    for m in swap.memslots.iter().filter(|m| m.slot == 1 || m.slot == 2) {
        ensure!(
            last.get(&m.slot) == Some(&m.base_gfn),
            "slot {} last shown at gfn {:?}, it is at {:#x}",
            m.slot,
            last.get(&m.slot),
            m.base_gfn
        );
    }
    Ok(format!(
        "{} log, slots 1 and 2 swapped: {} (slot, gfn) pages = dirty log{}; summaries follow the move",
        if ring { "ring" } else { "bitmap" },
        seen.len(),
        if ring { ", counts exact" } else { "" }
    ))
}
