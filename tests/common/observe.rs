//! Running kvm-watcher and independent observers (bpftrace) side by side,
//! and reading their output.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// bpftrace maps by name, then by key.
pub type ObserverMaps = HashMap<String, BTreeMap<Vec<i64>, i64>>;

/// Mounts tracefs if needed (bpftrace reads tracepoint formats from it).
pub fn ensure_tracefs() {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .expect("running mount");
    assert!(
        status.success() || std::path::Path::new("/sys/kernel/tracing/events").exists(),
        "cannot mount tracefs"
    );
}

pub fn have_bpftrace() -> bool {
    Command::new("bpftrace")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || super::skip("bpftrace is not installed (apt-get install bpftrace)")
}

/// A process whose stdout we collect and whose stderr we watch for a line.
pub struct Spawned {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    name: &'static str,
}

impl Spawned {
    /// Starts `cmd`, waiting until `marker` appears on stdout (`on_stdout`) or stderr.
    pub fn start(name: &'static str, mut cmd: Command, marker: &str, on_stdout: bool) -> Spawned {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (tx, rx) = mpsc::channel::<()>();
        let marker = marker.to_string();
        let watch = move |stream: Box<dyn Read + Send>, tx: Option<mpsc::Sender<()>>| {
            let mut all = String::new();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = &tx
                    && line.contains(&marker)
                {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        };
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let (tx_out, tx_err) = if on_stdout {
            (Some(tx), None)
        } else {
            (None, Some(tx))
        };
        let w1 = watch.clone();
        let stdout = std::thread::spawn(move || w1(out, tx_out));
        let stderr = std::thread::spawn(move || watch(err, tx_err));
        let mut s = Spawned {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            name,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = s.child.kill();
            let (o, e) = s.collect();
            panic!("{name} never became ready:\nstdout:\n{o}\nstderr:\n{e}");
        }
        s
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit (killing after `timeout`), returns (status, stdout, stderr).
    pub fn wait(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let (o, e) = self.collect();
                panic!(
                    "{} did not exit within {timeout:?}:\nstdout:\n{o}\nstderr:\n{e}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (o, e) = self.collect();
        (status, o, e)
    }

    fn collect(&mut self) -> (String, String) {
        let o = self
            .stdout
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        let e = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        (o, e)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// bpftrace running `script`, attached once it says so.
pub fn observer(script: &str) -> Spawned {
    ensure_tracefs();
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-e", script]);
    Spawned::start("bpftrace", cmd, "Attaching", true)
}

/// Stops bpftrace and parses its maps: `@name[k1, k2]: v` -> name -> keys -> v.
pub fn observer_maps(obs: Spawned) -> ObserverMaps {
    obs.signal(libc::SIGINT);
    let (_, out, err) = obs.wait(Duration::from_secs(90));
    let mut maps: ObserverMaps = HashMap::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix('@') else {
            continue;
        };
        let Some((lhs, value)) = rest.rsplit_once(": ") else {
            continue;
        };
        let (name, keys) = match lhs.split_once('[') {
            Some((n, k)) => (
                n.to_string(),
                k.trim_end_matches(']')
                    .split(", ")
                    .map(|x| {
                        x.trim()
                            .parse::<i64>()
                            .unwrap_or_else(|_| panic!("bad key in {line}"))
                    })
                    .collect(),
            ),
            None => (lhs.to_string(), vec![]),
        };
        let v: i64 = value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}\nstderr: {err}"));
        maps.entry(name).or_default().insert(keys, v);
    }
    maps
}

/// `kvm-watcher <args>`, attached once it says it is watching.
pub fn watcher(args: &[&str]) -> Spawned {
    let mut cmd = Command::new(super::bin());
    cmd.args(args);
    Spawned::start("kvm-watcher", cmd, "kvm-watcher: watching", false)
}

/// Parses NDJSON, asserting every line is a JSON object with the fixed fields.
pub fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            for field in ["monitor", "time_ns", "pid", "tid", "comm", "vcpu_id"] {
                assert!(v.get(field).is_some(), "record lacks {field}: {l}");
            }
            v
        })
        .collect()
}

pub fn of(records: &[Value], monitor: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["monitor"] == monitor)
        .cloned()
        .collect()
}

pub fn summary(records: &[Value]) -> Value {
    let last = records.last().expect("no output at all");
    assert_eq!(
        last["monitor"], "summary",
        "last line is not the summary: {last}"
    );
    last.clone()
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}
