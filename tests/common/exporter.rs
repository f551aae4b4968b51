//! `kvm-watcher serve` started for a test (under a file-descriptor limit),
//! plain HTTP clients for it, and what /proc says about its resources.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running exporter. Killed on drop.
pub struct Exporter {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Exporter {
    /// `kvm-watcher serve --listen 127.0.0.1:PORT <args>` with at most
    /// `nofile` open files, once it says it is serving.
    pub fn start(nofile: u64, args: &[&str]) -> Exporter {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(super::bin())
            .args(["serve", "--listen", &listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting prlimit kvm-watcher serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let acc = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                {
                    let mut a = acc.lock().unwrap();
                    a.push_str(&line);
                    a.push('\n');
                }
                if line.contains("serving metrics") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            panic!("serve did not start:\n{}", stderr.lock().unwrap());
        }
        Exporter {
            child,
            port,
            stderr,
        }
    }

    /// Its process id (prlimit execs it, so the pid is kvm-watcher's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Threads.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    }

    /// Waits until its fd count is at most `n` (connections it closed can
    /// take a moment); returns the last count seen.
    pub fn settle_fds(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let now = self.fds();
            if now <= n || Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP response: status code, headers (lower-case names), body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A connection to 127.0.0.1:`port` from the local address `src` (any of
/// 127.0.0.0/8): another client, as the exporter sees it.
pub fn connect_from(src: std::net::Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket owned by the TcpStream below; plain sockaddr_in structs.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sin(src, 0);
        let remote = sin(std::net::Ipv4Addr::LOCALHOST, port);
        if libc::bind(fd, (&raw const local).cast(), len) != 0
            || libc::connect(fd, (&raw const remote).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Sends `request` (whole, raw) on a new connection and reads the reply
/// until the server closes it.
pub fn exchange(port: u16, request: &str, timeout: Duration) -> Result<Reply, String> {
    exchange_from(std::net::Ipv4Addr::LOCALHOST, port, request, timeout)
}

/// [`exchange`] from the local address `src`.
pub fn exchange_from(
    src: std::net::Ipv4Addr,
    port: u16,
    request: &str,
    timeout: Duration,
) -> Result<Reply, String> {
    let mut s = connect_from(src, port).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One normal scrape (`GET /metrics`, connection closed after it): how long
/// it took, or what went wrong.
pub fn scrape(port: u16) -> Result<Duration, String> {
    let t = Instant::now();
    let r = exchange(
        port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )?;
    if r.status != 200 || !r.body.contains("kvm_watcher_backend_info") {
        return Err(format!("status {}: {:.200}", r.status, r.body));
    }
    Ok(t.elapsed())
}

/// Normal scrapes every 100 ms in the background, for the whole of an attack.
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Result<Duration, String>>>,
}

impl Scraper {
    pub fn start(port: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // At least one scrape, however soon the attack is over: one that
            // ends before this thread gets going leaves nothing to check.
            let mut results = Vec::new();
            loop {
                results.push(scrape(port));
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        });
        Scraper { stop, thread }
    }

    /// Stops; asserts there were scrapes and every one was answered within
    /// `bound`. Returns the slowest.
    pub fn finish(self, what: &str, bound: Duration) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let results = self.thread.join().unwrap();
        assert!(!results.is_empty(), "{what}: no scrape ran");
        let bad: Vec<String> = results
            .iter()
            .filter_map(|r| match r {
                Ok(d) if *d <= bound => None,
                Ok(d) => Some(format!("answered in {d:?}")),
                Err(e) => Some(e.clone()),
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: {} of {} scrapes not answered within {bound:?}: {bad:?}",
            bad.len(),
            results.len()
        );
        let slowest = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max()
            .copied();
        let slowest = slowest.unwrap_or_default();
        eprintln!(
            "{what}: {} scrapes, slowest {:.1} ms",
            results.len(),
            slowest.as_secs_f64() * 1e3
        );
        slowest
    }
}

/// Raises this process's soft limit on open files to its hard limit (the
/// attacks hold more connections than the exporter may).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// The sum of the samples of `family` whose labels include every one of
/// `labels` (`name="value"`), from an exposition text.
pub fn sum_of(text: &str, family: &str, labels: &[String]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let Some((set, value)) = rest.strip_prefix('{').and_then(|r| r.split_once("} ")) else {
            continue;
        };
        let set: Vec<&str> = set.split(',').collect();
        if labels.iter().all(|l| set.contains(&l.as_str())) {
            *found.get_or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

/// One scrape of `e`'s /metrics (asserting 200).
pub fn metrics(e: &Exporter) -> String {
    let r = exchange(
        e.port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .expect("scrape");
    assert_eq!(r.status, 200);
    r.body
}
