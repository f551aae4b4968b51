//! Metric families as data: a monitor lists its families (name, help,
//! unit, kind, and how to get each value from its per-thread counters) in
//! a static table, and [`encode`] turns any table into series, in the
//! manner of ebpf_exporter's configurations.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use std::collections::{BTreeMap, BTreeSet};

use crate::monitors::Thread;
use crate::monitors::metrics::{Export, Family as Series, Hist, Labeler, Labels, Max, TopK, with};

/// One value of a per-vCPU family.
pub enum Get<C: 'static> {
    /// A count.
    Count(fn(&C) -> u64),
    /// Nanoseconds, exported in seconds.
    Nanos(fn(&C) -> u64),
}

/// A monitor's metric family, described.
pub struct Family<C: 'static> {
    /// Name, without the `kvm_watcher_` prefix and unit suffix.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Which threads have series in it.
    pub only: fn(&C) -> bool,
    /// What it is.
    pub kind: Kind<C>,
}

/// Every thread has series in a family.
pub fn every<C>(_: &C) -> bool {
    true
}

impl<C> Family<C> {
    /// A family of kind `kind` in which every thread has series.
    pub const fn of(name: &'static str, help: &'static str, kind: Kind<C>) -> Self {
        Family {
            name,
            help,
            only: every,
            kind,
        }
    }

    /// Counters per vCPU, one per value, labelled `split` (when not empty).
    pub const fn counters(
        name: &'static str,
        help: &'static str,
        split: &'static str,
        values: &'static [(&'static str, Get<C>)],
    ) -> Self {
        Family {
            name,
            help,
            only: every,
            kind: Kind::Counter { split, values },
        }
    }

    /// One counter per vCPU.
    pub const fn counter(
        name: &'static str,
        help: &'static str,
        get: &'static [(&'static str, Get<C>)],
    ) -> Self {
        Self::counters(name, help, "", get)
    }

    /// A setting per vCPU.
    pub const fn setting(name: &'static str, help: &'static str, get: Get<C>) -> Self {
        Family {
            name,
            help,
            only: every,
            kind: Kind::Setting(get),
        }
    }

    /// A histogram per VM (per vCPU with `--metrics.vcpu-histograms`).
    pub const fn histogram(name: &'static str, help: &'static str, get: fn(&C) -> Hist) -> Self {
        Family {
            name,
            help,
            only: every,
            kind: Kind::Histogram(get),
        }
    }

    /// Only the threads `only` admits have series in it.
    pub const fn only(self, only: fn(&C) -> bool) -> Self {
        Family { only, ..self }
    }
}

/// The kind of a family and its values.
pub enum Kind<C: 'static> {
    /// Counters per vCPU: one series per value, the label `split` (when
    /// not empty) set to the value's name.
    Counter {
        split: &'static str,
        values: &'static [(&'static str, Get<C>)],
    },
    /// A gauge per vCPU that is a setting: series under the same labels
    /// take the largest.
    Setting(Get<C>),
    /// A histogram per VM (per vCPU with `--metrics.vcpu-histograms`), in seconds.
    Histogram(fn(&C) -> Hist),
    /// A counter per vCPU of nanoseconds per key of a thread (e.g. per
    /// physical CPU), in seconds: a series per key labelled `label` when
    /// `split` says so for this export, summed otherwise.
    NanosBy {
        label: &'static str,
        split: fn(&Export) -> bool,
        values: fn(&C) -> Vec<(u32, u64)>,
    },
    /// Counters per key of a thread, the most used keys of each group as
    /// series of their own (see [`Keyed`]).
    Keyed(Keyed<C>),
    /// Histograms per key of a thread (see [`KeyedHistogram`]).
    KeyedHistogram(KeyedHistogram<C>),
}

fn unit_of<C>(get: &Get<C>) -> Option<&'static Unit> {
    match get {
        Get::Count(_) => None,
        Get::Nanos(_) => Some(&Unit::Seconds),
    }
}

/// Encodes the families of `table` over per-thread figures `rows`; `chosen`
/// keeps the keys of [`Kind::Keyed`] families from one scrape to the next.
pub fn encode<'a, C: 'a>(
    table: &[Family<C>],
    rows: impl Iterator<Item = (&'a Thread, &'a C)> + Clone,
    encoder: &mut DescriptorEncoder,
    labels: &Labeler,
    chosen: &mut Chosen,
) -> Result<(), std::fmt::Error> {
    for f in table {
        let rows = rows.clone().filter(|(_, c)| (f.only)(c));
        match &f.kind {
            Kind::Counter { split, values } => {
                let (mut counts, mut secs) = (Series::default(), Series::default());
                for (who, c) in rows.clone() {
                    let base = labels.vcpu(who.tid);
                    for (value, get) in *values {
                        let l = match *split {
                            "" => base.clone(),
                            key => with(base.clone(), key, value),
                        };
                        match get {
                            Get::Count(g) => counts.add(l, g(c)),
                            Get::Nanos(g) => secs.add(l, g(c) as f64 / 1e9),
                        }
                    }
                }
                let unit = values.first().and_then(|(_, g)| unit_of(g));
                match unit {
                    None => labels.counters(encoder, (f.name, f.help, unit), &counts)?,
                    Some(_) => labels.counters(encoder, (f.name, f.help, unit), &secs)?,
                }
            }
            Kind::Setting(get) => {
                let mut series = Series::default();
                for (who, c) in rows.clone() {
                    let v = match get {
                        Get::Count(g) => g(c) as f64,
                        Get::Nanos(g) => g(c) as f64 / 1e9,
                    };
                    series.add(labels.vcpu(who.tid), Max(v));
                }
                labels.gauges(encoder, (f.name, f.help, unit_of(get)), &series)?;
            }
            Kind::NanosBy {
                label,
                split,
                values,
            } => {
                let mut series = Series::default();
                for (who, c) in rows.clone() {
                    let base = labels.vcpu(who.tid);
                    for (key, ns) in values(c) {
                        let l = match split(labels.export) {
                            true => with(base.clone(), label, key),
                            false => base.clone(),
                        };
                        series.add(l, ns as f64 / 1e9);
                    }
                }
                labels.counters(encoder, (f.name, f.help, Some(&Unit::Seconds)), &series)?;
            }
            Kind::Histogram(get) => {
                let mut series = Series::default();
                for (who, c) in rows.clone() {
                    series.add(labels.histogram(who.tid), get(c));
                }
                labels.histograms(encoder, (f.name, f.help), &series)?;
            }
            Kind::Keyed(k) => {
                let series = keyed(k, rows.clone(), labels, chosen);
                labels.counters(encoder, (f.name, f.help, None), &series)?;
            }
            Kind::KeyedHistogram(k) => {
                let mut series = Series::default();
                for (who, c) in rows.clone() {
                    for (key, h) in (k.get)(c) {
                        let l = labels.histogram(who.tid);
                        match (k.split)(labels.export) {
                            true => series.add(with(l, k.label, key), h),
                            false => series.add(l, h),
                        }
                    }
                }
                labels.histograms(encoder, (f.name, f.help), &series)?;
            }
        }
    }
    Ok(())
}

// Keyed families: values per key of a thread (an exit reason, a port), the
// most used keys of each vCPU or VM on their own and the rest `other`.

/// A family of counters per key of a thread.
pub struct Keyed<C: 'static> {
    /// The label that names the key.
    pub label: &'static str,
    /// Whose keys are chosen together: each vCPU's or each VM's.
    pub per: Per,
    /// Keys of a group with series of their own (a `--metrics.*` option).
    pub top: fn(&Export) -> usize,
    /// The choice of keys it makes or shares: families of one choice have
    /// the same keys, chosen by their first value.
    pub choice: &'static str,
    /// A thread's keys with their cumulative values.
    pub keys: fn(&C) -> Vec<Key>,
    /// Which of a key's values the family exports.
    pub value: usize,
}

/// Whose series a [`Keyed`] family's keys are chosen among.
pub enum Per {
    /// Each vCPU's (`vm`, `namespace`, `vcpu`).
    Vcpu,
    /// Each VM's (`vm`, `namespace`).
    Vm,
}

/// One key of a thread and its cumulative values.
pub struct Key {
    /// A label of its group besides its vCPU's or VM's, on its series too.
    pub group: Option<(&'static str, &'static str)>,
    /// The key's value of the label [`Keyed::label`].
    pub name: String,
    /// Its values, the first deciding which keys are chosen.
    pub values: Vec<u64>,
}

/// A family of histograms per key of a thread: per VM (per vCPU with
/// `--metrics.vcpu-histograms`), per key too when `split` says so.
pub struct KeyedHistogram<C: 'static> {
    /// The label that names the key.
    pub label: &'static str,
    /// Whether the key is a label (a `--metrics.*` option).
    pub split: fn(&Export) -> bool,
    /// A thread's histograms by key, in seconds.
    pub get: fn(&C) -> Vec<(String, Hist)>,
}

/// The keys chosen so far, per [`Keyed::choice`].
#[derive(Debug, Default)]
pub struct Chosen(BTreeMap<&'static str, TopK>);

/// The series of a [`Keyed`] family: each group's chosen keys and `other`.
fn keyed<'a, C: 'a>(
    k: &Keyed<C>,
    rows: impl Iterator<Item = (&'a Thread, &'a C)>,
    labels: &Labeler,
    chosen: &mut Chosen,
) -> Series<u64> {
    let mut groups: BTreeMap<Labels, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    let mut live = BTreeSet::new();
    for (who, c) in rows {
        let base = match k.per {
            Per::Vcpu => labels.vcpu(who.tid),
            Per::Vm => labels.vm(who.pid),
        };
        for key in (k.keys)(c) {
            let group = match key.group {
                Some((label, value)) => with(base.clone(), label, value),
                None => base.clone(),
            };
            let sum = groups.entry(group).or_default().entry(key.name);
            let sum = sum.or_insert_with(|| vec![0; key.values.len()]);
            sum.iter_mut().zip(&key.values).for_each(|(s, v)| *s += v);
        }
        live.insert(base);
    }
    let topk = chosen.0.entry(k.choice).or_default();
    let mut series = Series::default();
    for (group, by_key) in &groups {
        for (key, v) in topk.select(group, (k.top)(labels.export), by_key) {
            let value = v.get(k.value).copied().unwrap_or_default();
            series.add(with(group.clone(), k.label, key), value);
        }
    }
    // A group is kept while a thread of its vCPU or VM is, or it has keys.
    live.extend(groups.into_keys());
    topk.retain(&live);
    series
}

#[cfg(test)]
#[path = "families_tests.rs"]
mod tests;
