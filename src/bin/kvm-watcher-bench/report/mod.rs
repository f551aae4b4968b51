//! What a run reports: every figure and the targets as bench.json, the table
//! (printed, and bench.txt) and the plot of kernel cost (bench.svg); for a
//! run of the host tax alone, host-tax.json and its part of the table.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};

use crate::attach::AttachResult;
use crate::env::{Env, sh};
use crate::guest::GuestResult;
use crate::guest_tax::GuestTaxResult;
use crate::host_tax::HostTaxResult;
use crate::kernel_cost::{CaseResult, ProgramResult};
use crate::memory::MemoryResult;
use crate::pipeline::PipelineResult;

mod guest_tax;
mod host_tax;
mod plot;
mod table;
mod targets;

/// The figures of every part of a run.
pub struct Figures {
    pub cases: Vec<CaseResult>,
    pub programs: Vec<ProgramResult>,
    pub guest: Vec<GuestResult>,
    pub pipeline: PipelineResult,
    pub memory: MemoryResult,
    pub attach: Vec<AttachResult>,
    pub host_tax: HostTaxResult,
    pub guest_tax: GuestTaxResult,
}

/// The run as bench.json holds it: the figures, the targets met or missed, and
/// where they come from (machine, binaries, how long the run took).
pub fn json(env: &Env, started: Instant, machine: Value, f: &Figures) -> Value {
    let mut tg = targets::targets(&f.cases, &f.guest, &f.pipeline, &f.memory, &f.attach);
    tg.extend(targets::host_tax(&f.host_tax));
    tg.extend(targets::guest_tax(&f.guest_tax));
    with_header(
        env,
        started,
        machine,
        json!({
            "kernel_cost": { "cases": f.cases, "programs": f.programs },
            "guest_overhead": f.guest,
            "pipeline": f.pipeline,
            "memory": f.memory,
            "attach": f.attach,
            "host_tax": f.host_tax,
            "guest_tax": f.guest_tax,
            "targets": tg,
        }),
    )
}

/// `figures` (an object) after where they come from: the machine, the
/// binaries, how long the run took.
fn with_header(env: &Env, started: Instant, machine: Value, figures: Value) -> Value {
    let mut v = json!({
        "schema": 1,
        "quick": env.quick,
        "rounds": env.rounds,
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "loadavg_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kvm_watcher": sh(env.kw.to_str().unwrap_or("kvm-watcher"), &["--version"]),
        "git": sh("git", &["describe", "--always", "--dirty"]),
    });
    if let (Some(m), Value::Object(f)) = (v.as_object_mut(), figures) {
        m.extend(f);
    }
    v
}

/// Prints the table of `result` (the run's JSON) and writes bench.json,
/// bench.svg and bench.txt into `out`.
pub fn write(out: &Path, result: &Value) -> Result<()> {
    let text = table::table(result);
    println!("{text}");
    std::fs::create_dir_all(out)?;
    let json_path = out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(result)? + "\n")?;
    std::fs::write(out.join("bench.svg"), svg(result))?;
    std::fs::write(out.join("bench.txt"), text)?;
    eprintln!(
        "wrote {}, bench.svg and bench.txt in {}",
        json_path.display(),
        out.display()
    );
    Ok(())
}

/// A part of the benchmark run alone, with its figures.
pub enum Alone<'a> {
    HostTax(&'a HostTaxResult),
    GuestTax(&'a GuestTaxResult),
}

/// Prints the part's table and targets and writes its JSON (host-tax.json
/// or guest-tax.json) into `out`.
pub fn write_alone(
    out: &Path,
    env: &Env,
    started: Instant,
    machine: Value,
    alone: Alone,
) -> Result<()> {
    let (part, figures, targets) = match alone {
        Alone::HostTax(t) => (
            Part {
                key: "host_tax",
                file: "host-tax.json",
                section: host_tax::section,
            },
            json!(t),
            targets::host_tax(t),
        ),
        Alone::GuestTax(t) => (
            Part {
                key: "guest_tax",
                file: "guest-tax.json",
                section: guest_tax::section,
            },
            json!(t),
            targets::guest_tax(t),
        ),
    };
    part.write(out, env, started, machine, figures, targets)
}

/// A part of the benchmark run alone: its key in the JSON, its file and
/// its section of the table.
struct Part {
    key: &'static str,
    file: &'static str,
    section: fn(&Value) -> String,
}

impl Part {
    fn write(
        &self,
        out: &Path,
        env: &Env,
        started: Instant,
        machine: Value,
        figures: Value,
        targets: Vec<targets::TargetResult>,
    ) -> Result<()> {
        let mut part = serde_json::Map::new();
        part.insert(self.key.into(), figures);
        part.insert("targets".into(), json!(targets));
        let result = with_header(env, started, machine, Value::Object(part));
        println!(
            "{}{}",
            (self.section)(&result),
            table::targets_section(&result)
        );
        std::fs::create_dir_all(out)?;
        let path = out.join(self.file);
        std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// The plot of `result` (the run's JSON), titled with the machine it ran on.
fn svg(result: &Value) -> String {
    let title = format!(
        "kvm-watcher kernel cost per event ({}, {} CPUs, Linux {})",
        if result["quick"] == true {
            "quick run"
        } else {
            "full run"
        },
        result["machine"]["cpus"],
        result["machine"]["kernel"].as_str().unwrap_or("?")
    );
    let cases = result["kernel_cost"]["cases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    plot::plot(cases, &title)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::Value;

    /// The committed table and plot are those of the committed figures: what
    /// `scripts/bench` wrote is what this code writes for the same run.
    #[test]
    fn committed_table_and_plot_come_from_the_committed_figures() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bench");
        let read = |f: &str| std::fs::read_to_string(docs.join(f)).unwrap();
        let result: Value = serde_json::from_str(&read("bench.json")).unwrap();
        assert_eq!(super::table::table(&result), read("bench.txt"));
        assert_eq!(super::svg(&result), read("bench.svg"));
    }
}
