//! dirty-rate (`-D`): how fast each VM's memory changes, at any time, from
//! the host: pages sampled at random across its RAM memslots are hashed
//! through the VMM's address space and hashed again a window later. Needs
//! no dirty logging, no VMM support and no BPF program of its own beyond the
//! memslot iterator (src/memslots.rs); reading guest memory needs
//! CAP_SYS_PTRACE. With `--link` it says whether a pre-copy migration would
//! converge (precopy.rs; the model is in docs/dirty-rate.md).

mod aggregate;
pub mod estimate;
mod metrics;
pub mod pages;
pub mod precopy;
mod sampler;
pub mod slots;

pub use aggregate::{DirtyRateRow, Migration, WorkingSet};
pub use sampler::{Config as SamplerConfig, Sampler, Window};

use std::time::Duration;

use crate::backend::Backend;
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, types};
use crate::monitors::Begun;
use crate::monitors::{
    Configure, Face, Metrics, Monitor, OptionKind, OptionSpec, Options, Part, Start, Tick, Watching,
};
use crate::output::Output;
use crate::procfs::VmNames;

/// The dirty-rate monitor.
pub struct DirtyRate;

static FACE: Face = Face {
    name: "dirty_rate",
    command: "dirty-rate",
    events_flag: "dirty-rate-events",
    short: 'D',
    about: "Per VM, how fast guest memory changes (sampled) and if a migration would converge",
    what: "every VM's dirty rate, sampled from its memory (reads guest memory: needs CAP_SYS_PTRACE)",
    kind: types::monitor_kind::MONITOR_DIRTY_RATE,
    backends: BACKENDS,
    options: OPTIONS,
    by_default: false,
    summary_fields: &["dirty_rate_windows", "dirty_rate_read_bytes"],
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

static BACKENDS: &[Backend] = &[Backend {
    name: "sampling",
    needs: &[],
    quirks: &[],
    note: "random guest pages hashed through the VMM's memory (process_vm_readv, CAP_SYS_PTRACE), memslots from a BPF iterator (Linux 5.8+)",
}];

const WINDOW: &str = "rate_window";
const SAMPLE_PAGES: &str = "sample_pages";
const MAX_READ_RATE: &str = "max_read_rate";
const LINK: &str = "link";
const MAX_DOWNTIME: &str = "max_downtime";

static OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        id: WINDOW,
        long: "window",
        value_name: "SECONDS",
        help: "The window the dirty rate is measured over (pages whose content changed within it, per second)",
        kind: OptionKind::Seconds,
        default: Some("1"),
        requires: None,
        serve: true,
    },
    OptionSpec {
        id: SAMPLE_PAGES,
        long: "sample-pages",
        value_name: "PAGES",
        help: "Pages sampled per GiB of guest RAM for each window (QEMU's calc-dirty-rate samples 512)",
        kind: OptionKind::Count {
            min: 1,
            max: 262_144,
        },
        default: Some("512"),
        requires: None,
        serve: true,
    },
    OptionSpec {
        id: MAX_READ_RATE,
        long: "max-read-rate",
        value_name: "MIB/S",
        help: "Most guest memory read per VM per second, MiB; bigger VMs get fewer samples per GiB (and wider intervals)",
        kind: OptionKind::Count {
            min: 1,
            max: 65_536,
        },
        default: Some("16"),
        requires: None,
        serve: true,
    },
    OptionSpec {
        id: LINK,
        long: "link",
        value_name: "MIB/S",
        help: "Migration bandwidth, MiB/s (1 Gbit/s = 119.2 MiB/s): predict per VM whether pre-copy converges",
        kind: OptionKind::MibPerSecond,
        default: None,
        requires: None,
        serve: false,
    },
    OptionSpec {
        id: MAX_DOWNTIME,
        long: "max-downtime",
        value_name: "SECONDS",
        help: "The longest final pause of the guest allowed, with --link (QEMU's default downtime-limit is 0.3 s)",
        kind: OptionKind::Seconds,
        default: Some("0.3"),
        requires: Some(LINK),
        serve: false,
    },
];

/// The working-set windows, besides the rate's own.
const WORKING_SET: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_secs(1),
    Duration::from_secs(10),
];

/// What the options (and the session's pids) say: the sampler's
/// configuration and the rows'.
fn settings(options: &Options, pids: &[u32]) -> (SamplerConfig, aggregate::Settings) {
    let rate_window = Duration::from_secs_f64(options.seconds(WINDOW).unwrap_or(1.0));
    let mut windows: Vec<Duration> = WORKING_SET.to_vec();
    if !windows.contains(&rate_window) {
        windows.push(rate_window);
    }
    windows.sort();
    let link = options.mib_per_second(LINK).map(|mib| precopy::Link {
        bytes_per_s: mib * 1048576.0,
        max_downtime_s: options.seconds(MAX_DOWNTIME).unwrap_or(0.3),
    });
    (
        SamplerConfig {
            pids: pids.to_vec(),
            windows: windows.clone(),
            per_gib: options.count(SAMPLE_PAGES).unwrap_or(512),
            max_bytes_per_s: options.count(MAX_READ_RATE).unwrap_or(16) << 20,
        },
        aggregate::Settings {
            rate_window,
            windows,
            link,
        },
    )
}

fn start_sampler(cx: &Start) -> anyhow::Result<(Sampler, aggregate::Settings)> {
    let (config, settings) = settings(cx.options, &cx.filter.pids);
    Ok((Sampler::start(config)?, settings))
}

impl Monitor for DirtyRate {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn check(&self, _options: &Options) -> anyhow::Result<()> {
        // Without it every window would stay empty until stopped.
        const CAP_SYS_PTRACE: u32 = 19;
        if !crate::procfs::has_capability(CAP_SYS_PTRACE) {
            anyhow::bail!(
                "the dirty-rate monitor reads guest memory, which needs CAP_SYS_PTRACE: run as root or grant it"
            );
        }
        Ok(())
    }

    fn configure(&self, _open: &mut OpenKvmWatcherSkel<'_>, _cx: &Configure) -> anyhow::Result<()> {
        Ok(())
    }

    fn watch(&self, _skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        let (sampler, settings) = start_sampler(cx)?;
        Ok(Box::new(Watch {
            sampler,
            settings,
            aggregator: aggregate::Aggregator::default(),
            windows: 0,
        }))
    }

    fn metrics(&self, _skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        let (sampler, settings) = start_sampler(cx)?;
        Ok(Box::new(metrics::DirtyRateMetrics::new(sampler, settings)))
    }

    fn live_check(&self) -> Option<crate::monitors::LiveCheck> {
        let text = match live_check() {
            Ok(text) => format!("works: {text}"),
            Err(e) => format!("does not work here: {e:#}"),
        };
        Some(crate::monitors::LiveCheck {
            text,
            silent: Vec::new(),
        })
    }
}

/// Reads every VM's memslots and one page of each VM's RAM, as a round would.
fn live_check() -> anyhow::Result<String> {
    let vms = crate::memslots::list(None)?;
    let mut read = 0;
    for vm in &vms {
        let ram = slots::ram_of(&slots::user_slots(vm));
        let Some(first) = ram.first() else {
            continue;
        };
        let mut reader = pages::Reader::open(vm.pid)
            .map_err(|e| anyhow::anyhow!(pages::access_error(vm.pid, &e)))?;
        reader.read(&[first.userspace_addr]);
        read += 1;
    }
    Ok(if vms.is_empty() {
        "the memslot iterator loads (no VM runs now, so no guest memory was read)".to_string()
    } else {
        format!(
            "the memslot iterator found {} VM(s); a page of {read} of them was read",
            vms.len()
        )
    })
}

/// dirty-rate during a session: the windows that ended in each interval.
struct Watch {
    sampler: Sampler,
    settings: aggregate::Settings,
    aggregator: aggregate::Aggregator,
    /// Windows that ended, all VMs.
    windows: u64,
}

impl Watch {
    fn rows(&mut self, tick: &Tick) -> Vec<DirtyRateRow> {
        for note in self.sampler.notes() {
            eprintln!("kvm-watcher: dirty-rate: {note}");
        }
        let windows = self.sampler.take();
        self.windows += windows.len() as u64;
        self.aggregator.tick(&windows, &self.settings, tick)
    }
}

impl Watching for Watch {
    fn interval(&mut self, tick: &Tick) -> anyhow::Result<Part> {
        Ok(Part {
            vm_rows: self
                .rows(tick)
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn crate::monitors::VmRow>)
                .collect(),
            vm_title: "dirty rate (sampled: content changed)",
            ..Part::default()
        })
    }

    fn begin(&mut self, _start_ns: u64) -> anyhow::Result<Begun> {
        Ok(Begun {
            rows_every_interval: true,
        })
    }

    fn summary(
        &self,
        _counters: &types::monitor_counters,
    ) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("dirty_rate_windows", self.windows.into()),
            ("dirty_rate_read_bytes", self.sampler.bytes_read().into()),
        ]
    }

    fn interval_rows(
        &mut self,
        tick: &Tick,
        out: &mut Output,
        names: &mut VmNames,
    ) -> anyhow::Result<()> {
        let mut rows = self.rows(tick);
        for r in &mut rows {
            r.vm = names.get(r.pid);
        }
        crate::monitors::write_periodic(out, tick, "dirty-rate", "(no window ended yet)", &rows);
        Ok(())
    }
}
