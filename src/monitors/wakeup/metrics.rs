//! wakeup's metric families: wake-ups by how they ended, and the
//! halt-duration histogram built in the kernel.

use std::collections::BTreeMap;

use libbpf_rs::MapCore;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::WakeupTotals;
use super::read::read_totals;
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::{Labeler, Metrics, Refresh, with};
use crate::monitors::task_aggregates::TaskAggregates;

pub struct WakeupMetrics {
    source: TaskAggregates,
    threads: BTreeMap<u32, WakeupTotals>,
}

impl WakeupMetrics {
    pub fn new(source: TaskAggregates) -> Self {
        WakeupMetrics {
            source,
            threads: BTreeMap::new(),
        }
    }
}

impl Metrics for WakeupMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for t in read_totals(&self.source)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            self.threads.insert(t.tid, t);
        }
        Ok(())
    }

    fn thread_exited(&mut self, tid: u32) {
        let _ = self.source.stats().delete(&tid.to_ne_bytes());
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
                "vcpu_wakeups",
                "vCPU wake-ups from halt, by whether the thread slept (waited) or polling caught it",
                None,
                MetricType::Counter,
            )?;
            for (tid, f) in &self.threads {
                let base = labels.vcpu(*tid);
                for (waited, n) in [("true", f.waited), ("false", f.polled())] {
                    m.encode_family(&with(base.clone(), "waited", waited))?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        let mut m = encoder.encode_descriptor(
            "vcpu_halt_duration",
            "Halt durations (polling plus sleeping), log2 buckets built in the kernel",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (tid, f) in &self.threads {
            m.encode_family(&labels.vcpu(*tid))?
                .encode_histogram::<NoLabelSet>(
                    f.halt_ns as f64 / 1e9,
                    f.wakeups,
                    &buckets(&f.hist),
                    None,
                )?;
        }
        Ok(())
    }
}
