//! `kvm-watcher top`: a live view of every VM and vCPU on the host.
//!
//! A summary session (src/session/) closes an interval every `--interval`
//! from the kernel's aggregates (no record per event); each refresh puts
//! the running monitors' parts and the VMs in /proc together
//! ([`snapshot`]), [`state`] holds what is shown and how keys change it,
//! [`view`] draws it with ratatui and [`term`] owns the terminal. Columns
//! and detail sections come from the registry: each monitor declares its
//! own ([`crate::monitors::Monitor::top_columns`]).

mod format;
mod paused;
mod snapshot;
mod state;
mod term;
#[cfg(test)]
mod testing;
mod view;

use std::io::IsTerminal;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event};

use crate::engine::{Targets, resolve_pids, stop_flag};
use crate::monitors::{Monitor, Options};
use crate::output::{Clock, HeldWarnings, OutputFormat, TimeFormat};
use crate::session::{Session, WatchConfig};
use snapshot::{FigureColumn, build};
use state::{CpuMeter, Header, State};

/// What `top` shows.
#[derive(Debug, Clone)]
pub struct TopConfig {
    /// Monitors whose columns to show.
    pub monitors: Vec<&'static dyn Monitor>,
    /// Only these VMM pids (`--pid`).
    pub pids: Vec<u32>,
    /// Only these VMs (`--vm`).
    pub vms: Vec<String>,
    /// Seconds between refreshes.
    pub interval: f64,
    /// Backends the user forced.
    pub backend: crate::engine::Forced,
    /// The monitors' own options.
    pub options: Options,
}

/// Intervals `advise`'s rules look back over in the detail pane.
const ADVICE_INTERVALS: usize = 30;

/// The longest wait for a key, so signals are seen soon.
const MAX_WAIT: Duration = Duration::from_millis(200);

/// Runs `top` until `q`, Ctrl-C or an ending signal.
pub fn run(cfg: &TopConfig) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        crate::usage_bail!(
            "top needs a terminal on standard output; for a pipe or a file use `kvm-watcher watch` (add `--output json` for records)"
        );
    }
    let pids = resolve_pids(&cfg.pids, &cfg.vms)?;
    for m in &cfg.monitors {
        m.check(&cfg.options)?;
    }
    let stop = stop_flag()?;
    let held = HeldWarnings::start();
    let watch = WatchConfig {
        monitors: cfg.monitors.clone(),
        pids: pids.clone(),
        vms: Vec::new(),
        follow: false,
        tid: None,
        vcpu: None,
        duration: None,
        interval: cfg.interval,
        output: OutputFormat::Json,
        time: TimeFormat::Mono,
        backend: cfg.backend.clone(),
        // Summaries stream nothing.
        ringbuf_kib: 4,
        summary: true,
        options: cfg.options.clone(),
        partial: true,
        announce: false,
    };
    let mut storage = MaybeUninit::uninit();
    let mut session = Session::start(&watch, pids.clone(), &mut storage)?;
    let running = |m: &dyn Monitor| {
        session
            .choices()
            .iter()
            .any(|c| c.monitor.name() == m.name())
    };
    let columns = FigureColumn::all(&cfg.monitors, running);
    let notes = session
        .unavailable()
        .iter()
        .map(|u| format!("{}: {}", u.monitor.name(), u.reason))
        .collect();
    let header = Header {
        kernel: snapshot::clean(&crate::procfs::kernel_release()),
        backends: session
            .choices()
            .iter()
            .map(|c| (c.monitor.name(), c.backend()))
            .collect(),
        ..Header::default()
    };
    let mut state = State::new(columns, header, notes);
    let mut targets = session.targets(cfg.vms.clone(), cfg.pids.clone())?;
    state.refresh(build(&state.columns, &[], 0, &vms_of(&targets)));
    let result = show(&mut session, &mut state, &mut targets, &stop, &held);
    // An error after an ending signal (e.g. the terminal went away with
    // SIGHUP) is that signal's doing, not a failure.
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    result
}

/// The VMs running now that `targets` wants.
fn vms_of(targets: &Targets) -> Vec<crate::procfs::VmProcess> {
    let mut vms = crate::procfs::list_vms();
    vms.retain(|v| targets.wants(v.pid));
    vms
}

/// The screen until the user or a signal ends it; the terminal is restored
/// before this returns, whichever way.
fn show(
    session: &mut Session,
    state: &mut State,
    targets: &mut Targets,
    stop: &AtomicBool,
    held: &HeldWarnings,
) -> anyhow::Result<()> {
    let mut screen = term::Screen::enter()?;
    let mut meter = CpuMeter::default();
    let clock = Clock::new(TimeFormat::Wall);
    let start = Instant::now();
    let mut redraw = true;
    let mut shown = vms_of(targets);
    let mut names = crate::procfs::VmNames::default();
    let mut paused = paused::Paused::default();
    let mut advice = crate::advise::Rolling::new(ADVICE_INTERVALS);
    state.warn(held.take_new());
    while !stop.load(Ordering::Relaxed) {
        if term::hung_up() {
            // Nobody to show anything to: the same as SIGHUP.
            return Ok(());
        }
        if redraw {
            screen.terminal.draw(|f| view::draw(f, state))?;
            redraw = false;
        }
        let wait = session
            .next_tick()
            .saturating_duration_since(Instant::now())
            .min(MAX_WAIT);
        let mut ready = event::poll(wait)?;
        while ready {
            match event::read()? {
                Event::Key(k) => {
                    if let Some(key) = term::key_of(k) {
                        if state.key(key) {
                            return Ok(());
                        }
                        redraw = true;
                    }
                }
                Event::Resize(..) => redraw = true,
                _ => {}
            }
            ready = event::poll(Duration::ZERO)?;
        }
        if let Some(mut interval) = session.next_interval(Duration::ZERO)?
            && !state.paused
        {
            // A VM asked for by name that restarted (a new pid) is watched again.
            targets.refresh();
            let mut now = vms_of(targets);
            paused.apply(&mut now, &session.known_vcpu_ids());
            let vms = snapshot::with_exited(now, &shown, &interval.parts);
            let mut snap = build(
                &state.columns,
                &interval.parts,
                interval.tick.interval_ns,
                &vms,
            );
            names.prune(Duration::from_secs(60));
            advice.add(crate::advise::records_of(&mut interval, &mut names));
            let mut lines = advice.lines();
            for vm in &mut snap.vms {
                if let Some(lines) = lines.remove(&vm.pid) {
                    vm.sections.push(snapshot::Section {
                        title: "advise (the last intervals; see `kvm-watcher advise`)".into(),
                        lines: lines.iter().map(|l| snapshot::clean(l)).collect(),
                    });
                }
            }
            state.refresh(snap);
            shown = vms;
            let h = &mut state.header;
            h.time = clock.format(interval.tick.now_ns).chars().take(8).collect();
            h.lost = session.lost();
            h.cpu_percent = crate::procfs::own_cpu_seconds()
                .and_then(|cpu| meter.sample(cpu, start.elapsed().as_secs_f64()));
            h.rss = crate::procfs::own_rss_bytes();
            state.warn(held.take_new());
            redraw = true;
        }
    }
    Ok(())
}
