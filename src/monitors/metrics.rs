//! What `serve` asks of a monitor: read its cumulative figures at every
//! refresh, forget what exited, and encode its metric families. The exporter
//! (src/exporter/) owns the HTTP side, the thread identities and VM names.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// A vCPU thread as the exporter knows it.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// VMM process.
    pub pid: u32,
    /// vCPU id, once any monitor learned it.
    pub vcpu_id: Option<u32>,
    /// When the thread was first seen gone.
    pub exited: Option<Instant>,
}

/// One refresh: what monitors report back to the exporter.
pub struct Refresh<'a> {
    /// Now.
    pub now: Instant,
    /// How long figures of what exited are kept (`--retain`).
    pub retain: Duration,
    /// Threads seen so far, by tid.
    pub threads: &'a mut BTreeMap<u32, Known>,
    /// VMM processes with per-VM figures (their names are looked up too).
    pub pids: &'a mut BTreeSet<u32>,
    /// Per-VM figures one monitor reads and a later one in the registry uses.
    pub shared: &'a mut Shared,
}

/// Per-VM figures that pass from one monitor's refresh to a later one's,
/// refilled at every refresh (so neither names the other).
#[derive(Debug, Default)]
pub struct Shared {
    /// Guest page writes KVM logged as dirty so far, per VMM pid (the dirty
    /// monitor's counts; dirty-rate exports their rate next to its sampled one).
    pub logged_writes: BTreeMap<u32, u64>,
}

impl Refresh<'_> {
    /// Notes thread `tid` of `pid`, with its vCPU id if known.
    pub fn saw(&mut self, tid: u32, pid: u32, vcpu_id: Option<u32>) {
        let k = self.threads.entry(tid).or_default();
        k.pid = pid;
        k.vcpu_id = vcpu_id.or(k.vcpu_id);
    }
}

/// Labels of vCPU and VM series.
pub struct Labeler<'a> {
    /// Threads by tid.
    pub threads: &'a BTreeMap<u32, Known>,
    /// VM names by pid, remembered after the VMs exit.
    pub names: &'a BTreeMap<u32, String>,
}

impl Labeler<'_> {
    /// `vm`, `pid` of process `pid`.
    pub fn vm(&self, pid: u32) -> Labels {
        vec![
            (
                "vm".into(),
                self.names.get(&pid).cloned().unwrap_or_default(),
            ),
            ("pid".into(), pid.to_string()),
        ]
    }

    /// `vm`, `pid`, `vcpu`, `tid` of thread `tid`.
    pub fn vcpu(&self, tid: u32) -> Labels {
        let k = self.threads.get(&tid).cloned().unwrap_or_default();
        let mut labels = self.vm(k.pid);
        labels.push((
            "vcpu".into(),
            k.vcpu_id.map(|v| v.to_string()).unwrap_or_default(),
        ));
        labels.push(("tid".into(), tid.to_string()));
        labels
    }
}

/// `labels` with one more pair.
pub fn with(mut labels: Labels, key: &str, value: impl ToString) -> Labels {
    labels.push((key.into(), value.to_string()));
    labels
}

/// A monitor's metric families.
pub trait Metrics: Send {
    /// Reads the kernel's cumulative figures, noting the threads and VMs seen.
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()>;

    /// Thread `tid` exited and its last figures were read: free its kernel entries.
    fn thread_exited(&mut self, _tid: u32) {}

    /// Thread `tid` exited longer than `--retain` ago: forget its figures.
    fn forget_thread(&mut self, _tid: u32) {}

    /// Encodes its families.
    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error>;
}
