//! New VMs one after another under one `dirty --summary`: a slot's first
//! intervals, while its pages move from the page hash to its dense storage,
//! never count more distinct pages than the guest wrote.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::observe::{of, records, u, watcher};

#[test]
fn a_new_vms_first_intervals_never_count_a_page_twice() {
    if !(common::require_bpf() && common::require_kvm()) {
        return;
    }
    const GUESTS: usize = 16;
    let vms: Vec<_> = (0..GUESTS)
        .map(|_| {
            common::spawn_vm(&[
                "--dirty-pages",
                "64",
                "--dirty-log",
                "ring",
                "--halt-hz",
                "300",
                "--memory",
                "8",
                "--seconds",
                "0.6",
            ])
        })
        .collect();
    let pids: Vec<String> = vms.iter().map(|v| v.ready.pid.to_string()).collect();
    let mut args = vec!["dirty", "--summary", "--output", "json", "-i", "0.25"];
    for p in &pids {
        args.extend(["-p", p]);
    }
    let w = watcher(&args);
    let mut truth: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for vm in vms {
        let pid = vm.ready.pid as u64;
        vm.start();
        let report = vm.finish(Duration::from_secs(60));
        for s in &report.dirty.per_slot {
            truth.insert((pid, s.slot as u64), s.distinct);
        }
    }
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let over: Vec<String> = of(&records(&out), "dirty_summary")
        .iter()
        .filter(|r| {
            let key = (u(&r["pid"]), u(&r["slot_id"]));
            u(&r["distinct_pages"]) > truth.get(&key).copied().unwrap_or(0)
        })
        .map(|r| r.to_string())
        .collect();
    assert!(
        over.is_empty(),
        "{} rows count more distinct pages than the guest wrote ({truth:?}):\n{}",
        over.len(),
        over.join("\n")
    );
}
