//! run-delay's section of `kvm-watcher demo`: the time each vCPU waited for
//! a physical CPU, against its thread's schedstat. From its summaries, which
//! have the kernel's switch-ins and waiting time per interval.

use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::{DemoSection, count, of_thread, verdict};
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: true,
    show,
};

fn show(w: &mut dyn Write, truth: &VmReport, intervals: &[Value]) -> anyhow::Result<()> {
    writeln!(
        w,
        "\n== run-delay: time each vCPU waited for a physical CPU, against its thread's schedstat"
    )?;
    for v in &truth.vcpus {
        let mine = of_thread(intervals, v.tid);
        let sum = |f: &str| -> u64 { mine.iter().map(|r| count(&r[f])).sum() };
        let (total, switch_ins) = (sum("run_delay_ns"), sum("run_delay_switch_ins"));
        let longest = mine
            .iter()
            .map(|r| count(&r["run_delay_max_ns"]))
            .max()
            .unwrap_or(0);
        let Some(kernel) = v.sched else {
            writeln!(
                w,
                "   vCPU {}: {:.3} ms in {switch_ins} switch-ins (this kernel has no schedstat to compare with)",
                v.vcpu_id,
                total as f64 / 1e6,
            )?;
            continue;
        };
        writeln!(
            w,
            "   vCPU {}: {:.3} ms in {switch_ins} switch-ins ({} after a wake-up); schedstat {:.3} ms in {}: {}",
            v.vcpu_id,
            total as f64 / 1e6,
            sum("run_delay_woken_waits"),
            kernel.run_delay_ns as f64 / 1e6,
            kernel.switch_ins,
            verdict(kernel.agrees(total, switch_ins, longest))
        )?;
    }
    Ok(())
}
