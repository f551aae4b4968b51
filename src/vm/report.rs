//! The ground-truth report `kvm-watcher vm --json` prints on stdout at exit.
//!
//! Public and `Deserialize` so integration tests (and the demo) can read it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One KVM binary statistic (from `KVM_GET_STATS_FD`): a single counter, or an
/// array of buckets for histograms (`*_hist`) and any stat with `size > 1`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum StatValue {
    /// A cumulative counter, instant value or peak (`size == 1`, not a histogram).
    Value(u64),
    /// Histogram buckets (log2 or linear) or any multi-valued statistic.
    Array(Vec<u64>),
}

impl StatValue {
    /// The value of a scalar stat, or the sum of the buckets of a histogram.
    pub fn total(&self) -> u64 {
        match self {
            StatValue::Value(v) => *v,
            StatValue::Array(a) => a.iter().sum(),
        }
    }
}

/// All statistics of one KVM stats fd, by name (e.g. `halt_exits`, `halt_wait_hist`).
pub type Stats = BTreeMap<String, StatValue>;

/// The whole report: one JSON document.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmReport {
    /// Process id of the `kvm-watcher vm` process (the VMM).
    pub pid: u32,
    /// Actual guest run time in seconds: from the start of the vCPUs (after SIGUSR1
    /// with `--wait-for-signal`) until the last vCPU thread left KVM_RUN for good.
    pub seconds: f64,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuReport>,
    /// Every memslot of the VM: the code/stack slot first, then the data slots
    /// (as created; with `--swap-slots-at`, until the swap).
    pub memslots: Vec<MemslotReport>,
    /// With `--swap-slots-at`: the memslots after the swap, and the guest time
    /// in seconds at which the vCPUs were paused for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swapped: Option<SlotSwap>,
    /// What KVM's dirty log reported.
    pub dirty: DirtyReport,
    /// KVM_GET_STATS_FD on the VM fd; `null` on kernels without binary stats (< 5.14).
    pub vm_stats: Option<Stats>,
    /// With `--timeline`: [CLOCK_MONOTONIC ns, page writes so far, all vCPUs]
    /// every so often while the guest ran, the last one as it stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<[u64; 2]>,
}

/// One vCPU.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VcpuReport {
    /// Index 0..N-1 (the `<n>` in the thread name `CPU <n>/KVM`).
    pub index: u32,
    /// KVM vCPU id (`--first-vcpu-id` + index); also its x2APIC id.
    pub vcpu_id: u32,
    /// Thread id of the thread that ran KVM_RUN for this vCPU.
    pub tid: u32,
    /// That thread's name as read from /proc (`CPU <n>/KVM`).
    pub comm: String,
    /// Timer interrupts the guest took on this vCPU (counted by the guest's handler).
    pub interrupts: u64,
    /// HLT instructions the guest executed on this vCPU (counted by the guest before each HLT).
    pub halts: u64,
    /// Completed passes of the guest loop (one pass = write the pages, then HLT if `--halt-hz`).
    pub passes: u64,
    /// Page writes by the guest (`passes * --dirty-pages`, or `passes * --sweep`).
    pub pages_written: u64,
    /// The exits to the VMM the guest made on purpose (`--io-exits`, `--mmio-exits`, `--io-in`).
    #[serde(default)]
    pub exits_made: ExitsMade,
    /// How the vCPU stopped: `guest` (it saw the stop flag or reached `--passes` and did
    /// OUT to the exit port), `kick` (the host interrupted KVM_RUN with a signal, e.g.
    /// while it was halted with no timer), or `not_started` (stopped before SIGUSR1).
    pub exit: String,
    /// KVM_GET_STATS_FD on this vCPU's fd, read after the vCPU stopped; `null` on
    /// kernels without binary stats.
    pub stats: Option<Stats>,
    /// The kernel's scheduler statistics of this vCPU's thread over its guest
    /// run (its `/proc/thread-self/schedstat` read before it waited for the
    /// start and as the thread ends, after `--linger`); `null` where /proc
    /// has no schedstat or the guest never started.
    #[serde(default)]
    pub sched: Option<SchedReport>,
}

/// The exits to the VMM a vCPU made on purpose, as the guest and the VMM counted them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitsMade {
    /// `OUT`s to `io_port` the guest completed (counted by the guest after each).
    pub io: u64,
    /// Writes to `mmio_gpa` the guest completed.
    pub mmio: u64,
    /// The I/O port of those exits.
    pub io_port: u16,
    /// The guest-physical address of the MMIO writes.
    pub mmio_gpa: u64,
    /// KVM_EXIT_IO exits on `io_port` the VMM handled.
    pub vmm_io: u64,
    /// KVM_EXIT_MMIO exits on `mmio_gpa` the VMM handled.
    pub vmm_mmio: u64,
    /// `IN`s from `io_in_port` the guest completed (`--io-in`).
    #[serde(default)]
    pub io_in: u64,
    /// The I/O port of those reads.
    #[serde(default)]
    pub io_in_port: u16,
    /// KVM_EXIT_IO exits (in) on `io_in_port` the VMM answered.
    #[serde(default)]
    pub vmm_io_in: u64,
    /// Time from KVM_RUN's return to the next KVM_RUN for those exits, as the
    /// VMM measured it around its own handling, ns.
    pub vmm_ns: u64,
}

/// A vCPU thread's scheduler statistics over its guest run.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedReport {
    /// Time on a CPU, ns (schedstat's first field): what the guest's work,
    /// KVM and every program run in the thread's context cost it.
    #[serde(default)]
    pub cpu_ns: u64,
    /// Time runnable but waiting on a run queue, ns (schedstat's second field).
    pub run_delay_ns: u64,
    /// Times it was switched in (schedstat's third field).
    pub switch_ins: u64,
}

impl SchedReport {
    /// Whether a watcher's figures for this thread (waiting time, switch-ins,
    /// its longest wait) agree with these: the same switch-ins and the time
    /// within 1 % or 100 us, except that a watcher that saw the thread exit
    /// also saw the arrivals of its exit, after its last reading (at most
    /// two, each no longer than the longest wait it saw).
    pub fn agrees(&self, delay_ns: u64, switch_ins: u64, max_wait_ns: u64) -> bool {
        let tol = (self.run_delay_ns / 100).max(100_000);
        let Some(extra) = switch_ins.checked_sub(self.switch_ins).filter(|&e| e <= 2) else {
            return false;
        };
        delay_ns + tol >= self.run_delay_ns
            && delay_ns <= self.run_delay_ns + tol + extra * max_wait_ns
    }
}

#[cfg(test)]
mod tests {
    use super::SchedReport;

    #[test]
    fn a_watcher_agrees_with_schedstat_or_sees_the_exit_too() {
        let k = SchedReport {
            cpu_ns: 0,
            run_delay_ns: 50_000_000,
            switch_ins: 1000,
        };
        assert!(k.agrees(50_400_000, 1000, 3_000_000));
        assert!(!k.agrees(51_000_000, 1000, 3_000_000), "over 1 %");
        assert!(!k.agrees(49_000_000, 1000, 3_000_000), "under 1 %");
        // One arrival more (the thread's exit), as long as the longest wait.
        assert!(k.agrees(53_000_000, 1001, 3_000_000));
        assert!(!k.agrees(54_000_000, 1001, 3_000_000));
        assert!(!k.agrees(50_000_000, 999, 3_000_000), "fewer switch-ins");
        assert!(!k.agrees(50_000_000, 1003, 3_000_000), "too many");
    }
}

/// One KVM memslot (as passed to KVM_SET_USER_MEMORY_REGION).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemslotReport {
    /// Slot id (address space 0).
    pub slot: u32,
    /// First guest frame number (guest physical address / 4096).
    pub base_gfn: u64,
    /// Number of 4 KiB pages.
    pub npages: u64,
    /// Host virtual address of the slot's memory in this process.
    pub userspace_addr: u64,
    /// KVM_MEM_* flags (1 = KVM_MEM_LOG_DIRTY_PAGES).
    pub flags: u32,
    /// `system` (guest code, IDT, GDT, stacks, counters, page table; never dirty-logged)
    /// or `data` (the guest RAM the pages are written to).
    pub role: String,
}

impl VmReport {
    /// Slot `slot` as it was when it held `gfn`: as created, or after the swap
    /// of `--swap-slots-at`; `None` if neither place holds it.
    pub fn slot_holding(&self, slot: u32, gfn: u64) -> Option<&MemslotReport> {
        let after = self.swapped.iter().flat_map(|s| &s.memslots);
        self.memslots
            .iter()
            .chain(after)
            .find(|m| m.slot == slot && (m.base_gfn..m.base_gfn + m.npages).contains(&gfn))
    }
}

/// The slot swap of `--swap-slots-at`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SlotSwap {
    /// Guest time in seconds when the vCPUs were paused for the swap.
    pub at_seconds: f64,
    /// Every memslot after the swap (slots 1 and 2 have traded places).
    pub memslots: Vec<MemslotReport>,
}

/// Dirty-log ground truth.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct DirtyReport {
    /// `off`, `bitmap` or `ring`.
    pub mode: String,
    /// Number of distinct (slot, rel_gfn) pages KVM reported dirty over the whole run.
    pub distinct_pages: u64,
    /// bitmap: dirty bits seen, summed over all KVM_GET_DIRTY_LOG collections;
    /// ring: dirty-ring entries harvested (can be below the pushes if a ring overflowed).
    pub harvested: u64,
    /// Number of collections (bitmap: KVM_GET_DIRTY_LOG rounds over all data slots;
    /// ring: harvest rounds over all rings).
    pub collections: u64,
    /// ring: KVM_EXIT_DIRTY_RING_FULL exits seen by the vCPU threads.
    pub ring_full_exits: u64,
    /// Per data slot.
    pub per_slot: Vec<SlotDirty>,
    /// The sorted distinct set of `[slot, rel_gfn]` KVM reported dirty.
    pub pages: Vec<(u32, u64)>,
    /// With `--swap-slots-at`: `[slot, gfn, times]` for every page, with the gfn
    /// of the slot's place when KVM reported it (ring: entries harvested, so
    /// exactly the pushes; bitmap: collections that found the page dirty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_counts: Option<Vec<(u32, u64, u64)>>,
}

/// Dirty-log counts for one data slot.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotDirty {
    /// Slot id.
    pub slot: u32,
    /// Distinct pages reported dirty in this slot.
    pub distinct: u64,
    /// Bits seen (bitmap) or ring entries harvested (ring) for this slot.
    pub harvested: u64,
}
