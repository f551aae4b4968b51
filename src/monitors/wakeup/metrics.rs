//! wakeup's metric families: wake-ups by how they ended, and the
//! halt-duration histogram built in the kernel.

use std::collections::BTreeMap;

use libbpf_rs::MapCore;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::WakeupTotals;
use super::read::read_totals;
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::{Family, Hist, Labeler, Metrics, Refresh, with};
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
        for mut t in read_totals(&self.source, None)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            // A counter never goes back: a halt's end may add a little less
            // than its time so far was charged (see `WakeupTotals::halted_ns`).
            if let Some(old) = self.threads.get(&t.tid).filter(|old| old.pid == t.pid) {
                t.halted_ns = t.halted_ns.max(old.halted_ns);
            }
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
        let (mut wakeups, mut halted, mut durations) =
            (Family::default(), Family::default(), Family::default());
        for (tid, f) in &self.threads {
            let base = labels.vcpu(*tid);
            for (waited, n) in [("true", f.waited), ("false", f.polled())] {
                wakeups.add(with(base.clone(), "waited", waited), n);
            }
            halted.add(base, f.halted_ns as f64 / 1e9);
            durations.add(
                labels.histogram(*tid),
                Hist {
                    sum: f.halt_ns as f64 / 1e9,
                    count: f.wakeups,
                    buckets: buckets(&f.hist),
                },
            );
        }
        labels.counters(
            encoder,
            (
                "vcpu_wakeups",
                "vCPU wake-ups from halt, by whether the thread slept (waited) or polling caught it",
                None,
            ),
            &wakeups,
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_halt",
                "Time vCPUs spent halted (polling plus sleeping), a halt in progress counted as it goes",
                Some(&Unit::Seconds),
            ),
            &halted,
        )?;
        labels.histograms(
            encoder,
            (
                "vcpu_halt_duration",
                "Halt durations (polling plus sleeping), log2 buckets built in the kernel; per VM (per vCPU with --metrics.vcpu-histograms)",
            ),
            &durations,
        )
    }
}
