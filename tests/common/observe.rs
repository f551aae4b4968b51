//! Running kvm-watcher and independent observers (bpftrace) side by side,
//! and reading their output.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use kvm_watcher::child::{Running, Spawn, Stream};
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
/// Killed on drop.
pub struct Spawned(Running);

impl Spawned {
    /// Starts `cmd`, waiting until `marker` appears on stdout (`on_stdout`) or stderr.
    pub fn start(name: &'static str, cmd: Command, marker: &str, on_stdout: bool) -> Spawned {
        let stream = if on_stdout {
            Stream::Stdout
        } else {
            Stream::Stderr
        };
        Spawn::new(cmd)
            .name(name)
            .ready_on(stream, marker)
            .start()
            .map(Spawned)
            .unwrap_or_else(|e| panic!("{}", super::failure(&e)))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        self.0.running()
    }

    pub fn signal(&self, sig: i32) {
        // An error means it has exited already, which the wait shows.
        let _ = self.0.signal(sig);
    }

    /// Waits for exit (killing after `timeout`), returns (status, stdout, stderr).
    pub fn wait(self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        self.wait_repeating(timeout, None)
    }

    /// [`Spawned::wait`], sending `sig` once more every `every` while the
    /// process runs (a signal that arrives between two looks at a flag can
    /// be missed).
    fn wait_repeating(
        self,
        timeout: Duration,
        resend: Option<(i32, Duration)>,
    ) -> (std::process::ExitStatus, String, String) {
        let name = self.0.name().to_string();
        let mut last = Instant::now();
        let exit = match resend {
            None => self.0.wait_or_kill(timeout),
            Some((sig, every)) => self.0.wait_or_kill_polling(timeout, every, |pid| {
                if last.elapsed() >= every {
                    last = Instant::now();
                    // SAFETY: kill(2) on our own child, not yet reaped.
                    unsafe { libc::kill(pid as i32, sig) };
                }
            }),
        }
        .unwrap_or_else(|e| panic!("{}", super::failure(&e)));
        assert!(
            !exit.killed,
            "{name} did not exit within {timeout:?}:\nstdout:\n{}\nstderr:\n{}",
            exit.stdout, exit.stderr
        );
        (exit.status, exit.stdout, exit.stderr)
    }
}

/// What the observer prints from BEGIN, which bpftrace runs only once every
/// probe is attached ("Attaching N probes..." comes before the attach).
const OBSERVER_READY: &str = "observer attached";

/// bpftrace running `script`, returned once every probe is attached, so
/// that it sees everything from then on and a SIGINT finds it in its event
/// loop rather than half-way through attaching.
pub fn observer(script: &str) -> Spawned {
    ensure_tracefs();
    let mut cmd = Command::new("bpftrace");
    cmd.args([
        "-e",
        &format!("{script}\nBEGIN {{ printf(\"{OBSERVER_READY}\\n\"); }}"),
    ]);
    Spawned::start("bpftrace", cmd, OBSERVER_READY, true)
}

/// Stops bpftrace and parses its maps: `@name[k1, k2]: v` -> name -> keys -> v.
pub fn observer_maps(obs: Spawned) -> ObserverMaps {
    obs.signal(libc::SIGINT);
    let (_, out, err) = obs.wait_repeating(
        Duration::from_secs(90),
        Some((libc::SIGINT, Duration::from_secs(10))),
    );
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

/// A bpftrace predicate: `field` is one of `tids`.
pub fn one_of(field: &str, tids: &[u32]) -> String {
    tids.iter()
        .map(|t| format!("{field} == {t}"))
        .collect::<Vec<_>>()
        .join(" || ")
}

/// `kvm-watcher <args>`, attached once it says it is watching.
pub fn watcher(args: &[&str]) -> Spawned {
    let mut cmd = Command::new(super::bin());
    cmd.args(args);
    Spawned::start("kvm-watcher", cmd, "kvm-watcher: watching", false)
}

/// Parses NDJSON, asserting every line is a JSON object with the fixed fields.
pub fn records(stdout: &str) -> Vec<Value> {
    parse_records(stdout).unwrap_or_else(|e| panic!("{e}"))
}

/// Parses NDJSON; an error names the first line that is not a JSON object
/// with the fixed fields.
pub fn parse_records(stdout: &str) -> Result<Vec<Value>, String> {
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).map_err(|e| format!("not JSON ({e}): {l}"))?;
            for field in ["monitor", "time_ns", "pid", "tid", "comm", "vcpu_id"] {
                if v.get(field).is_none() {
                    return Err(format!("record lacks {field}: {l}"));
                }
            }
            Ok(v)
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
