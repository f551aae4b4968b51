//! run-delay's metric families: the run-delay histogram built in the kernel,
//! and waits and waiting time by cause.

use std::collections::BTreeMap;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::record::cause_name;
use super::{Maps, RunDelayTotals, read_totals};
use crate::monitors::histogram::buckets;
use crate::monitors::metrics::{Family, Hist, Labeler, Metrics, Refresh, with};
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
        let (mut hist, mut delay, mut waits, mut by_cause) = (
            Family::default(),
            Family::default(),
            Family::default(),
            Family::default(),
        );
        for (tid, t) in self.threads.iter().filter(|(_, t)| t.waits > 0) {
            let base = labels.vcpu(*tid);
            hist.add(
                labels.histogram(*tid),
                Hist {
                    sum: t.delay_ns as f64 / 1e9,
                    count: t.waits,
                    buckets: buckets(&t.hist),
                },
            );
            delay.add(base.clone(), t.delay_ns as f64 / 1e9);
            for cause in 0..2 {
                let l = with(base.clone(), "cause", cause_name(cause as u32));
                waits.add(l.clone(), t.cause_waits[cause]);
                by_cause.add(l, t.cause_ns[cause] as f64 / 1e9);
            }
        }
        labels.histograms(
            encoder,
            (
                "vcpu_run_delay",
                "Time vCPU threads waited on a run queue, runnable but not running (host steal), log2 buckets built in the kernel; per VM (per vCPU with --metrics.vcpu-histograms)",
            ),
            &hist,
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_delay",
                "Time vCPU threads waited on a run queue, runnable but not running (libvirt's vcpu.N.delay, KubeVirt's kubevirt_vmi_vcpu_delay_seconds_total), since kvm-watcher saw the thread",
                Some(&Unit::Seconds),
            ),
            &delay,
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_run_delay_waits",
                "Waits of vCPU threads on a run queue, by cause (woken or preempted)",
                None,
            ),
            &waits,
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_run_delay_cause",
                "Time vCPU threads waited on a run queue, by cause (woken or preempted)",
                Some(&Unit::Seconds),
            ),
            &by_cause,
        )
    }
}
