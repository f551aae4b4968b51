//! `kvm-watcher serve`: Prometheus metrics of all four monitors.
//!
//! The BPF programs only aggregate (no ring-buffer records); every scrape
//! reads the kernel's cumulative per-thread and per-slot figures, keeps the
//! last values of threads and VMs that exited for `--retain` seconds, and
//! encodes them with `prometheus-client` in the exposition conventions:
//! snake_case names, `_total` counters, base units (`_seconds`).

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::backend::Monitor;
use crate::bpf::{read_record, types};
use crate::cli::ServeArgs;
use crate::monitors::{halt_poll, wakeup};
use crate::procfs::VmNames;
use crate::session::{self, Attached, LoadConfig};

type Labels = Vec<(String, String)>;

/// One vCPU thread's cumulative figures.
#[derive(Clone, Debug, Default)]
struct ThreadFigures {
    pid: u32,
    vcpu_id: Option<u32>,
    wakeups: u64,
    waited: u64,
    halt_ns: u64,
    hist: Vec<u64>,
    grows: u64,
    shrinks: u64,
    window_ns: Option<u64>,
    load_pairs: u64,
    run_ns_by_cpu: BTreeMap<u32, u64>,
    /// When the thread was first seen gone.
    exited: Option<Instant>,
}

/// One memslot's cumulative dirty-page figures.
#[derive(Clone, Debug, Default)]
struct SlotFigures {
    writes: u64,
    distinct: u64,
    exited: Option<Instant>,
}

/// Everything the metrics are made of.
#[derive(Default)]
struct State {
    threads: BTreeMap<u32, ThreadFigures>,
    slots: BTreeMap<(u32, u32), SlotFigures>,
    lost: BTreeMap<&'static str, u64>,
    backends: Vec<(&'static str, &'static str)>,
    names: VmNames,
    known_names: BTreeMap<u32, String>,
}

/// The kernel maps a scrape reads.
struct Maps {
    wakeup_stats: MapHandle,
    halt_poll_stats: MapHandle,
    vcpu_threads: MapHandle,
    vcpu_cpu_ns: MapHandle,
    slot_stats: MapHandle,
    dirty_counts: MapHandle,
    counters: MapHandle,
}

/// The Prometheus collector: refreshes from the kernel on every scrape.
struct KvmCollector {
    maps: Maps,
    state: Mutex<State>,
    retain: Duration,
}

impl std::fmt::Debug for KvmCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvmCollector")
    }
}

fn thread_alive(pid: u32, tid: u32) -> bool {
    Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

impl KvmCollector {
    /// Reads the kernel's figures into the state; forgets what exited more
    /// than `retain` ago and deletes exited threads' kernel entries.
    fn refresh(&self) -> anyhow::Result<()> {
        let m = &self.maps;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for t in wakeup::read_totals(&m.wakeup_stats)? {
            let f = st.threads.entry(t.tid).or_default();
            f.pid = t.pid;
            f.vcpu_id = t.vcpu_id.or(f.vcpu_id);
            f.wakeups = t.wakeups;
            f.waited = t.waited;
            f.halt_ns = t.halt_ns;
            f.hist = t.hist;
        }
        for t in halt_poll::read_totals(&m.halt_poll_stats)? {
            let f = st.threads.entry(t.tid).or_default();
            f.pid = t.pid;
            f.vcpu_id = t.vcpu_id.or(f.vcpu_id);
            f.grows = t.grows;
            f.shrinks = t.shrinks;
            f.window_ns = Some(t.window_ns);
        }
        for k in m.vcpu_threads.keys() {
            let (Some(tid), Some(v)) = (
                read_record::<u32>(&k),
                m.vcpu_threads.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            let Some(t) = read_record::<types::vcpu_thread>(&v) else {
                continue;
            };
            let f = st.threads.entry(tid).or_default();
            f.pid = t.pid;
            f.vcpu_id = u32::try_from(t.vcpu_id).ok().or(f.vcpu_id);
            f.load_pairs = t.count;
        }
        for k in m.vcpu_cpu_ns.keys() {
            let (Some(key), Some(v)) = (
                read_record::<types::vcpu_cpu_key>(&k),
                m.vcpu_cpu_ns.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            if let Some(f) = st.threads.get_mut(&key.tid) {
                f.run_ns_by_cpu
                    .insert(key.cpu, read_record::<u64>(&v).unwrap_or(0));
            }
        }
        for k in m.slot_stats.keys() {
            let (Some(key), Some(v)) = (
                read_record::<types::dirty_slot_key>(&k),
                m.slot_stats.lookup(&k, MapFlags::ANY)?,
            ) else {
                continue;
            };
            if let Some(s) = read_record::<types::dirty_slot_stats>(&v) {
                let f = st.slots.entry((key.pid, key.slot)).or_default();
                f.writes = s.writes;
                f.distinct = s.distinct_total;
            }
        }
        let totals = session::read_counters(&m.counters);
        for monitor in Monitor::ALL {
            st.lost
                .insert(monitor.name(), totals[monitor.kind() as usize].lost);
        }

        // Names of live VMs, remembered for after they exit.
        let pids: Vec<u32> = st
            .threads
            .values()
            .map(|t| t.pid)
            .chain(st.slots.keys().map(|k| k.0))
            .collect();
        for pid in pids {
            if !st.known_names.contains_key(&pid)
                && let Some(name) = st.names.get(pid)
            {
                st.known_names.insert(pid, name);
            }
        }

        // Exited threads: keep their last figures, free their kernel entries.
        let mut gone = Vec::new();
        for (tid, f) in st.threads.iter_mut() {
            if f.exited.is_none() && !thread_alive(f.pid, *tid) {
                f.exited = Some(now);
                gone.push(*tid);
            }
        }
        for tid in gone {
            let key = tid.to_ne_bytes();
            let _ = m.wakeup_stats.delete(&key);
            let _ = m.halt_poll_stats.delete(&key);
            let _ = m.vcpu_threads.delete(&key);
            for k in m.vcpu_cpu_ns.keys() {
                if read_record::<types::vcpu_cpu_key>(&k).is_some_and(|c| c.tid == tid) {
                    let _ = m.vcpu_cpu_ns.delete(&k);
                }
            }
        }
        let mut gone_pids = Vec::new();
        for ((pid, _), f) in st.slots.iter_mut() {
            if f.exited.is_none() && !Path::new(&format!("/proc/{pid}")).exists() {
                f.exited = Some(now);
                gone_pids.push(*pid);
            }
        }
        gone_pids.dedup();
        for pid in gone_pids {
            forget_pid_pages(m, pid);
        }
        let retain = self.retain;
        st.threads
            .retain(|_, f| f.exited.is_none_or(|t| now.duration_since(t) < retain));
        st.slots
            .retain(|_, f| f.exited.is_none_or(|t| now.duration_since(t) < retain));
        Ok(())
    }
}

/// Deletes an exited VM's per-slot and per-page entries from the kernel.
fn forget_pid_pages(m: &Maps, pid: u32) {
    for k in m.slot_stats.keys() {
        if read_record::<types::dirty_slot_key>(&k).is_some_and(|s| s.pid == pid) {
            let _ = m.slot_stats.delete(&k);
        }
    }
    let stale: Vec<Vec<u8>> = m
        .dirty_counts
        .keys()
        .filter(|k| read_record::<types::dirty_key>(k).is_some_and(|d| d.pid == pid))
        .collect();
    for k in stale {
        let _ = m.dirty_counts.delete(&k);
    }
}

fn vcpu_labels(st: &State, tid: u32, f: &ThreadFigures) -> Labels {
    vec![
        (
            "vm".into(),
            st.known_names.get(&f.pid).cloned().unwrap_or_default(),
        ),
        ("pid".into(), f.pid.to_string()),
        (
            "vcpu".into(),
            f.vcpu_id.map(|v| v.to_string()).unwrap_or_default(),
        ),
        ("tid".into(), tid.to_string()),
    ]
}

fn with(mut labels: Labels, key: &str, value: impl ToString) -> Labels {
    labels.push((key.into(), value.to_string()));
    labels
}

impl Collector for KvmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Err(e) = self.refresh() {
            crate::output::warn(&format!("cannot read the kernel's figures: {e:#}"));
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let vcpus: Vec<(u32, &ThreadFigures)> = st.threads.iter().map(|(t, f)| (*t, f)).collect();

        {
            let mut m = encoder.encode_descriptor(
                "vcpu_wakeups",
                "vCPU wake-ups from halt, by whether the thread slept (waited) or polling caught it",
                None,
                MetricType::Counter,
            )?;
            for (tid, f) in vcpus.iter().filter(|(_, f)| !f.hist.is_empty()) {
                let base = vcpu_labels(&st, *tid, f);
                for (waited, n) in [("true", f.waited), ("false", f.wakeups - f.waited)] {
                    m.encode_family(&with(base.clone(), "waited", waited))?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_halt_duration",
                "Halt durations (polling plus sleeping), log2 buckets built in the kernel",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (tid, f) in vcpus.iter().filter(|(_, f)| !f.hist.is_empty()) {
                // Per-bucket counts (the encoder accumulates them): slot i holds
                // halts of [2^i, 2^(i+1)) us, and the last slot everything
                // longer, so it is the +Inf bucket.
                let last = f.hist.len() - 1;
                let buckets: Vec<(f64, u64)> = f
                    .hist
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let le = if i == last {
                            f64::INFINITY
                        } else {
                            (1u64 << (i + 1)) as f64 / 1e6
                        };
                        (le, c)
                    })
                    .collect();
                m.encode_family(&vcpu_labels(&st, *tid, f))?
                    .encode_histogram::<NoLabelSet>(
                        f.halt_ns as f64 / 1e9,
                        f.wakeups,
                        &buckets,
                        None,
                    )?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "halt_poll_window",
                "The vCPU's halt-polling window after its last change",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for (tid, f) in &vcpus {
                if let Some(w) = f.window_ns {
                    m.encode_family(&vcpu_labels(&st, *tid, f))?
                        .encode_gauge(&(w as f64 / 1e9))?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "halt_poll_changes",
                "Halt-polling window changes, by direction (grow or shrink)",
                None,
                MetricType::Counter,
            )?;
            for (tid, f) in vcpus.iter().filter(|(_, f)| f.window_ns.is_some()) {
                let base = vcpu_labels(&st, *tid, f);
                for (dir, n) in [("grow", f.grows), ("shrink", f.shrinks)] {
                    m.encode_family(&with(base.clone(), "direction", dir))?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_run",
                "Time the vCPU was loaded on each physical CPU (kvm_arch_vcpu_load to _put)",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (tid, f) in &vcpus {
                let base = vcpu_labels(&st, *tid, f);
                for (cpu, ns) in &f.run_ns_by_cpu {
                    m.encode_family(&with(base.clone(), "pcpu", cpu))?
                        .encode_counter::<NoLabelSet, _, f64>(&(*ns as f64 / 1e9), None)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "vcpu_loads",
                "Completed vCPU load/put pairs",
                None,
                MetricType::Counter,
            )?;
            for (tid, f) in vcpus.iter().filter(|(_, f)| f.load_pairs > 0) {
                m.encode_family(&vcpu_labels(&st, *tid, f))?
                    .encode_counter::<NoLabelSet, _, u64>(&f.load_pairs, None)?;
            }
        }
        let slot_labels = |pid: u32, slot: u32| -> Labels {
            vec![
                (
                    "vm".into(),
                    st.known_names.get(&pid).cloned().unwrap_or_default(),
                ),
                ("pid".into(), pid.to_string()),
                ("slot".into(), (slot & 0xffff).to_string()),
                ("as".into(), (slot >> 16).to_string()),
            ]
        };
        {
            let mut m = encoder.encode_descriptor(
                "dirty_page_writes",
                "Guest page writes KVM logged as dirty, per memslot",
                None,
                MetricType::Counter,
            )?;
            for ((pid, slot), f) in &st.slots {
                m.encode_family(&slot_labels(*pid, *slot))?
                    .encode_counter::<NoLabelSet, _, u64>(&f.writes, None)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "dirty_distinct_pages",
                "Distinct guest pages dirtied since kvm-watcher started, per memslot",
                None,
                MetricType::Gauge,
            )?;
            for ((pid, slot), f) in &st.slots {
                m.encode_family(&slot_labels(*pid, *slot))?
                    .encode_gauge(&f.distinct)?;
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
        {
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
        }
        Ok(())
    }
}

/// Runs the exporter until SIGINT/SIGTERM or `--duration`.
pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let pids = session::resolve_pids(&args.pids, &args.vms)?;
    let stop = session::stop_flag()?;
    let server = tiny_http::Server::http(args.listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e}; choose another --listen address",
            args.listen
        )
    })?;
    let cfg = LoadConfig {
        monitors: Monitor::ALL.to_vec(),
        pids,
        tid: None,
        vcpu: None,
        backend: None,
        ringbuf_kib: 4,
        max_pages: args.max_pages,
        stream: false,
        aggregate: true,
        interval_distinct: false,
    };
    let mut storage = MaybeUninit::uninit();
    let Attached {
        skel,
        links,
        choices,
        ..
    } = session::attach(&cfg, &mut storage)?;
    let maps = Maps {
        wakeup_stats: MapHandle::try_from(&skel.maps.wakeup_stats)?,
        halt_poll_stats: MapHandle::try_from(&skel.maps.halt_poll_stats)?,
        vcpu_threads: MapHandle::try_from(&skel.maps.vcpu_threads)?,
        vcpu_cpu_ns: MapHandle::try_from(&skel.maps.vcpu_cpu_ns)?,
        slot_stats: MapHandle::try_from(&skel.maps.dirty_slot_stats)?,
        dirty_counts: MapHandle::try_from(&skel.maps.dirty_counts)?,
        counters: MapHandle::try_from(&skel.maps.counters)?,
    };
    let state = State {
        backends: choices
            .iter()
            .map(|c| (c.monitor.name(), c.backend.name))
            .collect(),
        ..Default::default()
    };
    let collector = Arc::new(KvmCollector {
        maps,
        state: Mutex::new(state),
        retain: Duration::from_secs_f64(args.retain),
    });
    let mut registry = Registry::with_prefix("kvm_watcher");
    registry.register_collector(Box::new(Arc::clone(&collector)));
    let attached: Vec<String> = choices
        .iter()
        .map(|c| format!("{} ({} backend)", c.monitor.name(), c.backend.name))
        .collect();
    eprintln!(
        "kvm-watcher: serving metrics of {} on http://{}/metrics; Ctrl-C to stop",
        attached.join(", "),
        args.listen
    );
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut next_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        // Between scrapes too: learn VM names while the VMs live, note exits.
        if Instant::now() >= next_refresh {
            if let Err(e) = collector.refresh() {
                crate::output::warn(&format!("cannot read the kernel's figures: {e:#}"));
            }
            next_refresh = Instant::now() + Duration::from_secs(1);
        }
        let request = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot accept HTTP connections"),
        };
        let response = if request.url() == "/metrics" || request.url().starts_with("/metrics?") {
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, &registry)
                .context("cannot encode metrics")?;
            let header = tiny_http::Header::from_bytes(
                "Content-Type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .expect("static header is valid");
            tiny_http::Response::from_string(body).with_header(header)
        } else {
            tiny_http::Response::from_string("kvm-watcher: metrics are at /metrics\n")
                .with_status_code(404)
        };
        let _ = request.respond(response);
    }
    drop(links);
    Ok(())
}
