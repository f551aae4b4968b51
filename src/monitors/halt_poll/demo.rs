//! halt-poll's section of `kvm-watcher demo`: the first few changes of the
//! halt-polling window.

use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::DemoSection;
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: false,
    show,
};

fn show(w: &mut dyn Write, _truth: &VmReport, polls: &[Value]) -> anyhow::Result<()> {
    let grows = polls.iter().filter(|r| r["grow"] == true).count();
    writeln!(
        w,
        "\n== halt-poll: {} window changes ({grows} grow, {} shrink)",
        polls.len(),
        polls.len() - grows
    )?;
    for r in polls.iter().take(4) {
        writeln!(
            w,
            "   vCPU {}: {} {} ns -> {} ns",
            r["vcpu_id"],
            if r["grow"] == true {
                "grow  "
            } else {
                "shrink"
            },
            r["old_ns"],
            r["new_ns"]
        )?;
    }
    Ok(())
}
