//! `kvm-watcher-bench --quick` still works: it runs every part of the benchmark
//! for a few tenths of a second each and writes well-formed JSON with every
//! figure. Nothing about speed is asserted (that is what `scripts/bench` is for).

mod common;

use std::process::Command;

use serde_json::Value;

fn have_bpftrace() -> bool {
    Command::new("bpftrace")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || common::skip("bpftrace is not installed (apt-get install bpftrace)")
}

fn finite(v: &Value, what: &str) {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite(), "{what} is not finite: {x}");
}

fn spread(v: &Value, what: &str) {
    for k in ["median", "min", "max"] {
        finite(&v[k], &format!("{what}.{k}"));
    }
    assert!(
        v["n"].as_u64().unwrap_or(0) >= 1,
        "{what} has no samples: {v}"
    );
}

#[test]
fn quick_benchmark_writes_every_figure() {
    if !(common::require_bpf() && common::require_kvm() && have_bpftrace()) {
        return;
    }
    let out = std::env::temp_dir().join(format!("kvm-watcher-bench-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_kvm-watcher-bench"))
        .args(["--quick", "--out"])
        .arg(&out)
        .args(["--kvm-watcher", common::bin()])
        .output()
        .expect("running kvm-watcher-bench");
    assert!(
        run.status.success(),
        "kvm-watcher-bench --quick failed ({}):\nstdout:\n{}\nstderr:\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(out.join("bench.json")).expect("bench.json written");
    let r: Value = serde_json::from_str(&text).expect("bench.json is JSON");
    let svg = std::fs::read_to_string(out.join("bench.svg")).expect("bench.svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("== Targets"), "no target table:\n{table}");

    // 1. kernel cost: every monitor, both modes, against floor and bpftrace.
    let cases = r["kernel_cost"]["cases"].as_array().expect("cases");
    for (m, mode) in [
        ("dirty", "aggregate"),
        ("dirty", "streaming"),
        ("wakeup", "aggregate"),
        ("wakeup", "streaming"),
        ("halt_poll", "aggregate"),
        ("halt_poll", "streaming"),
        ("vcpu_load", "aggregate"),
    ] {
        let c = cases
            .iter()
            .find(|c| c["monitor"] == m && c["mode"] == mode)
            .unwrap_or_else(|| panic!("no kernel-cost case {m} {mode}"));
        for k in [
            "floor_raw_tp_ns",
            "floor_classic_tp_ns",
            "kvm_watcher_ns",
            "bpftrace_ns",
            "ratio_to_floor",
            "bpftrace_over_kvm_watcher",
        ] {
            spread(&c[k], &format!("{m} {mode} {k}"));
        }
    }
    // 2. guest overhead: the baseline and all four, on both workloads.
    let guest = r["guest_overhead"].as_array().expect("guest_overhead");
    for w in ["dirty", "halt"] {
        for cfg in ["none", "all four (summary)", "all four (rows)"] {
            let g = guest
                .iter()
                .find(|g| g["workload"] == w && g["config"] == cfg)
                .unwrap_or_else(|| panic!("no guest-overhead figure {w} {cfg}"));
            spread(&g["rate"], &format!("{w} {cfg} rate"));
            spread(&g["work_lost_pct"], &format!("{w} {cfg} lost"));
        }
    }
    // 3. pipeline, 4. memory, 5. attach.
    spread(&r["pipeline"]["max_rate_zero_lost"], "pipeline max rate");
    spread(&r["pipeline"]["cpu_pct_at_1m"], "pipeline CPU%");
    finite(&r["memory"]["peak_rss_mib"], "peak RSS");
    finite(&r["memory"]["maps_memlock_mib"], "maps memlock");
    assert!(r["memory"]["distinct_pages"].as_u64().unwrap_or(0) > 0);
    let attach = r["attach"].as_array().expect("attach");
    for tool in ["kvm-watcher", "bpftrace"] {
        for m in ["wakeup", "halt_poll", "dirty", "vcpu_load"] {
            let a = attach
                .iter()
                .find(|a| a["tool"] == tool && a["monitor"] == m)
                .unwrap_or_else(|| panic!("no attach figure for {tool} {m}"));
            spread(&a["total_ms"], &format!("{tool} {m} attach+detach"));
        }
    }
    // 6. host tax: both workloads, unwatched and with serve and bpftrace.
    let loads = r["host_tax"]["loads"].as_array().expect("host_tax.loads");
    for w in ["syscall", "context_switch"] {
        let l = loads
            .iter()
            .find(|l| l["workload"] == w)
            .unwrap_or_else(|| panic!("no host-tax figure for {w}"));
        spread(&l["none_ns_per_op"], &format!("{w} unwatched"));
        for c in ["kvm-watcher serve", "bpftrace"] {
            let a = l["attached"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["condition"] == c)
                .unwrap_or_else(|| panic!("no host-tax figure for {w} with {c}"));
            spread(&a["ns_per_op"], &format!("{w} {c}"));
            spread(&a["bpf_ns_per_op"], &format!("{w} {c} BPF time"));
            finite(&a["added_pct"]["mean"], &format!("{w} {c} added %"));
            finite(&a["added_pct"]["ci_hi"], &format!("{w} {c} added % CI"));
        }
    }
    let programs = r["host_tax"]["programs"].as_array().expect("programs");
    assert!(
        programs
            .iter()
            .any(|p| p["tool"] == "kvm-watcher serve" && p["program"] == "tp_btf_sched_switch"),
        "serve's sched_switch program is not among the host-tax programs: {programs:?}"
    );
    // 7. guest tax: every workload, the default set three ways and one
    // monitor alone three ways, each paired with the unwatched guest.
    let workloads = r["guest_tax"]["workloads"]
        .as_array()
        .expect("guest_tax.workloads");
    for w in ["dirty", "halt", "exits"] {
        let g = workloads
            .iter()
            .find(|g| g["workload"] == w)
            .unwrap_or_else(|| panic!("no guest-tax figure for {w}"));
        spread(
            &g["none_cpu_ns_per_unit"],
            &format!("{w} unwatched vCPU ns"),
        );
        spread(&g["none_rate"], &format!("{w} unwatched rate"));
        for c in [
            "default set summary",
            "default set rows",
            "bpftrace default set",
            "dirty summary",
            "dirty rows",
            "bpftrace dirty",
        ] {
            let a = g["attached"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["condition"] == c)
                .unwrap_or_else(|| panic!("no guest-tax figure for {w} with {c}"));
            spread(&a["cpu_ns_per_unit"], &format!("{w} {c} vCPU ns"));
            spread(&a["rate"], &format!("{w} {c} rate"));
            for k in ["added_cpu_ns", "added_cpu_pct", "rate_change_pct"] {
                finite(&a[k]["mean"], &format!("{w} {c} {k}"));
                finite(&a[k]["ci_hi"], &format!("{w} {c} {k} CI"));
            }
        }
    }
    assert!(
        table.contains("== 7. Guest tax"),
        "no guest-tax table:\n{table}"
    );
    // Targets: each with a figure and a verdict.
    let targets = r["targets"].as_array().expect("targets");
    assert!(targets.len() >= 20, "only {} targets", targets.len());
    for t in targets {
        finite(&t["figure"], &format!("target {}", t["target"]));
        let v = t["verdict"].as_str().unwrap_or("");
        assert!(
            ["met", "missed", "undecided"].contains(&v),
            "target without verdict: {t}"
        );
        assert_eq!(t["met"].as_bool(), Some(v == "met"), "{t}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
