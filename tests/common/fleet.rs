//! A small fleet on one machine: hosts stood for by network namespaces, each
//! with its own `kvm-watcher serve` reached over a veth pair, one real
//! Prometheus scraping them through file-based service discovery with a
//! `host` label per target, and the packaged rules with their time scaled
//! down (one minute of a fleet is one second of a test).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::prometheus::Prometheus;

/// True if `ip netns` works here (root and iproute2); otherwise skips.
pub fn netns_available() -> bool {
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok || super::skip("`ip netns` does not work (apt-get install iproute2; needs root)")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the root namespace by a veth pair:
/// `peer` (the root side) and `addr` (the namespace side) on a /30.
/// Deleted (with its veth pair) on drop.
pub struct Netns {
    pub name: String,
    pub addr: String,
}

impl Netns {
    /// Namespace number `n` (0..64) of this test process.
    pub fn new(n: u32) -> Netns {
        let tag = std::process::id() % 100_000;
        let name = format!("kwfleet-{tag}-{n}");
        let (outer, inner) = (format!("kwf{tag}h{n}"), format!("kwf{tag}n{n}"));
        // 10.(200..249).(n*4).0/30, one subnet per namespace of this process.
        let (b, c) = (200 + tag % 50, n * 4);
        let (peer, addr) = (format!("10.{b}.{c}.1"), format!("10.{b}.{c}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name, addr };
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns.name,
        ]);
        ip(&["addr", "add", &format!("{peer}/30"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        let cidr = format!("{}/30", ns.addr);
        for args in [
            ["addr", "add", &cidr, "dev", &inner],
            ["link", "set", &inner, "up", ""],
            ["link", "set", "lo", "up", ""],
        ] {
            let mut full = vec!["-n", &ns.name];
            full.extend(args.iter().copied().filter(|a| !a.is_empty()));
            ip(&full);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One host of the fleet: its namespace and the exporter serving in it.
pub struct Host {
    /// The `host` label Prometheus gives its target.
    pub name: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// Scrape address, `ADDR:9464` inside the namespace.
    pub target: String,
    // Dropped after the exporter.
    ns: Netns,
}

impl Host {
    /// `kvm-watcher serve --listen ADDR:9464 <args>` inside namespace `n`,
    /// once it says it is serving.
    pub fn start(name: &str, n: u32, args: &[&str]) -> Host {
        let ns = Netns::new(n);
        let target = format!("{}:9464", ns.addr);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, super::bin(), "serve", "--listen"])
            .arg(&target)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kvm-watcher serve in a namespace");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (err, acc) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                acc.lock().unwrap().push_str(&format!("{line}\n"));
                if line.contains("serving metrics") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            panic!(
                "serve in {} did not start:\n{}",
                ns.name,
                stderr.lock().unwrap()
            );
        }
        Host {
            name: name.to_string(),
            child,
            stderr,
            target,
            ns,
        }
    }

    /// Everything its exporter wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Stops its exporter (the host goes dark for Prometheus).
    pub fn stop_exporter(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its namespace's name.
    pub fn netns(&self) -> &str {
        &self.ns.name
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_exporter();
    }
}

/// The packaged rules with every duration in minutes (`[5m]`, `for: 15m`)
/// read as seconds, and the migration link set to `link` bytes per second.
pub fn scaled_rules(link: f64) -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus/kvm-watcher-rules.yml");
    let mut rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut linked = false;
    for g in rules["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            let expr = if r.get("record").and_then(|n| n.as_str())
                == Some("kvm_watcher:migration_link:bytes_per_second")
            {
                linked = true;
                format!("vector({link})")
            } else {
                minutes_as_seconds(expr)
            };
            r["expr"] = expr.into();
            if let Some(f) = r.get("for").and_then(|f| f.as_str()) {
                let scaled = minutes_as_seconds(&format!("[{f}]"));
                r["for"] = scaled[1..scaled.len() - 1].into();
            }
        }
    }
    assert!(linked, "the rules have no migration link rule");
    serde_norway::to_string(&rules).unwrap()
}

/// `[Nm]` as `[Ns]`.
pub fn minutes_as_seconds(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with("m]") {
            out.push_str(&rest[..digits]);
            out.push('s');
            rest = &rest[digits + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Prometheus in `dir` scraping `hosts` every second (job kvm-watcher,
/// file-based discovery with a `host` label each), evaluating `rules`.
pub fn prometheus(dir: &Path, hosts: &[&Host], rules: &str) -> Prometheus {
    let targets: Vec<Value> = hosts
        .iter()
        .map(|h| serde_json::json!({"targets": [h.target], "labels": {"host": h.name}}))
        .collect();
    let sd = dir.join("targets.json");
    std::fs::write(&sd, serde_json::to_string(&targets).unwrap()).unwrap();
    let rules_file: PathBuf = dir.join("rules.yml");
    std::fs::write(&rules_file, rules).unwrap();
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .expect("promtool");
    assert!(check.status.success(), "{check:?}");
    Prometheus::start(
        dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\nscrape_configs:\n  - job_name: kvm-watcher\n    \
             file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
            rules_file.display(),
            sd.display()
        ),
    )
}

/// Waits until Prometheus scrapes every host (`up == 1` with its host
/// label), or panics after `within`.
pub fn wait_up(prom: &Prometheus, hosts: &[&Host], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let up: Vec<String> = prom
            .query("up{job=\"kvm-watcher\"} == 1")
            .iter()
            .filter_map(|m| m.get("host")?.as_str().map(str::to_string))
            .collect();
        if hosts.iter().all(|h| up.contains(&h.name)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "targets up: {up:?}, {:?}",
            prom.api("/api/v1/targets")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The labels of each firing alert called `name` (ALERTS series).
pub fn firing(prom: &Prometheus, name: &str) -> Vec<serde_json::Map<String, Value>> {
    prom.query(&format!(
        "ALERTS{{alertname=\"{name}\",alertstate=\"firing\"}}"
    ))
}

/// A label of a series, "" if absent.
pub fn label<'a>(m: &'a serde_json::Map<String, Value>, name: &str) -> &'a str {
    m.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A temporary directory for one test's Prometheus.
pub fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("kvm-watcher-fleet-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Makes thread `tid` SCHED_FIFO (priority 1): when it wakes it preempts
/// every normal task, so whatever else loads the machine, it does not wait
/// for a CPU (a VM kept healthy next to a planted problem).
pub fn realtime(tid: u32) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: a valid sched_param for the call's duration.
    let r = unsafe { libc::sched_setscheduler(tid as i32, libc::SCHED_FIFO, &param) };
    assert_eq!(
        r,
        0,
        "SCHED_FIFO for thread {tid}: {}",
        std::io::Error::last_os_error()
    );
}
