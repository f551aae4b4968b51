//! What `serve` asks of a monitor: read its cumulative figures at every
//! refresh, forget what exited, and encode its metric families. The exporter
//! (src/exporter/) owns the HTTP side, the thread identities and VM names.
//!
//! Series are keyed by the VM's identity (`vm`, `namespace`) and the vCPU id,
//! not by process and thread ids (those only with `--metrics.pid-labels`):
//! a VM restarted under its name continues its series. Threads whose figures
//! end up under the same labels (a restarted VM's exited and live threads, a
//! vCPU seen under two threads) are summed by [`Family`], never duplicated;
//! when the exited thread is forgotten (`--retain`) a counter goes down once,
//! which Prometheus takes as a reset.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::procfs::VmId;

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

/// A figure of [`Shared`]: guest page writes KVM logged as dirty so far,
/// per VMM pid (published by the monitor that counts them, read by one that
/// exports their rate next to its own).
pub const LOGGED_WRITES: &str = "logged_writes";

/// Per-VM figures that pass from one monitor's refresh to a later one's in
/// the registry, refilled at every refresh, under the figure's name (so neither names the other).
#[derive(Debug, Default)]
pub struct Shared {
    figures: BTreeMap<&'static str, BTreeMap<u32, u64>>,
}

impl Shared {
    /// Adds `value` to figure `name` of VMM process `pid`.
    pub fn add(&mut self, name: &'static str, pid: u32, value: u64) {
        *self
            .figures
            .entry(name)
            .or_default()
            .entry(pid)
            .or_default() += value;
    }

    /// Figure `name` per VMM pid (empty when no monitor published it).
    pub fn get(&self, name: &str) -> BTreeMap<u32, u64> {
        self.figures.get(name).cloned().unwrap_or_default()
    }
}

impl Refresh<'_> {
    /// Notes thread `tid` of `pid`, with its vCPU id if known.
    pub fn saw(&mut self, tid: u32, pid: u32, vcpu_id: Option<u32>) {
        let k = self.threads.entry(tid).or_default();
        k.pid = pid;
        k.vcpu_id = vcpu_id.or(k.vcpu_id);
    }
}

/// Which series `serve` exports (its `--metrics.*` options): the defaults
/// keep every vCPU at a fixed, small number of series.
#[derive(Clone, Debug)]
pub struct Export {
    /// `pid` and `tid` labels on every per-VM and per-vCPU series.
    pub pid_labels: bool,
    /// Histograms per vCPU instead of per VM.
    pub vcpu_histograms: bool,
    /// Exit-time histograms per exit reason.
    pub reason_histograms: bool,
    /// vCPU run time per physical CPU (a `pcpu` label).
    pub pcpu: bool,
    /// Ports and guest-physical addresses exported per VM; the rest is `other`.
    pub top_k: usize,
    /// Exit reasons exported per vCPU and kind of exit; the rest is `other`.
    pub top_reasons: usize,
    /// Series per VM at most; the rest is left out and counted.
    pub max_series_per_vm: usize,
}

impl Default for Export {
    fn default() -> Self {
        Export {
            pid_labels: false,
            vcpu_histograms: false,
            reason_histograms: false,
            pcpu: false,
            top_k: 10,
            top_reasons: 6,
            max_series_per_vm: 10_000,
        }
    }
}

/// Labels of vCPU and VM series, and the per-VM series budget of one scrape.
pub struct Labeler<'a> {
    /// Threads by tid.
    pub threads: &'a BTreeMap<u32, Known>,
    /// VM identities by pid, remembered after the VMs exit.
    pub names: &'a BTreeMap<u32, VmId>,
    /// What to export.
    pub export: &'a Export,
    /// Series encoded and left out so far, per VM (`vm`, `namespace`).
    budget: RefCell<BTreeMap<(String, String), (usize, u64)>>,
}

impl<'a> Labeler<'a> {
    /// Labels for `threads` of the VMs `names`.
    pub fn new(
        threads: &'a BTreeMap<u32, Known>,
        names: &'a BTreeMap<u32, VmId>,
        export: &'a Export,
    ) -> Self {
        Labeler {
            threads,
            names,
            export,
            budget: RefCell::new(BTreeMap::new()),
        }
    }

    /// `vm`, `namespace` (and `pid`) of process `pid`.
    pub fn vm(&self, pid: u32) -> Labels {
        let id = self.names.get(&pid);
        let mut labels = vec![
            ("vm".into(), id.map(|i| i.name.clone()).unwrap_or_default()),
            (
                "namespace".into(),
                id.map(|i| i.namespace.clone()).unwrap_or_default(),
            ),
        ];
        if self.export.pid_labels {
            labels.push(("pid".into(), pid.to_string()));
        }
        labels
    }

    /// `vm`, `namespace`, `vcpu` (and `pid`, `tid`) of thread `tid`.
    pub fn vcpu(&self, tid: u32) -> Labels {
        let k = self.threads.get(&tid).cloned().unwrap_or_default();
        let mut labels = self.vm(k.pid);
        labels.push((
            "vcpu".into(),
            k.vcpu_id.map(|v| v.to_string()).unwrap_or_default(),
        ));
        if self.export.pid_labels {
            labels.push(("tid".into(), tid.to_string()));
        }
        labels
    }

    /// The labels of a histogram of thread `tid`: its vCPU's with
    /// `--metrics.vcpu-histograms`, its VM's otherwise.
    pub fn histogram(&self, tid: u32) -> Labels {
        if self.export.vcpu_histograms {
            self.vcpu(tid)
        } else {
            self.vm(self.threads.get(&tid).map_or(0, |k| k.pid))
        }
    }

    /// True while thread `tid` has not been seen exit.
    pub fn live(&self, tid: u32) -> bool {
        self.threads.get(&tid).is_some_and(|k| k.exited.is_none())
    }

    /// Takes `n` series of the VM in `labels` from its budget: false when
    /// they do not fit (counted as left out).
    fn take(&self, labels: &Labels, n: usize) -> bool {
        let get = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let (Some(vm), Some(ns)) = (get("vm"), get("namespace")) else {
            return true; // not a VM's series
        };
        let mut budget = self.budget.borrow_mut();
        let used = budget.entry((vm, ns)).or_default();
        if used.0 + n > self.export.max_series_per_vm {
            used.1 += n as u64;
            return false;
        }
        used.0 += n;
        true
    }

    /// Series encoded and left out per VM (`vm`, `namespace`) so far in this scrape.
    pub fn budget(&self) -> BTreeMap<(String, String), (usize, u64)> {
        self.budget.borrow().clone()
    }

    /// Encodes a counter family.
    pub fn counters<V: Value + EncodeCounterValue>(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help, unit): (&str, &str, Option<&Unit>),
        family: &Family<V>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for (labels, v) in &family.series {
            if self.take(labels, 1) {
                m.encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(v, None)?;
            }
        }
        Ok(())
    }

    /// Encodes a gauge family.
    pub fn gauges<V: Value + EncodeGaugeValue>(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help, unit): (&str, &str, Option<&Unit>),
        family: &Family<V>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (labels, v) in &family.series {
            if self.take(labels, 1) {
                m.encode_family(labels)?.encode_gauge(v)?;
            }
        }
        Ok(())
    }

    /// Encodes a histogram family (`unit` seconds).
    pub fn histograms(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help): (&str, &str),
        family: &Family<Hist>,
    ) -> Result<(), std::fmt::Error> {
        let mut m =
            encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (labels, h) in &family.series {
            if self.take(labels, h.buckets.len() + 2) {
                m.encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        Ok(())
    }
}

/// A value that series under the same labels add up to.
pub trait Value: Clone {
    /// Adds `other` (of another thread or process under the same labels).
    fn merge(&mut self, other: &Self);
}

impl Value for u64 {
    fn merge(&mut self, other: &Self) {
        *self += other;
    }
}

impl Value for f64 {
    fn merge(&mut self, other: &Self) {
        *self += other;
    }
}

/// A gauge whose series under the same labels take the largest value (a
/// setting, such as the halt-polling window, that adding would make up).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Max(pub f64);

impl Value for Max {
    fn merge(&mut self, other: &Self) {
        self.0 = self.0.max(other.0);
    }
}

impl EncodeGaugeValue for Max {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::GaugeValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        EncodeGaugeValue::encode(&self.0, encoder)
    }
}

/// A histogram: sum, count and per-bucket counts (upper bound, count).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    /// Sum of the values.
    pub sum: f64,
    /// Number of values.
    pub count: u64,
    /// Per-bucket counts (the encoder accumulates them).
    pub buckets: Vec<(f64, u64)>,
}

impl Value for Hist {
    fn merge(&mut self, other: &Self) {
        self.sum += other.sum;
        self.count += other.count;
        if self.buckets.len() < other.buckets.len() {
            let from = self.buckets.len();
            self.buckets
                .extend(other.buckets[from..].iter().map(|&(le, _)| (le, 0)));
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            mine.1 += theirs.1;
        }
    }
}

/// Series of one family, summed by labels.
#[derive(Clone, Debug)]
pub struct Family<V> {
    /// By labels.
    pub series: BTreeMap<Labels, V>,
}

impl<V> Default for Family<V> {
    fn default() -> Self {
        Family {
            series: BTreeMap::new(),
        }
    }
}

impl<V: Value> Family<V> {
    /// Adds `v` under `labels`.
    pub fn add(&mut self, labels: Labels, v: V) {
        match self.series.get_mut(&labels) {
            Some(have) => have.merge(&v),
            None => {
                self.series.insert(labels, v);
            }
        }
    }
}

/// At most `k` keys of each group (a VM's ports, a vCPU's exit reasons) as
/// series of their own, the rest summed under `other`, every series
/// monotonic: the keys are chosen once (the largest when the group is first
/// encoded, then the largest of the rest while there is room) and kept; a key
/// chosen later counts from then on, what it had before stays in `other`.
#[derive(Debug, Default)]
pub struct TopK {
    /// Per group, the chosen keys and what each had when chosen.
    groups: BTreeMap<Labels, BTreeMap<String, Vec<u64>>>,
}

/// The key of the series that sums the keys not chosen.
pub const OTHER: &str = "other";

impl TopK {
    /// The series of `group`: each chosen key's figures (`counts`: per key,
    /// cumulative figures, the first deciding the order) and `other`.
    pub fn select(
        &mut self,
        group: &Labels,
        k: usize,
        counts: &BTreeMap<String, Vec<u64>>,
    ) -> Vec<(String, Vec<u64>)> {
        let first = !self.groups.contains_key(group);
        let chosen = self.groups.entry(group.clone()).or_default();
        if chosen.len() < k {
            let mut rest: Vec<(&String, &Vec<u64>)> = counts
                .iter()
                .filter(|(key, _)| !chosen.contains_key(*key))
                .collect();
            rest.sort_by(|a, b| b.1.first().cmp(&a.1.first()).then(a.0.cmp(b.0)));
            for (key, v) in rest.into_iter().take(k - chosen.len()) {
                let base = if first { vec![0; v.len()] } else { v.clone() };
                chosen.insert(key.clone(), base);
            }
        }
        let width = counts.values().map(Vec::len).max().unwrap_or(0);
        let mut other = vec![0u64; width];
        for v in counts.values() {
            for (o, x) in other.iter_mut().zip(v) {
                *o += x;
            }
        }
        let mut out = Vec::new();
        for (key, base) in chosen.iter() {
            let now = counts.get(key).cloned().unwrap_or_else(|| vec![0; width]);
            let own: Vec<u64> = now
                .iter()
                .enumerate()
                .map(|(i, x)| x.saturating_sub(base.get(i).copied().unwrap_or(0)))
                .collect();
            for (o, x) in other.iter_mut().zip(&own) {
                *o = o.saturating_sub(*x);
            }
            out.push((key.clone(), own));
        }
        out.push((OTHER.to_string(), other));
        out
    }

    /// Forgets the groups not in `live`.
    pub fn retain(&mut self, live: &BTreeSet<Labels>) {
        self.groups.retain(|g, _| live.contains(g));
    }
}

/// `labels` with one more pair.
pub fn with(mut labels: Labels, key: &str, value: impl ToString) -> Labels {
    labels.push((key.into(), value.to_string()));
    labels
}

/// How often `serve` runs [`Metrics::keep_up`]: as often as `watch` polls
/// dirty's storage (its GRACE).
pub const KEEP_UP: std::time::Duration = std::time::Duration::from_millis(20);

/// A monitor's metric families.
pub trait Metrics: Send {
    /// Reads the kernel's cumulative figures, noting the threads and VMs seen.
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()>;

    /// Whether the monitor has kernel state to keep up between refreshes
    /// ([`Metrics::keep_up`]); `serve` ticks faster only for such monitors.
    fn keeps_up(&self) -> bool {
        false
    }

    /// Work that cannot wait for the next refresh (a second away), run
    /// every [`KEEP_UP`] when the collector is free: kept cheap when there
    /// is nothing to do (a map lookup).
    fn keep_up(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Encodes its families.
    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, namespace: &str) -> VmId {
        VmId {
            name: name.into(),
            namespace: namespace.into(),
            ..VmId::default()
        }
    }

    #[test]
    fn threads_of_a_restarted_vm_share_its_labels_and_are_summed() {
        // pid 10 exited (thread 11, vCPU 0); pid 20 is the same VM restarted.
        let names = BTreeMap::from([(10, id("web", "prod")), (20, id("web", "prod"))]);
        let threads = BTreeMap::from([
            (
                11,
                Known {
                    pid: 10,
                    vcpu_id: Some(0),
                    exited: Some(Instant::now()),
                },
            ),
            (
                21,
                Known {
                    pid: 20,
                    vcpu_id: Some(0),
                    exited: None,
                },
            ),
        ]);
        let export = Export::default();
        let l = Labeler::new(&threads, &names, &export);
        assert_eq!(l.vcpu(11), l.vcpu(21));
        assert_eq!(
            l.vcpu(21),
            vec![
                ("vm".to_string(), "web".to_string()),
                ("namespace".into(), "prod".into()),
                ("vcpu".into(), "0".into())
            ]
        );
        let mut f = Family::default();
        f.add(l.vcpu(11), 5u64);
        f.add(l.vcpu(21), 2u64);
        assert_eq!(f.series.len(), 1);
        assert_eq!(f.series.values().next(), Some(&7));
        let mut h = Family::default();
        let hist = |n| Hist {
            sum: n as f64,
            count: n,
            buckets: vec![(1.0, n), (f64::INFINITY, 0)],
        };
        h.add(l.histogram(11), hist(1));
        h.add(l.histogram(21), hist(2));
        assert_eq!(h.series.values().next(), Some(&hist(3)));
        assert_eq!(h.series.keys().next().unwrap().len(), 2, "per VM");
        let mut g = Family::default();
        g.add(l.vcpu(11), Max(0.5));
        g.add(l.vcpu(21), Max(0.2));
        assert_eq!(g.series.values().next(), Some(&Max(0.5)));

        // With --metrics.pid-labels they are two series again.
        let export = Export {
            pid_labels: true,
            ..Export::default()
        };
        let l = Labeler::new(&threads, &names, &export);
        assert_ne!(l.vcpu(11), l.vcpu(21));
        assert!(l.vcpu(21).contains(&("tid".into(), "21".into())));
    }

    #[test]
    fn top_k_keeps_k_keys_and_sums_the_rest_monotonically() {
        let g: Labels = vec![("vm".into(), "v".into())];
        let mut t = TopK::default();
        let counts = |pairs: &[(&str, u64)]| -> BTreeMap<String, Vec<u64>> {
            pairs
                .iter()
                .map(|(k, n)| (k.to_string(), vec![*n]))
                .collect()
        };
        // 10,000 ports: two of their own, the rest in other.
        let many: BTreeMap<String, Vec<u64>> = (0..10_000u64)
            .map(|p| (format!("{p:#x}"), vec![if p < 2 { 100 } else { 1 }]))
            .collect();
        let out = t.select(&g, 2, &many);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], ("0x0".to_string(), vec![100]));
        assert_eq!(out[1], ("0x1".to_string(), vec![100]));
        assert_eq!(out[2], (OTHER.to_string(), vec![9_998]));
        // Room for one more: a key chosen later counts from then on.
        let mut t = TopK::default();
        let out = t.select(&g, 2, &counts(&[("a", 5)]));
        assert_eq!(out, vec![("a".into(), vec![5]), (OTHER.into(), vec![0])]);
        let out = t.select(&g, 2, &counts(&[("a", 6), ("b", 3), ("c", 9)]));
        assert_eq!(
            out,
            vec![
                ("a".into(), vec![6]),
                ("c".into(), vec![0]),
                (OTHER.into(), vec![12])
            ]
        );
        let out = t.select(&g, 2, &counts(&[("a", 6), ("b", 4), ("c", 19)]));
        assert_eq!(out[1], ("c".into(), vec![10]));
        assert_eq!(out[2], (OTHER.into(), vec![13]));
        t.retain(&BTreeSet::new());
        assert!(t.groups.is_empty());
    }

    #[test]
    fn a_vm_over_its_series_budget_has_the_rest_left_out_and_counted() {
        let names = BTreeMap::from([(10, id("big", ""))]);
        let threads = BTreeMap::new();
        let export = Export {
            max_series_per_vm: 3,
            ..Export::default()
        };
        let l = Labeler::new(&threads, &names, &export);
        let mut f = Family::default();
        for i in 0..5 {
            f.add(with(l.vm(10), "slot", i), 1u64);
        }
        let mut out = String::new();
        let mut reg = prometheus_client::registry::Registry::default();
        #[derive(Debug)]
        struct C(Family<u64>, Export);
        impl prometheus_client::collector::Collector for C {
            fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let names = BTreeMap::from([(10, id("big", ""))]);
                let threads = BTreeMap::new();
                let l = Labeler::new(&threads, &names, &self.1);
                l.counters(&mut e, ("c", "c", None), &self.0)?;
                assert_eq!(
                    l.budget().get(&("big".to_string(), String::new())),
                    Some(&(3, 2))
                );
                Ok(())
            }
        }
        reg.register_collector(Box::new(C(f, export)));
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert_eq!(out.lines().filter(|l| l.starts_with("c_total{")).count(), 3);
    }
}
