//! The matrix's state on this kernel: what `doctor` says, which backends
//! the kernel offers, and how a scenario's runs become cells.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Instant;

use kvm_watcher::backend;
use kvm_watcher::monitors::REGISTRY;
use serde_json::Value;

use crate::common::bin;
use crate::scenario::{Outcome, Run};
use crate::util::{diff, multiset, s, u};
use crate::vcpu_load::load_counts;

/// One cell of the matrix.
pub struct Cell {
    pub monitor: &'static str,
    pub backend: String,
    pub mode: &'static str,
    pub status: &'static str,
    pub ms: u128,
    pub detail: String,
}

pub fn emit(c: &Cell) {
    println!(
        "MATRIX\t{}\t{}\t{}\t{}\t{}\t{}",
        c.monitor,
        c.backend,
        c.mode,
        c.status,
        c.ms,
        c.detail.replace(['\n', '\t'], " ")
    );
}

/// A check's result as a cell's status and detail.
pub fn status_of(result: Result<String, String>) -> (&'static str, String) {
    match result {
        Ok(d) => ("pass", d),
        Err(e) => ("fail", e),
    }
}

/// A check with its own timing (not a side-by-side scenario) as a cell.
pub fn emit_timed(
    monitor: &'static str,
    backend: &str,
    mode: &'static str,
    check: impl FnOnce() -> Result<String, String>,
) {
    let t0 = Instant::now();
    let (status, detail) = status_of(check());
    emit(&Cell {
        monitor,
        backend: backend.into(),
        mode,
        status,
        ms: t0.elapsed().as_millis(),
        detail,
    });
}

/// Backends that are expected to be unavailable on this kernel, with a
/// phrase the refusal must contain. Anything else refused is a failure.
fn expected_refusal(
    version: (u32, u32),
    kvm_btf: bool,
    monitor: &str,
    backend: &str,
) -> Option<&'static str> {
    match (monitor, backend) {
        // KVM is a module; without its BTF (Debian 11's 5.10) no fentry target in it resolves.
        ("wakeup" | "dirty" | "vcpu_load", "fentry") if !kvm_btf => {
            Some("not in this kernel's BTF")
        }
        // kvm:kvm_dirty_ring_push arrived with the dirty ring in 5.11.
        ("dirty", "tracepoint") if version < (5, 11) => Some("kvm_dirty_ring_push does not exist"),
        _ => None,
    }
}

/// The tid-independent fields rows of a monitor must agree on across backends.
fn stable_rows(run: &Run, monitor: &str) -> BTreeMap<Vec<u64>, usize> {
    let keys: &[&str] = match monitor {
        "wakeup" => &["vcpu_id", "waited", "valid"],
        "halt_poll" => &["vcpu_id", "grow", "old_ns", "new_ns"],
        "dirty" => &["vcpu_id", "slot_id", "as_id", "gfn", "rel_gfn", "npages"],
        _ => &[],
    };
    multiset(run.rows(monitor).iter().map(|r| {
        keys.iter()
            .map(|k| match &r[*k] {
                Value::Bool(b) => *b as u64,
                v => u(v),
            })
            .collect::<Vec<u64>>()
    }))
}

fn cmd_of(monitor: &str) -> &'static str {
    REGISTRY
        .iter()
        .find(|m| m.name() == monitor)
        .map_or("?", |m| m.face().command)
}

/// Whether `run` agrees with `reference` (another backend's run of the same
/// scenario): the same load/put pairs per vCPU, or the same stable rows.
fn agreement(monitor: &str, run: &Run, reference: &Run) -> Result<(), String> {
    if monitor == "vcpu_load" {
        let (a, b) = (load_counts(run), load_counts(reference));
        if a == b {
            Ok(())
        } else {
            Err(format!("pairs {a:?} vs {} {b:?}", reference.label))
        }
    } else {
        let (a, b) = (stable_rows(run, monitor), stable_rows(reference, monitor));
        if a == b {
            Ok(())
        } else {
            Err(format!(
                "rows differ from {}: {}",
                reference.label,
                diff(&a, &b)
            ))
        }
    }
}

/// What the matrix knows of this kernel, read once before the scenarios.
pub struct Matrix {
    pub version: (u32, u32),
    pub tmp: String,
    pub ncpu: u64,
    /// MATRIX_ONLY=exits,dirty runs only those monitors' scenarios (to look
    /// into one monitor in one kernel); every monitor by default.
    only: String,
    /// Monitor -> the backend `doctor --json` says it picks.
    pub defaults: HashMap<String, String>,
    /// Monitor -> the backends this kernel offers (and is expected to).
    offered: HashMap<&'static str, Vec<&'static str>>,
    pub has_ring: bool,
    pub has_halt_poll_cap: bool,
}

impl Matrix {
    /// Runs `doctor --json` (printing it and its defaults), then checks which
    /// backends this kernel offers against what is expected of it, printing
    /// a cell for each one it refuses.
    pub fn new() -> Matrix {
        let version = kvm_watcher::procfs::kernel_version();
        let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let only = std::env::var("MATRIX_ONLY").unwrap_or_default();
        let (defaults, kvm_btf) = doctor();
        let mut m = Matrix {
            version,
            tmp,
            ncpu,
            only,
            defaults,
            offered: HashMap::new(),
            has_ring: version >= (5, 11),
            has_halt_poll_cap: version >= (5, 12),
        };
        m.offered = m.probe_backends(kvm_btf);
        m
    }

    /// Which backends this kernel offers; emits a cell for each it refuses
    /// (unavailable when that refusal is expected, with its reason) and
    /// each it was expected to refuse.
    fn probe_backends(&self, kvm_btf: bool) -> HashMap<&'static str, Vec<&'static str>> {
        let mut prober = kvm_watcher::hooks::Prober::new();
        let mut offered: HashMap<&'static str, Vec<&'static str>> = HashMap::new();
        let mut cells: Vec<Cell> = Vec::new();
        for m in REGISTRY {
            for b in m.backends() {
                let expected = expected_refusal(self.version, kvm_btf, m.name(), b.name);
                let (status, detail) = match (backend::resolve(b, &mut prober), expected) {
                    (Ok(_), None) => {
                        offered.entry(m.name()).or_default().push(b.name);
                        continue;
                    }
                    (Ok(_), Some(why)) => {
                        ("fail", format!("expected unavailable ({why}) but it loads"))
                    }
                    (Err(r), Some(why)) if r.reason.contains(why) => ("unavailable", r.reason),
                    (Err(r), _) => ("fail", format!("refused: {}", r.reason)),
                };
                cells.push(Cell {
                    monitor: m.name(),
                    backend: b.name.into(),
                    mode: "-",
                    status,
                    ms: 0,
                    detail,
                });
            }
        }
        for c in &cells {
            emit(c);
        }
        offered
    }

    pub fn wanted(&self, monitor: &str) -> bool {
        self.only.is_empty() || self.only.split(',').any(|o| o == monitor)
    }

    /// The backends of `monitor` this kernel offers.
    pub fn offered(&self, monitor: &str) -> Vec<&'static str> {
        self.offered.get(monitor).cloned().unwrap_or_default()
    }

    /// The offered backends of `monitor` and the run without `--backend`.
    pub fn all_runs(&self, monitor: &str) -> Vec<&'static str> {
        let mut v = self.offered(monitor);
        v.push("default");
        v
    }

    /// One watcher per offered backend of `monitor` (`cmd --backend B
    /// extra...`), and one without `--backend` labelled "default".
    pub fn watchers_for(
        &self,
        monitor: &'static str,
        cmd: &str,
        extra: &[&str],
    ) -> Vec<(String, Vec<String>)> {
        let mut w: Vec<(String, Vec<String>)> = self
            .offered(monitor)
            .iter()
            .map(|b| {
                let mut a = s(&[cmd, "--backend", b]);
                a.extend(s(extra));
                (b.to_string(), a)
            })
            .collect();
        let mut a = s(&[cmd]);
        a.extend(s(extra));
        w.push(("default".into(), a));
        w
    }

    /// Evaluates a scenario: per-run checks, then agreement across backends
    /// (except those of `skip_compare`) and the default run's choice; emits
    /// a cell per run of `monitor`, or a failed cell per offered backend if
    /// the scenario did not run.
    pub fn evaluate(
        &self,
        monitor: &'static str,
        mode: &'static str,
        outcome: Result<Outcome, String>,
        check: &dyn Fn(&Run, &Outcome) -> Result<String, String>,
        skip_compare: &[&str],
    ) {
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                for b in self.offered(monitor) {
                    emit(&Cell {
                        monitor,
                        backend: b.into(),
                        mode,
                        status: "fail",
                        ms: 0,
                        detail: e.clone(),
                    });
                }
                return;
            }
        };
        let runs: Vec<&Run> = o
            .runs
            .iter()
            .filter(|r| r.label.split(' ').next() == Some(cmd_of(monitor)))
            .collect();
        let reference = runs
            .iter()
            .find(|r| !skip_compare.iter().any(|s| r.label.ends_with(s)));
        for run in &runs {
            let backend = run.label.split(' ').nth(1).unwrap_or("?").to_string();
            let mut result = check(run, &o);
            if result.is_ok()
                && !skip_compare.contains(&backend.as_str())
                && let Some(reference) = reference
            {
                result = match (result, agreement(monitor, run, reference)) {
                    (Ok(d), Ok(())) => Ok(format!(
                        "{d}; identical to {}",
                        reference.label.split(' ').nth(1).unwrap_or("")
                    )),
                    (_, Err(e)) => Err(e),
                    (r, _) => r,
                };
            }
            if backend == "default" {
                result = self.default_choice(monitor, run, result);
            }
            let (status, detail) = match result {
                Err(e) if e == "EXPECTED-UNAVAILABLE" => (
                    "unavailable",
                    "kvm:kvm_dirty_ring_push never fires for bitmap dirty logging; checked: no rows and a warning naming the VM".to_string(),
                ),
                r => status_of(r),
            };
            emit(&Cell {
                monitor,
                backend,
                mode,
                status,
                ms: o.ms,
                detail,
            });
        }
    }

    /// The run without `--backend` must have picked what doctor says.
    fn default_choice(
        &self,
        monitor: &str,
        run: &Run,
        result: Result<String, String>,
    ) -> Result<String, String> {
        let chosen = run
            .summary()
            .ok()
            .and_then(|s| s["backend"][monitor].as_str())
            .unwrap_or("?")
            .to_string();
        let want = self.defaults.get(monitor).cloned().unwrap_or_default();
        if chosen != want {
            Err(format!("picked {chosen}, doctor says {want}"))
        } else {
            result.map(|d| format!("picked {chosen} like doctor; {d}"))
        }
    }
}

/// `kvm-watcher doctor --json`, printed as `MATRIX-DOCTOR`, with its time
/// and each monitor's default backend (`MATRIX-DEFAULT`): the defaults, and
/// whether KVM's types are in BTF (a module with its BTF, or built in).
fn doctor() -> (HashMap<String, String>, bool) {
    let t0 = Instant::now();
    let doctor = Command::new(bin())
        .args(["doctor", "--json"])
        .output()
        .expect("doctor");
    let doctor_ms = t0.elapsed().as_millis();
    let d: Value = serde_json::from_slice(&doctor.stdout).expect("doctor --json is JSON");
    println!("MATRIX-DOCTOR\t{}", serde_json::to_string(&d).unwrap());
    println!("MATRIX-TIME\tdoctor\t{doctor_ms}");
    let kvm_btf = d["kernel"]["kvm_module_btf"] == true || d["kernel"]["kvm"] == "builtin";
    let defaults: HashMap<String, String> = d["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["monitor"].as_str().unwrap().to_string(),
                m["backend"].as_str().unwrap_or("none").to_string(),
            )
        })
        .collect();
    for (m, b) in &defaults {
        println!("MATRIX-DEFAULT\t{m}\t{b}");
    }
    (defaults, kvm_btf)
}
