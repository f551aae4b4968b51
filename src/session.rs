//! Running monitors: pick backends, load the BPF object with just their
//! programs, attach, then poll the ring buffer and the in-kernel aggregates
//! until the duration ends, a signal arrives or the watched VMs exit.
//!
//! Everything attached is owned by values on this function's stack, so every
//! way out (including an error halfway through attaching) detaches it all.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, RingBufferBuilder};
use serde::Serialize;

use crate::backend::{self, Choice, Monitor};
use crate::bpf::{KvmWatcherSkel, KvmWatcherSkelBuilder, read_record, types};
use crate::cli::{DirtyArgs, MonitorArgs, OutputFormat};
use crate::hooks::{self, Prober};
use crate::monitors::{dirty, halt_poll, vcpu_load, wakeup};
use crate::output::{Output, Row, monotonic_ns, warn};
use crate::procfs::VmNames;
use crate::summary::Interval;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Monitors to run.
    pub monitors: Vec<Monitor>,
    /// Shared options.
    pub common: MonitorArgs,
    /// Dirty-page options.
    pub dirty: DirtyArgs,
}

/// The last line of a run (`"monitor": "summary"`).
#[derive(Debug, Serialize)]
struct Summary {
    time_ns: u64,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<String>,
    vcpu_id: Option<u32>,
    events: std::collections::BTreeMap<&'static str, u64>,
    lost: std::collections::BTreeMap<&'static str, u64>,
    backend: std::collections::BTreeMap<&'static str, &'static str>,
    /// Records whose thread ran no vCPU (vcpu_id null), per monitor.
    unknown_vcpu: std::collections::BTreeMap<&'static str, u64>,
    /// Dirty pages not counted because `--max-pages` was reached.
    dirty_map_full: u64,
    /// Pages in the per-page counts at exit.
    dirty_distinct_pages: u64,
}

impl Row for Summary {
    fn monitor(&self) -> &'static str {
        "summary"
    }
    fn header(&self) -> String {
        String::new()
    }
    fn row(&self, _clock: &crate::output::Clock) -> String {
        let parts: Vec<String> = self
            .backend
            .iter()
            .map(|(m, b)| {
                format!(
                    "{m}: {} events, {} lost, backend {b}",
                    self.events.get(m).copied().unwrap_or(0),
                    self.lost.get(m).copied().unwrap_or(0)
                )
            })
            .collect();
        format!("# summary: {}", parts.join("; "))
    }
}

/// Per-CPU counters summed over CPUs, indexed by monitor kind.
pub fn read_counters(map: &MapHandle) -> [types::monitor_counters; 4] {
    let mut out = [types::monitor_counters::default(); 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let key = (i as u32).to_ne_bytes();
        if let Ok(Some(per_cpu)) = map.lookup_percpu(&key, MapFlags::ANY) {
            for v in per_cpu {
                if let Some(c) = read_record::<types::monitor_counters>(&v) {
                    slot.events += c.events;
                    slot.lost += c.lost;
                    slot.map_full += c.map_full;
                    slot.unknown_vcpu += c.unknown_vcpu;
                }
            }
        }
    }
    out
}

/// What to load: monitors, filters and modes.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Monitors to run.
    pub monitors: Vec<Monitor>,
    /// VMM pids to watch (empty: all).
    pub pids: Vec<u32>,
    /// Only this thread.
    pub tid: Option<u32>,
    /// Only this vCPU id.
    pub vcpu: Option<u32>,
    /// Forced backend (one monitor only).
    pub backend: Option<String>,
    /// Ring buffer size, KiB.
    pub ringbuf_kib: u32,
    /// Capacity of the per-page dirty counts.
    pub max_pages: u32,
    /// Stream one record per event (wakeup, halt_poll, dirty).
    pub stream: bool,
    /// Keep per-thread wake-up and halt-poll aggregates in the kernel.
    pub aggregate: bool,
    /// Track distinct dirty pages per interval (needs BPF cmpxchg, 5.12+).
    pub interval_distinct: bool,
}

/// A loaded BPF object with its programs attached. Dropping it detaches
/// everything; `links` can also be dropped first to stop new events.
pub struct Attached<'obj> {
    /// The skeleton: maps and programs.
    pub skel: KvmWatcherSkel<'obj>,
    /// One link per attached program.
    pub links: Vec<Link>,
    /// The backend chosen for each monitor.
    pub choices: Vec<Choice>,
    /// Distinct dirty pages are tracked per interval (asked for, and the kernel can).
    pub interval_distinct: bool,
}

/// Picks backends, loads the programs they need configured for `cfg`, and
/// attaches them. On any error everything loaded so far is released.
pub fn attach<'obj>(
    cfg: &LoadConfig,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> anyhow::Result<Attached<'obj>> {
    if cfg.backend.is_some() && cfg.monitors.len() != 1 {
        crate::usage_bail!(
            "--backend applies to one monitor; run the monitors separately to force backends"
        );
    }
    let version = crate::procfs::kernel_version();
    let interval_distinct = cfg.interval_distinct && version >= (5, 12);
    if cfg.interval_distinct && !interval_distinct {
        warn(&format!(
            "distinct dirty pages per interval need BPF cmpxchg (Linux 5.12+), this kernel is {}.{}: summaries show writes only",
            version.0, version.1
        ));
    }
    let mut prober = Prober::new();
    let mut choices: Vec<Choice> = Vec::new();
    for &m in &cfg.monitors {
        choices.push(backend::choose(m, cfg.backend.as_deref(), &mut prober)?);
    }
    let programs: Vec<&str> = choices
        .iter()
        .flat_map(|c| c.programs.iter().copied())
        .collect();
    hooks::quiet_libbpf();

    let has = |m: Monitor| cfg.monitors.contains(&m);
    let wakeup_agg = cfg.aggregate && has(Monitor::Wakeup);
    let halt_poll_agg = cfg.aggregate && has(Monitor::HaltPoll);
    let dirty = has(Monitor::Dirty);
    let mut open = KvmWatcherSkelBuilder::default()
        .open(storage)
        .context("cannot open the BPF object")?;
    {
        let ro = open
            .maps
            .rodata_data
            .as_deref_mut()
            .context("BPF object has no .rodata")?;
        ro.filter_pids = !cfg.pids.is_empty();
        ro.filter_tid = cfg.tid.unwrap_or(0);
        ro.filter_vcpu = cfg.vcpu.map_or(-1, |v| v as i32);
        ro.stream_wakeup = cfg.stream && has(Monitor::Wakeup);
        ro.stream_halt_poll = cfg.stream && has(Monitor::HaltPoll);
        ro.stream_dirty = cfg.stream && has(Monitor::Dirty);
        ro.aggregate_wakeup = wakeup_agg;
        ro.aggregate_halt_poll = halt_poll_agg;
        ro.count_dirty = dirty;
        ro.dirty_summary = interval_distinct && dirty;
        ro.mark_dirty_has_kvm = version >= (5, 16);
        ro.load_from_ioctls = choices.iter().any(|c| c.backend.load_from_ioctls);
    }
    open.maps
        .events
        .set_max_entries(cfg.ringbuf_kib * 1024)
        .context("cannot size the ring buffer")?;
    // Maps of monitors that are not running still get created: make them
    // tiny (the page map's bucket array alone is 64 MiB at its default size).
    open.maps
        .dirty_counts
        .set_max_entries(if dirty { cfg.max_pages } else { 1 })
        .context("cannot size the dirty-page map")?;
    for (map, used) in [
        (&mut open.maps.dirty_slot_stats, dirty),
        (&mut open.maps.pending_dirty_gfn, dirty),
        (&mut open.maps.dirty_epoch_pages, dirty && interval_distinct),
        (&mut open.maps.wakeup_stats, wakeup_agg),
        (&mut open.maps.halt_poll_stats, halt_poll_agg),
        (&mut open.maps.vcpu_cpu_ns, has(Monitor::VcpuLoad)),
    ] {
        if !used {
            map.set_max_entries(1).context("cannot size the BPF maps")?;
        }
    }
    for mut prog in open.open_object_mut().progs_mut() {
        let wanted = prog.name().to_str().is_some_and(|n| programs.contains(&n));
        prog.set_autoload(wanted);
    }
    let skel = open
        .load()
        .map_err(|e| anyhow::anyhow!("cannot load the BPF programs: {e}"))?;
    for &pid in &cfg.pids {
        skel.maps
            .allowed_pids
            .update(&pid.to_ne_bytes(), &[1u8], MapFlags::ANY)
            .context("cannot set the pid filter")?;
    }
    let mut links: Vec<Link> = Vec::new();
    {
        use libbpf_rs::skel::Skel;
        for prog in skel.object().progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            if !programs.contains(&name.as_str()) {
                continue;
            }
            links.push(
                prog.attach()
                    .map_err(|e| anyhow::anyhow!("cannot attach {name}: {e}"))?,
            );
        }
    }
    Ok(Attached {
        skel,
        links,
        choices,
        interval_distinct,
    })
}

/// The pids named by `--pid` and `--vm`, checked to be VMMs.
pub fn resolve_pids(pids: &[u32], vms: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for &pid in pids {
        crate::procfs::check_vmm_pid(pid)?;
        out.push(pid);
    }
    for name in vms {
        out.extend(crate::procfs::pids_of_vm(name)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Installs handlers for the signals that end a watch (SIGINT, SIGTERM, and
/// SIGHUP and SIGQUIT, e.g. a closed terminal) that set the returned flag, so
/// every one of them ends it cleanly: detached, drained, counts file written.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handler")?;
    }
    Ok(stop)
}

/// Runs `plan` until it ends. Returns an error only for failures; signals,
/// the duration and the VMs exiting are normal ends.
pub fn run(plan: Plan) -> anyhow::Result<()> {
    let common = &plan.common;
    let pids = resolve_pids(&common.pids, &common.vms)?;
    if let Some(path) = &plan.dirty.counts_file {
        dirty::check_counts_path(path)?;
    }
    let summary_mode = common.summary;
    let want_dirty = plan.monitors.contains(&Monitor::Dirty);
    let want_load = plan.monitors.contains(&Monitor::VcpuLoad);
    let stop = stop_flag()?;
    let cfg = LoadConfig {
        monitors: plan.monitors.clone(),
        pids: pids.clone(),
        tid: common.tid,
        vcpu: common.vcpu,
        backend: common.backend.clone(),
        ringbuf_kib: common.ringbuf_size,
        max_pages: plan.dirty.max_pages,
        stream: !summary_mode,
        aggregate: summary_mode,
        interval_distinct: summary_mode && want_dirty,
    };
    let mut storage = MaybeUninit::uninit();
    let Attached {
        mut skel,
        links,
        choices,
        interval_distinct,
    } = attach(&cfg, &mut storage)?;

    let attached: Vec<String> = choices
        .iter()
        .map(|c| format!("{} ({} backend)", c.monitor.name(), c.backend.name))
        .collect();
    eprintln!(
        "kvm-watcher: watching {}; Ctrl-C to stop",
        attached.join(", ")
    );

    let output = Rc::new(RefCell::new(Output::new(common.output, common.time)));
    let names = Rc::new(RefCell::new(VmNames::default()));
    // A busy ring buffer must not starve ticks, signals and the duration:
    // after this instant the callback stops a poll (the record it was given is
    // consumed), and the loop comes back to its timers.
    let poll_budget = Rc::new(std::cell::Cell::new(Instant::now()));
    let mut ring = RingBufferBuilder::new();
    {
        let output = Rc::clone(&output);
        let names = Rc::clone(&names);
        let poll_budget = Rc::clone(&poll_budget);
        ring.add(&skel.maps.events, move |data: &[u8]| {
            crate::monitors::write_record(data, &mut output.borrow_mut(), &mut names.borrow_mut());
            if Instant::now() >= poll_budget.get() {
                return -libc::EAGAIN;
            }
            0
        })
        .context("cannot read the ring buffer")?;
    }
    let ring = ring.build().context("cannot read the ring buffer")?;

    for c in &choices {
        if c.monitor == Monitor::Dirty && c.backend.name == "tracepoint" {
            // Said once; per-VM warnings follow when a VM without a dirty ring is seen.
            eprintln!(
                "kvm-watcher: dirty pages come from kvm:kvm_dirty_ring_push (tracepoint backend): only VMs with a dirty ring are visible"
            );
        }
    }

    let threads = MapHandle::try_from(&skel.maps.vcpu_threads)?;
    let cpu_ns = MapHandle::try_from(&skel.maps.vcpu_cpu_ns)?;
    let counters = MapHandle::try_from(&skel.maps.counters)?;
    let dirty_counts = MapHandle::try_from(&skel.maps.dirty_counts)?;
    let slot_stats = MapHandle::try_from(&skel.maps.dirty_slot_stats)?;
    let epoch_pages = MapHandle::try_from(&skel.maps.dirty_epoch_pages)?;
    let wakeup_stats = MapHandle::try_from(&skel.maps.wakeup_stats)?;
    let halt_poll_stats = MapHandle::try_from(&skel.maps.halt_poll_stats)?;

    let interval = Duration::from_secs_f64(common.interval);
    let start = Instant::now();
    let deadline = common.duration.map(|d| start + Duration::from_secs_f64(d));
    let mut next_tick = start + interval;
    let mut last_tick_ns = monotonic_ns();
    let counts_every = plan.dirty.counts_every.map(Duration::from_secs_f64);
    let mut next_counts = counts_every.map(|d| start + d);
    let mut loads = vcpu_load::LoadTracker::default();
    let mut slots = dirty::SlotSummary::new(interval_distinct);
    // Starts at 1 like the kernel's: zeroed per-interval slots never look current.
    let mut epoch: u32 = 1;
    let mut bitmap_warned: Vec<u32> = Vec::new();
    let mut next_prune = start + Duration::from_secs(5);
    let mut next_bitmap_check = start;
    let dirty_tracepoint = choices
        .iter()
        .any(|c| c.monitor == Monitor::Dirty && c.backend.name == "tracepoint");
    let mut wakeups = wakeup::WakeupTracker::default();
    let mut polls = halt_poll::HaltPollTracker::default();
    let (mut exited_wakeups, mut exited_polls) =
        (ExitedThreads::default(), ExitedThreads::default());
    let periodic = want_load || summary_mode;

    // Closes the current interval and prints its periodic tables.
    let mut tick = |skel: &mut crate::bpf::KvmWatcherSkel,
                    last_tick_ns: &mut u64,
                    epoch: &mut u32|
     -> anyhow::Result<()> {
        let now_ns = monotonic_ns();
        let interval_ns = now_ns.saturating_sub(*last_tick_ns);
        *last_tick_ns = now_ns;
        let ended = *epoch;
        *epoch += 1;
        if let Some(data) = skel.maps.data_data.as_deref_mut() {
            // SAFETY: this is the mmapped .data of the loaded object; a
            // volatile store makes the new interval visible to the programs at once.
            unsafe { std::ptr::write_volatile(&mut data.epoch, *epoch) };
        }
        let mut out = output.borrow_mut();
        let mut names = names.borrow_mut();
        if summary_mode {
            let has = |m: Monitor| plan.monitors.contains(&m);
            let interval = Interval {
                time_ns: now_ns,
                interval_ns,
                wakeup: if has(Monitor::Wakeup) {
                    Some(wakeups.tick(wakeup::read_totals(&wakeup_stats)?))
                } else {
                    None
                },
                halt_poll: if has(Monitor::HaltPoll) {
                    let totals = halt_poll::read_totals(&halt_poll_stats)?;
                    let windows = totals.iter().map(|t| (t.tid, t.window_ns)).collect();
                    Some((polls.tick(totals), windows))
                } else {
                    None
                },
                load: if want_load {
                    Some(loads.tick(&threads, &cpu_ns, ended, now_ns, interval_ns)?)
                } else {
                    None
                },
                dirty: if want_dirty {
                    Some(slots.tick(&slot_stats, &epoch_pages, ended, now_ns, interval_ns)?)
                } else {
                    None
                },
            };
            interval.write(&mut out, &mut names);
            // Their last figures are reported: forget threads that exited.
            exited_wakeups.sweep(&wakeup_stats);
            exited_polls.sweep(&halt_poll_stats);
        } else if want_load {
            let mut rows = loads.tick(&threads, &cpu_ns, ended, now_ns, interval_ns)?;
            for r in &mut rows {
                r.vm = names.get(r.pid);
            }
            let title = format!(
                "\n{}  vcpu-load, interval {:.3} s",
                out.clock().format(now_ns),
                interval_ns as f64 / 1e9
            );
            out.text(&title);
            if rows.is_empty() {
                out.text("(no vCPU was loaded)");
            } else if let Some(first) = rows.first() {
                out.text(&first.header());
            }
            for r in &rows {
                if out.format() == OutputFormat::Table {
                    let line = r.row(out.clock());
                    out.text(&line);
                } else {
                    out.record(r);
                }
            }
        }
        out.flush();
        Ok(())
    };

    let write_counts = |path: &PathBuf| -> anyhow::Result<()> {
        let counts = dirty::read_counts(&dirty_counts)?;
        dirty::write_counts_file(path, &counts)
    };

    let mut result: anyhow::Result<()> = Ok(());
    loop {
        if stop.load(Ordering::Relaxed) || output.borrow().closed {
            break;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if !pids.is_empty()
            && pids
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            break; // every watched VM has exited
        }
        let mut wake = now + Duration::from_millis(200);
        if periodic {
            wake = wake.min(next_tick);
        }
        if let Some(d) = deadline {
            wake = wake.min(d);
        }
        if let Some(n) = next_counts {
            wake = wake.min(n);
        }
        poll_budget.set(now + Duration::from_millis(50).min(wake.saturating_duration_since(now)));
        if let Err(e) = ring.poll(wake.saturating_duration_since(now))
            && !matches!(
                e.kind(),
                libbpf_rs::ErrorKind::Interrupted | libbpf_rs::ErrorKind::WouldBlock
            )
        {
            result = Err(anyhow::anyhow!("cannot read the ring buffer: {e}"));
            break;
        }
        // The programs wake us at most every 10 ms (see submit_event()), and a
        // poll that times out reads nothing: take what arrived without a
        // wake-up, so no record waits longer than one poll timeout.
        poll_budget.set(Instant::now() + Duration::from_millis(50));
        if let Err(e) = ring.consume()
            && !matches!(
                e.kind(),
                libbpf_rs::ErrorKind::Interrupted | libbpf_rs::ErrorKind::WouldBlock
            )
        {
            result = Err(anyhow::anyhow!("cannot read the ring buffer: {e}"));
            break;
        }
        output.borrow_mut().flush();
        let now = Instant::now();
        if periodic && now >= next_tick {
            if let Err(e) = tick(&mut skel, &mut last_tick_ns, &mut epoch) {
                result = Err(e);
                break;
            }
            // Fixed schedule: no drift from the time ticks take.
            while next_tick <= now {
                next_tick += interval;
            }
        }
        if let (Some(n), Some(every), Some(path)) =
            (next_counts, counts_every, &plan.dirty.counts_file)
            && now >= n
        {
            if let Err(e) = write_counts(path) {
                result = Err(e);
                break;
            }
            next_counts = Some(n + every);
        }
        let pruning = !want_load && now >= next_prune;
        if dirty_tracepoint && (now >= next_bitmap_check || pruning) {
            // A scan of the thread table: once a second is soon enough to warn,
            // and always before exited threads are forgotten.
            warn_bitmap_vms(&threads, &mut bitmap_warned);
            next_bitmap_check = now + Duration::from_secs(1);
        }
        if pruning {
            // vcpu-load reports exited threads once more before deleting them;
            // without it, nothing else needs their entries.
            forget_exited_vcpu_threads(&threads);
            next_prune = now + Duration::from_secs(5);
        }
    }

    // Detach first, so the drained records, the counts file and the summary
    // all describe the same set of events; then drain and close the interval.
    drop(links);
    if dirty_tracepoint {
        // A VM seen since the last scan still deserves its warning.
        warn_bitmap_vms(&threads, &mut bitmap_warned);
    }
    // Nothing new arrives now: drain everything, without a budget.
    poll_budget.set(Instant::now() + Duration::from_secs(24 * 3600));
    let _ = ring.consume();
    if periodic && result.is_ok() {
        result = tick(&mut skel, &mut last_tick_ns, &mut epoch);
    }
    if let Some(path) = &plan.dirty.counts_file {
        let written = write_counts(path);
        if result.is_ok() {
            result = written;
        } else if let Err(e) = written {
            warn(&format!("{e:#}"));
        }
    }

    let totals = read_counters(&counters);
    let mut summary = Summary {
        time_ns: monotonic_ns(),
        pid: None,
        tid: None,
        comm: None,
        vcpu_id: None,
        events: Default::default(),
        lost: Default::default(),
        backend: Default::default(),
        unknown_vcpu: Default::default(),
        dirty_map_full: totals[Monitor::Dirty.kind() as usize].map_full,
        dirty_distinct_pages: if want_dirty {
            dirty_counts.keys().count() as u64
        } else {
            0
        },
    };
    for c in &choices {
        let t = &totals[c.monitor.kind() as usize];
        summary.events.insert(c.monitor.name(), t.events);
        summary.lost.insert(c.monitor.name(), t.lost);
        summary
            .unknown_vcpu
            .insert(c.monitor.name(), t.unknown_vcpu);
        summary.backend.insert(c.monitor.name(), c.backend.name);
        if t.lost > 0 {
            warn(&format!(
                "{} {} events lost because the ring buffer was full; raise --ringbuf-size{}",
                t.lost,
                c.monitor.name(),
                if c.monitor == Monitor::Dirty {
                    " or use --summary (per-page counts are complete)"
                } else {
                    ""
                }
            ));
        }
    }
    if summary.dirty_map_full > 0 {
        warn(&format!(
            "{} dirty-page writes were not counted per page because --max-pages ({}) was reached; raise it",
            summary.dirty_map_full, plan.dirty.max_pages
        ));
    }
    {
        let mut out = output.borrow_mut();
        out.record(&summary);
        out.flush();
        if let Some(e) = out.take_failure()
            && result.is_ok()
        {
            result = Err(anyhow::anyhow!(
                "cannot write the output ({e}); records after that point were not written"
            ));
        }
    }
    drop(ring);
    result
}

/// Forgets the entries of a tid-keyed aggregate map once their thread has
/// exited and its last figures were read: a thread found gone after one
/// reading is deleted after the next one, which has everything it did.
#[derive(Default)]
struct ExitedThreads {
    gone: Vec<Vec<u8>>,
}

impl ExitedThreads {
    /// Call right after reading `map`.
    fn sweep(&mut self, map: &MapHandle) {
        for k in self.gone.drain(..) {
            let _ = map.delete(&k);
        }
        self.gone = map
            .keys()
            .filter(|k| {
                read_record::<u32>(k)
                    // /proc/TID exists for every live thread, listed or not.
                    .is_some_and(|tid| !std::path::Path::new(&format!("/proc/{tid}")).exists())
            })
            .collect();
    }
}

/// Deletes vcpu_threads entries of threads the kernel saw exit.
fn forget_exited_vcpu_threads(threads: &MapHandle) {
    let gone: Vec<Vec<u8>> = threads
        .keys()
        .filter(|k| {
            threads
                .lookup(k, MapFlags::ANY)
                .ok()
                .flatten()
                .and_then(|v| read_record::<types::vcpu_thread>(&v))
                .is_some_and(|t| t.exited != 0)
        })
        .collect();
    for k in gone {
        let _ = threads.delete(&k);
    }
}

/// Warns once per VM that logs dirty pages with the bitmap while only the
/// dirty-ring tracepoint is available.
fn warn_bitmap_vms(threads: &MapHandle, warned: &mut Vec<u32>) {
    for k in threads.keys() {
        let Ok(Some(v)) = threads.lookup(&k, MapFlags::ANY) else {
            continue;
        };
        let Some(t) = read_record::<types::vcpu_thread>(&v) else {
            continue;
        };
        if t.dirty_ring_size == 0 && !warned.contains(&t.pid) {
            warned.push(t.pid);
            warn(&format!(
                "VM pid {} has no dirty ring: dirty pages it logs with the bitmap (e.g. during migration) are invisible to the tracepoint backend, which is all this kernel allows (see `kvm-watcher doctor`)",
                t.pid
            ));
        }
    }
}
