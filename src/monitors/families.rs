//! Metric families as data: a monitor lists its families (name, help,
//! unit, kind, and how to get each value from its per-thread counters) in
//! a static table, and [`encode`] turns any table into series, in the
//! manner of ebpf_exporter's configurations.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use crate::monitors::Thread;
use crate::monitors::metrics::{Export, Family as Series, Hist, Labeler, Max, with};

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
}

fn unit_of<C>(get: &Get<C>) -> Option<&'static Unit> {
    match get {
        Get::Count(_) => None,
        Get::Nanos(_) => Some(&Unit::Seconds),
    }
}

/// Encodes the families of `table` over per-thread figures `rows`.
pub fn encode<'a, C: 'a>(
    table: &[Family<C>],
    rows: impl Iterator<Item = (&'a Thread, &'a C)> + Clone,
    encoder: &mut DescriptorEncoder,
    labels: &Labeler,
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
        }
    }
    Ok(())
}
