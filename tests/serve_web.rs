//! `serve --web.config.file` given hostile or careless input, and basic
//! authentication under a password-guessing client.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::exporter::{Exporter, exchange_from};

fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-web-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `serve --web.config.file <file> -t 1` fails at once (within 5 s, so a
/// read without end fails the test instead of filling memory) with exit 2
/// and one line mentioning `mentions`.
fn refused(file: &str, mentions: &str) -> Option<String> {
    let t = Instant::now();
    let out = common::run_cli(
        &["serve", "--web.config.file", file, "-t", "1"],
        Duration::from_secs(5),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let ok = out.status.code() == Some(2)
        && err.lines().count() == 1
        && err.starts_with("kvm-watcher: error:")
        && err.contains(mentions);
    eprintln!(
        "{file}: {:?} in {:?}: {}",
        out.status.code(),
        t.elapsed(),
        err.trim()
    );
    (!ok).then(|| {
        format!(
            "{file}: status {:?}, want 2 mentioning {mentions:?}: {err}",
            out.status.code()
        )
    })
}

/// Files that are not regular, too large, too deep, bcrypt costs no
/// htpasswd makes, duplicate users and user names with `:` are one-line
/// usage errors before any work.
#[test]
fn web_config_files_read_with_bounds() {
    let dir = tempdir("bounds");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let fifo = dir.join("fifo.yml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path of our own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let hash = bcrypt::hash("pw", 4).unwrap();
    let costly = hash.replacen("$04$", "$31$", 1);
    let mut huge = String::from("basic_auth_users: {}\n");
    while huge.len() < 2 << 20 {
        huge.push_str("# padding padding padding padding padding padding padding\n");
    }
    let cases = [
        ("/dev/zero".to_string(), "not a regular file"),
        (fifo.to_str().unwrap().to_string(), "not a regular file"),
        (
            write(
                "zero-cert.yml",
                "tls_server_config:\n  cert_file: /dev/zero\n  key_file: /dev/zero\n",
            ),
            "not a regular file",
        ),
        (write("huge.yml", &huge), "larger than"),
        (write("deep.yml", &"[".repeat(60_000)), "deep"),
        (
            write(
                "cost.yml",
                &format!("basic_auth_users:\n  prom: '{costly}'\n"),
            ),
            "cost 31",
        ),
        (
            write(
                "dup.yml",
                &format!("basic_auth_users:\n  prom: '{hash}'\n  prom: '{hash}'\n"),
            ),
            "prom",
        ),
        (
            write(
                "colon.yml",
                &format!("basic_auth_users:\n  'a:b': '{hash}'\n"),
            ),
            "a:b",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(file, mentions)| refused(file, mentions))
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An empty file and `~` mean the same (no TLS, no users), and risky
/// set-ups are warned about: every address without authentication, basic
/// auth over plain HTTP there, an expired certificate.
#[test]
fn web_configs_that_turn_little_on_are_consistent_and_warned_about() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir("warn");
    let hash = bcrypt::hash("pw", 4).unwrap();
    let mut expired = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = expired.self_signed(&key).unwrap();
    std::fs::write(dir.join("old.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("old.key"), key.serialize_pem()).unwrap();
    let mut cases: Vec<(&str, String, &str, &str)> = Vec::new();
    for (name, text, listen, warning) in [
        ("empty.yml", String::new(), "127.0.0.1", ""),
        ("null.yml", "~\n".to_string(), "127.0.0.1", ""),
        (
            "open.yml",
            String::new(),
            "0.0.0.0",
            "without authentication",
        ),
        (
            "plain.yml",
            format!("basic_auth_users:\n  prom: '{hash}'\n"),
            "0.0.0.0",
            "over plain HTTP",
        ),
        (
            "expired.yml",
            format!(
                "tls_server_config:\n  cert_file: old.crt\n  key_file: old.key\nbasic_auth_users:\n  prom: '{hash}'\n"
            ),
            "127.0.0.1",
            "expired",
        ),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
        cases.push((
            name,
            dir.join(name).to_str().unwrap().to_string(),
            listen,
            warning,
        ));
    }
    let mut failures = Vec::new();
    for (name, file, listen, warning) in cases {
        let listen = format!("{listen}:{}", common::exporter::free_port());
        let out = common::run_cli(
            &[
                "serve",
                "--listen",
                &listen,
                "--web.config.file",
                &file,
                "-t",
                "1",
            ],
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{name} on {listen}: {:?}\n{err}", out.status.code());
        let warned = err
            .lines()
            .any(|l| l.contains("warning") && l.contains(warning));
        if out.status.code() != Some(0) || (!warning.is_empty() && !warned) {
            failures.push(format!(
                "{name}: {:?}, want 0 and a warning {warning:?}: {err}",
                out.status.code()
            ));
        }
        if warning.is_empty() && err.contains("warning") {
            failures.push(format!("{name}: an unexpected warning: {err}"));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{failures:#?}");
}

fn basic(user: &str, password: &str, scheme: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} {b}\r\nConnection: close\r\n\r\n"
    )
}

/// An exporter with user `prom`, password `correct horse` (bcrypt cost 10).
fn with_auth(dir: &std::path::Path) -> Exporter {
    let hash = bcrypt::hash("correct horse", 10).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(&web, format!("basic_auth_users:\n  prom: '{hash}'\n")).unwrap();
    Exporter::start(1024, &["--web.config.file", web.to_str().unwrap()])
}

/// The scheme name is case-insensitive (RFC 7617, 7235).
#[test]
fn basic_auth_scheme_in_any_case() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir("case");
    let e = with_auth(&dir);
    for scheme in ["Basic", "basic", "BASIC"] {
        let r = exchange_from(
            Ipv4Addr::LOCALHOST,
            e.port,
            &basic("prom", "correct horse", scheme),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.status, 200, "scheme {scheme:?}: {r:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// One client guessing passwords is slowed down (429 with Retry-After),
/// and while 48 connections of it guess at once, another client's right
/// password, never seen before, is answered at once.
#[test]
fn password_guessing_is_throttled_per_client() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir("throttle");
    let e = with_auth(&dir);
    let t = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let r = exchange_from(
            Ipv4Addr::LOCALHOST,
            e.port,
            &basic("prom", &format!("guess {i}"), "Basic"),
            Duration::from_secs(10),
        )
        .unwrap();
        if r.status == 429 {
            assert!(r.header("retry-after").is_some(), "429 without Retry-After");
        }
        statuses.push(r.status);
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    eprintln!(
        "20 wrong passwords in {:?}: {checked} checked (401), {} throttled (429)",
        t.elapsed(),
        statuses.iter().filter(|s| **s == 429).count()
    );
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429) && checked <= 5,
        "{statuses:?}"
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guessers: Vec<_> = (0..48)
        .map(|g| {
            let stop = std::sync::Arc::clone(&stop);
            let port = e.port;
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = exchange_from(
                        Ipv4Addr::LOCALHOST,
                        port,
                        &basic("prom", &format!("guess {g}.{i}"), "Basic"),
                        Duration::from_secs(10),
                    );
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let r = exchange_from(
        Ipv4Addr::new(127, 0, 0, 2),
        e.port,
        &basic("prom", "correct horse", "Basic"),
        Duration::from_secs(10),
    );
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for g in guessers {
        g.join().unwrap();
    }
    eprintln!("the right password from another client during the guessing: {took:?}");
    let r = r.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // Not queued behind the guesses: before back-off it waited for them
    // until the 5 s limit on waiting for a check, then got 429.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// With basic auth on, /healthz answers without credentials (a kubelet's
/// probe sends none; it tells only whether the monitors are attached) while
/// /metrics still asks for them.
#[test]
fn healthz_needs_no_credentials() {
    if !common::require_bpf() {
        return;
    }
    let dir = tempdir("healthz");
    let e = with_auth(&dir);
    let get = |path: &str| {
        exchange_from(
            Ipv4Addr::LOCALHOST,
            e.port,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            Duration::from_secs(10),
        )
        .unwrap()
    };
    let health = get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    let metrics = get("/metrics");
    assert_eq!(metrics.status, 401, "{metrics:?}");
    std::fs::remove_dir_all(&dir).ok();
}
