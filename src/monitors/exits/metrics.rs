//! The exits monitor's metric families: exits from the guest by reason with
//! their time in KVM as a histogram built in the kernel, and exits to the VMM
//! by reason with their time there.

use std::collections::BTreeMap;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::aggregate::{ExitTotals, Kind};
use super::reasons::Reasons;
use super::{Maps, read_totals};
use crate::monitors::histogram::buckets_in;
use crate::monitors::metrics::{Labeler, Metrics, Refresh, with};

pub struct ExitsMetrics {
    maps: Maps,
    reasons: Reasons,
    /// By (tid, kind, reason).
    series: BTreeMap<(u32, u8, u32), ExitTotals>,
}

impl ExitsMetrics {
    pub(super) fn new(maps: Maps, reasons: Reasons) -> Self {
        ExitsMetrics {
            maps,
            reasons,
            series: BTreeMap::new(),
        }
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &ExitTotals> {
        self.series.values().filter(move |t| t.kind == kind)
    }
}

impl Metrics for ExitsMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for t in read_totals(&self.maps.stats)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            let kind = u8::from(t.kind == Kind::User);
            self.series.insert((t.tid, kind, t.reason), t);
        }
        self.maps.sweep();
        Ok(())
    }

    fn forget_thread(&mut self, tid: u32) {
        self.series.retain(|(t, _, _), _| *t != tid);
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        let name = |t: &ExitTotals| match t.kind {
            Kind::Kvm => self.reasons.kvm(t.reason),
            Kind::User => self.reasons.user(t.reason),
        };
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_exits",
                "Exits from the guest (kvm:kvm_exit), by reason",
                None,
                MetricType::Counter,
            )?;
            for t in self.of(Kind::Kvm) {
                m.encode_family(&with(labels.vcpu(t.tid), "reason", name(t)))?
                    .encode_counter::<NoLabelSet, _, u64>(&t.count, None)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_exit_handling",
                "Time from an exit from the guest to the next guest entry (or the return to the VMM), by reason, log2 buckets built in the kernel",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for t in self.of(Kind::Kvm).filter(|t| t.timed > 0) {
                m.encode_family(&with(labels.vcpu(t.tid), "reason", name(t)))?
                    .encode_histogram::<NoLabelSet>(
                        t.ns as f64 / 1e9,
                        t.timed,
                        &buckets_in(&t.hist, 1e-9),
                        None,
                    )?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_userspace_exits",
                "Exits to the VMM (kvm:kvm_userspace_exit), by KVM_EXIT_* reason",
                None,
                MetricType::Counter,
            )?;
            for t in self.of(Kind::User) {
                m.encode_family(&with(labels.vcpu(t.tid), "reason", name(t)))?
                    .encode_counter::<NoLabelSet, _, u64>(&t.count, None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "vcpu_userspace_exit",
            "Time in the VMM after an exit to it, until the next KVM_RUN, by reason, log2 buckets built in the kernel",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for t in self.of(Kind::User).filter(|t| t.timed > 0) {
            m.encode_family(&with(labels.vcpu(t.tid), "reason", name(t)))?
                .encode_histogram::<NoLabelSet>(
                    t.ns as f64 / 1e9,
                    t.timed,
                    &buckets_in(&t.hist, 1e-9),
                    None,
                )?;
        }
        Ok(())
    }
}
