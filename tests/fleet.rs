//! For people and fleets: `watch` summaries, VM names (synthetic and QEMU),
//! CSV, the Prometheus exporter scraped by a real Prometheus, and running
//! with capabilities instead of root.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::observe::{Spawned, of, records, summary, u, watcher};
use serde_json::Value;

fn ready() -> bool {
    common::require_bpf() && common::require_kvm()
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:port/path, returning the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-fleet-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `watch` runs all five monitors in one process; summed over its intervals
/// its figures match KVM's statistics, the guest's own dirty log and its
/// threads' schedstat.
#[test]
fn watch_summarises_all_five_monitors_against_kvm() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--name",
        "fleet-vm",
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "3",
        "--slots",
        "2",
        "--halt-hz",
        "2000",
        "--halt-poll-ns",
        "500000",
        "--dirty-pages",
        "16",
        "--dirty-log",
        "ring",
        "--seconds",
        "1.2",
    ]);
    let w = watcher(&["watch", "--vm", "fleet-vm", "--output", "json", "-i", "0.4"]);
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let recs = records(&out);
    let vcpus = of(&recs, "vcpu_interval");
    let slots = of(&recs, "dirty_summary");
    assert!(
        of(&recs, "wakeup").is_empty() && of(&recs, "dirty").is_empty(),
        "summary mode streams no rows"
    );
    for r in vcpus.iter().chain(slots.iter()) {
        assert_eq!(r["vm"], "fleet-vm", "{r}");
        assert_eq!(u(&r["pid"]), report.pid as u64);
    }
    for v in &report.vcpus {
        let stats = v.stats.as_ref().expect("KVM stats fd");
        let mine: Vec<&Value> = vcpus
            .iter()
            .filter(|r| u(&r["tid"]) == v.tid as u64)
            .collect();
        assert!(!mine.is_empty(), "no intervals for vCPU {}", v.vcpu_id);
        let sum = |f: &str| -> u64 { mine.iter().map(|r| r[f].as_u64().unwrap_or(0)).sum() };
        assert_eq!(
            sum("waited"),
            common::stat(stats, "halt_wait_hist"),
            "vCPU {} waited",
            v.vcpu_id
        );
        assert!(sum("polled") >= common::stat(stats, "halt_successful_poll"));
        assert_eq!(sum("wakeups"), sum("waited") + sum("polled"));
        let hist_total: u64 = mine
            .iter()
            .map(|r| {
                r["halt_hist"]
                    .as_array()
                    .map_or(0, |h| h.iter().map(u).sum())
            })
            .sum();
        assert_eq!(
            hist_total,
            sum("wakeups"),
            "the histogram counts every wake-up"
        );
        for r in &mine {
            assert_eq!(u(&r["vcpu_id"]), v.vcpu_id as u64);
            if let Some(run) = r["run_ns"].as_u64() {
                assert!(
                    run <= u(&r["interval_ns"]),
                    "run time exceeds the interval: {r}"
                );
            }
        }
        assert!(
            sum("poll_grows") + sum("poll_shrinks") > 0,
            "the window should move: {mine:?}"
        );
        let sched = v.sched.expect("the guest's report has its schedstat");
        // Null in an interval without a wait.
        let longest = mine
            .iter()
            .filter_map(|r| r["run_delay_max_ns"].as_u64())
            .max();
        assert!(
            sched.agrees(
                sum("run_delay_ns"),
                sum("run_delay_switch_ins"),
                longest.unwrap_or(0)
            ),
            "vCPU {} waited {} ns in {} switch-ins, schedstat {sched:?}",
            v.vcpu_id,
            sum("run_delay_ns"),
            sum("run_delay_switch_ins"),
        );
        assert!(sum("load_count") > 0);
    }
    let mut writes: HashMap<u64, u64> = HashMap::new();
    let mut max_distinct: HashMap<u64, u64> = HashMap::new();
    for s in &slots {
        *writes.entry(u(&s["slot_id"])).or_default() += u(&s["writes"]);
        let m = max_distinct.entry(u(&s["slot_id"])).or_default();
        *m = (*m).max(u(&s["distinct_pages"]));
    }
    for s in &report.dirty.per_slot {
        // Every guest write to a logged page is one ring entry on this host.
        assert_eq!(
            writes.get(&(s.slot as u64)),
            Some(&s.harvested),
            "slot {} writes",
            s.slot
        );
        assert_eq!(
            max_distinct.get(&(s.slot as u64)),
            Some(&s.distinct),
            "slot {} distinct",
            s.slot
        );
    }
    let s = summary(&recs);
    for m in ["wakeup", "halt_poll", "dirty", "vcpu_load", "run_delay"] {
        assert_eq!(s["backend"][m], "tracepoint", "{s}");
        assert_eq!(u(&s["lost"][m]), 0);
    }
}

/// The table screen names the VM and shows every part.
#[test]
fn watch_table_screen_shows_every_part() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--name",
        "screen-vm",
        "--vcpus",
        "1",
        "--halt-hz",
        "2000",
        "--halt-poll-ns",
        "500000",
        "--dirty-pages",
        "8",
        "--dirty-log",
        "ring",
        "--seconds",
        "0.8",
    ]);
    let w = watcher(&["watch", "--vm", "screen-vm", "-i", "0.3"]);
    vm.start();
    vm.finish(Duration::from_secs(60));
    let (status, out, err) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    for needle in [
        "VM screen-vm (pid",
        "wake-ups",
        "halt duration (us)",
        "halt-poll:",
        "run:",
        "dirty pages:",
        "MiB/s",
        "|****",
    ] {
        assert!(out.contains(needle), "screen lacks {needle:?}:\n{out}");
    }
}

/// A real QEMU process holding a KVM VM is listed with its VMM and name, and
/// `--vm` selects it.
#[test]
fn qemu_is_recognised_by_name() {
    if !ready() {
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        return;
    }
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-name",
            "guest=qemu-fleet,debug-threads=on",
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-m",
            "64",
            "-smp",
            "2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu");
    let pid = qemu.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let out = common::run_cli(&["vms", "--json"], Duration::from_secs(20));
        let vms: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(vm) = vms
            .as_array()
            .unwrap()
            .iter()
            .find(|v| u(&v["pid"]) == pid as u64)
            && vm["vcpu_ids"].as_array().is_some_and(|a| a.len() == 2)
        {
            break vm.clone();
        }
        assert!(Instant::now() < deadline, "qemu pid {pid} never listed");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["vmm"], "qemu");
    assert_eq!(listed["name"], "qemu-fleet");
    let threads: Vec<&str> = listed["vcpu_threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["comm"].as_str().unwrap())
        .collect();
    assert_eq!(threads, ["CPU 0/KVM", "CPU 1/KVM"]);
    let text = common::run_cli(&["vms"], Duration::from_secs(20));
    assert!(String::from_utf8_lossy(&text.stdout).contains("qemu-fleet"));
    let out = common::run_cli(
        &[
            "watch",
            "--vm",
            "qemu-fleet",
            "-t",
            "0.5",
            "--output",
            "json",
        ],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    let s = summary(&records(&String::from_utf8_lossy(&out.stdout)));
    assert_eq!(s["backend"]["wakeup"], "tracepoint");
    let _ = qemu.kill();
    let _ = qemu.wait();
    let gone = common::run_cli(
        &["-w", "--vm", "qemu-fleet", "-t", "0.5"],
        Duration::from_secs(20),
    );
    assert_eq!(
        gone.status.code(),
        Some(2),
        "an unknown --vm is a usage error"
    );
}

/// CSV carries a header row and the same fields and values as JSON.
#[test]
fn csv_has_a_header_and_the_json_fields() {
    if !ready() {
        return;
    }
    let vm = common::spawn_vm(&["--vcpus", "1", "--halt-hz", "500", "--seconds", "0.5"]);
    let pid = vm.ready.pid.to_string();
    let json = watcher(&["wakeup", "-p", &pid, "--output", "json"]);
    let csv = watcher(&["wakeup", "-p", &pid, "--output", "csv"]);
    vm.start();
    vm.finish(Duration::from_secs(60));
    let (_, jout, _) = json.wait(Duration::from_secs(30));
    let (status, cout, err) = csv.wait(Duration::from_secs(30));
    assert!(status.success(), "{err}");
    let jrows = of(&records(&jout), "wakeup");
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(cout.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let jkeys: Vec<String> = jrows[0].as_object().unwrap().keys().cloned().collect();
    assert_eq!(header, jkeys, "CSV header vs JSON fields");
    let crows: Vec<csv::StringRecord> = reader
        .records()
        .map(Result::unwrap)
        .filter(|r| r.get(0) == Some("wakeup"))
        .collect();
    assert_eq!(crows.len(), jrows.len(), "both watchers saw every wake-up");
    let key = |vals: Vec<String>| vals.join(",");
    let mut from_csv: Vec<String> = crows
        .iter()
        .map(|r| {
            key(r
                .iter()
                .enumerate()
                .filter(|(i, _)| header[*i] != "time_ns")
                .map(|(_, v)| v.to_string())
                .collect())
        })
        .collect();
    let mut from_json: Vec<String> = jrows
        .iter()
        .map(|r| {
            key(header
                .iter()
                .filter(|h| *h != "time_ns")
                .map(|h| match &r[h] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    v => v.to_string(),
                })
                .collect())
        })
        .collect();
    // Two watchers see the same events; compare them as multisets.
    from_csv.sort();
    from_json.sort();
    assert_eq!(from_csv, from_json);
}

/// A real Prometheus scrapes the exporter while a synthetic VM runs; what it
/// stored matches KVM's statistics and the guest's dirty log.
#[test]
fn prometheus_scrapes_correct_numbers() {
    if !ready() {
        return;
    }
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip("prometheus is not installed (apt-get install prometheus)");
        return;
    }
    let dir = tempdir("prometheus");
    let (exporter_port, prom_port) = (free_port(), free_port());
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kvm\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n"
        ),
    )
    .unwrap();
    let exporter = {
        let mut cmd = Command::new(common::bin());
        // Per-vCPU histograms: the queries below compare them per vCPU.
        cmd.args([
            "serve",
            "--metrics.vcpu-histograms",
            "--listen",
            &format!("127.0.0.1:{exporter_port}"),
        ]);
        Spawned::start("kvm-watcher serve", cmd, "serving metrics", false)
    };
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus");
    let vm = common::spawn_vm(&[
        "--name",
        "prom-vm",
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "7",
        "--slots",
        "2",
        "--halt-hz",
        "1000",
        "--halt-poll-ns",
        "500000",
        "--dirty-pages",
        "24",
        "--dirty-log",
        "ring",
        "--seconds",
        "1.5",
    ]);
    // Let Prometheus scrape once before the guest runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query(prom_port, "up{job=\"kvm\"}").is_empty() {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the exporter"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    vm.start();
    let report = vm.finish(Duration::from_secs(60));

    let want_waited: BTreeMap<String, f64> = report
        .vcpus
        .iter()
        .map(|v| {
            (
                v.vcpu_id.to_string(),
                common::stat(v.stats.as_ref().unwrap(), "halt_wait_hist") as f64,
            )
        })
        .collect();
    let want_distinct: BTreeMap<String, f64> = report
        .dirty
        .per_slot
        .iter()
        .map(|s| (s.slot.to_string(), s.distinct as f64))
        .collect();
    let want_writes: BTreeMap<String, f64> = report
        .dirty
        .per_slot
        .iter()
        .map(|s| (s.slot.to_string(), s.harvested as f64))
        .collect();
    // Final values reach Prometheus within a few scrapes after the guest exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (waited, distinct, writes, counts) = loop {
        let waited = by(
            prom_port,
            "kvm_watcher_vcpu_wakeups_total{vm=\"prom-vm\",waited=\"true\"}",
            "vcpu",
        );
        let distinct = by(
            prom_port,
            "kvm_watcher_dirty_distinct_pages{vm=\"prom-vm\"}",
            "slot",
        );
        let writes = by(
            prom_port,
            "kvm_watcher_dirty_page_writes_total{vm=\"prom-vm\"}",
            "slot",
        );
        let counts = by(
            prom_port,
            "sum by (vcpu) (kvm_watcher_vcpu_wakeups_total{vm=\"prom-vm\"}) - on(vcpu) group_left sum by (vcpu) (kvm_watcher_vcpu_halt_duration_seconds_count{vm=\"prom-vm\"})",
            "vcpu",
        );
        if (waited == want_waited && distinct == want_distinct && writes == want_writes)
            || Instant::now() > deadline
        {
            break (waited, distinct, writes, counts);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        waited, want_waited,
        "wake-ups after sleeping vs KVM's halt_wait_hist, per vCPU"
    );
    assert_eq!(
        distinct, want_distinct,
        "distinct dirty pages per slot vs the guest's dirty ring"
    );
    assert_eq!(
        writes, want_writes,
        "dirty page writes per slot vs ring entries harvested"
    );
    assert!(
        counts.values().all(|d| *d == 0.0) && counts.len() == 2,
        "histogram count = wake-ups: {counts:?}"
    );
    // The buckets as Prometheus reads them: the +Inf bucket holds every
    // halt, and the median of a guest halting at 1000 Hz is under a
    // millisecond or two (NaN or far off if the buckets were wrong).
    let inf_minus_count = by(
        prom_port,
        "sum by (vcpu) (kvm_watcher_vcpu_halt_duration_seconds_bucket{vm=\"prom-vm\",le=\"+Inf\"}) - on(vcpu) sum by (vcpu) (kvm_watcher_vcpu_halt_duration_seconds_count{vm=\"prom-vm\"})",
        "vcpu",
    );
    assert!(
        inf_minus_count.len() == 2 && inf_minus_count.values().all(|d| *d == 0.0),
        "+Inf bucket = count: {inf_minus_count:?}"
    );
    let median = by(
        prom_port,
        "histogram_quantile(0.5, sum by (vcpu, le) (kvm_watcher_vcpu_halt_duration_seconds_bucket{vm=\"prom-vm\"}))",
        "vcpu",
    );
    assert!(
        median.len() == 2 && median.values().all(|m| (0.0001..=0.004).contains(m)),
        "median halt of a 1000 Hz guest, in seconds: {median:?}"
    );
    let info = query(prom_port, "kvm_watcher_backend_info");
    assert_eq!(
        info.len(),
        kvm_watcher::monitors::REGISTRY
            .iter()
            .filter(|m| m.by_default())
            .count(),
        "one backend_info per monitor serve runs: {info:?}"
    );
    let run = by(
        prom_port,
        "sum by (vcpu) (kvm_watcher_vcpu_run_seconds_total{vm=\"prom-vm\"})",
        "vcpu",
    );
    assert!(
        run.values().all(|s| *s > 0.0 && *s <= report.seconds + 0.5),
        "{run:?}"
    );

    let _ = prom.kill();
    let _ = prom.wait();
    exporter.signal(libc::SIGTERM);
    let (status, _, err) = exporter.wait(Duration::from_secs(20));
    assert!(status.success(), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// Instant query results: (labels, value).
fn query(port: u16, promql: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some(body) = http_get(port, &format!("/api/v1/query?query={encoded}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .map(|r| {
                    (
                        r["metric"].as_object().cloned().unwrap_or_default(),
                        r["value"][1]
                            .as_str()
                            .unwrap_or("nan")
                            .parse()
                            .unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Instant query results keyed by one label.
fn by(port: u16, promql: &str, label: &str) -> BTreeMap<String, f64> {
    query(port, promql)
        .into_iter()
        .map(|(m, v)| {
            (
                m.get(label)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                v,
            )
        })
        .collect()
}

/// As an unprivileged user with only CAP_BPF and CAP_PERFMON, doctor says
/// so and the monitors still work.
#[test]
fn runs_with_capabilities_instead_of_root() {
    if !ready() {
        return;
    }
    let setpriv = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon",
            "--ambient-caps=-all,+bpf,+perfmon",
            "--",
            common::bin(),
        ]);
        cmd.args(args);
        cmd
    };
    let out = setpriv(&["doctor", "--json"]).output().expect("setpriv");
    assert!(out.status.success(), "{out:?}");
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&d["privileges"]["euid"]), 65534);
    assert_eq!(d["privileges"]["cap_bpf"], true);
    assert_eq!(d["privileges"]["cap_sys_admin"], false);
    let missing = d["privileges"]["missing"]
        .as_array()
        .expect("doctor lists what is missing");
    assert!(
        missing
            .iter()
            .any(|m| m.as_str().unwrap().contains("CAP_SYS_PTRACE")),
        "{missing:?}"
    );
    for m in d["monitors"].as_array().unwrap() {
        assert!(
            m["backend"].is_string(),
            "a monitor without backend as non-root: {m}"
        );
    }

    let vm = common::spawn_vm(&["--vcpus", "1", "--halt-hz", "500", "--seconds", "0.6"]);
    let mut cmd = setpriv(&["wakeup", "--output", "json", "-t", "5"]);
    cmd.stdin(Stdio::null());
    let w = Spawned::start(
        "kvm-watcher (capabilities)",
        cmd,
        "kvm-watcher: watching",
        false,
    );
    vm.start();
    let report = vm.finish(Duration::from_secs(60));
    w.signal(libc::SIGINT);
    let (status, out, err) = w.wait(Duration::from_secs(20));
    assert!(status.success(), "{err}");
    let rows = of(&records(&out), "wakeup");
    let tid = report.vcpus[0].tid as u64;
    let waited = rows
        .iter()
        .filter(|r| u(&r["tid"]) == tid && r["waited"] == true)
        .count() as u64;
    assert_eq!(
        waited,
        common::stat(report.vcpus[0].stats.as_ref().unwrap(), "halt_wait_hist"),
        "every wake-up after sleeping seen without root, as KVM counted them"
    );
}

/// The man page and shell completions come from the clap definitions.
#[test]
fn man_page_and_completions_are_generated() {
    let man = common::run_cli(&["manpage"], Duration::from_secs(20));
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH kvm-watcher") && man.contains("watch") && man.contains("serve"),
        "{man}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = common::run_cli(&["completions", shell], Duration::from_secs(20));
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("vcpu-load") && text.contains("counts-file"),
            "{shell} completion"
        );
    }
}
