//! `serve` under load from other local clients: many clients scraping in a
//! loop on a large page, a flood of connections, and a tight file limit.
//! A normal scrape (another client, as Prometheus would make it) is answered
//! within a second and never closed for someone else's traffic. The figures
//! are printed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::exporter::{Exporter, Scraper, connect_from, exchange_from, raise_nofile};

/// systemd's default soft limit on open files.
const NOFILE: u64 = 1024;
/// A normal scrape is answered within this, whatever else goes on.
const BOUND: Duration = Duration::from_secs(1);
/// Where the normal scraper connects from (the load comes from 127.0.0.1).
const SCRAPER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A keep-alive HTTP/1.1 client, as Prometheus scrapes.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn open(src: Ipv4Addr, port: u16) -> std::io::Result<KeepAlive> {
        let s = connect_from(src, port)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(KeepAlive {
            reader: BufReader::new(s),
        })
    }

    /// `GET path`: the status, the body's length, and whether the server
    /// said it closes the connection after this answer (`Connection: close`,
    /// as it does after 1000 requests on one connection).
    fn get(&mut self, path: &str) -> Result<(u16, usize, bool), String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        let mut status = None;
        let mut length = 0usize;
        let mut closing = false;
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed by the server".into());
            }
            if status.is_none() {
                status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if line.to_ascii_lowercase().trim() == "connection: close" {
                closing = true;
            } else if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("body: {e}"))?;
        Ok((status.unwrap_or(0), length, closing))
    }
}

/// Keep-alive scrapes of /metrics every `every` from `src` until `stop`:
/// how long each took, or what went wrong (a connection it had open closed
/// under it included).
fn keep_alive_scrapes(
    src: Ipv4Addr,
    port: u16,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Result<Duration, String>>> {
    std::thread::spawn(move || {
        let mut results = Vec::new();
        let mut client = None;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let c = match &mut client {
                Some(c) => c,
                None => match KeepAlive::open(src, port) {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        results.push(Err(format!("connect: {e}")));
                        continue;
                    }
                },
            };
            match c.get("/metrics") {
                Ok((200, _, closing)) => {
                    results.push(Ok(t.elapsed()));
                    if closing {
                        // An HTTP client opens a new connection, as Prometheus does.
                        client = None;
                    }
                }
                Ok((status, _, _)) => results.push(Err(format!("status {status}"))),
                Err(e) => {
                    results.push(Err(e));
                    client = None;
                }
            }
            std::thread::sleep(every);
        }
        results
    })
}

/// The failures among `results`, and the slowest answer.
fn tally(what: &str, results: &[Result<Duration, String>]) -> (Vec<String>, Duration) {
    let failed: Vec<String> = results.iter().filter_map(|r| r.clone().err()).collect();
    let slowest = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .max()
        .copied()
        .unwrap_or_default();
    eprintln!(
        "{what}: {} scrapes, {} failed, slowest {:.1} ms",
        results.len(),
        failed.len(),
        slowest.as_secs_f64() * 1e3
    );
    (failed, slowest)
}

/// 20 clients scrape a 256-vCPU page in a loop; a normal scraper (every
/// 500 ms, keep-alive, and one with a new connection each time) is
/// answered within a second every time.
#[test]
fn twenty_looping_clients_on_a_256_vcpu_page() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    let vm = common::spawn_vm(&[
        "--name",
        "wide-vm",
        "--vcpus",
        "256",
        "--halt-hz",
        "20",
        "--seconds",
        "60",
    ]);
    let pid = vm.ready.pid.to_string();
    let e = Exporter::start(NOFILE, &["-p", &pid]);
    vm.start();
    std::thread::sleep(Duration::from_secs(2));
    let page = common::exporter::metrics(&e);
    let vcpus = page
        .lines()
        .filter(|l| {
            l.starts_with("kvm_watcher_vcpu_wakeups_total{") && l.contains("waited=\"true\"")
        })
        .count();
    eprintln!(
        "page: {} bytes, {vcpus} vCPUs with wake-up series",
        page.len()
    );
    assert!(vcpus >= 256, "the page shows {vcpus} vCPUs, want 256");

    let stop = Arc::new(AtomicBool::new(false));
    let loopers: Vec<_> = (0..20)
        .map(|_| {
            keep_alive_scrapes(
                Ipv4Addr::LOCALHOST,
                e.port,
                Duration::ZERO,
                Arc::clone(&stop),
            )
        })
        .collect();
    let normal = keep_alive_scrapes(
        SCRAPER,
        e.port,
        Duration::from_millis(500),
        Arc::clone(&stop),
    );
    let fresh = Scraper::start(e.port);
    std::thread::sleep(Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    let fresh_slowest = fresh.finish("new-connection scraper", Duration::from_secs(3600));
    let (failed, slowest) = tally("keep-alive scraper", &normal.join().unwrap());
    let mut all = Vec::new();
    for l in loopers {
        all.extend(l.join().unwrap());
    }
    let (loop_failed, loop_slowest) = tally("20 looping clients", &all);
    drop(vm);
    assert!(
        failed.is_empty(),
        "the keep-alive scraper failed: {failed:?}"
    );
    assert!(
        loop_failed.is_empty(),
        "looping clients failed: {loop_failed:?}"
    );
    assert!(
        slowest < BOUND && fresh_slowest < BOUND,
        "worst normal scrape {slowest:?} (keep-alive), {fresh_slowest:?} (new connections); want < {BOUND:?} (looping clients' worst {loop_slowest:?})"
    );
}

/// 100 keep-alive clients make a request every 20 ms each, reconnecting
/// whenever closed (more connections than the exporter keeps open): a
/// keep-alive scraper and one that connects anew each time, both from
/// another address, lose no scrape.
#[test]
fn a_connection_flood_closes_no_real_scrape() {
    if !common::require_bpf() {
        return;
    }
    raise_nofile();
    let e = Exporter::start(NOFILE, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..100)
        .map(|_| {
            let stop = Arc::clone(&stop);
            let port = e.port;
            std::thread::spawn(move || {
                let (mut n, mut closed) = (0u64, 0u64);
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match &mut client {
                        Some(c) => c,
                        None => match KeepAlive::open(Ipv4Addr::LOCALHOST, port) {
                            Ok(c) => client.insert(c),
                            Err(_) => continue,
                        },
                    };
                    n += 1;
                    if c.get("/nothing").is_err() {
                        closed += 1;
                        client = None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (n, closed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let normal = keep_alive_scrapes(
        SCRAPER,
        e.port,
        Duration::from_millis(300),
        Arc::clone(&stop),
    );
    let fresh = std::thread::spawn({
        let stop = Arc::clone(&stop);
        let port = e.port;
        move || {
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                results.push(
                    exchange_from(
                        SCRAPER,
                        port,
                        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        Duration::from_secs(10),
                    )
                    .and_then(|r| match r.status {
                        200 => Ok(t.elapsed()),
                        s => Err(format!("status {s}")),
                    }),
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        }
    });
    std::thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let (requests, closed) = flood
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |(n, c), (dn, dc)| (n + dn, c + dc));
    eprintln!(
        "flood: {requests} requests from 100 clients in 10 s, {closed} of them on connections the exporter closed"
    );
    let (failed, slowest) = tally("keep-alive scraper", &normal.join().unwrap());
    let (fresh_failed, fresh_slowest) = tally("new-connection scraper", &fresh.join().unwrap());
    // What this checks is that no scrape is lost; how long they took (the
    // scraper threads compete with the 100 flooding ones for two cores) is
    // printed, not bounded.
    eprintln!(
        "flood: slowest normal scrape {:.0} ms (keep-alive), {:.0} ms (new connections)",
        slowest.as_secs_f64() * 1e3,
        fresh_slowest.as_secs_f64() * 1e3
    );
    assert!(
        failed.is_empty() && fresh_failed.is_empty(),
        "scrapes lost to the flood: keep-alive {failed:?}, new connections {fresh_failed:?}"
    );
}

/// Under a 128-file limit with 64 connections held open, the once-a-second
/// refresh still gets the files it needs, and scrapes are answered.
#[test]
fn the_refresh_keeps_its_files_under_a_128_file_limit() {
    if !common::require_bpf() || !common::require_kvm() {
        return;
    }
    raise_nofile();
    let vm = common::spawn_vm(&["--halt-hz", "100", "--seconds", "30"]);
    let pid = vm.ready.pid.to_string();
    let mut e = Exporter::start(128, &["-p", &pid]);
    vm.start();
    let held: Vec<TcpStream> = (0..64)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", e.port)).ok())
        .collect();
    let scraper = Scraper::start(e.port);
    std::thread::sleep(Duration::from_secs(5));
    scraper.finish("64 connections under 128 files", BOUND);
    eprintln!(
        "{} connections held, the exporter has {} files open",
        held.len(),
        e.fds()
    );
    assert!(e.running(), "the exporter died:\n{}", e.stderr());
    let err = e.stderr();
    assert!(
        !err.contains("cannot read the kernel's figures"),
        "the refresh failed:\n{err}"
    );
    drop(held);
    drop(vm);
}
