//! VM names in tables: shown escaped when they could drive a terminal, and
//! kept for a VM that exits before the first interval closes.

mod common;

use std::time::Duration;

use common::exporter::{Exporter, metrics};
use common::observe::watcher;
use common::qemu::Qemu;

fn ready() -> bool {
    common::require_bpf() && common::require_kvm()
}

/// A name that would clear nothing but forge a line and colour the rest.
const EVIL: &str = "evil\n\x1b[31mVM forged (pid 1)\u{202e}";

/// Lines of `out` that came from the name unescaped.
fn forged(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            l.starts_with("\x1b[31mVM forged") || l.contains('\x1b') || l.contains('\u{202e}')
        })
        .collect()
}

/// `vms` and `watch` tables show a VM name with a newline, an escape
/// sequence and a bidi override escaped, on the line of its VM.
#[test]
fn vm_names_reach_tables_escaped() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&["--name", EVIL, "--halt-hz", "200", "--seconds", "0.6"]);
    let pid = vm.ready.pid.to_string();
    let escaped = "evil\\n\\u{1b}[31mVM forged (pid 1)\\u{202e}";
    let list = common::run_cli(&["vms"], Duration::from_secs(20));
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let w = watcher(&["watch", "-p", &pid, "-i", "0.2"]);
    vm.start();
    vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    for (what, text, line_start) in [
        ("vms", &list, pid.clone()),
        ("watch", &out, "VM ".to_string()),
    ] {
        assert!(
            forged(text).is_empty(),
            "{what} printed the name raw:\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(&line_start) && l.contains(escaped)),
            "{what} does not show the escaped name:\n{text}"
        );
    }
}

/// A VM that lives shorter than one interval is reported under the name
/// it had, not `(exited)`.
#[test]
fn a_vm_shorter_than_an_interval_keeps_its_name() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&["--name", "brief-vm", "--halt-hz", "500", "--seconds", "0.3"]);
    let pid = vm.ready.pid;
    let w = watcher(&["watch", "--vm", "brief-vm", "-i", "30"]);
    vm.start();
    vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert!(
        out.contains(&format!("VM brief-vm (pid {pid})")),
        "the VM lost its name:\n{out}"
    );
}

/// CSV and JSON carry a hostile VM name too: what reaches a terminal from
/// them has no raw control character or bidi override, and JSON still
/// parses back to the exact name.
#[test]
fn vm_names_reach_csv_and_json_escaped() {
    if !ready() {
        return;
    }
    let name = format!("{EVIL}\x07\u{85}");
    let vm = common::spawn_vm(&["--name", &name, "--halt-hz", "200", "--seconds", "0.6"]);
    let pid = vm.ready.pid.to_string();
    let list = common::run_cli(&["vms", "--json"], Duration::from_secs(20));
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let w = watcher(&["-w", "-p", &pid, "--output", "csv"]);
    vm.start();
    vm.finish(Duration::from_secs(60));
    let (status, csv, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert!(csv.contains("VM forged"), "no row names the VM:\n{csv}");
    for (what, out) in [("vms --json", &list), ("--output csv", &csv)] {
        let raw: Vec<char> = out
            .chars()
            .filter(|&c| (c.is_control() && c != '\n') || c == '\u{202e}')
            .collect();
        assert!(raw.is_empty(), "{what} printed {raw:?} raw:\n{out}");
        assert_eq!(forged(out), Vec::<&str>::new(), "{what}");
    }
    let vms: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"].as_str() == Some(name.as_str())),
        "vms --json lost the name: {list}"
    );
}

/// A libvirt domain name with a comma (QEMU's `-name guest=web,,1`, as
/// libvirt escapes it) is shown whole, and `--vm 'web,1'` finds it; a
/// KubeVirt domain `<namespace>_<name>` is shown as `<namespace>/<name>` and
/// exported with `vm`, `namespace` and its UUID.
#[test]
fn libvirt_and_kubevirt_names_are_the_fleets() {
    if !ready() {
        return;
    }
    const UUID: &str = "5f0e8b9a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    let Some(comma) = Qemu::start_with("web,,1", 1, 64, &["-uuid", UUID]) else {
        return;
    };
    let kubevirt = Qemu::start_with(
        "prod_db",
        1,
        64,
        &["-smbios", "type=1,manufacturer=KubeVirt,product=None"],
    )
    .unwrap();
    let list = common::run_cli(&["vms", "--json"], Duration::from_secs(20));
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let find = |pid: u32| {
        vms.as_array()
            .unwrap()
            .iter()
            .find(|v| v["pid"] == pid)
            .cloned()
            .unwrap_or_else(|| panic!("vms does not list pid {pid}: {vms}"))
    };
    let v = find(comma.pid());
    assert_eq!(
        (v["name"].as_str(), v["uuid"].as_str()),
        (Some("web,1"), Some(UUID))
    );
    let v = find(kubevirt.pid());
    assert_eq!(
        (v["name"].as_str(), v["namespace"].as_str()),
        (Some("db"), Some("prod"))
    );
    let table = common::run_cli(&["vms"], Duration::from_secs(20));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains(" web,1 ") && table.contains(" prod/db "),
        "{table}"
    );
    // `vms --vm` lists that VM alone (it asked for --slots before).
    let one = common::run_cli(&["vms", "--json", "--vm", "web,1"], Duration::from_secs(20));
    let one: serde_json::Value = serde_json::from_slice(&one.stdout)
        .unwrap_or_else(|e| panic!("vms --vm: {e}: {}", String::from_utf8_lossy(&one.stderr)));
    let pids: Vec<_> = one
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pid"].clone())
        .collect();
    assert_eq!(pids, [serde_json::json!(comma.pid())]);
    // --vm takes the name with its comma (refused before: no VM had it).
    let w = watcher(&["watch", "--vm", "web,1", "-i", "0.5", "-t", "1.2"]);
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    assert!(
        out.contains(&format!("VM web,1 (pid {})", comma.pid())),
        "{out}"
    );
    let e = Exporter::start(1024, &["--vm", "web,1", "--vm", "prod_db"]);
    std::thread::sleep(Duration::from_millis(2500));
    let text = metrics(&e);
    for want in [
        format!(
            "kvm_watcher_vm_info{{vm=\"web,1\",namespace=\"\",uuid=\"{UUID}\",vmm=\"qemu\"}} 1"
        ),
        "kvm_watcher_vm_info{vm=\"db\",namespace=\"prod\",uuid=\"\",vmm=\"qemu\"} 1".to_string(),
        // Its vCPU's series (which ones depend on how far SeaBIOS got).
        "{vm=\"db\",namespace=\"prod\",vcpu=\"0\"".to_string(),
    ] {
        assert!(text.contains(&want), "no {want} in:\n{text}");
    }
}
