//! `serve --web.config.file` with TLS and basic authentication, scraped by
//! the real Prometheus: the right password gets metrics over TLS, a wrong
//! one is refused, and plain HTTP gets no metrics.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::exporter::Exporter;
use common::prometheus::Prometheus;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-tls-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in
/// `dir`: ca.crt, server.crt, server.key.
fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kvm-watcher test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

/// Each active target's job, health and last error.
fn targets(prom: &Prometheus) -> Vec<(String, String, String)> {
    let v = prom.api("/api/v1/targets?state=active");
    v["data"]["activeTargets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
                    (
                        t["labels"]["job"].as_str().unwrap_or("").to_string(),
                        s("health"),
                        s("lastError"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth() {
    if !common::require_bpf() {
        return;
    }
    if !common::prometheus::available() {
        return;
    }
    let dir = tempdir("prom");
    certificates(&dir);
    let hash = bcrypt::hash("correct horse", 10).unwrap();
    std::fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  prom: {hash}\n"
        ),
    )
    .unwrap();
    let web = dir.join("web.yml");
    let exporter = Exporter::start(1024, &["--web.config.file", web.to_str().unwrap()]);
    assert!(
        exporter.stderr().contains("on https://") && exporter.stderr().contains("basic auth"),
        "{}",
        exporter.stderr()
    );
    let target = format!("127.0.0.1:{}", exporter.port);
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    basic_auth:\n      username: prom\n      password: '{password}'\n    static_configs:\n      - targets: ['{target}']\n",
            ca = dir.join("ca.crt").display()
        )
    };
    let prom = Prometheus::start(
        &dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}{}  - job_name: plain\n    static_configs:\n      - targets: ['{target}']\n",
            job("good", "correct horse"),
            job("wrong", "battery staple"),
        ),
    );
    // Until every job has been scraped at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let t = targets(&prom);
        // The first bcrypt checks may outlast a 1 s scrape timeout; then
        // the exporter remembers the credentials, good or wrong.
        let settled = |job: &str, health: &str, error: &str| {
            t.iter()
                .any(|(j, h, e)| j == job && h == health && e.contains(error))
        };
        if (settled("good", "up", "")
            && settled("wrong", "down", "401")
            && settled("plain", "down", ""))
            || Instant::now() > deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let series = prom.query("kvm_watcher_backend_info{job=\"good\"}");
    drop(prom);
    eprintln!("targets (job, health, last error): {seen:?}");
    let health = |job: &str| seen.iter().find(|(j, _, _)| j == job).cloned();
    let (_, good, good_err) = health("good").unwrap_or_default();
    assert_eq!(
        good, "up",
        "TLS + the right password: {good_err} ({seen:?})"
    );
    let (_, wrong, wrong_err) = health("wrong").unwrap_or_default();
    assert_eq!(wrong, "down", "a wrong password was accepted: {seen:?}");
    assert!(wrong_err.contains("401"), "wrong password: {wrong_err}");
    let (_, plain, _) = health("plain").unwrap_or_default();
    assert_eq!(plain, "down", "plain HTTP got metrics: {seen:?}");
    assert_eq!(
        series.len(),
        kvm_watcher::monitors::REGISTRY
            .iter()
            .filter(|m| m.by_default())
            .count(),
        "one backend_info per monitor serve runs, over TLS: {series:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A web configuration that cannot be used is a usage error before
/// anything is attached.
#[test]
fn bad_web_config_files_are_usage_errors() {
    let dir = tempdir("bad");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let missing = dir.join("nope.yml").to_str().unwrap().to_string();
    let unknown = write(
        "unknown.yml",
        "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
    );
    let no_cert = write(
        "nocert.yml",
        "tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n",
    );
    let plain = write("plain.yml", "basic_auth_users:\n  prom: hunter2\n");
    common::usage::expect_errors(&[
        (
            vec!["serve", "--web.config.file", &missing, "-t", "1"],
            2,
            "nope.yml",
        ),
        (
            vec!["serve", "--web.config.file", &unknown, "-t", "1"],
            2,
            "client_ca_file",
        ),
        (
            vec!["serve", "--web.config.file", &no_cert, "-t", "1"],
            2,
            "none.crt",
        ),
        (
            vec!["serve", "--web.config.file", &plain, "-t", "1"],
            2,
            "bcrypt",
        ),
    ]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A 1 MiB header over TLS is answered 431, as over plain HTTP, not cut off.
#[test]
fn a_huge_header_over_tls_is_answered_431() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir("431");
    certificates(&dir);
    std::fs::write(
        dir.join("web.yml"),
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
    )
    .unwrap();
    let e = Exporter::start(
        1024,
        &["--web.config.file", dir.join("web.yml").to_str().unwrap()],
    );
    let header = dir.join("header");
    std::fs::write(&header, format!("X-Big: {}\n", "a".repeat(1 << 20))).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .args(["--cacert", dir.join("ca.crt").to_str().unwrap()])
        .arg("-H")
        .arg(format!("@{}", header.display()))
        .arg(format!("https://127.0.0.1:{}/metrics", e.port))
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "1 MiB header over TLS: {code} (curl exit {:?})",
        out.status.code()
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        code,
        "431",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
