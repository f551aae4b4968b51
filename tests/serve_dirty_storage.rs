//! `serve` gives a VM's memslot its dense dirty-page storage within
//! milliseconds of the slot's first logged write, as `watch` does: until
//! then every write of the slot takes the page hash, about twice the kernel
//! time of a dense one. Read by bpftool from the kernel map the programs
//! bump on that path (`dirty_slow`), found through serve's own program id,
//! against the pages the guest says it wrote.

mod common;

use std::time::Duration;

use common::exporter::{Exporter, metrics};
use serde_json::Value;

fn bpftool(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// The id of serve's program `name`, from its own metrics.
fn program_id(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("kvm_watcher_bpf_program_runs_total{"))
        .find(|l| l.contains(&format!("program=\"{name}\"")))
        .and_then(|l| l.split("id=\"").nth(1)?.split('"').next())
        .unwrap_or_else(|| panic!("serve exports no program {name}:\n{text}"))
        .to_string()
}

/// The `dirty_slow` map among the maps of program `prog`.
fn slow_map(prog: &str) -> String {
    let p = bpftool(&["prog", "show", "id", prog]);
    for id in p["map_ids"].as_array().into_iter().flatten() {
        let id = id.as_u64().expect("map id").to_string();
        if bpftool(&["map", "show", "id", &id])["name"] == "dirty_slow" {
            return id;
        }
    }
    panic!("program {prog} uses no dirty_slow map: {p}");
}

/// Distinct pages the VM writes in a pass.
const PAGES: u64 = 24576;

/// Pages the kernel has put in the hash so far (a page's later writes
/// there are not counted again).
fn slow_pages(map: &str) -> u64 {
    let v = bpftool(&["map", "lookup", "id", map, "key", "0", "0", "0", "0"]);
    let bytes: Vec<u8> = v["value"]
        .as_array()
        .expect("value bytes")
        .iter()
        .map(|b| {
            let s = b.as_str().expect("hex byte");
            u8::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex byte")
        })
        .collect();
    u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Two VMs in turn, each writing 24,576 distinct pages in its first pass
/// (about 170 ms here) and again in a second: at most half of them may
/// reach the hash before the slot has its storage (8-13 % do). Refreshed
/// only once a second, as serve was, every page of the first pass went to
/// the hash (four runs of four).
#[test]
fn a_new_slot_leaves_the_hash_within_milliseconds() {
    if !(common::require_bpf() && common::require_kvm()) {
        return;
    }
    let e = Exporter::start(1024, &[]);
    let map = slow_map(&program_id(&metrics(&e), "tp_dirty_ring_push"));
    for round in 0..2 {
        let before = slow_pages(&map);
        let vm = common::spawn_vm(&[
            "--name",
            "storage-vm",
            "--vcpus",
            "1",
            "--memory",
            "128",
            "--slots",
            "1",
            "--dirty-pages",
            &PAGES.to_string(),
            "--dirty-log",
            "ring",
            "--passes",
            "2",
        ]);
        vm.start();
        let report = vm.finish(Duration::from_secs(60));
        let written: u64 = report.vcpus.iter().map(|v| v.pages_written).sum();
        let slow = slow_pages(&map) - before;
        println!(
            "VM {round}: {written} writes of {PAGES} pages in {:.3} s, {slow} pages put in the hash ({:.1} %)",
            report.seconds,
            100.0 * slow as f64 / PAGES as f64
        );
        assert_eq!(written, 2 * PAGES, "the guest's own count");
        assert!(
            slow * 2 <= PAGES,
            "VM {round}: {slow} of its {PAGES} pages were put in the hash"
        );
    }
}
