//! `serve` answers each scrape in the exposition format its `Accept` header
//! asks for, as Prometheus' client libraries do: OpenMetrics for
//! Prometheus, the text format 0.0.4 for everything else, which promtool
//! (the text-format parser of Prometheus itself) accepts.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::exporter::{Exporter, Reply, exchange, sum_of};

/// What Prometheus 2.x sends when it scrapes.
const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn ask(port: u16, method: &str, accept: Option<&str>) -> Reply {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let r = exchange(
        port,
        &format!(
            "{method} /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n"
        ),
        Duration::from_secs(10),
    )
    .expect("scrape");
    assert_eq!(r.status, 200, "{r:?}");
    r
}

/// `promtool check metrics` on `page`: its output when it refuses it.
fn promtool(page: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Each sample's name and labels, the labels in order and histogram bounds
/// as numbers (the formats order and write them differently), values and
/// comments left out.
fn series(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s))
        .map(|s| {
            let Some((name, set)) = s.split_once('{') else {
                return s.to_string();
            };
            let mut labels = Vec::new();
            let mut rest = set.trim_end_matches('}');
            while let Some((key, after)) = rest.split_once("=\"") {
                // The value ends at the first quote not escaped.
                let mut end = 0;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = i;
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let mut value = after[..end].to_string();
                if key == "le" {
                    value = value.parse::<f64>().map_or(value, |v| v.to_string());
                }
                labels.push(format!("{key}={value}"));
                rest = after[end + 1..].trim_start_matches(',');
            }
            labels.sort();
            format!("{name}{{{}}}", labels.join(","))
        })
        .collect()
}

/// The lines of `page` that start with `prefix`.
fn lines<'a>(page: &'a str, prefix: &str) -> Vec<&'a str> {
    page.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// Text format for `text/plain;version=0.0.4`, no Accept header and `*/*`
/// (promtool accepts the page: info families as gauges, no units, no EOF);
/// OpenMetrics for Prometheus' Accept header; the same series in both, with
/// a guest's vCPU families filled in.
#[test]
fn each_scrape_gets_the_format_it_accepts() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    if Command::new("promtool").arg("--version").output().is_err() {
        common::skip("promtool is not installed (apt-get install prometheus)");
        return;
    }
    let vm = common::spawn_vm(&[
        "--passes",
        "200",
        "--halt-hz",
        "500",
        "--io-exits",
        "3",
        "--seconds",
        "0.5",
    ]);
    let pid = vm.ready.pid.to_string();
    let e = Exporter::start(
        1024,
        &[
            "-p",
            &pid,
            "--retain",
            "120",
            "--metrics.vcpu-histograms",
            "--metrics.reason-histograms",
        ],
    );
    vm.start();
    vm.finish(Duration::from_secs(60));
    // Final figures are read within a second of the exit.
    let io = ["reason=\"IO\"".to_string()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while sum_of(
        &ask(e.port, "GET", Some(PROMETHEUS)).body,
        "kvm_watcher_vcpu_userspace_exits_total",
        &io,
    )
    .is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }

    let text = ask(e.port, "GET", Some("text/plain;version=0.0.4"));
    if let Err(refused) = promtool(&text.body) {
        panic!("promtool check metrics refuses the text page: {refused}");
    }
    assert_eq!(text.header("content-type"), Some(TEXT));
    assert_eq!(text.header("vary"), Some("Accept"));
    assert!(!text.body.contains("# EOF"), "EOF on the text page");
    assert!(
        lines(&text.body, "# UNIT").is_empty(),
        "units on the text page"
    );
    assert_eq!(
        lines(&text.body, "# TYPE kvm_watcher_backend_info "),
        ["# TYPE kvm_watcher_backend_info gauge"]
    );
    assert!(
        lines(&text.body, "# TYPE ")
            .iter()
            .all(|l| !l.ends_with(" info")),
        "an info type on the text page"
    );
    for (what, accept) in [("no Accept header", None), ("*/*", Some("*/*"))] {
        let r = ask(e.port, "GET", accept);
        assert_eq!(r.header("content-type"), Some(TEXT), "{what}");
        assert!(!r.body.contains("# EOF"), "{what}: EOF");
    }

    let om = ask(e.port, "GET", Some(PROMETHEUS));
    assert_eq!(om.header("content-type"), Some(OPENMETRICS));
    assert!(
        om.body.ends_with("# EOF\n"),
        "no EOF on the OpenMetrics page"
    );
    assert_eq!(
        lines(&om.body, "# TYPE kvm_watcher_backend "),
        ["# TYPE kvm_watcher_backend info"]
    );
    assert!(!lines(&om.body, "# UNIT ").is_empty());
    // promtool parses the text format only: it refuses OpenMetrics.
    assert!(promtool(&om.body).is_err());
    let head = ask(e.port, "HEAD", Some("application/openmetrics-text"));
    assert_eq!(head.header("content-type"), Some(OPENMETRICS));

    // Same series, with the guest's families among them.
    let (t, o) = (series(&text.body), series(&om.body));
    assert_eq!(
        t.symmetric_difference(&o).collect::<Vec<_>>(),
        Vec::<&String>::new()
    );
    for family in [
        "kvm_watcher_vcpu_wakeups_total{",
        "kvm_watcher_vcpu_userspace_exits_total{",
        "kvm_watcher_vcpu_userspace_exit_seconds_bucket{",
        "kvm_watcher_backend_info{",
        "kvm_watcher_build_info{",
    ] {
        assert!(
            t.iter().any(|s| s.starts_with(family)),
            "no {family} series"
        );
    }
    prometheus_takes_the_openmetrics_page(e.port);
}

/// The real Prometheus (which asks for OpenMetrics, and parses it strictly)
/// scrapes the page without error and stores the guest's series.
fn prometheus_takes_the_openmetrics_page(port: u16) {
    if !common::prometheus::available() {
        return;
    }
    let dir = common::fleet::tempdir("formats");
    let prom = common::prometheus::Prometheus::start(
        &dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: kvm-watcher\n    \
             static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom
        .query("kvm_watcher_vcpu_userspace_exits_total{reason=\"IO\"}")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus stored no exits series: {}",
            prom.api("/api/v1/targets")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let targets = prom.api("/api/v1/targets");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");
    assert!(!prom.query("kvm_watcher_backend_info").is_empty());
    drop(prom);
    std::fs::remove_dir_all(&dir).ok();
}
