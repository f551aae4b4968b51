//! The command line, on top of everything: clap definitions, turned into
//! plain configurations (`WatchConfig`, `ServeConfig`, `DemoConfig`, ...)
//! for the layers below, none of which imports this module. Each monitor's
//! subcommand, short flag and options come from the registry
//! (src/cli/monitors.rs), so adding a monitor does not touch this file.

mod checks;
mod monitors;
pub mod version;
mod vm;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand};

use crate::demo::DemoConfig;
use crate::exporter::ServeConfig;
use crate::monitors::{Monitor, Options, REGISTRY};
use crate::output::{OutputFormat, TimeFormat, to_stdout};
use crate::session::WatchConfig;
use crate::top::TopConfig;
use vm::VmArgs;

/// Watch the vCPUs of KVM virtual machines from the host with eBPF.
///
/// Each monitor has a subcommand and a short flag; combine the flags (e.g.
/// -w -n -d -o) to run several monitors in one process, or use `watch` for a
/// per-VM summary of all of them. Run as root (or with CAP_BPF +
/// CAP_PERFMON). `kvm-watcher doctor` says what this kernel allows;
/// `kvm-watcher demo` shows everything against a synthetic guest.
#[derive(Parser, Debug)]
#[command(name = "kvm-watcher", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: MonitorArgs,
}

/// The subcommands other than the monitors' own.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Several monitors at once (default: all but dirty-rate) as a per-VM interval summary.
    ///
    /// One process, one ring buffer. Without monitor flags every monitor
    /// runs; --rows streams one record per event instead of the summary.
    Watch(WatchArgs),
    /// A live view of every VM and vCPU on the host, refreshed every --interval.
    ///
    /// One row per VM, expandable to one row per vCPU, with a column per
    /// figure of each monitor (all of them unless monitor flags choose),
    /// from the kernel's aggregates. Keys: < > sort, / filter, Enter expand,
    /// d detail pane, p pause, ? help, q quit. Needs a terminal.
    Top(TopArgs),
    /// List the KVM VMs running on this host: pid, VMM, name, vCPU threads.
    ///
    /// With --slots, each VM's memslots instead, read from KVM itself.
    Vms(VmsArgs),
    /// Serve Prometheus metrics of every monitor over HTTP.
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
    /// What is wrong with each VM, what it costs and what to change, with the evidence.
    ///
    /// Watches for --seconds (or reads a `watch --output json` recording with
    /// --from) and prints, per VM, findings ranked by cost: halt polling
    /// (KVM's grow/shrink policy replayed for other windows), waiting for a
    /// CPU, exits that cost the guest. docs/advise.md explains every rule.
    Advise(AdviseArgs),
}

/// Options of `kvm-watcher advise`.
#[derive(Args, Debug, Clone)]
pub struct AdviseArgs {
    /// Only this VMM process id (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only the VM with this name (repeatable).
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// How long to watch, in seconds.
    #[arg(short = 't', long, value_name = "SECONDS", default_value = "30", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub duration: f64,
    /// Analyse this recording (`kvm-watcher watch --output json > FILE`) instead of watching.
    #[arg(long, value_name = "FILE", conflicts_with = "record")]
    pub from: Option<std::path::PathBuf>,
    /// Also write what this run watched to FILE, as `watch --output json` does (for --from later).
    #[arg(long, value_name = "FILE")]
    pub record: Option<std::path::PathBuf>,
    /// One JSON object per finding (schema in docs/json-schema.md) instead of text.
    #[arg(long)]
    pub json: bool,
    /// The VMs' maximum halt-polling window in ns, when their VMM sets one
    /// (KVM_CAP_HALT_POLL); default: the host's kvm.halt_poll_ns.
    #[arg(long, value_name = "NS")]
    pub halt_poll_ns: Option<u64>,
    /// Migration bandwidth, MiB/s (1 Gbit/s = 119.2 MiB/s): also sample the
    /// guests' dirty rate (reads guest memory) and say whether pre-copy converges.
    #[arg(long = "link", value_name = "MIB/S", value_parser = mib_per_second, allow_hyphen_values = true)]
    pub link: Option<f64>,
    /// The longest final pause of the guest allowed, with --link (QEMU's default downtime-limit is 0.3 s).
    #[arg(long, value_name = "SECONDS", requires = "link", value_parser = positive_seconds)]
    pub max_downtime: Option<f64>,
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
    /// With --vm: keep watching when the VM exits, and watch it again when it
    /// restarts under its name (a new pid, e.g. `virsh destroy` and `start`,
    /// `save` and `restore`), as top and serve do. Without it the watch ends
    /// once every watched VM has exited.
    #[arg(long, requires = "vms")]
    pub follow: bool,
    /// Only this vCPU thread id. Filtered in the kernel.
    #[arg(long, value_name = "TID")]
    pub tid: Option<u32>,
    /// Only this vCPU: `N` or `kvm:N` is KVM's id (on x86 the APIC id), `vmm:N` the VMM's vCPU number (QEMU's `CPU N/KVM`, libvirt's vCPU N); they differ on some topologies. A vCPU no watched VM has is refused. Filtered in the kernel.
    #[arg(long, value_name = "ID", value_parser = crate::session::vcpu_filter::parse)]
    pub vcpu: Option<crate::session::vcpu_filter::VcpuChoice>,
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
    /// Force a backend (see `kvm-watcher doctor`) instead of the first one that
    /// works: NAME for the one monitor watched, or MONITOR=NAME (repeatable).
    #[arg(long, value_name = "[MONITOR=]NAME")]
    pub backend: Vec<String>,
    /// Size of the kernel-to-user ring buffer in KiB (a power of two, at least 4).
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = ringbuf_kib)]
    pub ringbuf_size: u32,
    /// Aggregate only in the kernel and print, every --interval, a summary per VM
    /// and vCPU (wake-ups with a halt-duration histogram, halt-poll changes, dirty
    /// pages per slot, run time per pCPU) instead of one row per event.
    #[arg(long)]
    pub summary: bool,
}

/// Options of `kvm-watcher watch` (the monitors' flags come from the registry).
#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Stream one row per event instead of the interval summary.
    #[arg(long)]
    pub rows: bool,
    #[command(flatten)]
    pub common: MonitorArgs,
}

/// Options of `kvm-watcher top` (the monitors' flags come from the registry).
#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Only this VMM process id (repeatable). Filtered in the kernel.
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only the VM with this name (repeatable). Filtered in the kernel, by pid.
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
    /// Seconds between refreshes.
    #[arg(short = 'i', long, value_name = "SECONDS", default_value = "1", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub interval: f64,
    /// Force a backend (see `kvm-watcher doctor`): NAME for the one monitor
    /// shown, or MONITOR=NAME (repeatable).
    #[arg(long, value_name = "[MONITOR=]NAME")]
    pub backend: Vec<String>,
}

/// Options of `kvm-watcher vms`.
#[derive(Args, Debug, Clone)]
pub struct VmsArgs {
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Each VM's memslots instead, read from KVM in the kernel (a BPF
    /// iterator; needs CAP_BPF and CAP_PERFMON, or root): address space, slot id, base gfn, pages, size,
    /// userspace address, flags (dirty logging, readonly).
    #[arg(long)]
    pub slots: bool,
    /// Only the VMM process with this id (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only the VM with this name (repeatable).
    #[arg(long = "vm", value_name = "NAME")]
    pub vms: Vec<String>,
}

/// Options of `kvm-watcher serve` (the flags of the monitors it runs only
/// when asked come from the registry).
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
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(short = 't', long, value_name = "SECONDS", value_parser = positive_seconds, allow_hyphen_values = true)]
    pub duration: Option<f64>,
    /// TLS and basic authentication, from a YAML file in the format of the
    /// Prometheus exporter toolkit (tls_server_config: cert_file, key_file,
    /// min_version; basic_auth_users: user -> bcrypt hash).
    #[arg(long = "web.config.file", value_name = "PATH")]
    pub web_config: Option<std::path::PathBuf>,
    /// Force a monitor's backend (see `kvm-watcher doctor`): MONITOR=NAME
    /// (repeatable). serve prefers backends that run nothing on the host's
    /// system calls; exits=tracepoint gives exits' exact time in the VMM at
    /// the price of a program on every system call.
    #[arg(long, value_name = "MONITOR=NAME")]
    pub backend: Vec<String>,
    /// Add `pid` and `tid` labels to every per-VM and per-vCPU series (a
    /// restarted VM then starts new series).
    #[arg(long = "metrics.pid-labels")]
    pub pid_labels: bool,
    /// Histograms per vCPU instead of per VM (about 40 series per vCPU each).
    #[arg(long = "metrics.vcpu-histograms")]
    pub vcpu_histograms: bool,
    /// Exit-time histograms per exit reason too.
    #[arg(long = "metrics.reason-histograms")]
    pub reason_histograms: bool,
    /// vCPU run time per physical CPU (a `pcpu` label).
    #[arg(long = "metrics.pcpu")]
    pub pcpu: bool,
    /// I/O ports and MMIO addresses with series of their own, per VM; the
    /// rest are summed as `other`.
    #[arg(long = "metrics.top-k", value_name = "N", default_value_t = 10)]
    pub top_k: usize,
    /// Exit reasons with series of their own, per vCPU and kind of exit;
    /// the rest are summed as `other`.
    #[arg(long = "metrics.top-reasons", value_name = "N", default_value_t = 6)]
    pub top_reasons: usize,
    /// Series per VM at most; the rest are left out of the scrape and
    /// counted in kvm_watcher_vm_series_dropped.
    #[arg(
        long = "metrics.max-series-per-vm",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_series_per_vm: usize,
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
/// A bandwidth in MiB/s: more than 0, at most 1,000,000 (fractions allowed:
/// 1 Gbit/s is 119.2).
pub fn mib_per_second(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of MiB/s"))?;
    if !(v > 0.0 && v <= 1e6) {
        return Err(format!(
            "must be more than 0 and at most 1000000 MiB/s, got `{s}`"
        ));
    }
    Ok(v)
}

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

/// The whole command line: the derived definitions plus every monitor's
/// subcommand, flags and options from the registry.
pub fn command() -> clap::Command {
    monitors::augment(<Cli as clap::CommandFactory>::command()).version(version::long())
}

impl MonitorArgs {
    /// The watch of `monitors` these options describe.
    fn watch(self, monitors: Vec<&'static dyn Monitor>, options: Options) -> WatchConfig {
        WatchConfig {
            monitors,
            pids: self.pids,
            vms: self.vms,
            follow: self.follow,
            tid: self.tid,
            vcpu: self.vcpu,
            duration: self.duration,
            interval: self.interval,
            output: self.output,
            time: self.time,
            backend: crate::engine::Forced::new(&self.backend),
            ringbuf_kib: self.ringbuf_size,
            summary: self.summary,
            options,
            partial: false,
            announce: true,
        }
    }
}

fn parsed<T: FromArgMatches>(matches: &ArgMatches) -> anyhow::Result<T> {
    T::from_arg_matches(matches).map_err(|e| anyhow::anyhow!("{}", e.kind()))
}

/// Runs the command the user asked for.
pub fn run(matches: &ArgMatches) -> anyhow::Result<()> {
    if let Some((name, sub)) = matches.subcommand()
        && let Some(m) = REGISTRY.iter().find(|m| m.face().command == name)
    {
        let common: MonitorArgs = parsed(sub)?;
        let options = monitors::options(&[*m], sub, false)?;
        checks::check_common(&[*m], sub)?;
        return crate::session::run(&common.watch(vec![*m], options));
    }
    let cli: Cli = parsed(matches)?;
    match cli.command {
        Some(Command::Watch(args)) => {
            let sub = matches
                .subcommand_matches("watch")
                .ok_or_else(|| anyhow::anyhow!("watch: no arguments"))?;
            let mut chosen = monitors::chosen(sub);
            if chosen.is_empty() {
                chosen = monitors::defaults();
            }
            let options = monitors::options(&chosen, sub, false)?;
            checks::check_common(&chosen, sub)?;
            checks::check_watch(args.rows, sub)?;
            let mut common = args.common;
            common.summary = !args.rows;
            crate::session::run(&common.watch(chosen, options))
        }
        Some(Command::Top(args)) => {
            let sub = matches
                .subcommand_matches("top")
                .ok_or_else(|| anyhow::anyhow!("top: no arguments"))?;
            let mut chosen = monitors::chosen(sub);
            if chosen.is_empty() {
                chosen = monitors::defaults();
            }
            crate::top::run(&TopConfig {
                options: monitors::options(&chosen, sub, true)?,
                monitors: chosen,
                pids: args.pids,
                vms: args.vms,
                interval: args.interval,
                backend: crate::engine::Forced::new(&args.backend),
            })
        }
        Some(Command::Vms(args)) => {
            // Never empty when asked for: an unknown pid or name is a usage error.
            let pids = crate::session::resolve_pids(&args.pids, &args.vms)?;
            let only = (!args.pids.is_empty() || !args.vms.is_empty()).then_some(pids.as_slice());
            match args.slots {
                true => to_stdout(|w| crate::memslots::print(only, args.json, w)),
                false => to_stdout(|w| crate::procfs::print_vms(only, args.json, w)),
            }
        }
        Some(Command::Serve(args)) => {
            let sub = matches
                .subcommand_matches("serve")
                .ok_or_else(|| anyhow::anyhow!("serve: no arguments"))?;
            let chosen = monitors::serve_chosen(sub);
            checks::check_serve(&chosen, REGISTRY, sub)?;
            crate::exporter::serve(&ServeConfig {
                listen: args.listen,
                retain: args.retain,
                pids: args.pids,
                vms: args.vms,
                duration: args.duration,
                web_config: args.web_config,
                backend: crate::engine::Forced::new(&args.backend),
                export: crate::monitors::metrics::Export {
                    pid_labels: args.pid_labels,
                    vcpu_histograms: args.vcpu_histograms,
                    reason_histograms: args.reason_histograms,
                    pcpu: args.pcpu,
                    top_k: args.top_k,
                    top_reasons: args.top_reasons,
                    max_series_per_vm: args.max_series_per_vm,
                },
                options: monitors::options(REGISTRY, sub, true)?,
                monitors: chosen,
            })
        }
        Some(Command::Completions { shell }) => {
            // clap_complete panics on a write error: render first, then write.
            let mut cmd = command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kvm-watcher", &mut script);
            to_stdout(|w| Ok(w.write_all(&script)?))
        }
        Some(Command::Manpage) => to_stdout(|w| Ok(clap_mangen::Man::new(command()).render(w)?)),
        Some(Command::Vm(args)) => crate::vm::run(&args.to_config()?),
        Some(Command::Doctor(args)) => {
            crate::output::check_stdout()?;
            let report = crate::doctor::report();
            to_stdout(|w| {
                if args.json {
                    let json = serde_json::to_string_pretty(&report)?;
                    writeln!(w, "{}", crate::output::json_safe(&json))?;
                } else {
                    crate::doctor::print_text(&report, w)?;
                }
                Ok(())
            })
        }
        Some(Command::Advise(args)) => crate::advise::run(&crate::advise::AdviseConfig {
            pids: args.pids,
            vms: args.vms,
            seconds: args.duration,
            from: args.from,
            record: args.record,
            json: args.json,
            halt_poll_ns: args.halt_poll_ns,
            link_mib_per_s: args.link,
            max_downtime_s: args.max_downtime,
        }),
        Some(Command::Demo(args)) => crate::demo::run(&DemoConfig {
            seconds: args.seconds,
        }),
        None => {
            let chosen = monitors::chosen(matches);
            if chosen.is_empty() && no_arguments(matches) {
                return bare();
            }
            if chosen.is_empty() {
                let flags: Vec<String> = REGISTRY
                    .iter()
                    .map(|m| format!("-{}", m.face().short))
                    .collect();
                crate::usage_bail!(
                    "no monitor chosen: use {}, or a subcommand (see `kvm-watcher --help`)",
                    or_list(&flags)
                );
            }
            let options = monitors::options(&chosen, matches, false)?;
            checks::check_common(&chosen, matches)?;
            crate::session::run(&cli.common.watch(chosen, options))
        }
    }
}

/// True when nothing at all was given on the command line.
fn no_arguments(matches: &ArgMatches) -> bool {
    matches
        .ids()
        .all(|id| matches.value_source(id.as_str()) != Some(ValueSource::CommandLine))
}

/// `kvm-watcher` alone: `top` on a terminal, as kvm_stat, htop and bpftop
/// do; elsewhere (a pipe, a service, a container without a TTY) a usage
/// error that says what to run instead.
fn bare() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()) {
        crate::usage_bail!(
            "no command given, and `top` needs a terminal: run `kvm-watcher serve` for Prometheus metrics, `kvm-watcher watch` for a per-VM summary, `kvm-watcher vms` for the VMs, or choose a monitor flag (see `kvm-watcher --help`)"
        );
    }
    run(&command().try_get_matches_from(["kvm-watcher", "top"])?)
}

/// `a, b, c or d`.
fn or_list(items: &[String]) -> String {
    match items.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.clone(),
        None => String::new(),
    }
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
    fn links_take_fractions_of_a_mib_per_second() {
        assert_eq!(mib_per_second("119.2"), Ok(119.2));
        assert_eq!(mib_per_second("32.5"), Ok(32.5));
        assert_eq!(mib_per_second("1000000"), Ok(1e6));
        for bad in ["0", "-1", "NaN", "inf", "", "fast", "1000000.5"] {
            assert!(mib_per_second(bad).is_err(), "{bad} accepted");
        }
        for cmd in [
            ["dirty-rate", "--link", "32.5"],
            ["advise", "--link", "32.5"],
        ] {
            let args = std::iter::once("kvm-watcher").chain(cmd);
            assert!(
                command().try_get_matches_from(args).is_ok(),
                "{cmd:?} refused"
            );
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
        command().debug_assert();
    }

    #[test]
    fn the_usage_hint_lists_every_monitor_flag() {
        let flags = ["-w", "-n", "-d", "-o"].map(String::from);
        assert_eq!(or_list(&flags), "-w, -n, -d or -o");
        assert_eq!(or_list(&flags[..1]), "-w");
    }
}
