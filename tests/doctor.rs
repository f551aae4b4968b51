//! `kvm-watcher doctor` agrees with reality.
//!
//! Every claim doctor makes is checked against an independent observer:
//! - hooks it calls available / unavailable: bpftrace (its own loader, its own
//!   feature probes) must be able / unable to attach the same thing, and the
//!   tracepoints must really fire for the synthetic guest;
//! - the VMs it lists: the synthetic guest's own ready line (pid, tids, vCPU ids);
//! - kernel facts: /proc, /sys, uname;
//! - its monitor/backend table: the monitors themselves (their summary line says
//!   which backend they used), and its own hook table;
//! - its text output: its JSON output.
//!
//! Nothing about this machine is hard-coded except where the brief says "on this
//! machine" (all monitors have a backend here).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// Tests that run a VM or bpftrace take this lock, so they do not compete for
/// the two CPUs of the test machines (halt-polling behaviour depends on timing).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    common::one_at_a_time(&HEAVY)
}

// ---------------------------------------------------------------------------
// helpers

/// `kvm-watcher doctor --json`, parsed. Asserts exit 0 and empty stderr.
fn doctor_json() -> Value {
    let out = common::run_cli(&["doctor", "--json"], T);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "doctor --json exited with {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.trim().is_empty(),
        "doctor --json wrote on stderr:\n{stderr}"
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json is not one JSON document ({e}):\n{stdout}"));
    assert_eq!(v["schema_version"], 1, "unexpected schema_version");
    for key in ["kernel", "privileges", "hooks", "monitors", "vms"] {
        assert!(!v[key].is_null(), "doctor --json lacks `{key}`:\n{stdout}");
    }
    v
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v}"))
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("`{key}` is not an array in {v}"))
}

/// (hook, attach, available) of every row of doctor's hook table.
fn hook_rows(d: &Value) -> Vec<(String, String, bool, &Value)> {
    arr(d, "hooks")
        .iter()
        .map(|h| {
            let attach = s(h, "attach").to_string();
            assert!(
                ["tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe"].contains(&attach.as_str()),
                "unknown attach type in {h}"
            );
            let available = h["available"]
                .as_bool()
                .unwrap_or_else(|| panic!("`available` is not a bool in {h}"));
            if !available {
                assert!(
                    h["reason"].is_string() && h["failed_at"].is_string(),
                    "an unavailable hook must say why and where: {h}"
                );
            }
            (s(h, "hook").to_string(), attach, available, h)
        })
        .collect()
}

fn is_tracepoint_kind(attach: &str) -> bool {
    matches!(attach, "tp_btf" | "raw_tp" | "tracepoint")
}

fn tracefs_mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "tracefs").then(|| f[1].to_string())
        })
        .collect()
}

/// Mounts tracefs on /sys/kernel/tracing unless it is mounted there already
/// (bpftrace's tracepoints and libbpf's classic tracepoints need it).
fn ensure_tracefs() {
    if tracefs_mount_points()
        .iter()
        .any(|m| m == "/sys/kernel/tracing")
    {
        return;
    }
    let out = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .output()
        .expect("running mount");
    // Another test may have mounted it between our check and our mount.
    assert!(
        tracefs_mount_points()
            .iter()
            .any(|m| m == "/sys/kernel/tracing"),
        "cannot mount tracefs on /sys/kernel/tracing ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Root, BTF, bpftrace installed, tracefs mounted; otherwise skips.
fn require_bpftrace() -> bool {
    if !common::require_bpf() {
        return false;
    }
    match Command::new("bpftrace").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return common::skip(&format!("bpftrace --version failed: {}", o.status)),
        Err(e) => return common::skip(&format!("bpftrace not installed: {e}")),
    }
    ensure_tracefs();
    true
}

/// Waits for `child` up to `timeout`; kills it (and panics) past that.
fn wait_or_kill(child: &mut Child, what: &str, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("waiting for child") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a bpftrace script that exits by itself; returns (success, stdout+stderr).
fn bpftrace_once(script: &str) -> (bool, String) {
    let mut child = Command::new("bpftrace")
        .args(["-e", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning bpftrace");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let st = wait_or_kill(&mut child, &format!("bpftrace -e '{script}'"), T);
    let stdout = to.join().unwrap();
    let stderr = te.join().unwrap();
    (
        st.success() && stdout.contains("READY"),
        format!("exit {st}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    )
}

/// Whether bpftrace can attach `probe` (e.g. `kfunc:kvm_vcpu_halt`): the script
/// exits from BEGIN, which runs only once every probe is attached.
fn bpftrace_attaches(probe: &str) -> (bool, String) {
    bpftrace_once(&format!(
        "{probe} {{ @n = count(); }} BEGIN {{ printf(\"READY\\n\"); exit(); }}"
    ))
}

/// A bpftrace process running in the background until stopped.
struct Bpftrace {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stdout_acc: Vec<String>,
    stderr_thread: Option<JoinHandle<String>>,
}

impl Bpftrace {
    /// Starts `bpftrace -e script` and waits until it has printed "Attaching"
    /// and then READY from BEGIN (which runs after every probe is attached).
    fn start(script: &str) -> Bpftrace {
        let mut child = Command::new("bpftrace")
            .args(["-e", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning bpftrace");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut b = Bpftrace {
            child,
            stdout: rx,
            stdout_acc: Vec::new(),
            stderr_thread: Some(stderr_thread),
        };
        let deadline = Instant::now() + T;
        let mut attaching = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match b.stdout.recv_timeout(left) {
                Ok(line) => {
                    attaching |= line.starts_with("Attaching");
                    let ready = line.trim() == "READY";
                    b.stdout_acc.push(line);
                    if ready {
                        assert!(attaching, "bpftrace printed READY before Attaching");
                        return b;
                    }
                }
                Err(_) => {
                    let _ = b.child.kill();
                    let st = b.child.wait();
                    let stderr = b.stderr_thread.take().unwrap().join().unwrap();
                    panic!(
                        "bpftrace did not get ready (exit {st:?}); script:\n{script}\nstdout:\n{}\nstderr:\n{stderr}",
                        b.stdout_acc.join("\n")
                    );
                }
            }
        }
    }

    /// SIGINT, wait (bounded), and return the `@name: N` counts it printed.
    fn stop(mut self) -> (HashMap<String, u64>, String) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let st = wait_or_kill(&mut self.child, "bpftrace (after SIGINT)", T);
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(5)) {
            self.stdout_acc.push(line);
        }
        let stderr = self.stderr_thread.take().unwrap().join().unwrap();
        let all = format!(
            "exit {st}\nstdout:\n{}\nstderr:\n{stderr}",
            self.stdout_acc.join("\n")
        );
        let mut counts = HashMap::new();
        for line in &self.stdout_acc {
            if let Some((k, v)) = line.trim().split_once(": ")
                && k.starts_with('@')
                && let Ok(n) = v.trim().parse::<u64>()
            {
                counts.insert(k.trim_start_matches('@').to_string(), n);
            }
        }
        (counts, all)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// hooks

/// Every tracepoint doctor calls available fires for a synthetic guest that
/// halts (with a halt-polling window it keeps growing and shrinking), dirties
/// pages into a dirty ring, and exits: counted by bpftrace, filtered to the
/// guest's pid.
#[test]
fn available_tracepoints_really_fire() {
    if !require_bpftrace() || !common::require_kvm() {
        return;
    }
    let _g = heavy();
    let d = doctor_json();
    // Tracepoints a monitor's live check found silent (they attach but never
    // fire for a running guest here): bpftrace must count none of them either.
    let silent: BTreeSet<String> = arr(&d, "monitors")
        .iter()
        .flat_map(|m| m["live"]["silent"].as_array().cloned().unwrap_or_default())
        .filter_map(|h| h.as_str().map(String::from))
        .collect();
    let tracepoints: BTreeSet<String> = hook_rows(&d)
        .into_iter()
        .filter(|(_, attach, available, _)| *available && is_tracepoint_kind(attach))
        .map(|(hook, ..)| hook)
        .collect();
    assert!(
        !tracepoints.is_empty(),
        "doctor calls no tracepoint available; hooks: {}",
        d["hooks"]
    );

    // 2000 Hz (a 500 us period) against a 500 us halt-polling window: some
    // halts end while polling and some do not, so KVM keeps growing and
    // shrinking the window and kvm:kvm_halt_poll_ns fires (tens to hundreds of
    // times per second here). Few pages per pass: on a loaded host a pass of
    // many ring writes outlasts the period, the next interrupt is pending at
    // every HLT, and no halt ever sleeps or polls.
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--halt-hz",
        "2000",
        "--halt-poll-ns",
        "500000",
        "--dirty-pages",
        "8",
        "--dirty-log",
        "ring",
        "--io-exits",
        "1",
        "--mmio-exits",
        "1",
        "--seconds",
        "2",
    ]);
    let pid = vm.ready.pid;
    let names: Vec<&String> = tracepoints.iter().collect();
    let mut script = String::new();
    for (i, tp) in names.iter().enumerate() {
        script.push_str(&format!(
            "tracepoint:{tp} /pid == {pid}/ {{ @c{i} = count(); }}\n"
        ));
    }
    script.push_str("BEGIN { printf(\"READY\\n\"); }\n");
    let bt = Bpftrace::start(&script);
    vm.start();
    let report = vm.finish(T);
    let (counts, raw) = bt.stop();

    // The guest really did what makes these fire.
    for v in &report.vcpus {
        assert!(v.halts > 0, "vCPU {} never halted: {v:?}", v.index);
        assert!(
            v.passes > 0,
            "vCPU {} never wrote its pages: {v:?}",
            v.index
        );
    }
    let mut missing = Vec::new();
    for (i, tp) in names.iter().enumerate() {
        let n = counts.get(&format!("c{i}")).copied().unwrap_or(0);
        eprintln!("{tp}: {n} events for pid {pid}");
        if silent.contains(*tp) {
            assert_eq!(
                n, 0,
                "doctor's live check found {tp} silent, bpftrace counted {n}"
            );
        } else if n == 0 {
            missing.push(tp.as_str());
        }
    }
    assert!(
        missing.is_empty(),
        "doctor calls these tracepoints available, but bpftrace counted no event of them \
         for the guest (pid {pid}): {missing:?}\nbpftrace:\n{raw}"
    );
}

/// For every kernel-function hook (fentry, kprobe) and every classic tracepoint
/// hook, bpftrace's equivalent attaches exactly when doctor says the hook is
/// available. A tracepoint bpftrace can attach is the control: the harness
/// itself works.
#[test]
fn function_hooks_agree_with_bpftrace() {
    if !require_bpftrace() {
        return;
    }
    let _g = heavy();
    let d = doctor_json();
    let rows = hook_rows(&d);

    // Control: a tracepoint doctor calls available attaches with the same harness.
    let control = rows
        .iter()
        .find(|(_, attach, available, _)| *available && is_tracepoint_kind(attach))
        .map(|(hook, ..)| hook.clone())
        .expect("doctor calls no tracepoint available");
    let (ok, out) = bpftrace_attaches(&format!("tracepoint:{control}"));
    assert!(
        ok,
        "control: bpftrace cannot attach tracepoint:{control}:\n{out}"
    );

    let tracefs = d["kernel"]["tracefs"].as_str().map(str::to_string);
    let mut disagreements = Vec::new();
    let mut checked = 0;
    for (hook, attach, available, row) in &rows {
        let probe = match attach.as_str() {
            "fentry" => format!("kfunc:{hook}"),
            "kprobe" => format!("kprobe:{hook}"),
            // bpftrace's tracepoints are classic ones: comparable only when
            // doctor saw tracefs mounted (we mounted it before running doctor).
            "tracepoint" if tracefs.is_some() => format!("tracepoint:{hook}"),
            _ => continue,
        };
        let (ok, out) = bpftrace_attaches(&probe);
        checked += 1;
        eprintln!("{probe}: doctor available={available}, bpftrace attaches={ok}");
        if ok != *available {
            disagreements.push(format!(
                "{hook} ({attach}): doctor says available={available} ({row}), bpftrace {probe} attaches={ok}:\n{out}"
            ));
        }
    }
    assert!(
        checked > 0,
        "doctor lists no function hooks: {}",
        d["hooks"]
    );
    assert!(
        disagreements.is_empty(),
        "doctor and bpftrace disagree:\n{}",
        disagreements.join("\n\n")
    );
}

// ---------------------------------------------------------------------------
// monitors

fn parse_hook_ref(h: &str) -> (String, String) {
    // "kvm:kvm_vcpu_wakeup (raw_tp)"
    let (target, kind) = h
        .rsplit_once(" (")
        .unwrap_or_else(|| panic!("monitor hook `{h}` is not `target (kind)`"));
    (target.to_string(), kind.trim_end_matches(')').to_string())
}

/// On this machine every monitor has a backend; each monitor's chosen hooks are
/// ones the hook table calls available, and every hook a refused backend blames
/// is one the hook table calls unavailable.
#[test]
fn monitors_have_backends_consistent_with_hooks() {
    if !common::require_bpf() {
        return;
    }
    let d = doctor_json();
    let avail: HashMap<(String, String), bool> = hook_rows(&d)
        .into_iter()
        .map(|(h, a, ok, _)| ((h, a), ok))
        .collect();
    let monitors = arr(&d, "monitors");
    let names: BTreeSet<&str> = monitors.iter().map(|m| s(m, "monitor")).collect();
    assert_eq!(
        names,
        BTreeSet::from_iter(kvm_watcher::monitors::REGISTRY.iter().map(|m| m.name())),
        "doctor must report every monitor"
    );
    for m in monitors {
        let name = s(m, "monitor");
        assert!(
            m["backend"].is_string(),
            "monitor {name} has no backend on this machine: {m}"
        );
        let hooks = arr(m, "hooks");
        // A monitor whose backends need no hook (dirty-rate samples from
        // user space) says in its live check whether what it needs works.
        let hookless = kvm_watcher::monitors::by_name(name)
            .is_some_and(|r| r.backends().iter().all(|b| b.needs.is_empty()));
        if hookless {
            let text = m["live"]["text"].as_str().unwrap_or_default();
            assert!(
                text.starts_with("works:"),
                "monitor {name} does not work here: {m}"
            );
            continue;
        }
        assert!(!hooks.is_empty(), "monitor {name} uses no hook: {m}");
        for h in hooks {
            let key = parse_hook_ref(h.as_str().expect("hook is a string"));
            assert_eq!(
                avail.get(&key),
                Some(&true),
                "monitor {name} uses {key:?}, which the hook table does not call available"
            );
        }
        for r in arr(m, "refused") {
            let reason = s(r, "reason");
            for part in reason.split("; ") {
                // "fentry kvm_vcpu_halt: the kernel refuses ..."
                let (what, _) = part
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("refusal `{part}` of {name} names no hook"));
                let (kind, target) = what.split_once(' ').unwrap_or_else(|| {
                    panic!("refusal `{part}` of {name} is not `kind target: why`")
                });
                assert_eq!(
                    avail.get(&(target.to_string(), kind.to_string())),
                    Some(&false),
                    "monitor {name} refuses backend {} because of {kind} {target}, \
                     which the hook table does not call unavailable",
                    s(r, "backend")
                );
            }
        }
    }
}

/// Each monitor, run for a moment, says it used the backend doctor reports.
#[test]
fn monitors_use_the_backend_doctor_reports() {
    if !common::require_bpf() {
        return;
    }
    let _g = heavy();
    let d = doctor_json();
    for m in arr(&d, "monitors") {
        let name = s(m, "monitor");
        let Some(backend) = m["backend"].as_str() else {
            continue; // covered by monitors_have_backends_consistent_with_hooks
        };
        let sub = name.replace('_', "-");
        let out = common::run_cli(&[&sub, "-t", "0.3", "--output", "json"], T);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kvm-watcher {sub} exited with {}; stderr:\n{stderr}",
            out.status
        );
        let summary: Value = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["monitor"] == "summary")
            .unwrap_or_else(|| panic!("kvm-watcher {sub} printed no summary:\n{stdout}"));
        assert_eq!(
            summary["backend"][name].as_str(),
            Some(backend),
            "doctor says {name} uses {backend}; the monitor says {}",
            summary["backend"]
        );
    }
}

// ---------------------------------------------------------------------------
// kernel facts

#[test]
fn kernel_facts_match_the_system() {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        // Make the tracefs answer stable against other tests mounting it.
        ensure_tracefs();
    }
    let d = doctor_json();
    let k = &d["kernel"];
    // SAFETY: uname fills the struct.
    let release = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        assert_eq!(libc::uname(&mut u), 0);
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(s(k, "release"), release, "kernel.release vs uname");
    let exists = |p: &str| std::path::Path::new(p).exists();
    assert_eq!(k["dev_kvm"], exists("/dev/kvm"), "kernel.dev_kvm");
    assert_eq!(
        k["vmlinux_btf"],
        exists("/sys/kernel/btf/vmlinux"),
        "kernel.vmlinux_btf"
    );
    assert_eq!(
        k["kvm_module_btf"],
        exists("/sys/kernel/btf/kvm"),
        "kernel.kvm_module_btf"
    );
    let hpn: Option<u64> = std::fs::read_to_string("/sys/module/kvm/parameters/halt_poll_ns")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    assert_eq!(k["halt_poll_ns"].as_u64(), hpn, "kernel.halt_poll_ns");
    let mounts = tracefs_mount_points();
    match k["tracefs"].as_str() {
        Some(m) => assert!(
            mounts.iter().any(|x| x == m),
            "doctor says tracefs is at {m}; /proc/mounts has it at {mounts:?}"
        ),
        None => assert!(
            mounts.is_empty(),
            "doctor says tracefs is not mounted; /proc/mounts has it at {mounts:?}"
        ),
    }
    let kvm = s(k, "kvm");
    let in_modules = std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').next() == Some("kvm"));
    let expected = if in_modules {
        "module"
    } else if exists("/sys/module/kvm") {
        "builtin"
    } else {
        "absent"
    };
    assert_eq!(kvm, expected, "kernel.kvm");
    // SAFETY: no arguments.
    assert_eq!(
        d["privileges"]["euid"].as_u64(),
        Some(unsafe { libc::geteuid() } as u64),
        "privileges.euid"
    );
}

// ---------------------------------------------------------------------------
// VMs

/// The running synthetic guest's entry in `doctor --json`.
fn doctor_vm_entry(pid: u32) -> Value {
    let d = doctor_json();
    arr(&d, "vms")
        .iter()
        .find(|v| v["pid"].as_u64() == Some(pid as u64))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "doctor does not list the running guest (pid {pid}): {}",
                d["vms"]
            )
        })
}

#[test]
fn doctor_lists_a_running_synthetic_vm() {
    if !common::require_kvm() {
        return;
    }
    let _g = heavy();
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "3",
        "--halt-hz",
        "100",
        "--seconds",
        "3",
    ]);
    assert_eq!(vm.ready.vcpu_ids, vec![3, 4], "the guest's own ready line");
    vm.start();
    std::thread::sleep(Duration::from_millis(300));
    let entry = doctor_vm_entry(vm.ready.pid);
    assert_eq!(s(&entry, "vmm"), "kvm-watcher", "vmm of {entry}");
    assert_eq!(entry["vms"], 1, "vms of {entry}");
    let ids: Vec<u64> = arr(&entry, "vcpu_ids")
        .iter()
        .map(|v| v.as_u64().expect("vcpu id"))
        .collect();
    assert_eq!(ids, vec![3, 4], "vcpu_ids of {entry}");
    let expected: Vec<u64> = vm.ready.vcpu_ids.iter().map(|&x| x as u64).collect();
    assert_eq!(ids, expected, "vcpu_ids vs the guest's ready line");
    let _ = vm.finish(T);
}

/// The vCPU threads doctor lists are exactly the guest's vCPU threads (from its
/// ready line), and a vCPU id doctor attaches to a thread is that thread's.
#[test]
fn doctor_vcpu_threads_are_the_guests_vcpu_threads() {
    if !common::require_kvm() {
        return;
    }
    let _g = heavy();
    let vm = common::spawn_vm(&[
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "3",
        "--halt-hz",
        "100",
        "--seconds",
        "3",
    ]);
    vm.start();
    std::thread::sleep(Duration::from_millis(300));
    let entry = doctor_vm_entry(vm.ready.pid);
    let truth: BTreeMap<u64, u64> = vm
        .ready
        .tids
        .iter()
        .zip(&vm.ready.vcpu_ids)
        .map(|(&t, &id)| (t as u64, id as u64))
        .collect();
    let mut seen = BTreeMap::new();
    for t in arr(&entry, "vcpu_threads") {
        let tid = t["tid"].as_u64().expect("tid");
        seen.insert(tid, (t["comm"].clone(), t["vcpu_id"].clone()));
        let Some(&want) = truth.get(&tid) else {
            let flags = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", vm.ready.pid))
                .ok()
                .and_then(|st| {
                    let after = st.rsplit_once(") ")?.1.to_string();
                    let f: u64 = after.split(' ').nth(6)?.parse().ok()?;
                    Some(format!("{f:#x}"))
                });
            panic!(
                "doctor lists thread {tid} ({t}) as a vCPU thread of pid {}, but the guest's vCPU \
                 threads are {truth:?} (tid -> vcpu id); task flags {flags:?} \
                 (0x4000 = PF_USER_WORKER: a kernel worker such as kvm-nx-lpage-recovery)",
                vm.ready.pid
            );
        };
        if let Some(id) = t["vcpu_id"].as_u64() {
            assert_eq!(
                id, want,
                "doctor gives thread {tid} vCPU id {id}; it runs vCPU {want}"
            );
        }
    }
    let seen_tids: BTreeSet<u64> = seen.keys().copied().collect();
    let truth_tids: BTreeSet<u64> = truth.keys().copied().collect();
    assert_eq!(
        seen_tids, truth_tids,
        "doctor's vCPU threads vs the guest's: {seen:?}"
    );
    let _ = vm.finish(T);
}

// ---------------------------------------------------------------------------
// text output

/// `doctor` (text) says the same as `doctor --json`: each hook row (available,
/// or unavailable with the same reason, errno and step), and each monitor's
/// backend, hooks and refusals. In particular, where the JSON says fentry is
/// refused and kprobes are unavailable, the text says so.
#[test]
fn text_output_agrees_with_json() {
    if unsafe { libc::geteuid() } == 0 {
        ensure_tracefs(); // the two runs must see the same tracefs state
    }
    let d = doctor_json();
    let out = common::run_cli(&["doctor"], T);
    assert!(out.status.success(), "doctor exited with {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();

    // Hook table: "HOOK ATTACH RESULT" header, then one row per hook.
    let start = lines
        .iter()
        .position(|l| l.starts_with("HOOK") && l.contains("ATTACH"))
        .unwrap_or_else(|| panic!("no hook table in doctor's text:\n{text}"));
    let hook_lines = &lines[start + 1..];
    for (hook, attach, available, row) in hook_rows(&d) {
        let line = hook_lines
            .iter()
            .take_while(|l| !l.trim().is_empty())
            .find(|l| {
                let mut f = l.split_whitespace();
                f.next() == Some(&hook) && f.next() == Some(&attach)
            })
            .unwrap_or_else(|| panic!("no text row for {hook} {attach}:\n{text}"));
        let result = line
            .split_whitespace()
            .skip(2)
            .collect::<Vec<_>>()
            .join(" ");
        if available {
            assert_eq!(
                result, "available",
                "{hook} {attach}: JSON {row}, text `{line}`"
            );
        } else {
            assert!(
                result.starts_with("unavailable: "),
                "{hook} {attach}: JSON says unavailable, text `{line}`"
            );
            let reason = s(row, "reason");
            let norm = |x: &str| x.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                result.contains(&norm(reason)),
                "{hook} {attach}: text `{line}` lacks the JSON reason `{reason}`"
            );
            if let Some(e) = row["errno_name"].as_str() {
                assert!(
                    result.contains(e),
                    "{hook} {attach}: text `{line}` lacks {e}"
                );
            }
            assert!(
                result.contains(&format!("at {})", s(row, "failed_at"))),
                "{hook} {attach}: text `{line}` lacks the failing step"
            );
            // The tracepoint-only case, in words: refused fentry, absent kprobes.
            if attach == "fentry" && row["errno_name"] == "EPERM" {
                assert!(
                    result.contains("refuses fentry"),
                    "{hook}: JSON says fentry is refused (EPERM), text `{line}` does not"
                );
            }
            if attach == "kprobe" && reason.contains("no kprobes") {
                assert!(
                    result.contains("no kprobes"),
                    "{hook}: JSON says there are no kprobes, text `{line}` does not"
                );
            }
        }
    }

    // Monitor table: "MONITOR BACKEND HOOKS", one row per monitor, then
    // indented "note:" and "not <backend>: <reason>" lines.
    let mstart = lines
        .iter()
        .position(|l| l.starts_with("MONITOR") && l.contains("BACKEND"))
        .unwrap_or_else(|| panic!("no monitor table in doctor's text:\n{text}"));
    let mlines: Vec<&str> = lines[mstart + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .copied()
        .collect();
    for m in arr(&d, "monitors") {
        let name = s(m, "monitor");
        let i = mlines
            .iter()
            .position(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no text row for monitor {name}:\n{text}"));
        let row = mlines[i];
        let backend = m["backend"].as_str().unwrap_or("none");
        assert_eq!(
            row.split_whitespace().nth(1),
            Some(backend),
            "monitor {name}: JSON backend {backend}, text `{row}`"
        );
        let hooks: Vec<&str> = arr(m, "hooks")
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert!(
            row.contains(&hooks.join(", ")),
            "monitor {name}: text `{row}` lacks its hooks {hooks:?}"
        );
        let block: Vec<&str> = mlines[i + 1..]
            .iter()
            .take_while(|l| l.starts_with(' '))
            .map(|l| l.trim())
            .collect();
        for r in arr(m, "refused") {
            let want = format!("not {}: {}", s(r, "backend"), s(r, "reason"));
            assert!(
                block.contains(&want.as_str()),
                "monitor {name}: text lacks `{want}`; it has {block:?}"
            );
        }
        assert_eq!(
            block.iter().filter(|l| l.starts_with("not ")).count(),
            arr(m, "refused").len(),
            "monitor {name}: refusals in text {block:?} vs JSON {}",
            m["refused"]
        );
    }
}
