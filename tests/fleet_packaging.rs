//! What a fleet installs next to the exporter: the Prometheus rules
//! (checked and unit-tested with promtool) and the Grafana dashboard, whose
//! every panel query, and every recording rule, returns series for a
//! synthetic guest scraped by the real Prometheus.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::exporter::Exporter;
use common::prometheus::Prometheus;
use serde_json::Value;

fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(rel)
}

fn have_promtool() -> bool {
    let have = Command::new("promtool").arg("--version").output().is_ok();
    if !have {
        return common::skip("promtool is not installed (apt-get install prometheus)");
    }
    true
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if !have_promtool() {
        return;
    }
    let rules = packaging("prometheus/kvm-watcher-rules.yml");
    let tests = packaging("prometheus/kvm-watcher-rules.test.yml");
    for args in [
        vec!["check", "rules", rules.to_str().unwrap()],
        vec!["test", "rules", tests.to_str().unwrap()],
    ] {
        let out = Command::new("promtool").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The rules file and its unit tests, as YAML values.
fn rules_yaml(file: &str) -> serde_norway::Value {
    let text = std::fs::read_to_string(packaging(&format!("prometheus/{file}"))).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Every alerting rule of the rules file.
fn alerts() -> Vec<serde_norway::Value> {
    let rules = rules_yaml("kvm-watcher-rules.yml");
    let groups = rules["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// Every alert has a severity a router knows and a runbook_url whose page
/// is in docs/runbooks/, all under one prefix a fleet can rewrite.
#[test]
fn every_alert_has_a_severity_and_a_runbook_that_exists() {
    let alerts = alerts();
    assert!(alerts.len() >= 7, "{} alerts", alerts.len());
    let runbooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks");
    let mut prefixes = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        let severity = a["labels"]["severity"].as_str();
        if !matches!(severity, Some("critical" | "warning" | "info")) {
            problems.push(format!("{name}: severity {severity:?}"));
        }
        let Some(url) = a["annotations"]["runbook_url"].as_str() else {
            problems.push(format!("{name}: no runbook_url annotation"));
            continue;
        };
        let Some((prefix, page)) = url.split_once("/docs/runbooks/") else {
            problems.push(format!(
                "{name}: runbook_url {url} is not under docs/runbooks/"
            ));
            continue;
        };
        prefixes.insert(prefix.to_string());
        let file = runbooks.join(page);
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for part in [format!("# {name}"), "## Confirm".into(), "## Change".into()] {
                    if !text.contains(&part) {
                        problems.push(format!("{}: lacks {part:?}", file.display()));
                    }
                }
                if !text.contains("kvm-watcher ") {
                    problems.push(format!("{}: names no kvm-watcher command", file.display()));
                }
            }
            Err(e) => problems.push(format!("{name}: {}: {e}", file.display())),
        }
    }
    assert_eq!(prefixes.len(), 1, "runbook URL prefixes: {prefixes:?}");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `promtool test rules` has, for every alert, a case where it fires and
/// one where it does not.
#[test]
fn the_rule_tests_make_every_alert_fire_and_stay_quiet() {
    let tests = rules_yaml("kvm-watcher-rules.test.yml");
    let mut fires = std::collections::BTreeSet::new();
    let mut quiet = std::collections::BTreeSet::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            match case["exp_alerts"].as_sequence() {
                Some(a) if !a.is_empty() => fires.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let names: Vec<String> = alerts()
        .iter()
        .map(|a| a["alert"].as_str().unwrap().to_string())
        .collect();
    let untested: Vec<String> = names
        .iter()
        .filter(|n| !fires.contains(*n) || !quiet.contains(*n))
        .map(|n| {
            format!(
                "{n}: fires {}, quiet {}",
                fires.contains(n),
                quiet.contains(n)
            )
        })
        .collect();
    assert!(untested.is_empty(), "{untested:#?}");
}

/// Every `expr` of the dashboard's panels, with its variables filled in.
fn panel_queries(vm: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(packaging("grafana/kvm-watcher.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            // Rates come from the recording rules, computed once for the
            // fleet, and series are keyed by VM, not by process.
            for raw in ["rate(", "increase(", "histogram_quantile(", "pid=", "tid="] {
                assert!(!expr.contains(raw), "panel {title} computes {raw}: {expr}");
            }
            let expr = expr
                .replace("$host", ".*")
                .replace("$namespace", ".*")
                .replace("$instance", ".+")
                .replace("$vm", vm);
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            out.push((title.clone(), expr));
        }
    }
    out
}

/// The recording rules' names.
fn recorded() -> Vec<String> {
    let text = std::fs::read_to_string(packaging("prometheus/kvm-watcher-rules.yml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_dashboard_panel_and_recording_rule_returns_series() {
    if !common::require_bpf() || !common::require_kvm() || !common::prometheus::available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvm-watcher-dash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exporter = Exporter::start(1024, &[]);
    let prom = Prometheus::start(
        &dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kvm-watcher\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            packaging("prometheus/kvm-watcher-rules.yml").display(),
            exporter.port
        ),
    );
    let vm = common::spawn_vm(&[
        "--name",
        "dash-vm",
        "--vcpus",
        "2",
        "--halt-hz",
        "1000",
        "--halt-poll-ns",
        "500000",
        "--dirty-pages",
        "32",
        "--dirty-log",
        "ring",
        "--seconds",
        "15",
    ]);
    vm.start();
    let mut queries = panel_queries("dash-vm");
    let rules = recorded();
    for (title, q) in &queries {
        for (i, _) in q.match_indices("kvm_watcher:") {
            let name: String = q[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            assert!(
                rules.contains(&name),
                "panel {title}: no rule records {name}"
            );
        }
    }
    for r in rules {
        queries.push((
            format!("recording rule {r}"),
            format!("{r}{{vm=\"dash-vm\"}}"),
        ));
    }
    // The rules about the exporter and the link have no vm label.
    for q in &mut queries {
        for rule in [
            "kvm_watcher:lost_events:increase10m",
            "kvm_watcher:migration_link:bytes_per_second",
            "kvm_watcher:process_cpu:rate5m",
            "kvm_watcher:bpf_program_run:rate5m",
        ] {
            if q.1.starts_with(rule) {
                q.1 = rule.to_string();
            }
        }
    }
    // While the guest runs, until every query returns series.
    let deadline = Instant::now() + Duration::from_secs(40);
    let missing = loop {
        let missing: Vec<&(String, String)> = queries
            .iter()
            .filter(|(_, q)| prom.query(q).is_empty())
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let vm_series = prom.query("sum by (vm) (kvm_watcher_vcpu_wakeups_total{vm=\"dash-vm\"})");
    drop(vm);
    drop(prom);
    drop(exporter);
    assert!(missing.is_empty(), "queries without series: {missing:#?}");
    assert_eq!(vm_series.len(), 1, "{vm_series:?}");
    eprintln!("{} panel and rule queries returned series", queries.len());
    std::fs::remove_dir_all(&dir).ok();
}

/// The systemd unit's user and capabilities (a user that owns no VM, as
/// libvirt's and KubeVirt's QEMU run as their own users) find a VM another
/// user runs: listing its /proc/PID/fd (mode 0500) takes
/// CAP_DAC_READ_SEARCH, reading the links CAP_SYS_PTRACE.
#[test]
fn the_systemd_units_capabilities_find_another_users_vm() {
    if !(common::require_root() && common::require_kvm()) {
        return;
    }
    let unit = std::fs::read_to_string(packaging("kvm-watcher.service")).unwrap();
    let ambient = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities");
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    assert_eq!(ambient, bounding, "the unit's two capability lists");
    let caps: Vec<String> = ambient
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let caps = format!("-all,{}", caps.join(","));
    let vm = common::spawn_vm(&["--vcpus", "1", "--halt-hz", "100"]);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .args(["--", common::bin(), "vms", "--json"])
        .output()
        .expect("setpriv");
    let pid = vm.ready.pid;
    vm.start();
    vm.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let vms: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        vms.as_array()
            .into_iter()
            .flatten()
            .any(|v| v["pid"].as_u64() == Some(pid as u64)),
        "as uid 65534 with {ambient}, `vms` misses root's VM {pid}: {vms}"
    );
}
