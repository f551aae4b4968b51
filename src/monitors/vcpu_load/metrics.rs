//! vcpu-load's metric families: run time per physical CPU, load/put pairs
//! and moves between CPUs (one counter per vCPU).

use std::collections::BTreeMap;

use libbpf_rs::{MapCore, MapHandle};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::read::cpu_times;
use crate::bpf::{read_record, types};
use crate::monitors::metrics::{Family, Labeler, Metrics, Refresh, with};
use crate::monitors::threads;

#[derive(Default)]
struct Figures {
    load_pairs: u64,
    cpu_migrations: u64,
    run_ns_by_cpu: BTreeMap<u32, u64>,
}

pub struct VcpuLoadMetrics {
    threads: MapHandle,
    cpu_ns: MapHandle,
    figures: BTreeMap<u32, Figures>,
}

impl VcpuLoadMetrics {
    pub fn new(threads: MapHandle, cpu_ns: MapHandle) -> Self {
        VcpuLoadMetrics {
            threads,
            cpu_ns,
            figures: BTreeMap::new(),
        }
    }
}

impl Metrics for VcpuLoadMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for e in threads::read_all(&self.threads)? {
            cx.saw(e.tid, e.thread.pid, u32::try_from(e.thread.vcpu_id).ok());
            let f = self.figures.entry(e.tid).or_default();
            f.load_pairs = e.thread.count;
            f.cpu_migrations = e.thread.cpu_migrations;
        }
        for (tid, cpus) in cpu_times(&self.cpu_ns)? {
            if let Some(f) = self.figures.get_mut(&tid) {
                f.run_ns_by_cpu.extend(cpus);
            }
        }
        Ok(())
    }

    fn thread_exited(&mut self, tid: u32) {
        for k in self.cpu_ns.keys() {
            if read_record::<types::vcpu_cpu_key>(&k).is_some_and(|c| c.tid == tid) {
                let _ = self.cpu_ns.delete(&k);
            }
        }
    }

    fn forget_thread(&mut self, tid: u32) {
        self.figures.remove(&tid);
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        let (mut run, mut loads, mut moves) =
            (Family::default(), Family::default(), Family::default());
        for (tid, f) in &self.figures {
            let base = labels.vcpu(*tid);
            for (cpu, ns) in &f.run_ns_by_cpu {
                let l = if labels.export.pcpu {
                    with(base.clone(), "pcpu", cpu)
                } else {
                    base.clone()
                };
                run.add(l, *ns as f64 / 1e9);
            }
            if f.load_pairs > 0 {
                loads.add(base.clone(), f.load_pairs);
                moves.add(base, f.cpu_migrations);
            }
        }
        labels.counters(
            encoder,
            (
                "vcpu_run",
                "Time the vCPU was loaded (kvm_arch_vcpu_load to _put); per physical CPU (a pcpu label) with --metrics.pcpu",
                Some(&Unit::Seconds),
            ),
            &run,
        )?;
        labels.counters(
            encoder,
            ("vcpu_loads", "Completed vCPU load/put pairs", None),
            &loads,
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_cpu_migrations",
                "vCPU loads on another physical CPU than the load before (moves between CPUs)",
                None,
            ),
            &moves,
        )
    }
}
