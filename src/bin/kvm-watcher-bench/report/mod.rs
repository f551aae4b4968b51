//! What a run reports: every figure and the targets as bench.json, the table
//! (printed, and bench.txt) and the plot of kernel cost (bench.svg).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};

use crate::attach::AttachResult;
use crate::env::{Env, sh};
use crate::guest::GuestResult;
use crate::kernel_cost::{CaseResult, ProgramResult};
use crate::memory::MemoryResult;
use crate::pipeline::PipelineResult;

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
}

/// The run as bench.json holds it: the figures, the targets met or missed, and
/// where they come from (machine, binaries, how long the run took).
pub fn json(env: &Env, started: Instant, machine: Value, f: &Figures) -> Value {
    let tg = targets::targets(&f.cases, &f.guest, &f.pipeline, &f.memory, &f.attach);
    json!({
        "schema": 1,
        "quick": env.quick,
        "rounds": env.rounds,
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "loadavg_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kvm_watcher": sh(env.kw.to_str().unwrap_or("kvm-watcher"), &["--version"]),
        "git": sh("git", &["describe", "--always", "--dirty"]),
        "kernel_cost": { "cases": f.cases, "programs": f.programs },
        "guest_overhead": f.guest,
        "pipeline": f.pipeline,
        "memory": f.memory,
        "attach": f.attach,
        "targets": tg,
    })
}

/// Prints the table of `result` and writes bench.json, bench.svg and
/// bench.txt into `out`.
pub fn write(out: &Path, env: &Env, result: &Value, cases: &[CaseResult]) -> Result<()> {
    let text = table::table(result);
    println!("{text}");
    std::fs::create_dir_all(out)?;
    let json_path = out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(result)? + "\n")?;
    let title = format!(
        "kvm-watcher kernel cost per event ({}, {} CPUs, Linux {})",
        if env.quick { "quick run" } else { "full run" },
        env.ncpu,
        result["machine"]["kernel"].as_str().unwrap_or("?")
    );
    std::fs::write(out.join("bench.svg"), plot::plot(cases, &title))?;
    std::fs::write(out.join("bench.txt"), text)?;
    eprintln!(
        "wrote {}, bench.svg and bench.txt in {}",
        json_path.display(),
        out.display()
    );
    Ok(())
}
