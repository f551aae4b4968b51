//! The Prometheus collector: at every scrape (and once a second between
//! them) each monitor reads the kernel's cumulative figures; the collector
//! keeps the identities of vCPU threads and the names of VMs, keeps what
//! exited for `--retain` seconds, and encodes every monitor's families plus
//! the shared ones (lost events, backends).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libbpf_rs::MapHandle;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::bpf::read_counters;
use crate::monitors::metrics::{Export, Known, Labeler, Refresh};
use crate::monitors::{Metrics, Monitor, threads};
use crate::procfs::{VmId, VmNames};

/// Everything a scrape is made of.
pub struct State {
    /// Each running monitor and its metric families.
    pub monitors: Vec<(&'static dyn Monitor, Box<dyn Metrics>)>,
    /// Each monitor's backend name.
    pub backends: Vec<(&'static str, &'static str)>,
    threads: BTreeMap<u32, Known>,
    /// Threads seen gone at the last refresh.
    exited: Vec<u32>,
    lost: BTreeMap<&'static str, u64>,
    names: VmNames,
    known_names: BTreeMap<u32, VmId>,
    /// When each VM process was last seen with figures.
    name_seen: BTreeMap<u32, Instant>,
}

/// The kernel maps every monitor shares.
pub struct Shared {
    /// The vCPU-thread table.
    pub threads: MapHandle,
    /// Per-monitor counters.
    pub counters: MapHandle,
}

/// `id` as label values may carry it: control characters and text-reordering
/// marks as visible text (as in the tables), so a scrape read on a terminal
/// cannot drive it and no value can forge a line.
fn shown(id: crate::procfs::VmId) -> crate::procfs::VmId {
    let safe = |s: String| crate::output::terminal_safe(&s).into_owned();
    crate::procfs::VmId {
        name: safe(id.name),
        namespace: safe(id.namespace),
        uuid: safe(id.uuid),
        vmm: safe(id.vmm),
        domain: id.domain.map(safe),
    }
}

/// The collector registered with `prometheus-client`.
pub struct KvmCollector {
    shared: Shared,
    state: Mutex<State>,
    retain: Duration,
    export: Export,
    programs: Vec<super::own::Program>,
    backends: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Debug for KvmCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvmCollector")
    }
}

impl KvmCollector {
    /// A collector of `monitors` (with their backends).
    pub fn new(
        shared: Shared,
        monitors: Vec<(&'static dyn Monitor, Box<dyn Metrics>)>,
        backends: Vec<(&'static str, &'static str)>,
        retain: Duration,
        export: Export,
        programs: Vec<super::own::Program>,
    ) -> Self {
        KvmCollector {
            shared,
            state: Mutex::new(State {
                monitors,
                backends: backends.clone(),
                threads: BTreeMap::new(),
                exited: Vec::new(),
                lost: BTreeMap::new(),
                names: VmNames::default(),
                known_names: BTreeMap::new(),
                name_seen: BTreeMap::new(),
            }),
            retain,
            export,
            programs,
            backends: backends.clone(),
        }
    }

    /// Notes the identities of VM processes while they run (a VM that
    /// exits within a second keeps its name).
    pub fn learn(&self, ids: Vec<(u32, VmId)>) {
        if ids.is_empty() {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for (pid, id) in ids {
            st.name_seen.insert(pid, now);
            st.known_names.insert(pid, shown(id));
        }
    }

    /// `/healthz`: every monitor asked for still attached.
    pub fn health(&self) -> Result<String, String> {
        super::own::health(&self.programs, &self.backends)
    }

    /// Whether any monitor has work between refreshes.
    pub fn keeps_up(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.monitors.iter().any(|(_, m)| m.keeps_up())
    }

    /// Each monitor's work between refreshes, unless a scrape or a refresh
    /// holds the state (it does the same work then).
    pub fn keep_up(&self) -> anyhow::Result<()> {
        let Ok(mut st) = self.state.try_lock() else {
            return Ok(());
        };
        for (_, m) in &mut st.monitors {
            m.keep_up()?;
        }
        Ok(())
    }

    /// Reads the kernel's figures; forgets what exited more than `retain`
    /// ago and frees exited threads' kernel entries.
    pub fn refresh(&self) -> anyhow::Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        let now = Instant::now();
        let mut pids = BTreeSet::new();
        let mut shared = crate::monitors::metrics::Shared::default();
        let mut cx = Refresh {
            now,
            retain: self.retain,
            threads: &mut st.threads,
            pids: &mut pids,
            shared: &mut shared,
        };
        for (_, m) in &mut st.monitors {
            m.refresh(&mut cx)?;
        }
        let totals = read_counters(&self.shared.counters);
        for (m, _) in &st.monitors {
            st.lost.insert(m.name(), totals[m.kind().0 as usize].lost);
        }

        // Names of live VMs, remembered for after they exit. A name is the
        // VMM's to choose: its control characters (escape sequences, BEL,
        // newlines) and text-reordering marks are kept as visible text
        // (`\u{1b}`), as the tables show them, so a scrape read on a
        // terminal cannot drive it and no name can forge a line.
        pids.extend(st.threads.values().map(|t| t.pid));
        for pid in pids {
            st.name_seen.insert(pid, now);
            if !st.known_names.contains_key(&pid)
                && let Some(id) = st.names.id(pid)
            {
                st.known_names.insert(pid, shown(id));
            }
        }
        // Forget a VM process's identity well after its last figures went
        // (they are kept for --retain).
        let keep = self.retain + Duration::from_secs(60);
        let stale: Vec<u32> = st
            .name_seen
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > keep)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            st.name_seen.remove(&pid);
            st.known_names.remove(&pid);
            st.names.forget(pid);
        }

        // Exited threads keep their labels for --retain; their entries of
        // the shared thread table go one refresh after they were seen gone,
        // so every monitor has read them once more (each monitor's ledger
        // frees its own entries).
        for tid in std::mem::take(&mut st.exited) {
            threads::forget(&self.shared.threads, tid);
        }
        for (tid, k) in st.threads.iter_mut() {
            if k.exited.is_none() && !crate::procfs::thread_alive(k.pid, *tid) {
                k.exited = Some(now);
                st.exited.push(*tid);
            }
        }
        let retain = self.retain;
        let expired: Vec<u32> = st
            .threads
            .iter()
            .filter(|(_, k)| k.exited.is_some_and(|t| now.duration_since(t) >= retain))
            .map(|(tid, _)| *tid)
            .collect();
        for tid in expired {
            st.threads.remove(&tid);
        }
        Ok(())
    }
}

impl Collector for KvmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Err(e) = self.refresh() {
            crate::output::warn(&format!("cannot read the kernel's figures: {e:#}"));
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let labels = Labeler::new(&st.threads, &st.known_names, &self.export);
        {
            // One series per VM identity, however many processes it had.
            let mut info = std::collections::BTreeSet::new();
            for (pid, id) in &st.known_names {
                let mut l = labels.vm(*pid);
                l.push(("uuid".into(), id.uuid.clone()));
                l.push(("vmm".into(), id.vmm.clone()));
                info.insert(l);
            }
            let mut m = encoder.encode_descriptor(
                "vm_info",
                "A VM kvm-watcher exports: its UUID (QEMU's -uuid) and VMM; always 1",
                None,
                MetricType::Gauge,
            )?;
            for l in &info {
                m.encode_family(l)?.encode_gauge(&1i64)?;
            }
        }
        for (_, m) in &st.monitors {
            m.encode(&mut encoder, &labels)?;
        }
        {
            // Not counted against the budget it reports on.
            let mut m = encoder.encode_descriptor(
                "vm_series_dropped",
                "Series of the VM left out of this scrape: more than --metrics.max-series-per-vm",
                None,
                MetricType::Gauge,
            )?;
            for ((vm, namespace), (_, n)) in labels.budget() {
                m.encode_family(&vec![
                    ("vm".to_string(), vm),
                    ("namespace".to_string(), namespace),
                ])?
                .encode_gauge(&n)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "lost_events",
                "Records dropped because the ring buffer was full",
                None,
                MetricType::Counter,
            )?;
            for (monitor, n) in &st.lost {
                m.encode_family(&vec![("monitor".to_string(), monitor.to_string())])?
                    .encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "backend",
            "The backend each monitor uses",
            None,
            MetricType::Info,
        )?;
        for (monitor, backend) in &st.backends {
            m.encode_info(&vec![
                ("monitor".to_string(), monitor.to_string()),
                ("backend".to_string(), backend.to_string()),
            ])?;
        }
        super::own::encode(&mut encoder, &self.programs, &self.backends)
    }
}
