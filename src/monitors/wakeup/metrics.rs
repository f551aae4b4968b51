//! wakeup's metric families: wake-ups by how they ended, and the
//! halt-duration histogram built in the kernel.

use std::collections::BTreeMap;

use libbpf_rs::{MapCore, MapHandle};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::{WakeupTotals, read_totals};
use crate::monitors::metrics::{Labeler, Metrics, Refresh, with};

pub struct WakeupMetrics {
    stats: MapHandle,
    threads: BTreeMap<u32, WakeupTotals>,
}

impl WakeupMetrics {
    pub fn new(stats: MapHandle) -> Self {
        WakeupMetrics {
            stats,
            threads: BTreeMap::new(),
        }
    }
}

/// Prometheus buckets of a kernel histogram: slot i holds halts of
/// [2^i, 2^(i+1)) us (slot 0 everything under 2 us), the last slot
/// everything longer, so it is the +Inf bucket. Per-bucket counts: the
/// encoder accumulates them.
pub fn buckets(hist: &[u64]) -> Vec<(f64, u64)> {
    let last = hist.len().saturating_sub(1);
    hist.iter()
        .enumerate()
        .map(|(i, &c)| {
            let le = if i == last {
                f64::INFINITY
            } else {
                (1u64 << (i + 1)) as f64 / 1e6
            };
            (le, c)
        })
        .collect()
}

impl Metrics for WakeupMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for t in read_totals(&self.stats)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            self.threads.insert(t.tid, t);
        }
        Ok(())
    }

    fn thread_exited(&mut self, tid: u32) {
        let _ = self.stats.delete(&tid.to_ne_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_buckets_become_upper_bounds_in_seconds_with_inf_last() {
        let b = buckets(&[3, 0, 5, 1]);
        assert_eq!(b[0], (2e-6, 3), "slot 0: under 2 us");
        assert_eq!(b[1], (4e-6, 0));
        assert_eq!(b[2], (8e-6, 5), "slot 2: [4, 8) us");
        assert_eq!(b[3].0, f64::INFINITY);
        assert_eq!(b[3].1, 1);
    }
}
