//! dirty-rate's metric families: per VM, the sampled rate of changed guest
//! memory with its 95 % interval, the rate of pages written while KVM logs
//! dirty pages (the dirty monitor's counts, handed over in `Refresh`), the
//! writable working set per window, and how much guest memory the sampler
//! read.

use crate::monitors::ledger::since;
use std::collections::BTreeMap;
use std::time::Instant;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::aggregate::{Aggregator, DirtyRateRow, Settings};
use super::sampler::Sampler;
use crate::monitors::Tick;
use crate::monitors::metrics::{Family, LOGGED_WRITES, Labeler, Max, Metrics, Refresh, with};

/// A VM's latest figures.
struct Latest {
    row: DirtyRateRow,
    /// When its VM was last seen by the sampler.
    seen: Instant,
}

/// The dirty monitor's logged writes of one VM, at one refresh.
#[derive(Clone, Copy)]
struct Logged {
    writes: u64,
    at: Instant,
    /// Bytes per second written since the refresh before.
    rate: Option<f64>,
}

pub struct DirtyRateMetrics {
    sampler: Sampler,
    settings: Settings,
    aggregator: Aggregator,
    vms: BTreeMap<u32, Latest>,
    logged: BTreeMap<u32, Logged>,
}

/// Refreshes closer together than this keep the last logged rate.
const MIN_SPAN_S: f64 = 0.5;

impl DirtyRateMetrics {
    pub fn new(sampler: Sampler, settings: Settings) -> Self {
        DirtyRateMetrics {
            sampler,
            settings,
            aggregator: Aggregator::default(),
            vms: BTreeMap::new(),
            logged: BTreeMap::new(),
        }
    }

    /// Pages written under dirty logging (counted by the dirty monitor,
    /// handed over in `writes`): the rate since the refresh before, per VM.
    fn refresh_logged(&mut self, writes: &BTreeMap<u32, u64>, now: Instant) {
        self.logged.retain(|pid, _| writes.contains_key(pid));
        for (&pid, &w) in writes {
            let next = match self.logged.get(&pid) {
                Some(prev) => {
                    let span = now.duration_since(prev.at).as_secs_f64();
                    if span < MIN_SPAN_S {
                        continue;
                    }
                    Logged {
                        writes: w,
                        at: now,
                        rate: Some(since(w, prev.writes) as f64 * 4096.0 / span),
                    }
                }
                None => Logged {
                    writes: w,
                    at: now,
                    rate: None,
                },
            };
            self.logged.insert(pid, next);
        }
    }
}

impl Metrics for DirtyRateMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for note in self.sampler.notes() {
            eprintln!("kvm-watcher: dirty-rate: {note}");
        }
        let windows = self.sampler.take();
        let tick = Tick {
            ended: 0,
            now_ns: 0,
            interval_ns: 0,
        };
        for row in self.aggregator.tick(&windows, &self.settings, &tick) {
            if row.slot.is_some() {
                continue;
            }
            cx.pids.insert(row.pid);
            let keep = self.vms.remove(&row.pid);
            // A refresh where only working-set windows ended keeps the last rate.
            let row = match keep {
                Some(old) if row.rate_pages_per_s.is_none() => DirtyRateRow {
                    rate_pages_per_s: old.row.rate_pages_per_s,
                    rate_mib_per_s: old.row.rate_mib_per_s,
                    ..row
                },
                _ => row,
            };
            self.vms.insert(row.pid, Latest { row, seen: cx.now });
        }
        // A VM whose windows stopped (it exited) is kept for --retain.
        let (now, retain) = (cx.now, cx.retain);
        let stale = retain + std::time::Duration::from_secs(20);
        self.vms.retain(|_, l| now.duration_since(l.seen) < stale);
        self.refresh_logged(&cx.shared.get(LOGGED_WRITES), now);
        Ok(())
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        const PAGE: f64 = 4096.0;
        type Bound = fn(&super::estimate::Share) -> f64;
        let bounds: [(&str, &str, Bound); 3] = [
            (
                "vm_dirty_rate_bytes_per_second",
                "Guest memory whose content changed (method sampling), or written under dirty logging (method logging, from the dirty monitor), bytes per second",
                |s| s.estimate,
            ),
            (
                "vm_dirty_rate_low_bytes_per_second",
                "Lower end of the 95 % interval of the sampled dirty rate",
                |s| s.low,
            ),
            (
                "vm_dirty_rate_high_bytes_per_second",
                "Upper end of the 95 % interval of the sampled dirty rate",
                |s| s.high,
            ),
        ];
        // Two processes under one VM's name (a restart) add up.
        for (i, (name, help, pick)) in bounds.into_iter().enumerate() {
            let mut rates = Family::default();
            for (pid, l) in &self.vms {
                if let Some(rate) = &l.row.rate_pages_per_s {
                    rates.add(
                        with(labels.vm(*pid), "method", "sampling"),
                        pick(rate) * PAGE,
                    );
                }
            }
            // Logged writes are counted, not sampled: no interval.
            if i == 0 {
                for (pid, l) in &self.logged {
                    if let Some(rate) = l.rate {
                        rates.add(with(labels.vm(*pid), "method", "logging"), rate);
                    }
                }
            }
            labels.gauges(encoder, (name, help, None), &rates)?;
        }
        let (mut working, mut sampled) = (Family::default(), Family::default());
        for (pid, l) in &self.vms {
            for ws in &l.row.working_set {
                working.add(
                    with(labels.vm(*pid), "window", ws.window_s),
                    Max(ws.share.estimate),
                );
            }
            sampled.add(labels.vm(*pid), l.row.pages * PAGE as u64);
        }
        labels.gauges(
            encoder,
            (
                "vm_writable_working_set_ratio",
                "Share of guest memory whose content changed within the window (seconds)",
                None,
            ),
            &working,
        )?;
        labels.gauges(
            encoder,
            (
                "vm_sampled_memory_bytes",
                "Guest RAM the dirty-rate sampler draws pages from",
                None,
            ),
            &sampled,
        )?;
        let mut m = encoder.encode_descriptor(
            "dirty_rate_read_bytes",
            "Guest memory the dirty-rate sampler has read, all VMs",
            None,
            MetricType::Counter,
        )?;
        m.encode_family(&Vec::<(String, String)>::new())?
            .encode_counter::<NoLabelSet, _, u64>(&self.sampler.bytes_read(), None)?;
        Ok(())
    }
}
