//! exits next to `perf kvm stat`: a second, independent count of every
//! exit reason (in the initramfs when the machine that built it has perf).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::observe::parse_records;
use crate::common::{VmReport, vcpu_stat};
use crate::matrix::{Matrix, emit_timed};
use crate::util::{finish, s, start, u};

impl Matrix {
    /// Scenario 7: The same kind of run as scenario 6 next to `perf kvm stat` (in the
    /// initramfs when the machine that built it has perf).
    pub fn exits_next_to_perf(&self) {
        if std::path::Path::new(PERF).exists() {
            emit_timed("exits", "perf-kvm-stat", "-", || {
                exits_next_to_perf(&self.tmp)
            });
        }
    }
}

const PERF: &str = "/bin/perf";

/// `perf kvm stat report --event=vmexit`'s samples per exit reason.
fn perf_vmexits(report: &str) -> BTreeMap<String, u64> {
    // "                  io        500    54.70%    10.56%     27.44us ..."
    let mut out = BTreeMap::new();
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(pct) = words.iter().position(|w| w.ends_with('%')) else {
            continue;
        };
        if pct < 2 {
            continue;
        }
        if let Ok(n) = words[pct - 1].parse::<u64>() {
            out.insert(words[..pct - 1].join(" "), n);
        }
    }
    out
}

/// A guest like scenario 6's watched by exits and recorded by `perf kvm
/// stat record` at once: every reason's count must be the same.
fn exits_next_to_perf(tmp: &str) -> Result<String, String> {
    let data = format!("{tmp}/perf-kvm.data");
    let vm = start(
        "vm".into(),
        &s(&[
            "vm",
            "--vcpus",
            "1",
            "--halt-hz",
            "200",
            "--passes",
            "100",
            "--io-exits",
            "5",
            "--mmio-exits",
            "2",
            "--wait-for-signal",
            "--json",
        ]),
        "kvm-watcher vm: ready",
    )?;
    let pid = vm.pid().to_string();
    let w = start(
        "exits perf".into(),
        &s(&[
            "exits",
            "--summary",
            "-i",
            "0.25",
            "-p",
            &pid,
            "--output",
            "json",
        ]),
        "kvm-watcher: watching",
    )?;
    let mut perf = Command::new(PERF)
        .args(["kvm", "stat", "record", "-a", "-o", &data])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("perf: {e}"))?;
    // perf has no ready line: its file, then time to enable its events.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&data).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    vm.signal(libc::SIGUSR1)
        .map_err(|e| format!("cannot start the vm: {e}"))?;
    let (ok, out, err) = finish(vm, Duration::from_secs(300));
    ensure!(ok, "vm failed: {}", err.trim());
    let report: VmReport = serde_json::from_str(&out).map_err(|e| format!("vm report: {e}"))?;
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let _ = perf.wait();
    let (ok, out, err) = finish(w, Duration::from_secs(120));
    ensure!(ok, "exits failed: {}", err.trim());
    let mut ours: BTreeMap<String, u64> = BTreeMap::new();
    for row in parse_records(&out)?
        .iter()
        .filter(|r| r["monitor"] == "vcpu_interval")
    {
        for r in row["exits_by_reason"].as_array().into_iter().flatten() {
            *ours
                .entry(r["name"].as_str().unwrap_or("?").to_string())
                .or_default() += u(&r["count"]);
        }
    }
    let text = Command::new(PERF)
        .args(["kvm", "-i", &data, "stat", "report", "--event=vmexit"])
        .output()
        .map_err(|e| format!("perf report: {e}"))?;
    // The report goes to stderr (its table) or stdout, depending on the version.
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr)
    );
    let theirs = perf_vmexits(&printed);
    ensure!(
        !theirs.is_empty(),
        "perf kvm stat report shows no exit: {}",
        printed.trim()
    );
    let exits = report
        .vcpus
        .iter()
        .filter_map(|v| vcpu_stat(v, "exits"))
        .sum::<u64>();
    let table: Vec<String> = ours
        .iter()
        .map(|(k, n)| format!("{k} {n}/{}", theirs.get(k).copied().unwrap_or(0)))
        .collect();
    let shown = format!(
        "kvm-watcher/perf kvm stat: {}; total {}/{}, KVM's exits {exits}",
        table.join(", "),
        ours.values().sum::<u64>(),
        theirs.values().sum::<u64>()
    );
    // perf counts an exit when the guest is entered again: each vCPU's last
    // exit (its stop, an I/O exit to the VMM) never is.
    let mut expected = ours.clone();
    if let Some(io) = expected.get_mut("io") {
        *io = io.saturating_sub(report.vcpus.len() as u64);
    }
    ensure!(expected == theirs, "differ: {shown}");
    Ok(format!(
        "{shown} (perf omits each vCPU's last exit, never re-entered)"
    ))
}
