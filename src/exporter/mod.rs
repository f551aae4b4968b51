//! `kvm-watcher serve`: Prometheus metrics of every monitor.
//!
//! The BPF programs only aggregate (no ring-buffer records); every scrape
//! reads the kernel's cumulative figures through each monitor's metric
//! families (src/monitors/*/metrics.rs), keeps the last values of threads
//! and VMs that exited for `--retain` seconds, and encodes them with
//! `prometheus-client` in the exposition conventions: snake_case names,
//! `_total` counters, base units (`_seconds`).

mod collector;

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use libbpf_rs::MapHandle;
use prometheus_client::registry::Registry;

use crate::monitors::{Mode, Options, REGISTRY};
use crate::session::{self, Filter, LoadConfig};
use collector::{KvmCollector, Shared};

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address of the /metrics endpoint.
    pub listen: SocketAddr,
    /// Seconds to keep the last values of what exited.
    pub retain: f64,
    /// Only these VMM processes.
    pub pids: Vec<u32>,
    /// Only the VMs with these names.
    pub vms: Vec<String>,
    /// Stop after this many seconds.
    pub duration: Option<f64>,
    /// The monitors' own options.
    pub options: Options,
}

/// Runs the exporter until SIGINT/SIGTERM or `--duration`.
pub fn serve(cfg: &ServeConfig) -> anyhow::Result<()> {
    let pids = session::resolve_pids(&cfg.pids, &cfg.vms)?;
    let stop = session::stop_flag()?;
    let server = tiny_http::Server::http(cfg.listen).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e}; choose another --listen address",
            cfg.listen
        )
    })?;
    let load = LoadConfig {
        monitors: REGISTRY.to_vec(),
        filter: Filter {
            pids,
            tid: None,
            vcpu: None,
        },
        backend: None,
        ringbuf_kib: 4,
        mode: Mode::Metrics,
        options: cfg.options.clone(),
        partial: false,
    };
    let mut storage = MaybeUninit::uninit();
    let attached = session::attach(&load, &mut storage)?;
    let mut monitors = Vec::new();
    for c in &attached.choices {
        monitors.push((c.monitor, c.monitor.metrics(&attached.skel)?));
    }
    let backends = attached
        .choices
        .iter()
        .map(|c| (c.monitor.name(), c.backend()))
        .collect();
    let shared = Shared {
        threads: MapHandle::try_from(&attached.skel.maps.vcpu_threads)?,
        counters: MapHandle::try_from(&attached.skel.maps.counters)?,
    };
    let collector = Arc::new(KvmCollector::new(
        shared,
        monitors,
        backends,
        Duration::from_secs_f64(cfg.retain),
    ));
    let mut registry = Registry::with_prefix("kvm_watcher");
    registry.register_collector(Box::new(Arc::clone(&collector)));
    eprintln!(
        "kvm-watcher: serving metrics of {} on http://{}/metrics; Ctrl-C to stop",
        attached.describe(),
        cfg.listen
    );
    let deadline = cfg
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
    drop(attached);
    Ok(())
}
