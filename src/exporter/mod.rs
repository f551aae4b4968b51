//! `kvm-watcher serve`: Prometheus metrics of every monitor.
//!
//! The BPF programs only aggregate (no ring-buffer records); every scrape
//! reads the kernel's cumulative figures through each monitor's metric
//! families (src/monitors/*/metrics.rs), keeps the last values of threads
//! and VMs that exited for `--retain` seconds, and encodes them with
//! `prometheus-client` in the exposition conventions: snake_case names,
//! `_total` counters, base units (`_seconds`); as OpenMetrics or the
//! Prometheus text format, as the scrape's `Accept` header asks (`format`).

mod collector;
mod conns;
mod format;
mod http;
mod own;
mod page;
mod throttle;
mod web_config;

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use libbpf_rs::MapHandle;
use prometheus_client::registry::Registry;

use crate::engine::{self, EngineConfig, Targets};
use crate::monitors::Filter;
use crate::monitors::{Mode, Options, Start};
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
    /// TLS and basic authentication (`--web.config.file`).
    pub web_config: Option<std::path::PathBuf>,
    /// Backends the user forced.
    pub backend: crate::engine::Forced,
    /// Which series to export (`--metrics.*`).
    pub export: crate::monitors::metrics::Export,
    /// The monitors' own options.
    pub options: Options,
    /// The monitors to run.
    pub monitors: Vec<&'static dyn crate::monitors::Monitor>,
}

/// Runs the exporter until SIGINT/SIGTERM or `--duration`.
pub fn serve(cfg: &ServeConfig) -> anyhow::Result<()> {
    let pids = engine::resolve_pids(&cfg.pids, &cfg.vms)?;
    let web = match &cfg.web_config {
        Some(path) => web_config::WebConfig::load(path)?,
        None => web_config::WebConfig::default(),
    };
    for w in web.warnings.iter().chain(&web.exposure(cfg.listen)) {
        crate::output::warn(w);
    }
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let stop = engine::stop_flag()?;
    // One thread serves HTTP; scrapes and refreshes run on two more.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .context("cannot start the HTTP runtime")?;
    let listener = {
        let _inside = rt.enter();
        http::bind(cfg.listen)?
    };
    let load = EngineConfig {
        monitors: cfg.monitors.clone(),
        filter: Filter {
            pids: pids.clone(),
            tid: None,
            vcpu: None,
        },
        backend: cfg.backend.clone(),
        ringbuf_kib: 4,
        mode: Mode::Metrics,
        options: cfg.options.clone(),
        // On every host of a fleet: nothing on the host's system calls
        // where a monitor can do without (exits' kvm-only backend).
        spare_syscalls: true,
        partial: false,
    };
    let mut storage = MaybeUninit::uninit();
    let attached = engine::start(&load, &mut storage)?;
    let start = Instant::now();
    let mut monitors = Vec::new();
    for c in &attached.choices {
        let cx = Start {
            resolved: &c.resolved,
            mode: Mode::Metrics,
            options: &load.options,
            filter: &load.filter,
            start,
        };
        monitors.push((c.monitor, c.monitor.metrics(&attached.skel, &cx)?));
    }
    let backends = attached
        .choices
        .iter()
        .map(|c| (c.monitor.name(), c.backend()))
        .collect();
    // Each attached program, its monitor and its link (links were made in
    // the order of the object's programs).
    let mut programs = Vec::new();
    let mut links = attached.links.iter();
    for prog in libbpf_rs::skel::Skel::object(&attached.skel).progs() {
        let name = prog.name().to_string_lossy().into_owned();
        let users: Vec<&'static str> = attached
            .choices
            .iter()
            .filter(|c| c.resolved.programs.contains(&name.as_str()))
            .map(|c| c.monitor.name())
            .collect();
        if users.is_empty() {
            continue;
        }
        let link_id = links.next().map_or(0, own::link_id);
        programs.push(own::Program {
            users,
            name,
            fd: std::os::fd::AsFd::as_fd(&prog)
                .try_clone_to_owned()
                .context("cannot duplicate a BPF program's file descriptor")?,
            link_id,
        });
    }
    let shared = Shared {
        threads: MapHandle::try_from(&attached.skel.maps.vcpu_threads)?,
        counters: MapHandle::try_from(&attached.skel.maps.counters)?,
    };
    let collector = Arc::new(KvmCollector::new(
        shared,
        monitors,
        backends,
        Duration::from_secs_f64(cfg.retain),
        cfg.export.clone(),
        programs,
    ));
    let targets = Mutex::new(Targets::new(
        cfg.vms.clone(),
        cfg.pids.clone(),
        &pids,
        MapHandle::try_from(&attached.skel.maps.allowed_pids)?,
    ));
    let mut registry = Registry::with_prefix("kvm_watcher");
    registry.register_collector(Box::new(Arc::clone(&collector)));
    let registry = Arc::new(registry);
    eprintln!(
        "kvm-watcher: serving metrics of {} on {scheme}://{}/metrics{}; Ctrl-C to stop",
        attached.describe(),
        cfg.listen,
        if web.auth.is_some() {
            " (basic auth)"
        } else {
            ""
        }
    );
    let deadline = cfg
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let pages = Arc::new(page::Pages::new(
        Arc::new(move |format: format::Format| {
            format.encode(&registry).context("cannot encode metrics")
        }),
        page::MAX_AGE,
    ));
    let health: http::Health = {
        let collector = Arc::clone(&collector);
        Arc::new(move || collector.health())
    };
    // Between scrapes too: follow restarted VMs, learn VM names while the
    // VMs live, note exits.
    let targets = Arc::new(targets);
    let follow = {
        let collector = Arc::clone(&collector);
        move || {
            let found = targets.lock().unwrap_or_else(|e| e.into_inner()).refresh();
            for (pid, id) in &found {
                eprintln!(
                    "kvm-watcher: VM {} runs as pid {pid}: exporting it",
                    crate::output::terminal_safe(&id.display())
                );
            }
            collector.learn(found);
        }
    };
    // Monitors' work that cannot wait a second (dirty's storage for a new
    // memslot), when the collector is free; a failure is said once (the
    // next refresh tries the same work and says its own).
    let keeper = collector.keeps_up().then(|| {
        let collector = Arc::clone(&collector);
        let said = std::sync::atomic::AtomicBool::new(false);
        Arc::new(move || {
            if let Err(e) = collector.keep_up()
                && !said.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                crate::output::warn(&format!("cannot keep up the kernel's state: {e:#}"));
            }
        })
    });
    let refresh = Arc::new(move || {
        if let Err(e) = collector.refresh() {
            crate::output::warn(&format!("cannot read the kernel's figures: {e:#}"));
        }
    });
    let result = rt.block_on(async move {
        // Off the HTTP thread: merging a moved slot's pages can wait out
        // dirty's GRACE.
        let keeping = keeper.map(|keep_up| {
            tokio::spawn(async move {
                let mut every = tokio::time::interval(crate::monitors::metrics::KEEP_UP);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let keep_up = Arc::clone(&keep_up);
                    let _ = tokio::task::spawn_blocking(move || keep_up()).await;
                }
            })
        });
        let between = Arc::clone(&pages);
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let _ = tokio::task::spawn_blocking(follow.clone()).await;
                let refresh = Arc::clone(&refresh);
                between.between(move || refresh()).await;
            }
        });
        let served = http::serve(listener, pages, health, web, stop, deadline).await;
        ticker.abort();
        if let Some(k) = keeping {
            k.abort();
        }
        served
    });
    // Connections still open are dropped with the runtime, before the
    // programs are detached.
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(attached);
    result
}
