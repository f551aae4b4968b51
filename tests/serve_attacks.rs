//! `serve` attacked the ways a hostile local user would, with the exporter
//! under systemd's default 1024-file limit: HTTP/2 request lines, more idle
//! connections than it may have files, a client that pipelines requests and
//! reads nothing, a huge header, slow clients, other methods. Throughout,
//! normal scrapes (from another connection) must be answered within a
//! second, and afterwards its files, threads and memory must be as before.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::exporter::{Exporter, Scraper, exchange, raise_nofile, scrape};

/// systemd's default soft limit, the one the attacks are run under.
const NOFILE: u64 = 1024;
/// A normal scrape is answered within this, whatever else goes on.
const BOUND: Duration = Duration::from_secs(1);

fn ready() -> bool {
    common::require_bpf()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Files and threads of `e` once warmed up by a few scrapes.
fn baseline(e: &Exporter) -> (usize, usize) {
    for _ in 0..3 {
        scrape(e.port).expect("a scrape before the attack");
    }
    std::thread::sleep(Duration::from_millis(200));
    eprintln!("before the attack: RSS {} KiB", e.status_kib("VmRSS"));
    (e.fds(), e.threads())
}

/// After an attack: running, and back to its files within a few of before.
fn check_recovered(e: &mut Exporter, what: &str, fds_before: usize) {
    assert!(e.running(), "{what}: the exporter died:\n{}", e.stderr());
    let fds = e.settle_fds(fds_before + 2, Duration::from_secs(15));
    eprintln!(
        "{what}: {fds_before} fds before, {fds} after; RSS {} KiB after, peak {} KiB",
        e.status_kib("VmRSS"),
        e.status_kib("VmHWM")
    );
    assert!(
        fds <= fds_before + 2,
        "{what}: {fds} fds open after the attack, {fds_before} before"
    );
    scrape(e.port).unwrap_or_else(|err| panic!("{what}: scrape after the attack: {err}"));
}

/// HTTP/2 request lines and the HTTP/2 connection preface are refused and
/// leave nothing behind: 600 of them under a 1024-file limit.
#[test]
fn http2_request_lines_leak_nothing() {
    if !ready() {
        return;
    }
    let mut e = Exporter::start(NOFILE, &[]);
    let (fds, threads) = baseline(&e);
    let scraper = Scraper::start(e.port);
    for i in 0..600 {
        let req = if i % 10 == 0 {
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        } else {
            "GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n"
        };
        // Whatever it answers, it must close the connection.
        let mut s = connect(e.port);
        let _ = s.write_all(req.as_bytes());
        let mut sink = Vec::new();
        s.read_to_end(&mut sink)
            .unwrap_or_else(|err| panic!("HTTP/2 line {i}: connection not closed: {err}"));
    }
    scraper.finish("HTTP/2 lines", BOUND);
    check_recovered(&mut e, "HTTP/2 lines", fds);
    assert!(
        e.threads() <= threads + 2,
        "{} threads after, {threads} before",
        e.threads()
    );
}

/// More idle connections than the exporter may have files: it keeps
/// serving, and the idle ones are closed as scrapes need room.
#[test]
fn idle_connections_beyond_the_fd_limit() {
    if !ready() {
        return;
    }
    assert!(
        raise_nofile() > 2 * NOFILE,
        "this test needs more files than serve"
    );
    let mut e = Exporter::start(NOFILE, &[]);
    let (fds, _) = baseline(&e);
    let scraper = Scraper::start(e.port);
    let idle: Vec<TcpStream> = (0..NOFILE + 200).map(|_| connect(e.port)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let held = e.fds();
    scraper.finish("idle connections", BOUND);
    assert!(e.running(), "the exporter died:\n{}", e.stderr());
    eprintln!(
        "idle connections: {} open, the exporter holds {held} fds",
        idle.len()
    );
    drop(idle);
    check_recovered(&mut e, "idle connections", fds);
}

/// One client pipelines thousands of requests and never reads an answer:
/// other scrapes go on, and the stuck connection is closed after the write
/// timeout.
#[test]
fn a_pipelining_client_that_never_reads() {
    if !ready() {
        return;
    }
    let mut e = Exporter::start(NOFILE, &[]);
    let (fds, _) = baseline(&e);
    let mut stuck = connect(e.port);
    stuck
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let one = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut sent = 0usize;
    for _ in 0..5000 {
        if stuck.write_all(one.as_bytes()).is_err() {
            break; // the exporter stopped reading: what it must survive
        }
        sent += one.len();
    }
    eprintln!("pipelining: sent {sent} bytes of requests, read nothing");
    let scraper = Scraper::start(e.port);
    std::thread::sleep(Duration::from_secs(3));
    scraper.finish("pipelining non-reader", BOUND);
    // The write timeout (10 s) closes it; the client still holds its end.
    check_recovered(&mut e, "pipelining non-reader", fds);
    drop(stuck);
}

/// A 64 MiB header line is cut off at the head limit, not kept in memory.
#[test]
fn a_huge_header_is_refused_without_growing() {
    if !ready() {
        return;
    }
    let mut e = Exporter::start(NOFILE, &[]);
    let (fds, _) = baseline(&e);
    let hwm_before = e.status_kib("VmHWM");
    let scraper = Scraper::start(e.port);
    let mut s = connect(e.port);
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ");
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..64 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    scraper.finish("huge header", BOUND);
    let hwm_after = e.status_kib("VmHWM");
    let reply = String::from_utf8_lossy(&reply);
    eprintln!(
        "huge header: {sent} bytes accepted of 64 MiB, peak RSS {hwm_before} -> {hwm_after} KiB, reply {:?}",
        reply.lines().next()
    );
    assert!(
        hwm_after < hwm_before + 8 * 1024,
        "peak RSS grew from {hwm_before} to {hwm_after} KiB"
    );
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply:.200}"
    );
    check_recovered(&mut e, "huge header", fds);
}

/// Clients that send their request a byte at a time, or read the answer a
/// byte at a time, hold only their own connection.
#[test]
fn slow_clients_hold_only_themselves() {
    if !ready() {
        return;
    }
    let mut e = Exporter::start(NOFILE, &[]);
    let (fds, _) = baseline(&e);
    let scraper = Scraper::start(e.port);
    let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut senders: Vec<TcpStream> = (0..200).map(|_| connect(e.port)).collect();
    let mut reader = connect(e.port);
    reader.write_all(request).unwrap();
    let mut got = 0;
    for i in 0..30 {
        for s in &mut senders {
            let _ = s.write_all(&request[i..i + 1]);
        }
        let mut byte = [0u8; 1];
        if reader.read_exact(&mut byte).is_ok() {
            got += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    scraper.finish("slow clients", BOUND);
    assert_eq!(got, 30, "the slow reader was cut off");
    drop(senders);
    drop(reader);
    check_recovered(&mut e, "slow clients", fds);
}

/// GET and HEAD of /metrics only: every other method is 405 with an Allow
/// header, every other path 404.
#[test]
fn other_methods_and_paths_are_refused() {
    if !ready() {
        return;
    }
    let e = Exporter::start(NOFILE, &[]);
    let ask = |method: &str, path: &str| {
        exchange(
            e.port,
            &format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
    };
    for method in ["POST", "PUT", "DELETE", "TRACE", "OPTIONS", "PATCH"] {
        let r = ask(method, "/metrics");
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}: {r:?}");
        assert!(!r.body.contains("kvm_watcher_"), "{method} got metrics");
    }
    let r = ask("GET", "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("kvm_watcher_backend_info"), "{r:?}");
    let head = ask("HEAD", "/metrics");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has a body: {head:?}");
    // No Accept header: the text format (tests/serve_formats.rs has the rest).
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for path in ["/", "/metricsx", "/metrics/", "/../metrics"] {
        assert_eq!(ask("GET", path).status, 404, "{path}");
    }
}

/// With file descriptors for a handful of connections only, the exporter
/// warns once (at start: it keeps some for reading the kernel's figures;
/// or when accept() runs out), closes the least active connection, and goes
/// on serving.
#[test]
fn accept_errors_are_survived() {
    if !ready() {
        return;
    }
    raise_nofile();
    // Room for its own files and a handful of connections only.
    let probe = Exporter::start(NOFILE, &[]);
    let own = probe.fds();
    drop(probe);
    let limit = own as u64 + 6;
    let mut e = Exporter::start(limit, &[]);
    let (fds, _) = baseline(&e);
    let scraper = Scraper::start(e.port);
    let idle: Vec<TcpStream> = (0..300).map(|_| connect(e.port)).collect();
    std::thread::sleep(Duration::from_secs(2));
    scraper.finish("accept errors", BOUND);
    drop(idle);
    check_recovered(&mut e, "accept errors", fds);
    let err = e.stderr();
    assert_eq!(
        err.matches("raise LimitNOFILE").count(),
        1,
        "want exactly one warning (limit {limit}):\n{err}"
    );
}
