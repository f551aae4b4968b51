//! kvm-watcher-bench: the overhead benchmark. `scripts/bench` runs it and
//! README.md ("Benchmarks") explains the figures; `tests/bench_quick.rs`
//! runs `--quick` only to prove it still works.
//!
//! What it measures, all in one run (trials interleaved, repeated; medians with
//! min..max, ratios taken within a trial):
//! 1. kernel cost per event of each monitor (BPF stats: run_time_ns / run_cnt)
//!    against an empty program on the same hooks (raw_tp like kvm-watcher, and
//!    classic tracepoint like bpftrace) and against bpftrace doing the same job.
//!    In a trial every candidate is attached at once, so all see the same events.
//! 2. guest-visible overhead: the synthetic VM's work rate with nothing, each
//!    monitor, all four and bpftrace attached.
//! 3. the user-space pipeline (decode + NDJSON to /dev/null) fed by a
//!    benchmark-only BPF event source (src/bpf/bench.bpf.c).
//! 4. peak RSS and BPF map memory while tracking ~1M distinct dirty pages.
//! 5. attach + detach time per monitor, and bpftrace's.
//! 6. the host tax: what `kvm-watcher serve` (default monitors) and bpftrace
//!    doing the same jobs add to a syscall loop and to context switches of
//!    a host workload that is no VM.
//! 7. the guest tax: the vCPU threads' CPU time per unit of guest work with
//!    each monitor alone, the default set and bpftrace attached, paired with
//!    the unwatched guest of the same round.
//!
//! One module per part ([`kernel_cost`], [`guest`], [`pipeline`], [`memory`],
//! [`attach`], [`host_tax`], [`guest_tax`]), on shared ones: [`env`] (the binaries, this machine, how each
//! tool is started), [`process`], [`procfs`], [`bpftrace`], [`workload`] and
//! [`stats`]. [`report`] turns the figures into the targets, bench.json, the
//! table and the plot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod attach;
mod bpftrace;
mod env;
mod guest;
mod guest_tax;
mod host_tax;
mod kernel_cost;
mod memory;
mod memory_scale;
mod pipeline;
mod process;
mod procfs;
mod report;
mod sampling;
mod stats;
mod workload;

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/bench.skel.rs"));
}

/// Overhead benchmark of kvm-watcher (run as root; see README, "Benchmarks").
#[derive(Parser, Debug)]
#[command(name = "kvm-watcher-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A few seconds per part, one trial each: proves the benchmark works, measures nothing reliable.
    #[arg(long)]
    quick: bool,
    /// Trials per configuration (default 5, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Where to write bench.json, bench.svg and bench.txt (default: docs/bench, where the
    /// committed figures are; with --quick, target/bench-quick, so a quick run never
    /// replaces them).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The kvm-watcher binary (default: next to this one).
    #[arg(long)]
    kvm_watcher: Option<PathBuf>,
    /// Host and guest tax: leave kernel.bpf_stats_enabled as it is during the timed
    /// trials instead of switching it off (on a machine shared with tools
    /// that read BPF statistics; the figures then include their cost).
    #[arg(long)]
    leave_bpf_stats: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// (internal) One pipeline trial: emit --rate dirty records/s for --seconds into the
    /// ring buffer, decode them and write NDJSON to stdout; print a JSON result on stderr.
    Pipeline {
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        seconds: f64,
        /// Do not read the ring buffer before the generator is done (measures the
        /// producer alone; records beyond the ring's capacity are lost).
        #[arg(long)]
        defer_consume: bool,
    },
    /// What the dirty-rate sampler costs for 1, 4 and 16 GiB of guest RAM (guest
    /// memory read per second, the watcher's CPU): prints a table and writes
    /// dirty-rate.json into --out (default docs/bench, target/bench-quick with --quick).
    DirtyRate,
    /// Only part 6, the host tax: prints its table and targets and writes
    /// host-tax.json into --out (default docs/bench, target/bench-quick with --quick).
    HostTax,
    /// Only part 7, the guest tax: prints its table and targets and writes
    /// guest-tax.json into --out (default docs/bench, target/bench-quick with --quick).
    GuestTax {
        /// Only this monitor's conditions (and the unwatched guest), repeatable: fewer
        /// conditions leave time for more --rounds, and narrower intervals.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(guest_tax::conds::ONLY))]
        only: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Some(Cmd::Pipeline {
            rate,
            seconds,
            defer_consume,
        }) => pipeline::child(rate, seconds, defer_consume),
        Some(Cmd::DirtyRate) => dirty_rate(&cli),
        Some(Cmd::HostTax) => tax_only(&cli, None),
        Some(Cmd::GuestTax { ref only }) => tax_only(&cli, Some(only)),
        None => run(&cli),
    };
    if let Err(e) = r {
        eprintln!("kvm-watcher-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn ensure_setup() -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (BPF, /dev/kvm, kernel.bpf_stats_enabled)");
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("cannot enable kernel.bpf_stats_enabled")?;
    Ok(())
}

/// Where a run writes: --out, else docs/bench (target/bench-quick with --quick).
fn out_dir(cli: &Cli) -> PathBuf {
    cli.out.clone().unwrap_or_else(|| {
        PathBuf::from(if cli.quick {
            "target/bench-quick"
        } else {
            "docs/bench"
        })
    })
}

/// Part 6 or 7 alone (`guest`: the guest tax, of the monitors it names,
/// or all when it names none).
fn tax_only(cli: &Cli, guest: Option<&[String]>) -> Result<()> {
    ensure_setup()?;
    let env = env::Env::new(cli.kvm_watcher.clone(), cli.quick, cli.rounds)?;
    let started = Instant::now();
    let machine = env::machine();
    let out = out_dir(cli);
    if let Some(only) = guest {
        let tax = guest_tax::measure(&env, cli.leave_bpf_stats, only)?;
        report::write_alone(&out, &env, started, machine, report::Alone::GuestTax(&tax))
    } else {
        let tax = host_tax::measure(&env, cli.leave_bpf_stats)?;
        report::write_alone(&out, &env, started, machine, report::Alone::HostTax(&tax))
    }
}

fn dirty_rate(cli: &Cli) -> Result<()> {
    ensure_setup()?;
    let env = env::Env::new(cli.kvm_watcher.clone(), cli.quick, cli.rounds)?;
    let cases = sampling::measure(&env)?;
    let out = out_dir(cli);
    std::fs::create_dir_all(&out)?;
    let doc = serde_json::json!({ "machine": env::machine(), "cases": cases });
    std::fs::write(
        out.join("dirty-rate.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    eprintln!(
        "kvm-watcher-bench: wrote {}",
        out.join("dirty-rate.json").display()
    );
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    ensure_setup()?;
    let env = env::Env::new(cli.kvm_watcher.clone(), cli.quick, cli.rounds)?;
    let started = Instant::now();
    let machine_start = env::machine();
    eprintln!(
        "kvm-watcher-bench: {} round(s){}",
        env.rounds,
        if env.quick { ", quick" } else { "" }
    );
    let floors = kernel_cost::Floors::load()?;

    eprintln!("1. kernel cost per event");
    let (cases, programs) = kernel_cost::measure(&env, &floors)?;
    eprintln!("2. guest-visible overhead");
    let guest = guest::measure(&env)?;
    eprintln!("3. user-space pipeline");
    let pipeline = pipeline::measure(&env)?;
    eprintln!("4. memory");
    let mut memory = memory::measure(&env)?;
    memory.scale = Some(memory_scale::measure(&env)?);
    eprintln!("5. attach + detach");
    let attach = attach::measure(&env)?;
    eprintln!("6. host tax");
    let host_tax = host_tax::measure(&env, cli.leave_bpf_stats)?;
    eprintln!("7. guest tax");
    let guest_tax = guest_tax::measure(&env, cli.leave_bpf_stats, &[])?;

    let figures = report::Figures {
        cases,
        programs,
        guest,
        pipeline,
        memory,
        attach,
        host_tax,
        guest_tax,
    };
    let result = report::json(&env, started, machine_start, &figures);
    report::write(&out_dir(cli), &result)
}
