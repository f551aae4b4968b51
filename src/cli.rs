//! Command-line interface: the clap definitions and the dispatch to each command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::Monitor;
use crate::output::to_stdout;
use crate::vm::args::VmArgs;

/// Watch the vCPUs of KVM virtual machines from the host with eBPF.
///
/// Four monitors: vCPU halt/wakeup (-w), halt-polling window changes (-n),
/// dirty guest pages (-d) and vCPU load/put on physical CPUs (-o). Run as root
/// (or with CAP_BPF + CAP_PERFMON). `kvm-watcher doctor` says what this kernel
/// allows; `kvm-watcher demo` shows everything against a synthetic guest.
#[derive(Parser, Debug)]
#[command(name = "kvm-watcher", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Short form of `kvm-watcher wakeup`: vCPU halt and wake-up events (combine
    /// -w -n -d -o to run several monitors in one process).
    #[arg(short = 'w', long = "wakeup-events")]
    pub wakeup: bool,
    /// Short form of `kvm-watcher halt-poll`: halt-polling window changes.
    #[arg(short = 'n', long = "halt-poll-events")]
    pub halt_poll: bool,
    /// Short form of `kvm-watcher dirty`: dirty guest pages.
    #[arg(short = 'd', long = "dirty-events")]
    pub dirty: bool,
    /// Short form of `kvm-watcher vcpu-load`: vCPU load/put on physical CPUs.
    #[arg(short = 'o', long = "vcpu-load-events")]
    pub vcpu_load: bool,

    #[command(flatten)]
    pub common: MonitorArgs,
    #[command(flatten)]
    pub dirty_args: DirtyArgs,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// One row per vCPU wake-up: halt duration, poll or wait, valid or not.
    Wakeup(MonitorArgs),
    /// One row per halt-polling window change (grow or shrink).
    HaltPoll(MonitorArgs),
    /// One row per dirtied guest page, with per-page counts.
    Dirty {
        #[command(flatten)]
        common: MonitorArgs,
        #[command(flatten)]
        dirty: DirtyArgs,
    },
    /// Per interval, how long each vCPU thread held a physical CPU.
    VcpuLoad(MonitorArgs),
    /// Several monitors at once (default: all four) as a per-VM interval summary.
    ///
    /// One process, one ring buffer. Without -w/-n/-d/-o all four monitors run;
    /// --rows streams one record per event instead of the summary.
    Watch(WatchArgs),
    /// List the KVM VMs running on this host: pid, VMM, name, vCPU threads.
    Vms(VmsArgs),
    /// Serve Prometheus metrics of all four monitors over HTTP.
    Serve(ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Manpage,
    /// Run a synthetic KVM guest whose own counts are ground truth.
    Vm(VmArgs),
    /// Check which hooks this kernel allows and which backend each monitor uses.
    Doctor(DoctorArgs),
    /// Start a synthetic guest and show what kvm-watcher sees of it.
    Demo(DemoArgs),
}

/// Output formats of the monitors.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Human-readable table with units in every header.
    #[default]
    Table,
    /// One JSON object per line (NDJSON), schema in docs/json-schema.md.
    Json,
    /// Comma-separated values with a header row, the same fields as JSON.
    Csv,
}

/// Which clock the TIME column shows.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeFormat {
    /// Local wall-clock time (HH:MM:SS.mmm).
    #[default]
    Wall,
    /// Kernel CLOCK_MONOTONIC, seconds since boot.
    Mono,
}

/// Options every monitor shares.
#[derive(Args, Debug, Clone)]
pub struct MonitorArgs {
    /// Only this VMM process id (repeatable: -p 1 -p 2). Filtered in the kernel.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only the VM with this name (repeatable; see `kvm-watcher vms`). Filtered in the kernel, by pid.
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// Only this vCPU thread id. Filtered in the kernel.
    #[arg(long, value_name = "TID")]
    pub tid: Option<u32>,
    /// Only this vCPU id (the index KVM gives the vCPU in its VM). Filtered in the kernel.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u32).range(..=i32::MAX as i64))]
    pub vcpu: Option<u32>,
    /// Stop after this many seconds (fractions allowed); default: until Ctrl-C or SIGTERM.
    #[arg(short = 't', long, value_name = "SECONDS", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub duration: Option<f64>,
    /// Seconds between periodic reports (vcpu-load tables, dirty summaries).
    #[arg(short = 'i', long, value_name = "SECONDS", default_value = "2", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub interval: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Clock for the TIME column of tables (JSON always carries CLOCK_MONOTONIC `time_ns`).
    #[arg(long, value_enum, default_value_t = TimeFormat::Wall)]
    pub time: TimeFormat,
    /// Force a backend (see `kvm-watcher doctor`) instead of the first one that works.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Size of the kernel-to-user ring buffer in KiB (a power of two, at least 4).
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = ringbuf_kib)]
    pub ringbuf_size: u32,
    /// Aggregate only in the kernel and print, every --interval, a summary per VM
    /// and vCPU (wake-ups with a halt-duration histogram, halt-poll changes, dirty
    /// pages per slot, run time per pCPU) instead of one row per event.
    #[arg(long)]
    pub summary: bool,
}

/// Options of `kvm-watcher watch`.
#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch vCPU wake-ups.
    #[arg(short = 'w', long)]
    pub wakeup: bool,
    /// Watch halt-polling window changes.
    #[arg(short = 'n', long)]
    pub halt_poll: bool,
    /// Watch dirty guest pages.
    #[arg(short = 'd', long)]
    pub dirty: bool,
    /// Watch vCPU load/put.
    #[arg(short = 'o', long)]
    pub vcpu_load: bool,
    /// Stream one row per event instead of the interval summary.
    #[arg(long)]
    pub rows: bool,
    #[command(flatten)]
    pub common: MonitorArgs,
    #[command(flatten)]
    pub dirty_args: DirtyArgs,
}

/// Options of `kvm-watcher vms`.
#[derive(Args, Debug, Clone)]
pub struct VmsArgs {
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `kvm-watcher serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to serve /metrics on. Loopback by default: binding another
    /// address exposes VM names and activity to whoever can reach it.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
    /// Keep the last values of VMs and vCPUs that exited for this many seconds,
    /// so a scrape after they are gone still sees their final counts.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub retain: f64,
    /// Only the VMM process with this id (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only the VM with this name (repeatable).
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// Most distinct dirty pages counted in the kernel (as in `dirty --max-pages`).
    #[arg(long, value_name = "PAGES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(1..=MAX_PAGES_LIMIT))]
    pub max_pages: u32,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(short = 't', long, value_name = "SECONDS", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub duration: Option<f64>,
}

/// Largest `--max-pages`: 64 Mi pages (256 GiB of 4 KiB pages), whose hash
/// table alone takes about 3 GiB of kernel memory.
const MAX_PAGES_LIMIT: i64 = 1 << 26;

/// Options of the dirty-page monitor.
#[derive(Args, Debug, Clone)]
pub struct DirtyArgs {
    /// Most distinct (pid, slot, page) pages counted in the kernel; more are counted
    /// as overflow and reported. Default covers a 16 GiB guest of 4 KiB pages.
    #[arg(long, value_name = "PAGES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(1..=MAX_PAGES_LIMIT))]
    pub max_pages: u32,
    /// Write per-page dirty counts (PID GFN REL_GFN SLOT_ID COUNTS, most dirtied first)
    /// to this file on exit, atomically, mode 0600.
    #[arg(long, value_name = "PATH")]
    pub counts_file: Option<PathBuf>,
    /// Also rewrite the counts file every this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds, allow_hyphen_values = true, requires = "counts_file")]
    pub counts_every: Option<f64>,
}

/// Options of `kvm-watcher doctor`.
#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Print the report as one JSON document (schema in docs/doctor.md).
    #[arg(long)]
    pub json: bool,
}

/// Options of `kvm-watcher demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long each part of the demo runs, in seconds.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub seconds: f64,
}

/// Shortest and longest time any option takes: a millisecond (shorter
/// intervals would only spin) and about 31 years.
const SECONDS_RANGE: (f64, f64) = (0.001, 1e9);

/// Parses a number of seconds between a millisecond and about 31 years.
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v <= 0.0 || v.is_nan() {
        return Err(format!("must be more than 0 seconds, got `{s}`"));
    }
    let (min, max) = SECONDS_RANGE;
    if !(min..=max).contains(&v) {
        return Err(format!(
            "must be between {min} and {max} seconds, got `{s}`"
        ));
    }
    Ok(v)
}

fn ringbuf_kib(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of KiB"))?;
    if v < 4 || !v.is_power_of_two() || v > (1 << 20) {
        return Err(format!(
            "must be a power of two between 4 and 1048576 KiB, got `{s}`"
        ));
    }
    Ok(v)
}

fn run_plan(monitors: Vec<Monitor>, common: MonitorArgs, dirty: DirtyArgs) -> anyhow::Result<()> {
    if !monitors.contains(&Monitor::Dirty) && dirty.counts_file.is_some() {
        crate::usage_bail!("--counts-file belongs to the dirty monitor (-d)");
    }
    crate::session::run(crate::session::Plan {
        monitors,
        common,
        dirty,
    })
}

fn no_dirty() -> DirtyArgs {
    DirtyArgs {
        max_pages: 4 << 20,
        counts_file: None,
        counts_every: None,
    }
}

/// Runs the command the user asked for.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Wakeup(common)) => run_plan(vec![Monitor::Wakeup], common, no_dirty()),
        Some(Command::HaltPoll(common)) => run_plan(vec![Monitor::HaltPoll], common, no_dirty()),
        Some(Command::Dirty { common, dirty }) => run_plan(vec![Monitor::Dirty], common, dirty),
        Some(Command::VcpuLoad(common)) => run_plan(vec![Monitor::VcpuLoad], common, no_dirty()),
        Some(Command::Watch(args)) => {
            let mut monitors = chosen(args.wakeup, args.halt_poll, args.dirty, args.vcpu_load);
            if monitors.is_empty() {
                monitors = Monitor::ALL.to_vec();
            }
            let mut common = args.common;
            common.summary = !args.rows;
            run_plan(monitors, common, args.dirty_args)
        }
        Some(Command::Vms(args)) => to_stdout(|w| crate::procfs::print_vms(args.json, w)),
        Some(Command::Serve(args)) => crate::exporter::serve(&args),
        Some(Command::Completions { shell }) => {
            // clap_complete panics on a write error: render first, then write.
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kvm-watcher", &mut script);
            to_stdout(|w| Ok(w.write_all(&script)?))
        }
        Some(Command::Manpage) => {
            let cmd = <Cli as clap::CommandFactory>::command();
            to_stdout(|w| Ok(clap_mangen::Man::new(cmd).render(w)?))
        }
        Some(Command::Vm(args)) => crate::vm::run(&args.to_config()?),
        Some(Command::Doctor(args)) => {
            let report = crate::doctor::report();
            to_stdout(|w| {
                if args.json {
                    writeln!(w, "{}", serde_json::to_string_pretty(&report)?)?;
                } else {
                    crate::doctor::print_text(&report, w)?;
                }
                Ok(())
            })
        }
        Some(Command::Demo(args)) => crate::demo::run(&args),
        None => {
            let monitors = chosen(cli.wakeup, cli.halt_poll, cli.dirty, cli.vcpu_load);
            if monitors.is_empty() {
                crate::usage_bail!(
                    "no monitor chosen: use -w, -n, -d or -o, or a subcommand (see `kvm-watcher --help`)"
                );
            }
            run_plan(monitors, cli.common, cli.dirty_args)
        }
    }
}

fn chosen(w: bool, n: bool, d: bool, o: bool) -> Vec<Monitor> {
    [
        (w, Monitor::Wakeup),
        (n, Monitor::HaltPoll),
        (d, Monitor::Dirty),
        (o, Monitor::VcpuLoad),
    ]
    .into_iter()
    .filter_map(|(on, m)| on.then_some(m))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert_eq!(positive_seconds("2"), Ok(2.0));
        assert_eq!(positive_seconds("0.25"), Ok(0.25));
        assert_eq!(positive_seconds("0.001"), Ok(0.001));
        for bad in ["0", "-1", "NaN", "inf", "-inf", "", "two", "1e-12", "1e300"] {
            assert!(positive_seconds(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ring_buffer_sizes_are_powers_of_two() {
        assert_eq!(ringbuf_kib("4"), Ok(4));
        assert_eq!(ringbuf_kib("4096"), Ok(4096));
        for bad in ["0", "2", "3", "6", "2097152", "x"] {
            assert!(ringbuf_kib(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_clap_definitions_are_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
