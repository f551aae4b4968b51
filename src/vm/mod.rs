//! `kvm-watcher vm`: a synthetic KVM guest used by the demo and the tests as ground truth.
//!
//! No image: [`guest`] writes a few hundred bytes of 32-bit machine code into guest
//! memory. Each vCPU runs in its own thread named like QEMU's (`CPU <n>/KVM`), loops
//! over "write my pages, then HLT until the next LAPIC timer interrupt", and counts
//! in guest memory what it did; the host reads those counters, KVM's binary stats
//! and the dirty log at the end and prints them (`--json`, see [`report`]).
//!
//! A [`SyntheticVm`] goes through three steps, one file each: [`SyntheticVm::build`]
//! (`build.rs`: the VM, its memslots (`memory.rs`), the guest code, the vCPUs),
//! [`SyntheticVm::run`] (`run.rs`: the vCPU threads of `vcpu.rs` and what the main
//! thread does meanwhile), [`SyntheticVm::stop`] (`stop.rs`: stopping the vCPUs, the
//! last dirty-log collection, the report). [`run()`] does all three for the command.

mod build;
mod dirty;
pub mod guest;
mod memory;
pub mod report;
mod run;
mod stats;
mod stop;
mod vcpu;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use guest::{DataLayout, PAGE};
use memory::GuestMemory;
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
    /// Instead of `halt_hz`: each vCPU halts for these durations in ns, in a
    /// cycle, each ended by a one-shot LAPIC timer armed right before the HLT
    /// (at most [`VmConfig::MAX_HALT_PATTERN`] entries); empty: none.
    pub halt_pattern: Vec<u32>,
    /// This VM's halt-polling window in ns (KVM_CAP_HALT_POLL); `None`: the host's.
    pub halt_poll_ns: Option<u32>,
    /// Pages each vCPU writes per pass (all vCPUs' pages fit in
    /// [`VmConfig::usable_pages`]).
    pub dirty_pages: u64,
    /// Sweep: each pass writes only this many of the `dirty_pages` pages, the
    /// next ones each pass, starting over at the end (a divisor of `dirty_pages`).
    pub sweep: Option<u64>,
    /// Every write stores what the page already holds (0) instead of the pass number.
    pub same_content: bool,
    /// Dirty logging on the data slots.
    pub dirty_log: DirtyLog,
    /// Entries in each vCPU's dirty ring with [`DirtyLog::Ring`]: a power of two, at least 16.
    pub dirty_ring_entries: u32,
    /// Guest time after which data slots 1 and 2 trade places (needs `slots >= 2`
    /// and dirty logging).
    pub swap_slots_at: Option<Duration>,
    /// `OUT`s to [`guest::IO_EXIT_PORT`] per pass, each an exit to the VMM.
    pub io_exits: u32,
    /// Writes to [`guest::MMIO_EXIT_GPA`] per pass, each an exit to the VMM.
    pub mmio_exits: u32,
    /// `IN`s from [`guest::IO_IN_PORT`] per pass (after the writes), each an
    /// exit to the VMM.
    pub io_in: u32,
    /// Those writes go to consecutive 4-byte words from [`guest::MMIO_EXIT_GPA`]
    /// (one address each) instead of all to it.
    pub mmio_spread: bool,
    /// Print the ready line on stderr and run no guest instruction before SIGUSR1.
    pub wait_for_signal: bool,
    /// After the run, keep the vCPU threads asleep until SIGUSR1, SIGINT or SIGTERM.
    pub linger: bool,
    /// Print the report as one JSON document instead of text.
    pub json: bool,
    /// Note the guest's page writes so far this often while it runs (the
    /// report's `timeline`); `None`: not at all.
    pub timeline: Option<Duration>,
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
    /// Most entries in `halt_pattern`.
    pub const MAX_HALT_PATTERN: usize = guest::MAX_HALT_PATTERN;

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

/// One synthetic VM through its life: [`SyntheticVm::build`] creates it (nothing
/// runs yet), [`SyntheticVm::run`] runs the guest, [`SyntheticVm::stop`] stops every
/// vCPU and returns the report. Dropping it stops vCPU threads that still run, then
/// releases the vCPUs, the VM and its memory, in that order.
pub struct SyntheticVm {
    config: VmConfig,
    /// The vCPU threads, in index order, from `run` until `stop` joins them.
    threads: Vec<VcpuThread>,
    /// The vCPU fds, until `run` hands each to its thread.
    vcpus: Vec<VcpuFd>,
    /// Thread id and name (`/proc/.../comm`) of each vCPU thread, from `run` on.
    tids: Vec<u32>,
    comms: Vec<String>,
    /// What happened while the guest ran, from `run` until `stop`.
    outcome: Option<run::Outcome>,
    shared: Arc<Shared>,
    vcpu_stats: Vec<Option<StatsFd>>,
    vm_stats: Option<StatsFd>,
    vm: VmFd,
    memory: GuestMemory,
    /// /dev/kvm, open as long as the VM.
    _kvm: Kvm,
}

impl SyntheticVm {
    /// KVM vCPU id of vCPU index `i`.
    fn vcpu_id(&self, i: usize) -> u32 {
        self.config.first_vcpu_id + i as u32
    }
}

/// `kvm-watcher vm`: builds the VM, runs the guest, stops it and prints the report.
pub fn run(config: &VmConfig) -> Result<()> {
    let mut vm = SyntheticVm::build(config)?;
    vm.run()?;
    let report = vm.stop()?;
    stop::print_report(&report, config.json)
}
