//! `kvm-watcher demo`: starts a synthetic guest, watches it with every monitor
//! that has a demo section ([`crate::monitors::Monitor::demo`]) at once (as
//! separate `kvm-watcher` processes, the way a user would), and prints what
//! each saw next to the guest's own counts and KVM's statistics.

use std::io::Write;
use std::process::Command;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::child::{self, Spawn, Stream};
use crate::monitors::REGISTRY;
use crate::vm::report::VmReport;

/// A guest or watcher of the demo. Dropped before [`Running::finish`] (the
/// demo ended early), it is killed and reaped, so no guest or watcher
/// outlives the demo.
struct Running(child::Running);

/// Starts `kvm-watcher <args>` and waits until a stderr line contains `marker`;
/// returns the child and that line. Its warnings are shown as they come.
fn start(args: &[String], marker: &str) -> anyhow::Result<(Running, String)> {
    let exe = std::env::current_exe().context("cannot find the kvm-watcher binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let running = Spawn::new(cmd)
        .name(format!("kvm-watcher {}", args.join(" ")))
        .ready_on(Stream::Stderr, marker)
        .fail_on("error")
        .echo_stderr("warning")
        .start()
        .map_err(|e| match e {
            child::Error::Failed { line, .. } => {
                anyhow!("{}", line.trim_start_matches("kvm-watcher: error: "))
            }
            child::Error::Timeout { name, .. } | child::Error::Exited { name, .. } => {
                anyhow!("{name} did not start")
            }
            e => e.into(),
        })?;
    let line = running.ready_line().unwrap_or_default().to_string();
    Ok((Running(running), line))
}

impl Running {
    fn finish(self) -> anyhow::Result<String> {
        let exit = self.0.wait()?;
        if !exit.status.success() {
            bail!("a demo process failed ({})", exit.status);
        }
        Ok(exit.stdout)
    }
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// How long each part runs, in seconds.
    pub seconds: f64,
}

/// Runs the demo.
pub fn run(args: &DemoConfig) -> anyhow::Result<()> {
    crate::output::to_stdout(|w| show(args, w))
}

fn show(args: &DemoConfig, w: &mut dyn Write) -> anyhow::Result<()> {
    let seconds = format!("{}", args.seconds);
    show_backends(w)?;

    let vm_args: Vec<String> = [
        "vm",
        "--vcpus",
        "2",
        "--first-vcpu-id",
        "3",
        "--slots",
        "3",
        "--halt-hz",
        "3000",
        "--halt-poll-ns",
        "100000",
        "--dirty-pages",
        "8",
        "--dirty-log",
        "ring",
        "--io-exits",
        "2",
        "--mmio-exits",
        "1",
        "--seconds",
        &seconds,
        "--wait-for-signal",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    writeln!(
        w,
        "\nStarting a synthetic guest: kvm-watcher {}",
        vm_args[..vm_args.len() - 2].join(" ")
    )?;
    writeln!(
        w,
        "  2 vCPUs (ids 3 and 4), each halting between 3000 timer interrupts a second and"
    )?;
    writeln!(
        w,
        "  writing 8 pages per pass into 3 dirty-logged memslots with a dirty ring, then"
    )?;
    writeln!(
        w,
        "  writing twice to I/O port 0x504 and once to an unmapped page: three exits to its VMM.\n"
    )?;
    let (vm, ready) = start(&vm_args, "ready pid=")?;
    let pid = ready
        .split_whitespace()
        .find_map(|f| f.strip_prefix("pid="))
        .context("no pid in the guest's ready line")?
        .to_string();

    // Every monitor with a section, each watching the guest in its own
    // process: its records or, for a summary section, its summaries.
    let mut watchers = Vec::new();
    for m in REGISTRY.iter().copied() {
        let Some(section) = m.demo() else {
            continue;
        };
        let command = m.face().command;
        let mut a: Vec<String> = [command, "-p", &pid, "--output", "json", "-i", "0.5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if section.summary {
            a.push("--summary".into());
        }
        let (w, _) = start(&a, "kvm-watcher: watching")?;
        watchers.push((m, section, w));
    }
    let commands: Vec<&str> = watchers.iter().map(|(m, ..)| m.face().command).collect();
    writeln!(
        w,
        "Watching pid {pid} with {} monitors ({}); running the guest for {seconds} s...\n",
        commands.len(),
        commands.join(", ")
    )?;
    vm.0.signal(libc::SIGUSR1)
        .context("cannot start the guest")?;
    let truth: VmReport =
        serde_json::from_str(&vm.finish()?).context("the guest's report is not JSON")?;
    let mut seen = Vec::new();
    for (m, section, w) in watchers {
        seen.push((m, section, ndjson(&w.finish()?)));
    }
    for (m, section, records) in seen {
        let kind = if section.summary {
            "vcpu_interval"
        } else {
            m.name()
        };
        let mine: Vec<Value> = records
            .into_iter()
            .filter(|r| r["monitor"] == kind)
            .collect();
        (section.show)(w, &truth, &mine)?;
    }
    writeln!(
        w,
        "\nTry it yourself: kvm-watcher -w -p <VMM pid>, or kvm-watcher --help."
    )?;
    Ok(())
}

/// What this kernel allows: each monitor's backend and hooks.
fn show_backends(w: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        w,
        "kvm-watcher demo: what this kernel allows (full report: kvm-watcher doctor)\n"
    )?;
    let report = crate::doctor::report();
    writeln!(
        w,
        "  kernel {} (KVM {})",
        report.kernel.release, report.kernel.kvm
    )?;
    for m in &report.monitors {
        writeln!(
            w,
            "  {:<10} backend {:<11} {}",
            m.monitor,
            m.backend.unwrap_or("none"),
            m.hooks.join(", ")
        )?;
    }
    if report.monitors.iter().any(|m| m.backend.is_none()) {
        bail!("a monitor has no working backend here; see `kvm-watcher doctor`");
    }
    Ok(())
}
