//! halt-poll's metric families: the window now and its changes.

use std::collections::BTreeMap;

use libbpf_rs::MapCore;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::HaltPollTotals;
use super::read::read_totals;
use crate::monitors::metrics::{Family, Labeler, Max, Metrics, Refresh, with};
use crate::monitors::task_aggregates::TaskAggregates;

pub struct HaltPollMetrics {
    source: TaskAggregates,
    threads: BTreeMap<u32, HaltPollTotals>,
}

impl HaltPollMetrics {
    pub fn new(source: TaskAggregates) -> Self {
        HaltPollMetrics {
            source,
            threads: BTreeMap::new(),
        }
    }
}

impl Metrics for HaltPollMetrics {
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
        let (mut window, mut changes) = (Family::default(), Family::default());
        for (tid, f) in &self.threads {
            let base = labels.vcpu(*tid);
            for (dir, n) in [("grow", f.grows), ("shrink", f.shrinks)] {
                changes.add(with(base.clone(), "direction", dir), n);
            }
            window.add(base, Max(f.window_ns as f64 / 1e9));
        }
        labels.gauges(
            encoder,
            (
                "halt_poll_window",
                "The vCPU's halt-polling window after its last change",
                Some(&Unit::Seconds),
            ),
            &window,
        )?;
        labels.counters(
            encoder,
            (
                "halt_poll_changes",
                "Halt-polling window changes, by direction (grow or shrink)",
                None,
            ),
            &changes,
        )
    }
}
