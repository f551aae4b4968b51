//! dirty's section of `kvm-watcher demo`: the pages it saw dirtied next to
//! those the guest harvested from its dirty ring.

use std::collections::BTreeSet;
use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::{DemoSection, count, verdict};
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: false,
    show,
};

fn show(w: &mut dyn Write, truth: &VmReport, dirty: &[Value]) -> anyhow::Result<()> {
    let set: BTreeSet<(u32, u64)> = dirty
        .iter()
        .map(|r| (count(&r["slot_id"]) as u32, count(&r["rel_gfn"])))
        .collect();
    let truth_set: BTreeSet<(u32, u64)> = truth.dirty.pages.iter().copied().collect();
    writeln!(
        w,
        "\n== dirty: {} dirtied-page events, {} distinct pages; the guest harvested {} ring entries, {} distinct pages: set {}",
        dirty.len(),
        set.len(),
        truth.dirty.harvested,
        truth_set.len(),
        verdict(set == truth_set)
    )?;
    for s in &truth.dirty.per_slot {
        let ours = set.iter().filter(|(slot, _)| *slot == s.slot).count();
        writeln!(
            w,
            "   slot {}: {} distinct pages seen, {} reported by KVM",
            s.slot, ours, s.distinct
        )?;
    }
    Ok(())
}
