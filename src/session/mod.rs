//! A watch session: the monitors' programs attached, the ring buffer read,
//! intervals closed on a fixed schedule, until the duration ends, a signal
//! arrives or the watched VMs exit. A [`Session`] is a value with a
//! lifecycle: [`Session::start`], [`Session::run`] (which ticks and
//! drains), [`Session::finish`]; dropping it detaches everything, so every
//! way out (an error halfway included) leaves nothing attached.

mod report;
pub mod vcpu_filter;

use crate::engine::{Attached, EngineConfig};
pub use crate::engine::{Choice, Targets, Unavailable, resolve_pids, stop_flag};
pub use crate::monitors::Filter;

use std::cell::{Cell, RefCell};
use std::mem::MaybeUninit;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use libbpf_rs::{MapHandle, RingBuffer, RingBufferBuilder};

use crate::monitors::{Mode, Monitor, Options, Start, Tick, Watching, threads};
use crate::output::{Output, OutputFormat, TimeFormat, monotonic_ns, warn};
use crate::procfs::VmNames;
pub use crate::summary::Interval;
use vcpu_filter::VcpuChoice;

/// What to watch and how to show it.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Monitors to run, in the order their figures are reported.
    pub monitors: Vec<&'static dyn Monitor>,
    /// VMM pids (`--pid`).
    pub pids: Vec<u32>,
    /// VM names (`--vm`).
    pub vms: Vec<String>,
    /// Follow the VMs named in `vms` across exits and restarts (`--follow`)
    /// instead of ending once every watched VM has exited.
    pub follow: bool,
    /// Only this thread.
    pub tid: Option<u32>,
    /// Only this vCPU: KVM's id, or the VMM's number that [`run`] turns into it.
    pub vcpu: Option<VcpuChoice>,
    /// Stop after this many seconds.
    pub duration: Option<f64>,
    /// Seconds between periodic reports.
    pub interval: f64,
    /// Output format.
    pub output: OutputFormat,
    /// Clock of the TIME column.
    pub time: TimeFormat,
    /// Backends the user forced.
    pub backend: crate::engine::Forced,
    /// Ring buffer size, KiB.
    pub ringbuf_kib: u32,
    /// Aggregate in the kernel and print interval summaries instead of rows.
    pub summary: bool,
    /// The monitors' own options.
    pub options: Options,
    /// Leave out the monitors this kernel cannot run ([`Session::unavailable`]
    /// says why) instead of failing.
    pub partial: bool,
    /// Say on stderr what is watched once it is attached.
    pub announce: bool,
}

/// Runs a watch until it ends. Returns an error only for failures; signals,
/// the duration and the VMs exiting are normal ends.
pub fn run(cfg: &WatchConfig) -> anyhow::Result<()> {
    let pids = resolve_pids(&cfg.pids, &cfg.vms)?;
    if let Some(tid) = cfg.tid {
        crate::procfs::check_vcpu_tid(tid, &pids)?;
    }
    let vcpu = cfg.vcpu.map(|c| kvm_vcpu(c, &pids)).transpose()?;
    let cfg = &WatchConfig {
        vcpu: vcpu.map(VcpuChoice::Kvm),
        ..cfg.clone()
    };
    for m in &cfg.monitors {
        m.check(&cfg.options)?;
    }
    let stop = stop_flag()?;
    let mut storage = MaybeUninit::uninit();
    let mut session = Session::start(cfg, pids, &mut storage)?;
    let ended = session.run(&stop);
    session.finish(ended)
}

/// KVM's id of the vCPU `choice` names among the VMs of `pids` (empty: all),
/// or a usage error when none has it. A thread of the VMM that is not inside
/// `KVM_RUN` yet (a VM starting or resuming) is given a second to get there.
fn kvm_vcpu(choice: VcpuChoice, pids: &[u32]) -> anyhow::Result<u32> {
    let watched = || {
        let mut vms = crate::procfs::list_vms();
        vms.retain(|v| pids.is_empty() || pids.contains(&v.pid));
        vms
    };
    let n = match choice {
        VcpuChoice::Kvm(id) => {
            if let Some(why) = vcpu_filter::refusal(id, &watched()) {
                crate::usage_bail!("{why}");
            }
            return Ok(id);
        }
        VcpuChoice::Vmm(n) => n,
    };
    let mut tries = 10;
    loop {
        match vcpu_filter::vmm_to_kvm(n, &watched()) {
            Ok(id) => return Ok(id),
            Err(vcpu_filter::Unresolved::NotRunning(_)) if tries > 0 => {
                tries -= 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(
                vcpu_filter::Unresolved::NotRunning(why) | vcpu_filter::Unresolved::Refused(why),
            ) => {
                crate::usage_bail!("{why}")
            }
        }
    }
}

/// Where records go, shared with the ring-buffer callback.
struct Sink {
    out: Output,
    names: VmNames,
}

/// The fixed schedule of a session.
struct Schedule {
    interval: Duration,
    deadline: Option<Instant>,
    next_tick: Instant,
    last_tick_ns: u64,
    /// The current interval's number; starts at 1 like the kernel's, so
    /// zeroed per-interval slots never look current.
    epoch: u32,
    next_prune: Instant,
    /// When to look for VMs whose names are not known yet.
    next_names: Instant,
    /// When to forget the names of VMs that are gone.
    next_names_prune: Instant,
}

/// A running watch.
pub struct Session<'obj> {
    attached: Attached<'obj>,
    ring: RingBuffer<'static>,
    sink: Rc<RefCell<Sink>>,
    /// A busy ring buffer must not starve ticks, signals and the duration:
    /// after this instant the callback stops a poll (the record it was given
    /// is consumed), and the loop comes back to its timers.
    poll_budget: Rc<Cell<Instant>>,
    /// Each running monitor's user-space half, in the order of `choices`.
    watching: Vec<Box<dyn Watching>>,
    threads: MapHandle,
    counters: MapHandle,
    summary: bool,
    /// Something reports every interval.
    periodic: bool,
    /// Whether each monitor reports every interval in the rows mode, in
    /// the order of `watching`.
    rows_every_interval: Vec<bool>,
    /// When each monitor next wants its poll, if sooner than the timers.
    wakes: Vec<Option<Instant>>,
    /// Thread-table entries seen exited at the last prune: deleted at the
    /// next, so every monitor has read them at least once since.
    exited_threads: Vec<u32>,
    pids: Vec<u32>,
    /// With `--follow`: the VMs asked for, and when to look for them next.
    following: Option<(Targets, Instant)>,
    schedule: Schedule,
}

/// How often `--follow` looks for the VMs it follows.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// How long one poll of the ring buffer may go on consuming records.
const POLL_BUDGET: Duration = Duration::from_millis(50);

fn ring_error(e: libbpf_rs::Error) -> anyhow::Result<()> {
    match e.kind() {
        libbpf_rs::ErrorKind::Interrupted | libbpf_rs::ErrorKind::WouldBlock => Ok(()),
        _ => Err(anyhow::anyhow!("cannot read the ring buffer: {e}")),
    }
}

impl<'obj> Session<'obj> {
    /// Loads and attaches the monitors of `cfg` for VMM processes `pids`
    /// (empty: all) and starts their user-space halves.
    pub fn start(
        cfg: &WatchConfig,
        pids: Vec<u32>,
        storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    ) -> anyhow::Result<Self> {
        let mode = if cfg.summary {
            Mode::Summary
        } else {
            Mode::Rows
        };
        let load = EngineConfig {
            monitors: cfg.monitors.clone(),
            filter: Filter {
                pids: pids.clone(),
                tid: cfg.tid,
                vcpu: cfg.vcpu.and_then(VcpuChoice::kvm),
            },
            backend: cfg.backend.clone(),
            ringbuf_kib: cfg.ringbuf_kib,
            mode,
            options: cfg.options.clone(),
            spare_syscalls: false,
            partial: cfg.partial,
        };
        let attached = crate::engine::start(&load, storage)?;

        // Names are looked up while the VMs live: a VM that exits before
        // the first interval closes keeps the name it had.
        let mut names = VmNames::default();
        for &pid in &pids {
            names.get(pid);
        }
        let sink = Rc::new(RefCell::new(Sink {
            out: Output::new(cfg.output, cfg.time),
            names,
        }));
        let poll_budget = Rc::new(Cell::new(Instant::now()));
        let mut ring = RingBufferBuilder::new();
        {
            let sink = Rc::clone(&sink);
            let poll_budget = Rc::clone(&poll_budget);
            ring.add(&attached.skel.maps.events, move |data: &[u8]| {
                let Sink { out, names } = &mut *sink.borrow_mut();
                crate::monitors::write_record(data, out, names);
                if Instant::now() >= poll_budget.get() {
                    return -libc::EAGAIN;
                }
                0
            })
            .context("cannot read the ring buffer")?;
        }
        let ring = ring.build().context("cannot read the ring buffer")?;

        let interval = Duration::from_secs_f64(cfg.interval);
        let start = Instant::now();
        let mut watching = Vec::new();
        for c in &attached.choices {
            watching.push(c.monitor.watch(
                &attached.skel,
                &Start {
                    resolved: &c.resolved,
                    mode,
                    options: &cfg.options,
                    filter: &load.filter,
                    start,
                },
            )?);
        }
        let start_ns = monotonic_ns();
        let mut rows_every_interval = Vec::new();
        for w in &mut watching {
            rows_every_interval.push(w.begin(start_ns)?.rows_every_interval);
        }
        let periodic = cfg.summary || rows_every_interval.contains(&true);
        // Said once everything counts: what happens from here is in the
        // first interval.
        if cfg.announce {
            eprintln!(
                "kvm-watcher: watching {}; Ctrl-C to stop",
                attached.describe()
            );
        }
        let mut session = Session {
            threads: MapHandle::try_from(&attached.skel.maps.vcpu_threads)?,
            counters: MapHandle::try_from(&attached.skel.maps.counters)?,
            attached,
            ring,
            sink,
            poll_budget,
            watching,
            summary: cfg.summary,
            periodic,
            wakes: vec![None; rows_every_interval.len()],
            rows_every_interval,
            exited_threads: Vec::new(),
            pids,
            following: None,
            schedule: Schedule {
                interval,
                deadline: cfg.duration.map(|d| start + Duration::from_secs_f64(d)),
                next_tick: start + interval,
                last_tick_ns: start_ns,
                epoch: 1,
                next_prune: start + Duration::from_secs(5),
                next_names: start,
                next_names_prune: start,
            },
        };
        if cfg.follow {
            let targets = session.targets(cfg.vms.clone(), cfg.pids.clone())?;
            session.following = Some((targets, start + FOLLOW_EVERY));
        }
        Ok(session)
    }

    /// Reads the ring buffer and closes intervals until the session should
    /// end: `stop` set, the duration over, the output closed or every
    /// watched VM gone. An error is a failure that ended it early.
    pub fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        while !self.should_end(stop) {
            self.step()?;
            self.follow();
        }
        Ok(())
    }

    fn should_end(&self, stop: &AtomicBool) -> bool {
        stop.load(Ordering::Relaxed)
            || self.sink.borrow().out.closed
            || self.schedule.deadline.is_some_and(|d| Instant::now() >= d)
            || (self.following.is_none()
                && !self.pids.is_empty()
                && self.pids.iter().all(|p| !crate::procfs::process_alive(*p)))
    }

    /// With `--follow`, about once a second: a VM asked for by name that
    /// started again (a new pid) is let through the kernel's filter and
    /// named, and one that exited is taken out of it.
    fn follow(&mut self) {
        let Some((targets, next)) = &mut self.following else {
            return;
        };
        let now = Instant::now();
        if now < *next {
            return;
        }
        *next = now + FOLLOW_EVERY;
        for (pid, _) in targets.refresh() {
            self.sink.borrow_mut().names.get(pid);
            if !self.pids.contains(&pid) {
                self.pids.push(pid);
            }
        }
    }

    /// When the next timer is due (at most 200 ms away, so signals and
    /// the VMs' exits are seen soon).
    fn wake(&self) -> Instant {
        let s = &self.schedule;
        let mut wake = Instant::now() + Duration::from_millis(200);
        if self.periodic {
            wake = wake.min(s.next_tick);
        }
        for at in s
            .deadline
            .iter()
            .copied()
            .chain(self.wakes.iter().flatten().copied())
        {
            wake = wake.min(at);
        }
        wake
    }

    /// One pass: wait for records or the next timer, read what arrived, then
    /// run the timers that are due.
    fn step(&mut self) -> anyhow::Result<()> {
        self.pass(self.wake(), false).map(drop)
    }

    /// One pass for a caller that shows the intervals itself (`top`): waits
    /// at most `wait`, and returns the summary interval that closed, if one
    /// did, instead of writing it.
    pub fn next_interval(&mut self, wait: Duration) -> anyhow::Result<Option<Interval>> {
        let wake = self.wake().min(Instant::now() + wait);
        self.pass(wake, true)
    }

    /// Closes the current interval now and returns it (a summary session
    /// whose caller shows the intervals itself, e.g. at its end).
    pub fn close_interval(&mut self) -> anyhow::Result<Option<Interval>> {
        let _ = self.ring.consume();
        self.tick(true)
    }

    /// Waits for records until `wake`, reads them, runs the due timers; the
    /// interval that closed is returned if `keep`, written otherwise.
    fn pass(&mut self, wake: Instant, keep: bool) -> anyhow::Result<Option<Interval>> {
        let now = Instant::now();
        self.poll_budget
            .set(now + POLL_BUDGET.min(wake.saturating_duration_since(now)));
        if let Err(e) = self.ring.poll(wake.saturating_duration_since(now)) {
            ring_error(e)?;
        }
        // The programs wake us at most every 10 ms (see submit_event()), and
        // a poll that times out reads nothing: take what arrived without a
        // wake-up, so no record waits longer than one poll timeout.
        self.poll_budget.set(Instant::now() + POLL_BUDGET);
        if let Err(e) = self.ring.consume() {
            ring_error(e)?;
        }
        self.sink.borrow_mut().out.flush();
        self.learn_names();

        let now = Instant::now();
        let mut closed = None;
        let closed_now = self.periodic && now >= self.schedule.next_tick;
        if closed_now {
            closed = self.tick(keep)?;
            // Fixed schedule: no drift from the time ticks take.
            while self.schedule.next_tick <= now {
                self.schedule.next_tick += self.schedule.interval;
            }
        }
        // One prune clock for the session and every monitor: with
        // intervals, each interval's end (after the monitors read it).
        let pruning = match self.periodic {
            true => closed_now,
            false => now >= self.schedule.next_prune,
        };
        for (w, wake) in self.watching.iter_mut().zip(&mut self.wakes) {
            *wake = w.poll(now, pruning)?;
        }
        if pruning {
            // Exited threads' entries of the shared thread table go one
            // prune after they were seen exited: every monitor that reads
            // the table has had its last reading of them.
            for tid in std::mem::take(&mut self.exited_threads) {
                threads::forget(&self.threads, tid);
            }
            self.exited_threads = threads::exited(&self.threads);
            self.schedule.next_prune = now + Duration::from_secs(5);
        }
        if now >= self.schedule.next_names_prune {
            // A VM gone for two intervals had its last rows written.
            let keep = (self.schedule.interval * 2).max(Duration::from_secs(10));
            self.sink.borrow_mut().names.prune(keep);
            self.schedule.next_names_prune = now + Duration::from_secs(5);
        }
        Ok(closed)
    }

    /// Looks up the names of VMs whose vCPU threads appeared since the last
    /// step (each pid once), while they still run.
    fn learn_names(&mut self) {
        let now = Instant::now();
        if now < self.schedule.next_names {
            return;
        }
        self.schedule.next_names = now + Duration::from_millis(100);
        let Ok(entries) = threads::read_all(&self.threads) else {
            return;
        };
        let names = &mut self.sink.borrow_mut().names;
        for e in entries {
            names.get(e.thread.pid);
        }
    }

    /// Closes the current interval and writes its periodic reports; in
    /// summary mode returns the interval instead if `keep`.
    fn tick(&mut self, keep: bool) -> anyhow::Result<Option<Interval>> {
        let s = &mut self.schedule;
        let now_ns = monotonic_ns();
        let tick = Tick {
            ended: s.epoch,
            now_ns,
            interval_ns: now_ns.saturating_sub(s.last_tick_ns),
        };
        s.last_tick_ns = now_ns;
        s.epoch += 1;
        if let Some(data) = self.attached.skel.maps.data_data.as_deref_mut() {
            // SAFETY: this is the mmapped .data of the loaded object; a
            // volatile store makes the new interval visible to the programs at once.
            unsafe { std::ptr::write_volatile(&mut data.epoch, s.epoch) };
        }
        let sink = &mut *self.sink.borrow_mut();
        if self.summary {
            let mut parts = Vec::new();
            for (c, w) in self.attached.choices.iter().zip(&mut self.watching) {
                parts.push((c.monitor, w.interval(&tick)?));
            }
            let interval = Interval { tick, parts };
            if keep {
                return Ok(Some(interval));
            }
            interval.write(&mut sink.out, &mut sink.names);
        } else {
            for (w, every) in self.watching.iter_mut().zip(&self.rows_every_interval) {
                if *every {
                    w.interval_rows(&tick, &mut sink.out, &mut sink.names)?;
                }
            }
        }
        sink.out.flush();
        Ok(None)
    }

    /// When the current interval closes.
    pub fn next_tick(&self) -> Instant {
        self.schedule.next_tick
    }

    /// The VMs asked for by name (`vms`) and pid (`given`), followed
    /// across restarts from the pids this session started with.
    pub fn targets(&self, vms: Vec<String>, given: Vec<u32>) -> anyhow::Result<Targets> {
        Ok(Targets::new(
            vms,
            given,
            &self.pids,
            MapHandle::try_from(&self.attached.skel.maps.allowed_pids)?,
        ))
    }

    /// KVM's vCPU id of each vCPU thread the kernel saw run a vCPU since
    /// attach, by thread id (threads that exited left out).
    pub fn known_vcpu_ids(&self) -> std::collections::HashMap<u32, u32> {
        threads::read_all(&self.threads)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.thread.exited == 0 && e.thread.vcpu_id >= 0)
            .map(|e| (e.tid, e.thread.vcpu_id as u32))
            .collect()
    }

    /// The monitors running, with their backends.
    pub fn choices(&self) -> &[Choice] {
        &self.attached.choices
    }

    /// The monitors left out because this kernel cannot run them, and why
    /// (only with [`WatchConfig::partial`]).
    pub fn unavailable(&self) -> &[Unavailable] {
        &self.attached.unavailable
    }

    /// Events lost so far (ring buffer full), over every running monitor.
    pub fn lost(&self) -> u64 {
        let totals = crate::bpf::read_counters(&self.counters);
        self.attached
            .choices
            .iter()
            .filter_map(|c| totals.get(c.monitor.kind().0 as usize))
            .map(|t| t.lost)
            .sum()
    }

    /// Ends the session that `run` returned `ended` for: detaches first, so
    /// the drained records, the last interval, the monitors' final output
    /// and the summary all describe the same set of events; then writes the
    /// summary record.
    pub fn finish(mut self, ended: anyhow::Result<()>) -> anyhow::Result<()> {
        self.attached.links.clear();
        // Nothing new arrives now: drain everything, without a budget.
        self.poll_budget
            .set(Instant::now() + Duration::from_secs(24 * 3600));
        let _ = self.ring.consume();
        let mut result = ended;
        if self.periodic && result.is_ok() {
            result = self.tick(false).map(drop);
        }
        for w in &mut self.watching {
            let done = w.finish();
            if result.is_ok() {
                result = done;
            } else if let Err(e) = done {
                warn(&format!("{e:#}"));
            }
        }
        let summary = report::summary(&self.attached.choices, &self.watching, &self.counters);
        let out = &mut self.sink.borrow_mut().out;
        out.record(&summary);
        out.flush();
        if let Some(e) = out.take_failure()
            && result.is_ok()
        {
            result = Err(anyhow::anyhow!(
                "cannot write the output ({e}); records after that point were not written"
            ));
        }
        result
    }
}
