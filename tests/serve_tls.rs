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
    let answer = tls_exchange(
        &dir.join("ca.crt"),
        e.port,
        &[
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".as_slice(),
            &vec![b'a'; 1 << 20],
            b"\r\n\r\n",
        ],
    );
    std::fs::remove_dir_all(&dir).ok();
    let status = answer.lines().next().unwrap_or_default().to_string();
    eprintln!("1 MiB header over TLS: {status:?}");
    assert!(status.starts_with("HTTP/1.1 431"), "{answer:.300}");
}

/// Sends `parts` over TLS (trusting the CA in `ca`) to 127.0.0.1:`port`
/// as far as the server reads them, then reads its answer to the end.
fn tls_exchange(ca: &Path, port: u16, parts: &[&[u8]]) -> String {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    for part in parts {
        if tls.write_all(part).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}
