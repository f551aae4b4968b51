//! `serve` on a fleet's host: series keyed by the VM's name and vCPU (no
//! pid/tid), a restarted VM continuing its series, a bounded number of
//! series per VM and per vCPU, and the exporter's own cost next to bpftool's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::exporter::{Exporter, exchange, metrics, sum_of};

fn ready() -> bool {
    common::require_bpf() && common::require_kvm()
}

/// (family, labels) of every sample of `text`.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (family, set) = match head.split_once('{') {
                Some((f, s)) => (f, s.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = set
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect();
            Some((
                family.to_string(),
                labels,
                value.parse().unwrap_or(f64::NAN),
            ))
        })
        .collect()
}

/// The monitor a family belongs to.
fn monitor_of(family: &str) -> &'static str {
    const PREFIXES: [(&str, &str); 11] = [
        ("kvm_watcher_vcpu_wakeups", "wakeup"),
        ("kvm_watcher_vcpu_halt", "wakeup"),
        ("kvm_watcher_halt_poll", "halt_poll"),
        ("kvm_watcher_dirty_", "dirty"),
        ("kvm_watcher_vcpu_run_delay", "run_delay"),
        ("kvm_watcher_vcpu_delay", "run_delay"),
        ("kvm_watcher_vcpu_run_", "vcpu_load"),
        ("kvm_watcher_vcpu_loads", "vcpu_load"),
        ("kvm_watcher_vcpu_cpu_migrations", "vcpu_load"),
        ("kvm_watcher_vcpu_exit", "exits"),
        ("kvm_watcher_vcpu_userspace", "exits"),
    ];
    PREFIXES
        .iter()
        .find(|(p, _)| family.starts_with(p))
        .map(|(_, m)| *m)
        .unwrap_or(if family.starts_with("kvm_watcher_vm_io") {
            "exits"
        } else {
            "exporter"
        })
}

/// Series of VM `vm` per monitor: (per VM, per vCPU) over `vcpus` vCPUs.
fn series_per_monitor(text: &str, vm: &str, vcpus: usize) -> BTreeMap<&'static str, (usize, f64)> {
    let mut out: BTreeMap<&'static str, (usize, f64)> = BTreeMap::new();
    for (family, labels, _) in samples(text) {
        if labels.get("vm").map(String::as_str) != Some(vm) {
            continue;
        }
        let e = out.entry(monitor_of(&family)).or_default();
        if labels.contains_key("vcpu") {
            e.1 += 1.0 / vcpus as f64;
        } else {
            e.0 += 1;
        }
    }
    out
}

/// By default every vCPU has at most 30 series and a VM that touches 10,000
/// guest-physical addresses has at most top-K + `other` of them; the counts
/// per VM and per vCPU for each monitor are printed next to those with every
/// opt-in on (what serve exported before: pid/tid, per-vCPU and per-reason
/// histograms, pcpu, every address).
#[test]
fn series_per_vm_and_per_vcpu_are_bounded() {
    if !ready() {
        return;
    }
    // One VM that every monitor sees, one that touches 10,000 addresses.
    let vm = common::spawn_vm(&[
        "--name",
        "bounded-vm",
        "--vcpus",
        "2",
        "--halt-hz",
        "500",
        "--halt-poll-ns",
        "200000",
        "--dirty-pages",
        "8",
        "--dirty-log",
        "ring",
        "--io-exits",
        "2",
        "--mmio-exits",
        "1",
        "--seconds",
        "2",
        "--linger",
    ]);
    let spread = common::spawn_vm(&[
        "--name",
        "spread-vm",
        "--mmio-exits",
        "10000",
        "--mmio-spread",
        "--seconds",
        "2",
        "--linger",
    ]);
    let (pid, pid2) = (vm.ready.pid.to_string(), spread.ready.pid.to_string());
    let after = Exporter::start(1024, &["-p", &pid, "-p", &pid2]);
    let before = Exporter::start(
        1024,
        &[
            "-p",
            &pid,
            "-p",
            &pid2,
            "--metrics.pid-labels",
            "--metrics.vcpu-histograms",
            "--metrics.reason-histograms",
            "--metrics.pcpu",
            "--metrics.top-k",
            "100000",
            "--metrics.top-reasons",
            "1000",
        ],
    );
    vm.start();
    spread.start();
    vm.wait_lingering(Duration::from_secs(120));
    spread.wait_lingering(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let (a, b) = (metrics(&after), metrics(&before));
    let (sa, sb) = (
        series_per_monitor(&a, "bounded-vm", 2),
        series_per_monitor(&b, "bounded-vm", 2),
    );
    println!("monitor     per VM before  per VM after  per vCPU before  per vCPU after");
    for m in sa.keys().chain(sb.keys()).collect::<BTreeSet<_>>() {
        let (x, y) = (
            sb.get(m).copied().unwrap_or_default(),
            sa.get(m).copied().unwrap_or_default(),
        );
        println!(
            "{m:<11} {:>14} {:>13} {:>16.1} {:>15.1}",
            x.0, y.0, x.1, y.1
        );
    }
    let total = |s: &BTreeMap<&str, (usize, f64)>| {
        (
            s.values().map(|v| v.0).sum::<usize>(),
            s.values().map(|v| v.1).sum::<f64>(),
        )
    };
    let (ta, tb) = (total(&sa), total(&sb));
    println!(
        "all         {:>14} {:>13} {:>16.1} {:>15.1}",
        tb.0, ta.0, tb.1, ta.1
    );
    assert!(ta.1 <= 30.0, "{} series per vCPU by default", ta.1);
    assert!(
        !a.contains("pid=\"") && !a.contains("tid=\"") && !a.contains("pcpu=\""),
        "pid, tid or pcpu labels by default"
    );
    // The guest touched thousands of addresses (as many as the kernel's
    // table holds); by default 10 of them and `other` are exported.
    let addresses = |text: &str| {
        samples(text)
            .into_iter()
            .filter(|(f, l, _)| {
                f == "kvm_watcher_vm_io_accesses_total"
                    && l.get("kind").map(String::as_str) == Some("mmio")
                    && l.get("vm").map(String::as_str) == Some("spread-vm")
            })
            .count()
    };
    let (na, nb) = (addresses(&a), addresses(&b));
    println!("MMIO address series: {nb} with every address, {na} by default");
    assert!(nb > 1000, "the guest touched only {nb} addresses");
    assert!(
        na <= 10 + 1,
        "{na} address series by default:\n{}",
        a.lines()
            .filter(|l| l.contains("spread-vm") && l.contains("io_accesses"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Nothing is lost by bounding: `other` holds the rest.
    let accesses = |text: &str| {
        sum_of(
            text,
            "kvm_watcher_vm_io_accesses_total",
            &["kind=\"mmio\"".into()],
        )
    };
    assert_eq!(accesses(&a), accesses(&b));
    for v in [vm, spread] {
        v.signal(libc::SIGUSR1);
        v.finish(Duration::from_secs(60));
    }
}

/// A VM restarted under its name continues its series: the same label sets,
/// the figures of both runs summed (KVM's own wake-up counts of each run),
/// no pid or tid label.
#[test]
fn a_restarted_vm_continues_its_series() {
    if !ready() {
        return;
    }
    let run = || {
        common::spawn_vm(&[
            "--name",
            "reborn-vm",
            "--vcpus",
            "2",
            "--halt-hz",
            "500",
            "--seconds",
            "0.5",
        ])
    };
    let first = run();
    let e = Exporter::start(1024, &["--vm", "reborn-vm", "--retain", "120"]);
    first.start();
    let r1 = first.finish(Duration::from_secs(60));
    let waited = |r: &common::VmReport| -> u64 {
        r.vcpus
            .iter()
            .map(|v| common::stat(v.stats.as_ref().unwrap(), "halt_wait_hist"))
            .sum()
    };
    let family = "kvm_watcher_vcpu_wakeups_total";
    let want = [
        "vm=\"reborn-vm\"".to_string(),
        "waited=\"true\"".to_string(),
    ];
    let settle = |want_n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = metrics(&e);
            if sum_of(&text, family, &want) == Some(want_n as f64) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let label_sets = |text: &str| -> BTreeSet<BTreeMap<String, String>> {
        samples(text)
            .into_iter()
            .filter(|(f, _, _)| f == family)
            .map(|(_, l, _)| l)
            .collect()
    };
    let t1 = settle(waited(&r1));
    assert_eq!(sum_of(&t1, family, &want), Some(waited(&r1) as f64));
    let second = run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !e
        .stderr()
        .contains(&format!("runs as pid {}", second.ready.pid))
    {
        assert!(Instant::now() < deadline, "{}", e.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    second.start();
    let r2 = second.finish(Duration::from_secs(60));
    let t2 = settle(waited(&r1) + waited(&r2));
    println!(
        "wake-ups after sleeping: run 1 {} , run 2 {}, exported {:?}; series {:?}",
        waited(&r1),
        waited(&r2),
        sum_of(&t2, family, &want),
        label_sets(&t2)
    );
    assert_eq!(
        sum_of(&t2, family, &want),
        Some((waited(&r1) + waited(&r2)) as f64)
    );
    assert_eq!(
        label_sets(&t1),
        label_sets(&t2),
        "a restart changed the series"
    );
    assert_eq!(label_sets(&t2).len(), 2 * 2, "2 vCPUs x waited true/false");
    assert!(!t2.contains("pid=\"") && !t2.contains("tid=\""));
    assert!(t2.contains(
        "kvm_watcher_vm_info{vm=\"reborn-vm\",namespace=\"\",uuid=\"\",vmm=\"kvm-watcher\"} 1"
    ));
}

/// Keeps the kernel's BPF statistics on while held (BPF_ENABLE_STATS), the
/// way bpftop does, without touching the sysctl.
fn bpf_stats_on() -> Option<OwnedFd> {
    // SAFETY: no pointers.
    let fd = unsafe {
        libbpf_rs::libbpf_sys::bpf_enable_stats(libbpf_rs::libbpf_sys::BPF_STATS_RUN_TIME)
    };
    // SAFETY: a file descriptor just returned to us.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpftool prog show` figures by program id: (run_time_ns, run_cnt).
fn bpftool_progs() -> BTreeMap<u64, (u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                (
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// The exporter reports each of its programs' kernel run time and run
/// count: bpftool's figures, read between two scrapes, lie between them;
/// /healthz says every monitor is attached.
#[test]
fn own_bpf_cost_agrees_with_bpftool() {
    if !ready() {
        return;
    }
    let Some(_stats) = bpf_stats_on() else {
        panic!("cannot turn on the kernel's BPF statistics (BPF_ENABLE_STATS)");
    };
    let vm = common::spawn_vm(&["--name", "cost-vm", "--halt-hz", "500", "--seconds", "2"]);
    let e = Exporter::start(1024, &["--vm", "cost-vm"]);
    vm.start();
    std::thread::sleep(Duration::from_secs(1));
    let per_prog = |text: &str, family: &str| -> BTreeMap<u64, (String, f64)> {
        samples(text)
            .into_iter()
            .filter(|(f, _, _)| f == family)
            .filter_map(|(_, l, v)| {
                Some((l.get("id")?.parse().ok()?, (l.get("program")?.clone(), v)))
            })
            .collect()
    };
    // Scrapes within 500 ms share one page: each read here is a page made
    // after the one before it.
    let fresh = Duration::from_millis(600);
    std::thread::sleep(fresh);
    let t1 = metrics(&e);
    std::thread::sleep(fresh);
    let tool = bpftool_progs();
    std::thread::sleep(fresh);
    let t2 = metrics(&e);
    vm.finish(Duration::from_secs(60));
    assert!(t1.contains("kvm_watcher_bpf_stats_enabled 1"), "{t1}");
    let (run1, run2) = (
        per_prog(&t1, "kvm_watcher_bpf_program_run_seconds_total"),
        per_prog(&t2, "kvm_watcher_bpf_program_run_seconds_total"),
    );
    let (cnt1, cnt2) = (
        per_prog(&t1, "kvm_watcher_bpf_program_runs_total"),
        per_prog(&t2, "kvm_watcher_bpf_program_runs_total"),
    );
    assert!(!run1.is_empty(), "no program figures:\n{t1}");
    println!(
        "program                       exported run_time_ns (before..after)  bpftool run_time_ns  exported run_cnt  bpftool run_cnt"
    );
    for (id, (name, r1)) in &run1 {
        let (t_ns, t_cnt) = *tool
            .get(id)
            .unwrap_or_else(|| panic!("bpftool does not list program {id} ({name})"));
        let (r1, r2) = ((r1 * 1e9).round() as u64, (run2[id].1 * 1e9).round() as u64);
        let (c1, c2) = (cnt1[id].1 as u64, cnt2[id].1 as u64);
        println!("{name:<29} {r1:>14}..{r2:<14} {t_ns:>20} {c1:>10}..{c2:<10} {t_cnt:>10}");
        // Seconds with 9 decimals: within a nanosecond of bpftool's figure.
        assert!(r1 <= t_ns + 1 && t_ns <= r2 + 1, "{name}: run time");
        assert!(c1 <= t_cnt && t_cnt <= c2, "{name}: runs");
    }
    assert!(cnt2.values().any(|(_, n)| *n > 0.0), "no program ran");
    // The one program on sched_switch runs for wakeup (halts in progress)
    // and run-delay on every backend: its time is labelled theirs together,
    // not the first one's.
    let switch: Vec<String> = samples(&t2)
        .into_iter()
        .filter(|(f, l, _)| {
            f == "kvm_watcher_bpf_program_run_seconds_total"
                && l.get("program").is_some_and(|p| p == "tp_btf_sched_switch")
        })
        .map(|(_, l, _)| l["monitor"].clone())
        .collect();
    match &switch[..] {
        [label] => {
            let users: Vec<&str> = label.split('+').collect();
            assert!(
                users.contains(&"wakeup") && users.contains(&"run_delay"),
                "the shared sched_switch program is labelled monitor=\"{label}\""
            );
            println!("tp_btf_sched_switch: monitor=\"{label}\"");
        }
        // A kernel without BTF-typed tracepoints runs raw ones, one each.
        [] => println!("no tp_btf_sched_switch on this kernel"),
        _ => panic!("one tp_btf_sched_switch program expected, found {switch:?}"),
    }
    let health = exchange(
        e.port,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    assert!(health.body.contains("wakeup: attached"), "{}", health.body);
    assert!(
        t2.contains("kvm_watcher_monitor_attached{monitor=\"wakeup\",backend=\"tracepoint\"} 1")
    );
    assert!(t2.contains("kvm_watcher_process_cpu_seconds_total"));
}
