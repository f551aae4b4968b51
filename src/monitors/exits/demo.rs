//! exits' section of `kvm-watcher demo`: exits to the VMM by port and
//! address, against what the guest's VMM handled. From its summaries: exits
//! are counted as they happen, so the summary has every one, rows only those
//! the VMM came back from.

use std::io::Write;

use serde_json::Value;

use crate::monitors::demo::{DemoSection, count, of_thread, verdict};
use crate::vm::guest::{IO_EXIT_PORT, MMIO_EXIT_GPA};
use crate::vm::report::VmReport;

pub static SECTION: DemoSection = DemoSection {
    summary: true,
    show,
};

fn show(w: &mut dyn Write, truth: &VmReport, intervals: &[Value]) -> anyhow::Result<()> {
    writeln!(
        w,
        "\n== exits: exits to the VMM by port and address, against what the guest's VMM handled"
    )?;
    for v in &truth.vcpus {
        let mine: Vec<&Value> = of_thread(intervals, v.tid)
            .into_iter()
            .filter(|r| !r["exits_user"].is_null())
            .collect();
        let target = |kind: &str, addr: u64| -> (u64, u64) {
            mine.iter()
                .flat_map(|r| r["exits_targets"].as_array().cloned().unwrap_or_default())
                .filter(|t| t["kind"] == kind && count(&t["addr"]) == addr)
                .fold((0, 0), |(c, ns), t| {
                    (c + count(&t["user_exits"]), ns + count(&t["vmm_ns"]))
                })
        };
        let (io, io_ns) = target("pio", u64::from(IO_EXIT_PORT));
        let (mmio, mmio_ns) = target("mmio", MMIO_EXIT_GPA);
        let from_guest = match mine
            .iter()
            .find_map(|r| r["exits_kvm_exit_fires"].as_bool())
        {
            Some(false) => {
                "kvm:kvm_exit does not fire here, exits from the guest are not shown".to_string()
            }
            _ => format!(
                "{} exits from the guest",
                mine.iter().map(|r| count(&r["exits"])).sum::<u64>()
            ),
        };
        let made = v.exits_made;
        let ok = io == made.vmm_io && mmio == made.vmm_mmio;
        writeln!(
            w,
            "   vCPU {}: port {IO_EXIT_PORT:#x} {io} exits ({:.3} ms in the VMM), mmio {MMIO_EXIT_GPA:#x} {mmio} ({:.3} ms); the VMM handled {} and {}: {}; {from_guest}",
            v.vcpu_id,
            io_ns as f64 / 1e6,
            mmio_ns as f64 / 1e6,
            made.vmm_io,
            made.vmm_mmio,
            verdict(ok)
        )?;
    }
    Ok(())
}
