//! wakeup's section of `kvm-watcher demo`: wake-ups per vCPU next to the
//! guest's HLTs and KVM's halt statistics.

use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::{DemoSection, of_thread, verdict};
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: false,
    show,
};

fn show(w: &mut dyn Write, truth: &VmReport, wakeups: &[Value]) -> anyhow::Result<()> {
    writeln!(w, "== wakeup: {} wake-ups", wakeups.len())?;
    for v in &truth.vcpus {
        let mine = of_thread(wakeups, v.tid);
        let polled = mine.iter().filter(|r| r["waited"] == false).count();
        let stat = |name: &str| {
            v.stats
                .as_ref()
                .and_then(|s| s.get(name))
                .map_or("?".to_string(), |s| s.total().to_string())
        };
        writeln!(
            w,
            "   vCPU {} (tid {}): kvm-watcher saw {} wake-ups ({} polled, {} slept)",
            v.vcpu_id,
            v.tid,
            mine.len(),
            polled,
            mine.len() - polled,
        )?;
        let slept = (mine.len() - polled).to_string();
        writeln!(
            w,
            "      the guest executed {} HLTs; KVM counted {} halt exits, {} sleeps (halt_wait_hist): {}",
            v.halts,
            stat("halt_exits"),
            stat("halt_wait_hist"),
            verdict(stat("halt_wait_hist") == slept),
        )?;
    }
    Ok(())
}
