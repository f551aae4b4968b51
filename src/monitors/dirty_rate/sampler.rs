//! The sampler: a thread that, for every VM and window length, picks pages
//! at random across the VM's RAM memslots, hashes them, hashes them again
//! one window later and counts the pages whose content changed. Rounds of a
//! window start every max(window, 1 s), each with new random pages, so no two
//! estimates share a sample. Memslots are read from KVM (the memslot
//! iterator) before a round starts and again when it ends: samples of a slot
//! that was deleted, moved or resized in between are dropped and the window
//! says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::rand::{GetRandomFlags, getrandom};

use super::estimate::sample_count;
use super::pages::{PageState, Reader, access_error, changed, zero_hash};
use super::slots::{KernelSlots, Slot, SlotSource, ram_of};

/// How often the VMs and their memslots are looked for between rounds.
const LIST_EVERY: Duration = Duration::from_secs(1);
/// Rounds of a window start at most this often.
const MIN_PERIOD: Duration = Duration::from_secs(1);

/// What the sampler is asked to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// Only these VMM pids (empty: every VM on the host).
    pub pids: Vec<u32>,
    /// Window lengths, each measured on its own samples.
    pub windows: Vec<Duration>,
    /// Sampled pages per GiB of RAM.
    pub per_gib: u64,
    /// Most bytes of guest memory read per second per VM.
    pub max_bytes_per_s: u64,
}

impl Config {
    /// Rounds started per second, all windows together.
    fn rounds_per_s(&self) -> f64 {
        self.windows
            .iter()
            .map(|w| 1.0 / period(*w).as_secs_f64())
            .sum()
    }
}

fn period(window: Duration) -> Duration {
    window.max(MIN_PERIOD)
}

/// One slot's samples in one window.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotCount {
    /// The slot, as it was during the whole window.
    pub slot: Slot,
    /// Pages compared at both ends.
    pub compared: u64,
    /// Of those, pages whose content changed.
    pub changed: u64,
    /// Pages read at the start that held something other than zeros.
    pub nonzero: u64,
}

/// One finished window of one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// The VMM process.
    pub pid: u32,
    /// The window asked for.
    pub window: Duration,
    /// Between the two readings, seconds (the rate uses this).
    pub elapsed_s: f64,
    /// When it ended.
    pub ended: Instant,
    /// The same, CLOCK_MONOTONIC ns (as the TIME column).
    pub ended_ns: u64,
    /// Per RAM slot that lasted the whole window.
    pub slots: Vec<SlotCount>,
    /// Samples of slots that changed during the window, not compared.
    pub dropped: u64,
    /// Samples that could not be read (swapped out, unmapped), not compared.
    pub unknown: u64,
    /// Samples were fewer than asked for because of the read cap.
    pub capped: bool,
}

/// What the thread hands over.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    windows: Mutex<Vec<Window>>,
    /// One line per problem (a VMM whose memory cannot be read, ...), each once.
    notes: Mutex<Vec<String>>,
    bytes_read: AtomicU64,
}

/// The sampling thread; dropping it stops it.
pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling with the memslots KVM holds; returns once the
    /// memslot iterator is loaded, or with the reason it cannot be.
    pub fn start(config: Config) -> anyhow::Result<Sampler> {
        let shared = Arc::new(Shared::default());
        let (loaded, is_loaded) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let mut storage = [
                        std::mem::MaybeUninit::uninit(),
                        std::mem::MaybeUninit::uninit(),
                    ];
                    match KernelSlots::load(&mut storage) {
                        Ok(mut source) => {
                            let _ = loaded.send(Ok(()));
                            Rounds::new(config, &mut source, shared).run();
                        }
                        Err(e) => {
                            let _ = loaded.send(Err(e));
                        }
                    }
                }
            })?;
        let mut sampler = Sampler {
            shared,
            thread: Some(thread),
        };
        match is_loaded.recv() {
            Ok(Ok(())) => Ok(sampler),
            Ok(Err(e)) => {
                sampler.join();
                Err(e.context("the dirty-rate sampler cannot read memslots"))
            }
            Err(_) => {
                sampler.join();
                anyhow::bail!("the dirty-rate sampler stopped while starting")
            }
        }
    }

    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }

    /// The windows finished since the last call.
    pub fn take(&self) -> Vec<Window> {
        std::mem::take(
            &mut *self
                .shared
                .windows
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Problems met since the last call, one line each.
    pub fn notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.shared.notes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes of guest memory read so far, all VMs.
    pub fn bytes_read(&self) -> u64 {
        self.shared.bytes_read.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.join();
    }
}

/// A VM being sampled.
struct Vm {
    reader: Reader,
    ram: Vec<Slot>,
    /// Next start per window (index into `Config::windows`).
    next: Vec<Instant>,
}

/// A round waiting for its window to end.
struct Round {
    pid: u32,
    window: usize,
    slots: Vec<Slot>,
    /// (slot index, host address) per sample.
    picks: Vec<(usize, u64)>,
    first: Vec<PageState>,
    read_at: Instant,
    capped: bool,
}

struct Rounds<'s> {
    config: Config,
    source: &'s mut dyn SlotSource,
    shared: Arc<Shared>,
    vms: HashMap<u32, Vm>,
    pending: Vec<Round>,
    listed: Option<Instant>,
    /// Notes given, each with the VMM pid it is about (None: about no VM),
    /// so each is said once and those of VMs that are gone are forgotten.
    warned: std::collections::HashSet<(Option<u32>, String)>,
    zero: u64,
}

impl<'s> Rounds<'s> {
    fn new(config: Config, source: &'s mut dyn SlotSource, shared: Arc<Shared>) -> Rounds<'s> {
        Rounds {
            config,
            source,
            shared,
            vms: HashMap::new(),
            pending: Vec::new(),
            listed: None,
            warned: Default::default(),
            zero: zero_hash(),
        }
    }

    fn note(&mut self, pid: Option<u32>, line: String) {
        if self.warned.insert((pid, line.clone())) {
            let mut notes = self.shared.notes.lock().unwrap_or_else(|e| e.into_inner());
            notes.push(line);
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Second readings first, on time; then the memslots they are
            // checked against (read after them, so a change in between is seen).
            let ended = self.read_due(now);
            if !ended.is_empty() || self.listed.is_none_or(|t| now >= t + LIST_EVERY) {
                self.list(now);
            }
            self.finish(ended);
            self.start_due(Instant::now());
            let wake = self.next_wake(now);
            std::thread::park_timeout(wake.saturating_duration_since(Instant::now()));
        }
    }

    fn ends(&self, r: &Round) -> Instant {
        r.read_at + self.config.windows[r.window]
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = self.listed.map_or(now, |t| t + LIST_EVERY);
        for r in &self.pending {
            wake = wake.min(self.ends(r));
        }
        for vm in self.vms.values() {
            for t in &vm.next {
                wake = wake.min(*t);
            }
        }
        wake.max(now)
    }

    /// Reads the VMs and their memslots; new VMs start now, gone ones are forgotten.
    fn list(&mut self, now: Instant) {
        self.listed = Some(now);
        let pids = (!self.config.pids.is_empty()).then_some(self.config.pids.as_slice());
        let listing = match self.source.list(pids) {
            Ok(l) => l,
            Err(e) => {
                self.note(None, format!("cannot read the VMs' memslots: {e:#}"));
                return;
            }
        };
        let seen: std::collections::HashSet<u32> = listing.iter().map(|(p, _)| *p).collect();
        self.vms.retain(|pid, _| seen.contains(pid));
        self.pending.retain(|r| seen.contains(&r.pid));
        self.warned
            .retain(|(pid, _)| pid.is_none_or(|p| seen.contains(&p)));
        for (pid, slots) in listing {
            let ram = ram_of(&slots);
            if let Some(vm) = self.vms.get_mut(&pid) {
                vm.ram = ram;
                continue;
            }
            match Reader::open(pid) {
                Ok(reader) => {
                    let next = vec![now; self.config.windows.len()];
                    self.vms.insert(pid, Vm { reader, ram, next });
                }
                Err(e) => self.note(Some(pid), access_error(pid, &e)),
            }
        }
    }

    fn start_due(&mut self, now: Instant) {
        let rounds_per_s = self.config.rounds_per_s();
        let mut started = Vec::new();
        for (&pid, vm) in self.vms.iter_mut() {
            for w in 0..self.config.windows.len() {
                if vm.next[w] > now {
                    continue;
                }
                let p = period(self.config.windows[w]);
                vm.next[w] = (vm.next[w] + p).max(now);
                let population: u64 = vm.ram.iter().map(|s| s.npages).sum();
                let (n, capped) = sample_count(
                    population,
                    self.config.per_gib,
                    rounds_per_s,
                    self.config.max_bytes_per_s,
                );
                if n == 0 {
                    continue;
                }
                let picks = pick(&vm.ram, n);
                let addrs: Vec<u64> = picks.iter().map(|p| p.1).collect();
                let before = vm.reader.bytes_read;
                let first = vm.reader.read(&addrs);
                let read = vm.reader.bytes_read - before;
                self.shared.bytes_read.fetch_add(read, Ordering::Relaxed);
                started.push(Round {
                    pid,
                    window: w,
                    slots: vm.ram.clone(),
                    picks,
                    first,
                    read_at: Instant::now(),
                    capped,
                });
            }
        }
        self.pending.extend(started);
    }

    /// The rounds whose window has ended, with their second reading.
    fn read_due(&mut self, now: Instant) -> Vec<(Round, Vec<PageState>, f64)> {
        let (due, waiting): (Vec<Round>, Vec<Round>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| self.ends(r) <= now);
        self.pending = waiting;
        let mut out = Vec::new();
        for round in due {
            let Some(vm) = self.vms.get_mut(&round.pid) else {
                continue;
            };
            let addrs: Vec<u64> = round.picks.iter().map(|p| p.1).collect();
            let before = vm.reader.bytes_read;
            let second = vm.reader.read(&addrs);
            let elapsed_s = round.read_at.elapsed().as_secs_f64();
            self.shared
                .bytes_read
                .fetch_add(vm.reader.bytes_read - before, Ordering::Relaxed);
            out.push((round, second, elapsed_s));
        }
        out
    }

    /// Counts the ended rounds against the memslots as they are now.
    fn finish(&mut self, ended: Vec<(Round, Vec<PageState>, f64)>) {
        for (round, second, elapsed_s) in ended {
            // A VM gone since: its last window is not reported.
            let Some(vm) = self.vms.get(&round.pid) else {
                continue;
            };
            let window = count(&round, &second, &vm.ram, self.zero, elapsed_s);
            if window.dropped > 0 {
                self.note(
                    Some(round.pid),
                    format!(
                        "pid {}: memslots changed during a window; the samples of the slots that changed were dropped",
                        round.pid
                    ),
                );
            }
            self.shared
                .windows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Window {
                    window: self.config.windows[round.window],
                    ..window
                });
        }
    }
}

/// `n` random pages across `ram` (uniform over all its pages): (slot index, host address).
fn pick(ram: &[Slot], n: u64) -> Vec<(usize, u64)> {
    let total: u64 = ram.iter().map(|s| s.npages).sum();
    let mut random = vec![0u8; 8 * n as usize];
    let mut filled = 0;
    while filled < random.len() {
        match getrandom(&mut random[filled..], GetRandomFlags::empty()) {
            Ok(k) => filled += k,
            Err(_) => break,
        }
    }
    random
        .chunks_exact(8)
        .map(|c| {
            let mut page = u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) % total;
            let mut slot = 0;
            while page >= ram[slot].npages {
                page -= ram[slot].npages;
                slot += 1;
            }
            (slot, ram[slot].userspace_addr + page * super::pages::PAGE)
        })
        .collect()
}

/// Compares a round's two readings, per slot; samples of slots that are not
/// in `now` as they were at the start are dropped.
fn count(round: &Round, second: &[PageState], now: &[Slot], zero: u64, elapsed_s: f64) -> Window {
    let mut slots: Vec<SlotCount> = round
        .slots
        .iter()
        .map(|s| SlotCount {
            slot: s.clone(),
            compared: 0,
            changed: 0,
            nonzero: 0,
        })
        .collect();
    let lasted: Vec<bool> = round.slots.iter().map(|s| now.contains(s)).collect();
    let (mut dropped, mut unknown) = (0, 0);
    for (k, &(slot, _)) in round.picks.iter().enumerate() {
        if !lasted[slot] {
            dropped += 1;
            continue;
        }
        let c = &mut slots[slot];
        if round.first[k].is_zero(zero) == Some(false) {
            c.nonzero += 1;
        }
        match changed(round.first[k], second[k], zero) {
            Some(ch) => {
                c.compared += 1;
                c.changed += u64::from(ch);
            }
            None => unknown += 1,
        }
    }
    let slots = slots
        .into_iter()
        .zip(lasted)
        .filter_map(|(c, l)| l.then_some(c))
        .collect();
    Window {
        pid: round.pid,
        window: Duration::ZERO,
        elapsed_s,
        ended: Instant::now(),
        ended_ns: crate::output::monotonic_ns(),
        slots,
        dropped,
        unknown,
        capped: round.capped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u16, npages: u64, ua: u64) -> Slot {
        Slot {
            as_id: 0,
            id,
            base_gfn: id as u64 * 0x1000,
            npages,
            userspace_addr: ua,
            logging: false,
            readonly: false,
        }
    }

    #[test]
    fn picks_cover_every_slot_in_proportion_and_stay_inside() {
        let ram = vec![slot(0, 1000, 0x10_0000_0000), slot(1, 3000, 0x20_0000_0000)];
        let picks = pick(&ram, 4000);
        let in_first = picks.iter().filter(|p| p.0 == 0).count();
        // 1/4 of 4000 = 1000, within 5 standard deviations (sqrt(750) = 27).
        assert!((865..=1135).contains(&in_first), "{in_first}");
        for (s, addr) in picks {
            let r = &ram[s];
            assert!(addr >= r.userspace_addr && addr < r.userspace_addr + r.npages * 4096);
            assert_eq!(addr % 4096, 0);
        }
    }

    /// VMs as a test says, one listing after another.
    struct Listings(Vec<Vec<(u32, Vec<Slot>)>>);

    impl SlotSource for Listings {
        fn list(&mut self, _pids: Option<&[u32]>) -> anyhow::Result<Vec<(u32, Vec<Slot>)>> {
            Ok(if self.0.is_empty() {
                Vec::new()
            } else {
                self.0.remove(0)
            })
        }
    }

    #[test]
    fn notes_are_said_once_and_forgotten_with_their_vm() {
        // A pid that cannot be opened (none is this high): one note, once,
        // however often it is listed; gone from the listing, its note goes.
        let gone = u32::MAX - 7;
        let vm = vec![(gone, vec![slot(1, 10, 0x1000_0000)])];
        let mut source = Listings(vec![vm.clone(), vm, Vec::new()]);
        let config = Config {
            pids: Vec::new(),
            windows: vec![Duration::from_secs(1)],
            per_gib: 512,
            max_bytes_per_s: 1 << 20,
        };
        let shared = Arc::new(Shared::default());
        let mut rounds = Rounds::new(config, &mut source, shared.clone());
        let t = Instant::now();
        rounds.list(t);
        rounds.list(t);
        assert_eq!(shared.notes.lock().unwrap().len(), 1);
        assert_eq!(rounds.warned.len(), 1);
        rounds.list(t);
        assert!(rounds.warned.is_empty(), "{:?}", rounds.warned);
        assert!(rounds.vms.is_empty());
    }

    #[test]
    fn a_slot_that_changed_drops_its_samples() {
        let ram = vec![slot(1, 10, 0x1000_0000), slot(2, 10, 0x2000_0000)];
        let round = Round {
            pid: 7,
            window: 0,
            slots: ram.clone(),
            picks: vec![(0, 0x1000_0000), (0, 0x1000_1000), (1, 0x2000_0000)],
            first: vec![
                PageState::Present(1),
                PageState::Absent,
                PageState::Present(5),
            ],
            read_at: Instant::now(),
            capped: false,
        };
        let zero = zero_hash();
        let second = [
            PageState::Present(2),
            PageState::Absent,
            PageState::Present(5),
        ];
        // Slot 2 moved to another host address meanwhile.
        let now = vec![ram[0].clone(), slot(2, 10, 0x3000_0000)];
        let w = count(&round, &second, &now, zero, 1.0);
        assert_eq!(w.dropped, 1);
        assert_eq!(w.slots.len(), 1);
        assert_eq!(
            (w.slots[0].compared, w.slots[0].changed, w.slots[0].nonzero),
            (2, 1, 1)
        );
        // Unchanged slots: everything compared.
        let w = count(&round, &second, &ram, zero, 1.0);
        assert_eq!((w.dropped, w.slots.len()), (0, 2));
        assert_eq!((w.slots[1].compared, w.slots[1].changed), (1, 0));
    }
}
