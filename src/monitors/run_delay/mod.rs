//! run-delay (`-r`): how long each vCPU thread waited on a host run queue,
//! runnable but not running (what the guest sees as steal), split by cause
//! (woken or preempted), and which tasks ran on its CPU meanwhile (kernel
//! half: src/bpf/run_delay.bpf.c).

mod aggregate;
mod demo;
mod metrics;
mod read;
mod record;

pub use aggregate::{Culprit, CulpritReading, RunDelayInterval, RunDelayTotals, Waits, quiet};
pub use read::{read_culprits, read_totals};
pub use record::{RunDelayRow, decode};

use std::time::Duration;

use libbpf_rs::{MapCore, MapHandle};

use crate::backend::{Backend, SCHED_SWITCH, need, runs_on_switch};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::TpBtf;
use crate::monitors::families::Family;
use crate::monitors::ledger::{Change, Reading};
use crate::monitors::tracked::{Table, Tracked};
use crate::monitors::{
    Configure, Face, Half, Mode, Monitor, OptionKind, OptionSpec, Part, Start, Thread, Tick, shrink,
};
use crate::output::Output;
use crate::procfs::{self, VmNames};

/// The run-delay monitor.
pub struct RunDelay;

static FACE: Face = Face {
    name: "run_delay",
    command: "run-delay",
    events_flag: "run-delay-events",
    short: 'r',
    about: "Per interval, how long each vCPU thread waited for a CPU, why, and what ran instead",
    what: "vCPU run delay (host steal) and the tasks that caused it",
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_RUN_DELAY,
    backends: BACKENDS,
    options: OPTIONS,
    vcpu_fields: aggregate::FIELDS,
    top_columns: aggregate::COLUMNS,
    ..Face::DEFAULTS
};

static BACKENDS: &[Backend] = &[Backend {
    name: "tracepoint",
    needs: &[
        need(&[("sched:sched_wakeup", TpBtf, "tp_run_delay_wakeup")]),
        need(&[("sched:sched_wakeup_new", TpBtf, "tp_run_delay_wakeup_new")]),
        need(&[("sched:sched_switch", TpBtf, SCHED_SWITCH)]),
    ],
    quirks: &[],
    note: "waits from sched:sched_wakeup/sched_wakeup_new and sched:sched_switch, timed with the run queue's clock; vCPU threads from /proc at attach and KVM's preempt notifier",
}];

const MIN_US: &str = "min_us";

static OPTIONS: &[OptionSpec] = &[OptionSpec {
    id: MIN_US,
    long: "min-us",
    value_name: "US",
    help: "With rows: only waits of at least this many microseconds (default: every wait)",
    kind: OptionKind::Count {
        min: 0,
        max: 1 << 40,
    },
    default: Some("0"),
    requires: None,
    serve: false,
}];

impl Monitor for RunDelay {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let ro = rodata(open)?;
        ro.stream_run_delay = running && cx.mode == Mode::Rows;
        ro.run_delay_min_ns = cx.options.count(MIN_US).unwrap_or(0).saturating_mul(1000);
        ro.switch_run_delay = runs_on_switch(cx.resolved);
        if !running {
            shrink(&mut open.maps.run_delay_stats)?;
            shrink(&mut open.maps.run_delay_culprits)?;
        }
        Ok(())
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        decode(data)
            .map(|mut r| {
                r.common.vm = names.get(r.common.pid);
                out.record(&r);
            })
            .is_some()
    }

    fn start(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        Ok(Box::new(Tracked::new(Maps::enter(skel, cx)?, cx.mode)))
    }
}

/// run-delay's maps, with the vCPU threads already running entered.
struct Maps {
    stats: MapHandle,
    culprits: MapHandle,
    /// Culprits are read for summaries only.
    summary: bool,
    /// Culprits are any task on the host: names of this interval's only.
    names: VmNames,
}

impl Maps {
    fn enter(skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Maps> {
        let maps = Maps {
            stats: MapHandle::try_from(&skel.maps.run_delay_stats)?,
            culprits: MapHandle::try_from(&skel.maps.run_delay_culprits)?,
            summary: cx.mode == Mode::Summary,
            names: VmNames::default(),
        };
        let marks = read::Marks::of(skel)?;
        read::enter_threads(&maps.stats, &marks, &procfs::list_vms(), cx.filter);
        Ok(maps)
    }
}

impl Table for Maps {
    type Counters = Waits;
    const FAMILIES: &'static [Family<Waits>] = metrics::FAMILIES;
    /// Its hooks count in the rows mode too (their marks and entries).
    const PRUNES_ROWS: bool = true;

    fn read(&mut self, _at_ns: Option<u64>) -> anyhow::Result<Vec<Reading<Waits>>> {
        let culprits = match self.summary {
            true => read_culprits(&self.culprits)?,
            false => Vec::new(),
        };
        let waits = Waits::join(read_totals(&self.stats)?, culprits);
        Ok(Reading::all(waits, |w| w.totals.thread()))
    }

    fn forget(&mut self, gone: &[Thread]) {
        let tids: Vec<u32> = gone.iter().map(|t| t.tid).collect();
        for tid in &tids {
            let _ = self.stats.delete(&tid.to_ne_bytes());
        }
        read::forget_culprits(&self.culprits, &tids);
    }

    fn aggregate(&mut self, changes: Vec<Change<Waits>>, tick: &Tick) -> Part {
        let mut intervals = aggregate::intervals(changes, tick);
        self.names.prune(Duration::ZERO);
        for c in intervals.iter_mut().flat_map(|i| &mut i.culprits) {
            c.vm = self.names.get(c.pid);
        }
        Part {
            quiet: Some(aggregate::quiet),
            ..Part::of(intervals.into_iter().map(|i| (i.thread.clone(), i)))
        }
    }
}
