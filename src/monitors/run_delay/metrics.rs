//! run-delay's metric families: the run-delay histogram built in the kernel,
//! and waits and waiting time by cause.

use std::collections::BTreeMap;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::record::cause_name;
use super::{Maps, RunDelayTotals, read_totals};
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::{Labeler, Metrics, Refresh, with};
use crate::monitors::threads::ExitedThreads;

pub struct RunDelayMetrics {
    maps: Maps,
    threads: BTreeMap<u32, RunDelayTotals>,
    exited: ExitedThreads,
}

impl RunDelayMetrics {
    pub(super) fn new(maps: Maps) -> Self {
        RunDelayMetrics {
            maps,
            threads: BTreeMap::new(),
            exited: ExitedThreads::default(),
        }
    }
}

impl Metrics for RunDelayMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for t in read_totals(&self.maps.stats)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            self.threads.insert(t.tid, t);
        }
        // No culprits in metrics: keep their map from filling with the gone.
        self.maps.sweep(&mut self.exited);
        Ok(())
    }

    fn forget_thread(&mut self, tid: u32) {
        self.threads.remove(&tid);
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_run_delay",
                "Time vCPU threads waited on a run queue, runnable but not running (host steal), log2 buckets built in the kernel",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (tid, t) in self.threads.iter().filter(|(_, t)| t.waits > 0) {
                m.encode_family(&labels.vcpu(*tid))?
                    .encode_histogram::<NoLabelSet>(
                        t.delay_ns as f64 / 1e9,
                        t.waits,
                        &buckets(&t.hist),
                        None,
                    )?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_run_delay_waits",
                "Waits of vCPU threads on a run queue, by cause (woken or preempted)",
                None,
                MetricType::Counter,
            )?;
            for (tid, t) in self.threads.iter().filter(|(_, t)| t.waits > 0) {
                for cause in 0..2 {
                    m.encode_family(&with(labels.vcpu(*tid), "cause", cause_name(cause as u32)))?
                        .encode_counter::<NoLabelSet, _, u64>(&t.cause_waits[cause], None)?;
                }
            }
        }
        let mut m = encoder.encode_descriptor(
            "vcpu_run_delay_cause",
            "Time vCPU threads waited on a run queue, by cause (woken or preempted)",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for (tid, t) in self.threads.iter().filter(|(_, t)| t.waits > 0) {
            for cause in 0..2 {
                m.encode_family(&with(labels.vcpu(*tid), "cause", cause_name(cause as u32)))?
                    .encode_counter::<NoLabelSet, _, f64>(
                        &(t.cause_ns[cause] as f64 / 1e9),
                        None,
                    )?;
            }
        }
        Ok(())
    }
}
