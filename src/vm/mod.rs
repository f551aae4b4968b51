//! `kvm-watcher vm`: a synthetic KVM guest used by the demo and the tests as ground truth.
//!
//! No image: [`guest`] writes a few hundred bytes of 32-bit machine code into guest
//! memory. Each vCPU runs in its own thread named like QEMU's (`CPU <n>/KVM`), loops
//! over "write my pages, then HLT until the next LAPIC timer interrupt", and counts
//! in guest memory what it did; the host reads those counters, KVM's binary stats
//! and the dirty log at the end and prints them (`--json`, see [`report`]).

pub mod args;
mod dirty;
pub mod guest;
mod memory;
pub mod report;
mod stats;
mod vcpu;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_HALT_POLL, KVM_MAX_CPUID_ENTRIES, kvm_enable_cap,
    kvm_pit_config,
};
use kvm_ioctls::{Cap, Kvm};

use crate::usage_bail;
use dirty::{ByGfn, Collected, LoggedSlot, Ring, RingSet};
use guest::{DataLayout, PAGE};
use memory::GuestMemory;
use report::{SlotSwap, Stats, VcpuReport, VmReport};
use stats::StatsFd;
use vcpu::{Shared, VcpuThread};

/// How the VM collects dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLog {
    /// No dirty logging (pages are still written if `dirty_pages` is not 0).
    #[default]
    Off,
    /// KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG every 100 ms and at the end.
    Bitmap,
    /// KVM_CAP_DIRTY_LOG_RING: per-vCPU rings harvested every 20 ms, on
    /// KVM_EXIT_DIRTY_RING_FULL and at the end (Linux 5.11+).
    Ring,
}

impl DirtyLog {
    fn name(self) -> &'static str {
        match self {
            DirtyLog::Off => "off",
            DirtyLog::Bitmap => "bitmap",
            DirtyLog::Ring => "ring",
        }
    }
}

/// The synthetic VM to build and run: what `kvm-watcher vm`'s options say, checked.
///
/// The values are taken as given, in the ranges the command line checks (the
/// `MAX_*` constants here); only what depends on this host's KVM is checked when
/// the VM is built. Guest layout and the exact pages written: see [`guest`].
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`VmConfig::MAX_VCPUS`]), each in its own thread
    /// named `CPU <n>/KVM` (n = 0..N-1).
    pub vcpus: u32,
    /// KVM vCPU id of the first vCPU; the others get the following ids.
    pub first_vcpu_id: u32,
    /// Guest run time; `None`: until every vCPU has done `passes` passes, or a
    /// signal stops the VM.
    pub run_for: Option<Duration>,
    /// Guest RAM for the data slots, in MiB (1..=[`VmConfig::MAX_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Number of data memslots the guest RAM is split into
    /// (1..=[`VmConfig::MAX_SLOTS`], at most one per page).
    pub slots: u32,
    /// Each vCPU stops by itself after this many passes (one pass = write the
    /// pages, then halt if `halt_hz`).
    pub passes: Option<u32>,
    /// Each vCPU's periodic LAPIC timer rate in Hz (1..=[`VmConfig::MAX_HALT_HZ`]),
    /// with HLT between interrupts; `None`: the vCPUs never halt.
    pub halt_hz: Option<u32>,
    /// This VM's halt-polling window in ns (KVM_CAP_HALT_POLL); `None`: the host's.
    pub halt_poll_ns: Option<u32>,
    /// Pages each vCPU writes per pass (all vCPUs' pages fit in
    /// [`VmConfig::usable_pages`]).
    pub dirty_pages: u64,
    /// Dirty logging on the data slots.
    pub dirty_log: DirtyLog,
    /// Entries in each vCPU's dirty ring with [`DirtyLog::Ring`]: a power of two, at least 16.
    pub dirty_ring_entries: u32,
    /// Guest time after which data slots 1 and 2 trade places (needs `slots >= 2`
    /// and dirty logging).
    pub swap_slots_at: Option<Duration>,
    /// Print the ready line on stderr and run no guest instruction before SIGUSR1.
    pub wait_for_signal: bool,
    /// Print the report as one JSON document instead of text.
    pub json: bool,
}

impl VmConfig {
    /// Most vCPUs the guest code has room for.
    pub const MAX_VCPUS: u32 = guest::MAX_VCPUS;
    /// Most guest RAM for the data slots, in MiB (up to the LAPIC/IOAPIC hole).
    pub const MAX_MEMORY_MIB: u64 = (guest::DATA_LIMIT - guest::DATA_BASE) >> 20;
    /// Most data memslots.
    pub const MAX_SLOTS: u32 = 256;
    /// Highest `halt_hz` (KVM's minimum periodic LAPIC timer period is 200 us).
    pub const MAX_HALT_HZ: u32 = guest::MAX_HALT_HZ;

    /// Pages (4 KiB) of guest RAM in all data slots.
    pub fn data_pages(&self) -> u64 {
        (self.memory_mib << 20) / PAGE
    }

    /// Pages the vCPUs can write: the same number in every data slot.
    pub fn usable_pages(&self) -> u64 {
        self.data_layout().pages_per_slot * self.slots as u64
    }

    fn data_layout(&self) -> DataLayout {
        let total_pages = self.data_pages();
        DataLayout {
            slots: self.slots,
            pages_per_slot: total_pages / self.slots as u64,
            total_pages,
        }
    }
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: plain libc sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Waits up to `timeout` for one of `set`; returns the signal or None on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<libc::c_int> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as _,
        tv_nsec: t.subsec_nanos() as _,
    });
    // SAFETY: valid set and timespec pointers.
    let r = unsafe {
        match &ts {
            Some(ts) => libc::sigtimedwait(set, std::ptr::null_mut(), ts),
            None => libc::sigwaitinfo(set, std::ptr::null_mut()),
        }
    };
    if r > 0 { Some(r) } else { None }
}

fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::EACCES | libc::EPERM => "; run as root or add yourself to the kvm group",
            libc::ENOENT | libc::ENODEV | libc::ENXIO => {
                "; is KVM enabled (modprobe kvm_intel or kvm_amd, or a host with nested virtualization)?"
            }
            _ => "",
        };
        anyhow!("cannot open /dev/kvm: {}{hint}", std::io::Error::from_raw_os_error(e.errno()))
    })
}

/// Runs the synthetic guest.
pub fn run(config: &VmConfig) -> Result<()> {
    let data = config.data_layout();
    let n = config.vcpus;
    let npages = config.dirty_pages;
    let kvm = open_kvm()?;

    let max_vcpus = kvm.get_max_vcpus() as u32;
    if n > max_vcpus {
        usage_bail!("--vcpus {n} is more than this KVM supports ({max_vcpus})");
    }
    let max_id = kvm.get_max_vcpu_id() as u64;
    if config.first_vcpu_id as u64 + n as u64 > max_id {
        usage_bail!(
            "vCPU ids {}..{} exceed this KVM's KVM_CAP_MAX_VCPU_ID ({max_id})",
            config.first_vcpu_id,
            config.first_vcpu_id as u64 + n as u64 - 1
        );
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            bail!("this KVM lacks {name}, which the synthetic guest needs");
        }
    }
    let nr_slots = kvm.get_nr_memslots() as u32;
    if config.slots + 1 > nr_slots {
        usage_bail!(
            "--slots {} plus the code slot exceed this KVM's {nr_slots} memslots",
            config.slots
        );
    }
    let have_stats = kvm.check_extension_raw(stats::KVM_CAP_BINARY_STATS_FD) > 0;
    if !have_stats {
        eprintln!(
            "kvm-watcher vm: this kernel has no KVM_GET_STATS_FD (Linux < 5.14): stats and vm_stats will be null"
        );
    }
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;

    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    if vm.check_extension(Cap::SetTssAddr) {
        // Only used by VMX for real mode emulation; harmless elsewhere.
        let _ = vm.set_tss_address(0xfffb_d000);
    }
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    // A PIT makes the VM look like a normal PC to KVM; the guest does not use it.
    if vm.check_extension(Cap::Pit2) {
        vm.create_pit2(kvm_pit_config::default())
            .context("KVM_CREATE_PIT2")?;
    }
    if let Some(ns) = config.halt_poll_ns {
        if vm.check_extension_raw(KVM_CAP_HALT_POLL as _) <= 0 {
            bail!("--halt-poll-ns needs KVM_CAP_HALT_POLL (Linux 5.12+), which this kernel lacks");
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_HALT_POLL,
            ..Default::default()
        };
        cap.args[0] = ns.into();
        vm.enable_cap(&cap)
            .context("KVM_ENABLE_CAP(KVM_CAP_HALT_POLL)")?;
    }

    let mut memory = GuestMemory::new(&vm, config, &data)?;
    {
        // SAFETY: the system region is ours and no vCPU runs yet.
        let sys_mem = unsafe { std::slice::from_raw_parts_mut(memory.sys.ptr, memory.sys.len) };
        let timer_count = config
            .halt_hz
            .map(|hz| (1_000_000_000 / guest::LAPIC_NS_PER_TICK / hz as u64) as u32)
            .unwrap_or(0);
        let max_passes = config.passes.unwrap_or(0);
        // Ring mode: yield to KVM well within the ring's 64 reserved entries (see YIELD_PORT).
        let yield_every = if config.dirty_log == DirtyLog::Ring {
            16
        } else {
            0
        };
        guest::write_image(
            sys_mem,
            n,
            npages,
            timer_count,
            max_passes,
            yield_every,
            &data,
        );
    }

    if config.dirty_log == DirtyLog::Ring {
        let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING as _);
        if max <= 0 {
            bail!(
                "--dirty-log ring needs KVM_CAP_DIRTY_LOG_RING (Linux 5.11+), which this kernel lacks; use --dirty-log bitmap"
            );
        }
        let bytes = config.dirty_ring_entries as u64 * 16;
        if bytes > max as u64 {
            usage_bail!(
                "--dirty-ring-entries {} is more than this KVM allows ({})",
                config.dirty_ring_entries,
                max / 16
            );
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING,
            ..Default::default()
        };
        cap.args[0] = bytes;
        vm.enable_cap(&cap)
            .context("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)")?;
    }

    // vCPUs.
    let mut vcpus = Vec::new();
    let mut rings = Vec::new();
    let mut vcpu_stats = Vec::new();
    for i in 0..n {
        let id = config.first_vcpu_id + i;
        let vcpu = vm
            .create_vcpu(id as u64)
            .with_context(|| format!("KVM_CREATE_VCPU({id})"))?;
        guest::setup_vcpu(&vcpu, &supported_cpuid, i, id)
            .with_context(|| format!("setting up vCPU {id}"))?;
        if config.dirty_log == DirtyLog::Ring {
            rings.push(Ring::map(&vcpu, config.dirty_ring_entries)?);
        }
        vcpu_stats.push(if have_stats {
            Some(StatsFd::open(&vcpu)?)
        } else {
            None
        });
        vcpus.push(vcpu);
    }
    let vm_stats_fd = if have_stats {
        Some(StatsFd::open(&vm)?)
    } else {
        None
    };

    let rings = if rings.is_empty() {
        None
    } else {
        Some(RingSet {
            vm_fd: std::os::fd::AsRawFd::as_raw_fd(&vm),
            rings,
        })
    };
    let mut collected = Collected::default();
    if config.swap_slots_at.is_some() {
        collected.by_gfn = Some(ByGfn {
            bases: memory
                .memslots
                .iter()
                .map(|m| (m.slot, m.base_gfn))
                .collect(),
            ..Default::default()
        });
    }
    let shared = Arc::new(Shared::new(rings, collected));

    // Signals: SIGUSR1/SIGINT/SIGTERM are taken synchronously by this thread (the vCPU
    // threads inherit the mask); SIGUSR2 interrupts KVM_RUN in a vCPU thread.
    let main_set = sigset(&[libc::SIGUSR1, libc::SIGINT, libc::SIGTERM]);
    // SAFETY: blocking signals in this thread.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &main_set, std::ptr::null_mut()) } != 0 {
        bail!("pthread_sigmask failed");
    }
    vcpu::install_kick_handler()?;

    let (tid_tx, tid_rx) = mpsc::channel();
    let mut threads = Vec::new();
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        threads.push(VcpuThread::spawn(
            i as u32,
            vcpu,
            shared.clone(),
            tid_tx.clone(),
        )?);
    }
    drop(tid_tx);
    let mut tids = vec![0u32; n as usize];
    for _ in 0..n {
        let (i, tid) = tid_rx
            .recv()
            .context("a vCPU thread died before starting")?;
        tids[i as usize] = tid;
    }
    let comms: Vec<String> = tids
        .iter()
        .enumerate()
        .map(|(i, tid)| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| format!("CPU {i}/KVM"))
        })
        .collect();
    let pid = std::process::id();
    let vcpu_ids: Vec<u32> = (0..n).map(|i| config.first_vcpu_id + i).collect();

    let mut aborted = false;
    if config.wait_for_signal {
        let join = |v: &[u32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "kvm-watcher vm: ready pid={pid} tids={} vcpu_ids={}",
            join(&tids),
            join(&vcpu_ids)
        );
        let _ = err.flush();
        drop(err);
        loop {
            match wait_signal(&main_set, None) {
                Some(libc::SIGUSR1) => break,
                Some(_) => {
                    aborted = true;
                    break;
                }
                None => continue,
            }
        }
    }

    let started = Instant::now();
    shared.start(!aborted);
    let limit = config.run_for;
    let tick = if config.dirty_log == DirtyLog::Ring {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(100)
    };
    let collect = |shared: &Shared, logged: &[LoggedSlot]| -> Result<()> {
        match config.dirty_log {
            DirtyLog::Off => Ok(()),
            DirtyLog::Bitmap => {
                dirty::collect_bitmaps(&vm, logged, &mut shared.collected.lock().unwrap())
            }
            DirtyLog::Ring => {
                let mut rings = shared.rings.lock().unwrap();
                rings
                    .as_mut()
                    .unwrap()
                    .collect(&mut shared.collected.lock().unwrap())
                    .map(|_| ())
            }
        }
    };
    let mut next_collect = started + tick;
    let mut collect_err = None;
    let mut swap_at = config.swap_slots_at.map(|t| started + t);
    let mut swapped = None;
    if !aborted {
        loop {
            if shared.finished() == n || shared.failed() {
                break;
            }
            let now = Instant::now();
            if let Some(l) = limit
                && now >= started + l
            {
                break;
            }
            if swap_at.is_some_and(|t| now >= t) {
                swap_at = None;
                let paused_at = now.saturating_duration_since(started).as_secs_f64();
                let done = pause_vcpus(&shared, &threads, n).and_then(|()| {
                    collect(&shared, &memory.logged)?;
                    swapped = Some((paused_at, memory.memslots.clone()));
                    memory.swap_slots(&vm)?;
                    if let Some(b) = &mut shared.collected.lock().unwrap().by_gfn {
                        b.bases = memory
                            .memslots
                            .iter()
                            .map(|m| (m.slot, m.base_gfn))
                            .collect();
                    }
                    Ok(())
                });
                shared.resume();
                if let Err(e) = done {
                    collect_err = Some(e);
                    break;
                }
                continue;
            }
            if now >= next_collect {
                if let Err(e) = collect(&shared, &memory.logged) {
                    collect_err = Some(e);
                    break;
                }
                next_collect += tick;
                continue;
            }
            let mut wait = next_collect - now;
            if let Some(l) = limit {
                wait = wait.min(started + l - now);
            }
            if let Some(t) = swap_at {
                wait = wait.min(t.saturating_duration_since(now));
            }
            // Check `finished` at least every 10 ms.
            if let Some(sig) = wait_signal(&main_set, Some(wait.min(Duration::from_millis(10))))
                && sig != libc::SIGUSR1
            {
                break; // SIGINT / SIGTERM: stop early, still report
            }
        }
    }

    // Stop: raise the guest's stop flag; a halted vCPU sees it at its next timer
    // interrupt (so its last HLT still ends with an interrupt). Whoever is still in
    // KVM_RUN after 100 ms + 2 timer periods (at most 250 ms) is kicked (signal +
    // immediate_exit) and reported with exit "kick".
    memory.sys.write_u32(guest::CTRL_STOP, 1);
    let grace = Duration::from_millis(100)
        + config
            .halt_hz
            .map(|hz| Duration::from_secs_f64(2.0 / hz as f64))
            .unwrap_or_default();
    let grace_end = Instant::now() + grace.min(Duration::from_millis(250));
    while shared.finished() < n && Instant::now() < grace_end {
        std::thread::sleep(Duration::from_millis(2));
    }
    if shared.finished() < n {
        shared.kick();
        for t in &threads {
            t.interrupt();
        }
    }
    let mut ends = Vec::new();
    for t in threads {
        ends.push(t.join()?);
    }
    let ended = ends.iter().map(|e| e.ended).max().unwrap_or(started);
    let seconds = if aborted {
        0.0
    } else {
        ended.saturating_duration_since(started).as_secs_f64()
    };
    let mut exits = Vec::new();
    for (i, e) in ends.iter_mut().enumerate() {
        let r = std::mem::replace(&mut e.result, Ok(""));
        exits.push(r.with_context(|| format!("vCPU {i} (id {})", vcpu_ids[i]))?);
    }
    if let Some(e) = collect_err {
        return Err(e);
    }
    collect(&shared, &memory.logged)?; // final collection, all vCPUs stopped
    let collected = std::mem::take(&mut *shared.collected.lock().unwrap());
    let mut collected = collected;
    collected.ring_full_exits = shared.ring_full.load(Ordering::SeqCst);
    let dirty = collected.report(config.dirty_log.name(), &memory.logged);

    let read_stats =
        |s: &Option<StatsFd>| -> Result<Option<Stats>> { s.as_ref().map(|s| s.read()).transpose() };
    let mut vcpu_reports = Vec::new();
    for i in 0..n as usize {
        let area = guest::AREAS + guest::AREA_SIZE * i as u64;
        vcpu_reports.push(VcpuReport {
            index: i as u32,
            vcpu_id: vcpu_ids[i],
            tid: tids[i],
            comm: comms[i].clone(),
            interrupts: memory.sys.read_u64(area + guest::AREA_INTERRUPTS),
            halts: memory.sys.read_u64(area + guest::AREA_HALTS),
            passes: memory.sys.read_u64(area + guest::AREA_PASSES),
            pages_written: memory.sys.read_u64(area + guest::AREA_PAGES_WRITTEN),
            exit: exits[i].to_string(),
            stats: read_stats(&vcpu_stats[i])
                .with_context(|| format!("reading the stats of vCPU {i}"))?,
        });
    }
    let report = VmReport {
        pid,
        seconds,
        vcpus: vcpu_reports,
        memslots: match &swapped {
            Some((_, created)) => created.clone(),
            None => memory.memslots.clone(),
        },
        swapped: swapped.map(|(at_seconds, _)| SlotSwap {
            at_seconds,
            memslots: memory.memslots.clone(),
        }),
        dirty,
        vm_stats: read_stats(&vm_stats_fd).context("reading the VM stats")?,
    };
    drop(ends); // vCPU fds (and their kvm_run mappings) go now
    print_report(&report, config.json)?;
    drop(vm);
    drop(memory);
    Ok(())
}

fn print_report(r: &VmReport, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r).context("writing the JSON report")?;
        writeln!(out)?;
    } else {
        writeln!(out, "pid {}: guest ran {:.3} s", r.pid, r.seconds)?;
        for v in &r.vcpus {
            writeln!(
                out,
                "vCPU {} (id {}, tid {}, {}): {} interrupts, {} halts, {} passes, {} page writes, stopped by {}",
                v.index,
                v.vcpu_id,
                v.tid,
                v.comm,
                v.interrupts,
                v.halts,
                v.passes,
                v.pages_written,
                v.exit
            )?;
        }
        for m in &r.memslots {
            writeln!(
                out,
                "slot {} ({}): gfn {:#x}..{:#x} ({} pages) at {:#x}, flags {}",
                m.slot,
                m.role,
                m.base_gfn,
                m.base_gfn + m.npages,
                m.npages,
                m.userspace_addr,
                m.flags
            )?;
        }
        if r.dirty.mode != "off" {
            writeln!(
                out,
                "dirty ({}): {} distinct pages, {} harvested in {} collections",
                r.dirty.mode, r.dirty.distinct_pages, r.dirty.harvested, r.dirty.collections
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Takes every running vCPU out of KVM_RUN and waits until each is paused or
/// has finished.
fn pause_vcpus(shared: &Shared, threads: &[VcpuThread], n: u32) -> Result<()> {
    shared.pause();
    for t in threads {
        t.interrupt();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.paused_or_finished() < n {
        if Instant::now() > deadline {
            bail!("the vCPUs did not leave KVM_RUN within 5 s for --swap-slots-at");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
