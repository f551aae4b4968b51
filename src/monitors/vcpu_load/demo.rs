//! vcpu-load's section of `kvm-watcher demo`: the time each vCPU held a
//! physical CPU.

use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::{DemoSection, count, of_thread};
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: false,
    show,
};

fn show(w: &mut dyn Write, truth: &VmReport, loads: &[Value]) -> anyhow::Result<()> {
    writeln!(w, "\n== vcpu-load: time each vCPU held a physical CPU")?;
    for v in &truth.vcpus {
        let mine = of_thread(loads, v.tid);
        let total: u64 = mine.iter().map(|r| count(&r["total_ns"])).sum();
        let pairs: u64 = mine.iter().map(|r| count(&r["count"])).sum();
        writeln!(
            w,
            "   vCPU {}: {:.1} ms loaded in {} load/put pairs over {:.2} s of guest time",
            v.vcpu_id,
            total as f64 / 1e6,
            pairs,
            truth.seconds
        )?;
    }
    Ok(())
}
