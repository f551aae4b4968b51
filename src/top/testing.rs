//! A monitor and figures made up for the unit tests of `top`: no kernel,
//! no terminal.

use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, types};
use crate::monitors::{
    Cell, Column, Configure, Face, Figures, Metrics, Monitor, Part, Start, Thread, Unit,
    VcpuFigures, VmRow, VmRule, Watching,
};
use crate::output::Output;
use crate::procfs::{VcpuThreadInfo, VmProcess};

/// A monitor with one column of each VM rule.
pub struct Fake;

static FACE: Face = Face {
    name: "fake",
    command: "fake",
    events_flag: "fake-events",
    short: 'f',
    about: "made up",
    what: "nothing",
    kind: types::monitor_kind::MONITOR_COUNT,
    top_columns: COLUMNS,
    ..Face::DEFAULTS
};

/// Its columns: SUM/s (Sum), MEAN% (Mean), MAX (Max), OWN (Blank), ROWS (Rows).
pub static COLUMNS: &[Column] = &[
    Column {
        title: "SUM/s",
        width: 7,
        help: "sum",
        unit: Unit::PerSecond,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "MEAN%",
        width: 6,
        help: "mean",
        unit: Unit::Percent,
        vm: VmRule::Mean,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "MAX",
        width: 6,
        help: "max",
        unit: Unit::Nanoseconds,
        vm: VmRule::Max,
        idle: Cell::Blank,
    },
    Column {
        title: "OWN",
        width: 4,
        help: "own",
        unit: Unit::Cpu,
        vm: VmRule::Blank,
        idle: Cell::Blank,
    },
    Column {
        title: "ROWS",
        width: 6,
        help: "rows",
        unit: Unit::Count,
        vm: VmRule::Rows,
        idle: Cell::Blank,
    },
];

impl Monitor for Fake {
    fn face(&self) -> &'static Face {
        &FACE
    }
    fn configure(&self, _: &mut OpenKvmWatcherSkel<'_>, _: &Configure) -> anyhow::Result<()> {
        anyhow::bail!("made up")
    }
    fn watch(&self, _: &KvmWatcherSkel<'_>, _: &Start) -> anyhow::Result<Box<dyn Watching>> {
        anyhow::bail!("made up")
    }
    fn metrics(&self, _: &KvmWatcherSkel<'_>, _: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        anyhow::bail!("made up")
    }
}

/// A second monitor without columns.
pub struct Plain;

static PLAIN: Face = Face {
    name: "plain",
    command: "plain",
    events_flag: "plain-events",
    short: 'P',
    about: "made up",
    what: "nothing",
    kind: types::monitor_kind::MONITOR_COUNT,
    ..Face::DEFAULTS
};

impl Monitor for Plain {
    fn face(&self) -> &'static Face {
        &PLAIN
    }
    fn configure(&self, _: &mut OpenKvmWatcherSkel<'_>, _: &Configure) -> anyhow::Result<()> {
        anyhow::bail!("made up")
    }
    fn watch(&self, _: &KvmWatcherSkel<'_>, _: &Start) -> anyhow::Result<Box<dyn Watching>> {
        anyhow::bail!("made up")
    }
    fn metrics(&self, _: &KvmWatcherSkel<'_>, _: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        anyhow::bail!("made up")
    }
}

/// Figures of one vCPU: `n` events, `pct` percent, window `ns`, on `cpu`.
pub struct Fig {
    pub n: f64,
    pub pct: f64,
    pub ns: f64,
    pub cpu: f64,
}

impl Figures for Fig {
    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    fn lines(&self, _interval_ns: u64) -> Vec<String> {
        vec![
            format!("    fake: {} events", self.n),
            format!("      cpu {}", self.cpu),
        ]
    }
    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        vec![
            Cell::Value(self.n * 1e9 / interval_ns as f64),
            Cell::Value(self.pct),
            Cell::Value(self.ns),
            Cell::Value(self.cpu),
            Cell::Value(99.0),
        ]
    }
}

/// A per-VM row of `pages` pages.
pub struct Slot {
    pub pid: u32,
    pub pages: f64,
}

impl VmRow for Slot {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn set_vm(&mut self, _: Option<String>) {}
    fn record(&self, _: &mut Output) {}
    fn line(&self) -> String {
        format!("    slot: {} pages", self.pages)
    }
    fn top_cells(&self) -> Vec<Cell> {
        vec![
            Cell::Blank,
            Cell::Blank,
            Cell::Blank,
            Cell::Blank,
            Cell::Value(self.pages),
        ]
    }
}

/// Figures of thread `tid` of `pid`.
pub fn vcpu(pid: u32, tid: u32, vcpu_id: u32, f: Fig) -> VcpuFigures {
    VcpuFigures {
        thread: Thread {
            pid,
            tid,
            comm: format!("CPU {vcpu_id}/KVM"),
            vcpu_id: Some(vcpu_id),
        },
        figures: Box::new(f),
    }
}

/// A fake monitor's part.
pub fn part(vcpus: Vec<VcpuFigures>, slots: Vec<Slot>) -> Part {
    Part {
        vcpus,
        annotations: Vec::new(),
        vm_rows: slots
            .into_iter()
            .map(|s| Box::new(s) as Box<dyn VmRow>)
            .collect(),
        vm_title: "  slots:",
        ..Part::default()
    }
}

/// A VM process `name` with vCPU threads `tids` (vCPU ids 0..).
pub fn vm(pid: u32, name: &str, tids: &[u32]) -> VmProcess {
    VmProcess {
        pid,
        comm: "kvm-watcher".into(),
        vmm: "kvm-watcher".into(),
        name: name.into(),
        namespace: None,
        uuid: None,
        domain: None,
        vms: 1,
        vcpu_ids: (0..tids.len() as u32).collect(),
        vcpu_threads: tids
            .iter()
            .enumerate()
            .map(|(i, &tid)| VcpuThreadInfo {
                tid,
                comm: format!("CPU {i}/KVM"),
                vcpu_id: None,
            })
            .collect(),
    }
}
