//! `kvm-watcher demo`: starts a synthetic guest, watches it with the six kernel
//! monitors at once (as separate `kvm-watcher` processes, the way a user would),
//! and prints what each saw next to the guest's own counts and KVM's statistics.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Command;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::child::{self, Spawn, Stream};
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

fn check(ok: bool) -> &'static str {
    if ok { "matches" } else { "DIFFERS" }
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

    let mut watchers = Vec::new();
    for monitor in [
        "wakeup",
        "halt-poll",
        "dirty",
        "vcpu-load",
        "run-delay",
        "exits",
    ] {
        let mut a: Vec<String> = [monitor, "-p", &pid, "--output", "json", "-i", "0.5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // Their summaries: run-delay's has the kernel's switch-ins and waiting
        // time per interval; exits are counted as they happen, so the summary
        // has every one, rows only those the VMM came back from.
        if monitor == "run-delay" || monitor == "exits" {
            a.push("--summary".into());
        }
        let (w, _) = start(&a, "kvm-watcher: watching")?;
        watchers.push((monitor, w));
    }
    writeln!(
        w,
        "Watching pid {pid} with the six kernel monitors; running the guest for {seconds} s...\n"
    )?;
    vm.0.signal(libc::SIGUSR1)
        .context("cannot start the guest")?;
    let truth: VmReport =
        serde_json::from_str(&vm.finish()?).context("the guest's report is not JSON")?;
    let mut seen: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (monitor, w) in watchers {
        seen.insert(monitor, ndjson(&w.finish()?));
    }

    let rows = |m: &str, kind: &str| -> Vec<Value> {
        seen.get(m)
            .map(|v| v.iter().filter(|r| r["monitor"] == kind).cloned().collect())
            .unwrap_or_default()
    };
    show_wakeups(w, &truth, &rows("wakeup", "wakeup"))?;
    show_halt_poll(w, &rows("halt-poll", "halt_poll"))?;
    show_dirty(w, &truth, &rows("dirty", "dirty"))?;
    show_vcpu_load(w, &truth, &rows("vcpu-load", "vcpu_load"))?;
    show_run_delay(w, &truth, &rows("run-delay", "vcpu_interval"))?;
    show_exits(w, &truth, &rows("exits", "vcpu_interval"))?;
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

/// Wake-ups per vCPU next to the guest's HLTs and KVM's halt statistics.
fn show_wakeups(w: &mut dyn Write, truth: &VmReport, wakeups: &[Value]) -> anyhow::Result<()> {
    writeln!(w, "== wakeup: {} wake-ups", wakeups.len())?;
    for v in &truth.vcpus {
        let mine: Vec<&Value> = wakeups
            .iter()
            .filter(|r| n(&r["tid"]) == v.tid as u64)
            .collect();
        let polled = mine.iter().filter(|r| r["waited"] == false).count();
        let stat = |name: &str| {
            v.stats
                .as_ref()
                .and_then(|s| s.get(name))
                .map_or("?".to_string(), |s| s.total().to_string())
        };
        writeln!(
            w,
            "   vCPU {} (tid {}): kvm-watcher saw {} wake-ups ({} polled, {} slept)",
            v.vcpu_id,
            v.tid,
            mine.len(),
            polled,
            mine.len() - polled,
        )?;
        let slept = (mine.len() - polled).to_string();
        writeln!(
            w,
            "      the guest executed {} HLTs; KVM counted {} halt exits, {} sleeps (halt_wait_hist): {}",
            v.halts,
            stat("halt_exits"),
            stat("halt_wait_hist"),
            check(stat("halt_wait_hist") == slept),
        )?;
    }
    Ok(())
}

/// The halt-polling window changes, the first few of them.
fn show_halt_poll(w: &mut dyn Write, polls: &[Value]) -> anyhow::Result<()> {
    let grows = polls.iter().filter(|r| r["grow"] == true).count();
    writeln!(
        w,
        "\n== halt-poll: {} window changes ({grows} grow, {} shrink)",
        polls.len(),
        polls.len() - grows
    )?;
    for r in polls.iter().take(4) {
        writeln!(
            w,
            "   vCPU {}: {} {} ns -> {} ns",
            r["vcpu_id"],
            if r["grow"] == true {
                "grow  "
            } else {
                "shrink"
            },
            r["old_ns"],
            r["new_ns"]
        )?;
    }
    Ok(())
}

/// Dirtied pages next to the pages the guest harvested from its ring.
fn show_dirty(w: &mut dyn Write, truth: &VmReport, dirty: &[Value]) -> anyhow::Result<()> {
    let set: BTreeSet<(u32, u64)> = dirty
        .iter()
        .map(|r| (n(&r["slot_id"]) as u32, n(&r["rel_gfn"])))
        .collect();
    let truth_set: BTreeSet<(u32, u64)> = truth.dirty.pages.iter().copied().collect();
    writeln!(
        w,
        "\n== dirty: {} dirtied-page events, {} distinct pages; the guest harvested {} ring entries, {} distinct pages: set {}",
        dirty.len(),
        set.len(),
        truth.dirty.harvested,
        truth_set.len(),
        check(set == truth_set)
    )?;
    for s in &truth.dirty.per_slot {
        let ours = set.iter().filter(|(slot, _)| *slot == s.slot).count();
        writeln!(
            w,
            "   slot {}: {} distinct pages seen, {} reported by KVM",
            s.slot, ours, s.distinct
        )?;
    }
    Ok(())
}

/// Time each vCPU held a physical CPU.
fn show_vcpu_load(w: &mut dyn Write, truth: &VmReport, loads: &[Value]) -> anyhow::Result<()> {
    writeln!(w, "\n== vcpu-load: time each vCPU held a physical CPU")?;
    for v in &truth.vcpus {
        let mine: Vec<&Value> = loads
            .iter()
            .filter(|r| n(&r["tid"]) == v.tid as u64)
            .collect();
        let total: u64 = mine.iter().map(|r| n(&r["total_ns"])).sum();
        let pairs: u64 = mine.iter().map(|r| n(&r["count"])).sum();
        writeln!(
            w,
            "   vCPU {}: {:.1} ms loaded in {} load/put pairs over {:.2} s of guest time",
            v.vcpu_id,
            total as f64 / 1e6,
            pairs,
            truth.seconds
        )?;
    }
    Ok(())
}

fn show_run_delay(w: &mut dyn Write, truth: &VmReport, intervals: &[Value]) -> anyhow::Result<()> {
    writeln!(
        w,
        "\n== run-delay: time each vCPU waited for a physical CPU, against its thread's schedstat"
    )?;
    for v in &truth.vcpus {
        let mine: Vec<&Value> = intervals
            .iter()
            .filter(|r| n(&r["tid"]) == v.tid as u64)
            .collect();
        let sum = |f: &str| -> u64 { mine.iter().map(|r| n(&r[f])).sum() };
        let (total, switch_ins) = (sum("run_delay_ns"), sum("run_delay_switch_ins"));
        let longest = mine
            .iter()
            .map(|r| n(&r["run_delay_max_ns"]))
            .max()
            .unwrap_or(0);
        let Some(kernel) = v.sched else {
            writeln!(
                w,
                "   vCPU {}: {:.3} ms in {switch_ins} switch-ins (this kernel has no schedstat to compare with)",
                v.vcpu_id,
                total as f64 / 1e6,
            )?;
            continue;
        };
        writeln!(
            w,
            "   vCPU {}: {:.3} ms in {switch_ins} switch-ins ({} after a wake-up); schedstat {:.3} ms in {}: {}",
            v.vcpu_id,
            total as f64 / 1e6,
            sum("run_delay_woken_waits"),
            kernel.run_delay_ns as f64 / 1e6,
            kernel.switch_ins,
            check(kernel.agrees(total, switch_ins, longest))
        )?;
    }
    Ok(())
}

fn show_exits(w: &mut dyn Write, truth: &VmReport, intervals: &[Value]) -> anyhow::Result<()> {
    writeln!(
        w,
        "\n== exits: exits to the VMM by port and address, against what the guest's VMM handled"
    )?;
    for v in &truth.vcpus {
        let mine: Vec<&Value> = intervals
            .iter()
            .filter(|r| n(&r["tid"]) == v.tid as u64 && !r["exits_user"].is_null())
            .collect();
        let target = |kind: &str, addr: u64| -> (u64, u64) {
            mine.iter()
                .flat_map(|r| r["exits_targets"].as_array().cloned().unwrap_or_default())
                .filter(|t| t["kind"] == kind && n(&t["addr"]) == addr)
                .fold((0, 0), |(c, ns), t| {
                    (c + n(&t["user_exits"]), ns + n(&t["vmm_ns"]))
                })
        };
        let (io, io_ns) = target("pio", u64::from(crate::vm::guest::IO_EXIT_PORT));
        let (mmio, mmio_ns) = target("mmio", crate::vm::guest::MMIO_EXIT_GPA);
        let from_guest = match mine
            .iter()
            .find_map(|r| r["exits_kvm_exit_fires"].as_bool())
        {
            Some(false) => {
                "kvm:kvm_exit does not fire here, exits from the guest are not shown".to_string()
            }
            _ => format!(
                "{} exits from the guest",
                mine.iter().map(|r| n(&r["exits"])).sum::<u64>()
            ),
        };
        let made = v.exits_made;
        let ok = io == made.vmm_io && mmio == made.vmm_mmio;
        writeln!(
            w,
            "   vCPU {}: port 0x504 {io} exits ({:.3} ms in the VMM), mmio 0xfed00000 {mmio} ({:.3} ms); the VMM handled {} and {}: {}; {from_guest}",
            v.vcpu_id,
            io_ns as f64 / 1e6,
            mmio_ns as f64 / 1e6,
            made.vmm_io,
            made.vmm_mmio,
            check(ok)
        )?;
    }
    Ok(())
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
