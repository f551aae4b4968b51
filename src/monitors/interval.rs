//! What a monitor contributes to one summary interval: figures per vCPU
//! thread and rows per VM. The summary (src/summary.rs) puts the parts of all monitors
//! together into one record per vCPU and one screen per VM.

use serde_json::{Map, Value};

use super::Cell;
use crate::output::Output;

/// The interval that just ended.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    /// The interval's number (`epoch` in the kernel), already closed.
    pub ended: u32,
    /// End of the interval, CLOCK_MONOTONIC ns.
    pub now_ns: u64,
    /// Its length, ns.
    pub interval_ns: u64,
}

/// A vCPU thread as a monitor saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Thread {
    /// VMM process.
    pub pid: u32,
    /// The thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id, if known.
    pub vcpu_id: Option<u32>,
}

/// One monitor's figures of one vCPU thread for one interval.
pub trait Figures {
    /// Its JSON fields, named as in [`super::Monitor::vcpu_fields`], in that order.
    fn fields(&self) -> Map<String, Value>;
    /// Its lines under the vCPU in the table summary (also its section of
    /// the vCPU in top's detail pane).
    fn lines(&self, interval_ns: u64) -> Vec<String>;
    /// Its cells in `top`, one per column of [`super::Monitor::top_columns`]
    /// (those of [`super::VmRule::Rows`] columns are not used).
    fn top_cells(&self, _interval_ns: u64) -> Vec<Cell> {
        Vec::new()
    }
}

/// A monitor's figures of a thread it saw nothing of in an interval (its
/// zeros): the fields in records, where null would say the monitor did not
/// run; no lines in the table summary, where they would only repeat "0".
pub struct Quiet<F>(pub F);

impl<F: Figures> Figures for Quiet<F> {
    fn fields(&self) -> Map<String, Value> {
        self.0.fields()
    }

    fn lines(&self, _interval_ns: u64) -> Vec<String> {
        Vec::new()
    }

    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        self.0.top_cells(interval_ns)
    }
}

/// A thread and a monitor's figures of it.
pub struct VcpuFigures {
    /// The thread.
    pub thread: Thread,
    /// The figures.
    pub figures: Box<dyn Figures>,
}

/// One per-VM row of a monitor (e.g. a memslot's dirty pages).
pub trait VmRow {
    /// The VMM process it belongs to.
    fn pid(&self) -> u32;
    /// Sets the VM's name.
    fn set_vm(&mut self, name: Option<String>);
    /// Writes it as a record (JSON, CSV).
    fn record(&self, out: &mut Output);
    /// Its line in the table summary (also in the VM's section of top's
    /// detail pane).
    fn line(&self) -> String;
    /// Its record as a JSON value, `monitor` included, where a consumer
    /// other than a sink needs it (`advise`); `None` by default.
    fn value(&self) -> Option<serde_json::Value> {
        None
    }
    /// Its cells in `top`, one per column of [`super::Monitor::top_columns`];
    /// a VM shows the sum of its rows' cells in [`super::VmRule::Rows`] columns.
    fn top_cells(&self) -> Vec<Cell> {
        Vec::new()
    }
}

/// What one monitor saw in one interval.
#[derive(Default)]
pub struct Part {
    /// Threads active in the interval: each gets a record.
    pub vcpus: Vec<VcpuFigures>,
    /// Figures shown only for threads that another monitor reported (e.g.
    /// the halt-polling window of a thread whose window did not change).
    pub annotations: Vec<VcpuFigures>,
    /// The figures of a thread another monitor reported and this one saw
    /// nothing of (e.g. no halt-polling window change: 0, not unknown).
    pub quiet: Option<fn() -> Box<dyn Figures>>,
    /// Per-VM rows, after the vCPUs.
    pub vm_rows: Vec<Box<dyn VmRow>>,
    /// The title of this monitor's rows in a VM's table screen.
    pub vm_title: &'static str,
}

impl Part {
    /// A part of one record per thread, with its figures.
    pub fn of<F: Figures + 'static>(figures: impl IntoIterator<Item = (Thread, F)>) -> Part {
        Part {
            vcpus: figures
                .into_iter()
                .map(|(thread, f)| VcpuFigures {
                    thread,
                    figures: Box::new(f),
                })
                .collect(),
            ..Part::default()
        }
    }
}

impl Thread {
    /// The thread `tid` of process `pid`, named `comm`, running vCPU `vcpu_id`.
    pub fn new(pid: u32, tid: u32, comm: impl Into<String>, vcpu_id: Option<u32>) -> Thread {
        Thread {
            pid,
            tid,
            comm: comm.into(),
            vcpu_id,
        }
    }
}

/// A kernel struct that names the thread it is of: its process, vCPU id
/// (-1: none yet) and name, as the shared thread table's entries and the
/// per-thread aggregates do (src/bpf/common.bpf.h, task_aggregate.bpf.h).
pub trait NamesThread: Copy {
    /// The thread `tid` this is of.
    fn who(&self, tid: u32) -> Thread;
}

/// Makes a kernel struct with `pid`, `vcpu_id` and `comm` a [`NamesThread`].
macro_rules! names_thread {
    ($t:ty) => {
        impl $crate::monitors::interval::NamesThread for $t {
            fn who(&self, tid: u32) -> $crate::monitors::Thread {
                let comm = $crate::bpf::comm_to_string(&self.comm);
                let vcpu_id = u32::try_from(self.vcpu_id).ok();
                $crate::monitors::Thread::new(self.pid, tid, comm, vcpu_id)
            }
        }
    };
}
pub(crate) use names_thread;

/// Serializes `figures` (a struct of named fields) into a JSON map.
pub fn fields_of<T: serde::Serialize>(figures: &T) -> Map<String, Value> {
    match serde_json::to_value(figures) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}
