//! The command line of `kvm-watcher vm`: the clap definition [`VmArgs`] and the
//! checks that turn it into the [`VmConfig`] the synthetic guest is built from.
//!
//! The synthetic guest itself (src/vm/) knows nothing of the command line.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::usage_bail;
use crate::vm::{DirtyLog, VmConfig};

/// How the VM collects dirty pages (`--dirty-log`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyLogArg {
    /// No dirty logging (pages are still written if --dirty-pages is given).
    #[default]
    Off,
    /// KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG every 100 ms and at the end.
    Bitmap,
    /// KVM_CAP_DIRTY_LOG_RING: per-vCPU rings harvested every 20 ms, on
    /// KVM_EXIT_DIRTY_RING_FULL and at the end (Linux 5.11+).
    Ring,
}

impl From<DirtyLogArg> for DirtyLog {
    fn from(m: DirtyLogArg) -> DirtyLog {
        match m {
            DirtyLogArg::Off => DirtyLog::Off,
            DirtyLogArg::Bitmap => DirtyLog::Bitmap,
            DirtyLogArg::Ring => DirtyLog::Ring,
        }
    }
}

/// Options of `kvm-watcher vm`.
///
/// Guest layout and the exact pages written: see `src/vm/guest.rs`. Output with
/// `--json`: one JSON document on stdout (schema: `src/vm/report.rs`).
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// A name for this VM, as `kvm-watcher vms` and `--vm` show and match it
    /// (read from the command line, like QEMU's `-name`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Number of vCPUs, each in its own thread named `CPU <n>/KVM` (n = 0..N-1).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,

    /// KVM vCPU id of the first vCPU; the others get the following ids.
    #[arg(long, default_value_t = 0, value_name = "ID")]
    pub first_vcpu_id: u32,

    /// Guest run time in seconds (fractions allowed). Default 2, or no limit with --passes.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub seconds: Option<f64>,

    /// Guest RAM for the data slots, in MiB (code and stacks live in a separate small slot).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub memory: u64,

    /// Number of memslots the guest RAM is split into (all dirty-logged when logging is on).
    #[arg(long, default_value_t = 2, value_name = "K")]
    pub slots: u32,

    /// Stop each vCPU after exactly this many passes (one pass = write the pages, then
    /// halt if --halt-hz) instead of after --seconds.
    #[arg(long, value_name = "P")]
    pub passes: Option<u64>,

    /// Arm each vCPU's LAPIC timer at this rate in Hz (periodic, 1..=5000) and HLT
    /// between interrupts. Without it the vCPUs never halt (busy loop).
    #[arg(long, value_name = "HZ", conflicts_with = "halt_pattern")]
    pub halt_hz: Option<u32>,

    /// Instead of --halt-hz: halt for these durations in turn, over and over
    /// (a comma-separated list of up to 64, each a number with ns, us or ms,
    /// from 1 us to 4 s: `300us,90us,40us`), each ended by a one-shot LAPIC
    /// timer armed right before the HLT.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_halt)]
    pub halt_pattern: Vec<u32>,

    /// This VM's halt-polling window in nanoseconds (KVM_CAP_HALT_POLL, Linux 5.12+);
    /// default: the host's kvm.halt_poll_ns.
    #[arg(long, value_name = "NS")]
    pub halt_poll_ns: Option<u64>,

    /// Pages (4 KiB) each vCPU writes per pass; every vCPU has its own pages.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub dirty_pages: u64,

    /// Write only C of the --dirty-pages pages per pass, the next C each pass,
    /// starting over after the last: with --halt-hz HZ the guest changes C x HZ
    /// distinct pages per second (C must divide --dirty-pages).
    #[arg(long, value_name = "C")]
    pub sweep: Option<u64>,

    /// Every write stores the value the page already holds (0), so pages are
    /// written (and dirty-logged) but their content never changes.
    #[arg(long)]
    pub same_content: bool,

    /// Dirty logging on the data slots.
    #[arg(long, value_enum, default_value_t = DirtyLogArg::Off, value_name = "MODE")]
    pub dirty_log: DirtyLogArg,

    /// Entries (of 16 bytes) in each vCPU's dirty ring with --dirty-log ring; a power
    /// of two, at least 256 (KVM wants a ring of at least one 4 KiB page).
    #[arg(long, default_value_t = 4096, value_name = "ENTRIES")]
    pub dirty_ring_entries: u32,

    /// After this many seconds of guest time, pause the vCPUs, collect the dirty
    /// log, and let data slots 1 and 2 trade places (each is deleted and created
    /// again at the other's guest-physical range and host memory, as a VMM that
    /// reuses slot ids does), then resume. Needs --slots 2 or more and dirty logging.
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub swap_slots_at: Option<f64>,

    /// After each pass's pages, this many one-byte writes to I/O port 0x504,
    /// which the VMM handles: each is one exit to the VMM (KVM_EXIT_IO).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub io_exits: u32,

    /// After each pass's pages, this many 4-byte writes to guest-physical
    /// 0xfed00000, where no memory is: each is one exit to the VMM (KVM_EXIT_MMIO).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub mmio_exits: u32,

    /// After those, this many one-byte reads from I/O port 0x505, which the
    /// VMM answers (with 0): each is one exit to the VMM (KVM_EXIT_IO, in).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub io_in: u32,

    /// With --mmio-exits N: write each pass to N consecutive 4-byte words from
    /// 0xfed00000 (N guest-physical addresses) instead of N times to one.
    #[arg(long, requires = "mmio_exits")]
    pub mmio_spread: bool,

    /// Set everything up, print `kvm-watcher vm: ready pid=.. tids=.. vcpu_ids=..` on
    /// stderr, and run no guest instruction before SIGUSR1.
    #[arg(long)]
    pub wait_for_signal: bool,

    /// When the guest has run (--passes or --seconds), keep the vCPU threads
    /// alive but asleep, print `kvm-watcher vm: lingering pid=.. tids=..` on
    /// stderr and wait for SIGUSR1 (or SIGINT/SIGTERM) before reporting, so
    /// that what the kernel counted for them (/proc/PID/task/TID/schedstat)
    /// can be read after the run.
    #[arg(long)]
    pub linger: bool,

    /// At exit print the ground truth (counters, memslots, dirty pages, KVM stats) as
    /// one JSON document on stdout.
    #[arg(long)]
    pub json: bool,

    /// Every MS milliseconds (1..=1000) while the guest runs, note the time
    /// (CLOCK_MONOTONIC) and the guest's page writes so far, all vCPUs
    /// together, in the report's `timeline`: how many pages it wrote within
    /// any window of the run.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub timeline: Option<u64>,
}

/// The longest halt of a pattern: the one-shot timer's count is a u32 of
/// ns (KVM's x2APIC timer counts at 1 GHz, divided by 1).
const MAX_HALT_NS: u64 = 4_000_000_000;

/// One `--halt-pattern` duration, in ns: a number with `ns`, `us` or `ms`,
/// from 1 µs to 1 s.
fn parse_halt(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let scale = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        _ => {
            return Err(format!(
                "{s:?}: a duration is a number with ns, us or ms (300us)"
            ));
        }
    };
    let ns = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ns| (1_000..=MAX_HALT_NS).contains(ns))
        .ok_or_else(|| format!("{s:?}: each duration must be from 1us to 4000ms"))?;
    Ok(ns as u32)
}

/// KVM refuses a dirty ring smaller than a page (4096 bytes / 16-byte entries).
const MIN_RING_ENTRIES: u32 = 256;

impl VmArgs {
    /// Checks the values that need no KVM and returns the VM to build; a bad
    /// value is a usage error. `--name` is not part of it: `kvm-watcher vms`
    /// reads it from the command line.
    ///
    /// The checks run in a fixed order, so a command line with several mistakes
    /// always gets the same message.
    pub fn to_config(&self) -> Result<VmConfig> {
        let mut config = VmConfig {
            vcpus: self.vcpus,
            first_vcpu_id: self.first_vcpu_id,
            run_for: None,
            memory_mib: self.memory,
            slots: self.slots,
            passes: None,
            halt_hz: self.halt_hz,
            halt_pattern: self.halt_pattern.clone(),
            halt_poll_ns: None,
            dirty_pages: self.dirty_pages,
            sweep: self.sweep,
            same_content: self.same_content,
            dirty_log: self.dirty_log.into(),
            dirty_ring_entries: self.dirty_ring_entries,
            swap_slots_at: None,
            io_exits: self.io_exits,
            mmio_exits: self.mmio_exits,
            io_in: self.io_in,
            mmio_spread: self.mmio_spread,
            wait_for_signal: self.wait_for_signal,
            linger: self.linger,
            json: self.json,
            timeline: self.timeline.map(Duration::from_millis),
        };
        self.check_vcpus()?;
        if self.mmio_spread && u64::from(self.mmio_exits) * 4 > 0x10_0000 {
            crate::usage_bail!(
                "--mmio-spread: --mmio-exits {} words do not fit the 1 MiB below the local APIC; use at most 262144",
                self.mmio_exits
            );
        }
        config.run_for = self.run_for()?;
        self.check_memory(&config)?;
        config.passes = self.passes()?;
        config.halt_poll_ns = self.check_halts()?;
        config.swap_slots_at = self.swap_slots_at()?;
        self.check_dirty_pages(&config)?;
        Ok(config)
    }

    fn check_vcpus(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > VmConfig::MAX_VCPUS {
            usage_bail!(
                "--vcpus must be between 1 and {}, not {}",
                VmConfig::MAX_VCPUS,
                self.vcpus
            );
        }
        if self.first_vcpu_id.checked_add(self.vcpus).is_none() {
            usage_bail!("--first-vcpu-id {} is too large", self.first_vcpu_id);
        }
        Ok(())
    }

    /// `--seconds`, by default 2 s, or no limit with `--passes`.
    fn run_for(&self) -> Result<Option<Duration>> {
        match self.seconds {
            Some(s) if !(s.is_finite() && s > 0.0 && s <= 1e6) => {
                usage_bail!("--seconds must be a positive number of seconds, not {s}")
            }
            Some(s) => Ok(Some(Duration::from_secs_f64(s))),
            None if self.passes.is_some() => Ok(None),
            None => Ok(Some(Duration::from_secs(2))),
        }
    }

    fn check_memory(&self, config: &VmConfig) -> Result<()> {
        let max_mib = VmConfig::MAX_MEMORY_MIB;
        if self.memory == 0 || self.memory > max_mib {
            usage_bail!(
                "--memory must be between 1 and {max_mib} MiB, not {}",
                self.memory
            );
        }
        if self.slots == 0
            || self.slots > VmConfig::MAX_SLOTS
            || self.slots as u64 > config.data_pages()
        {
            usage_bail!(
                "--slots must be between 1 and {} (and at most one per page), not {}",
                VmConfig::MAX_SLOTS,
                self.slots
            );
        }
        Ok(())
    }

    fn passes(&self) -> Result<Option<u32>> {
        match self.passes {
            Some(p) => match u32::try_from(p) {
                Ok(p) if p > 0 => Ok(Some(p)),
                _ => usage_bail!("--passes must be between 1 and {}, not {p}", u32::MAX),
            },
            None => Ok(None),
        }
    }

    /// `--halt-hz`, then `--halt-poll-ns`, which it returns.
    fn check_halts(&self) -> Result<Option<u32>> {
        if let Some(hz) = self.halt_hz
            && (hz == 0 || hz > VmConfig::MAX_HALT_HZ)
        {
            usage_bail!(
                "--halt-hz must be between 1 and {} Hz (KVM's minimum periodic LAPIC timer period is 200 us), not {hz}",
                VmConfig::MAX_HALT_HZ
            );
        }
        if self.halt_pattern.len() > VmConfig::MAX_HALT_PATTERN {
            usage_bail!(
                "--halt-pattern has {} durations; the guest has room for {}",
                self.halt_pattern.len(),
                VmConfig::MAX_HALT_PATTERN
            );
        }
        match self.halt_poll_ns {
            Some(ns) => match u32::try_from(ns) {
                Ok(ns) => Ok(Some(ns)),
                Err(_) => usage_bail!("--halt-poll-ns must be at most {} ns, not {ns}", u32::MAX),
            },
            None => Ok(None),
        }
    }

    fn swap_slots_at(&self) -> Result<Option<Duration>> {
        let Some(t) = self.swap_slots_at else {
            return Ok(None);
        };
        if !(t.is_finite() && t > 0.0 && t <= 1e6) {
            usage_bail!("--swap-slots-at must be a positive number of seconds, not {t}");
        }
        if self.slots < 2 || self.dirty_log == DirtyLogArg::Off {
            usage_bail!("--swap-slots-at needs --slots 2 or more and --dirty-log bitmap or ring");
        }
        Ok(Some(Duration::from_secs_f64(t)))
    }

    /// `--dirty-pages` against the room in the data slots, then `--dirty-ring-entries`.
    fn check_dirty_pages(&self, config: &VmConfig) -> Result<()> {
        let capacity = config.usable_pages();
        if self.dirty_pages.saturating_mul(self.vcpus as u64) > capacity {
            usage_bail!(
                "--dirty-pages {} x {} vCPUs = {} pages do not fit in {} MiB split into {} slots ({capacity} usable pages)",
                self.dirty_pages,
                self.vcpus,
                self.dirty_pages * self.vcpus as u64,
                self.memory,
                self.slots
            );
        }
        if let Some(c) = self.sweep
            && (c == 0 || self.dirty_pages == 0 || !self.dirty_pages.is_multiple_of(c))
        {
            usage_bail!(
                "--sweep {c} must divide --dirty-pages {} (and neither be 0): each pass writes the next {c} of them",
                self.dirty_pages
            );
        }
        if self.dirty_log == DirtyLogArg::Ring
            && (!self.dirty_ring_entries.is_power_of_two()
                || self.dirty_ring_entries < MIN_RING_ENTRIES)
        {
            usage_bail!(
                "--dirty-ring-entries must be a power of two of at least {MIN_RING_ENTRIES} (KVM needs a ring of at least one 4 KiB page), not {}",
                self.dirty_ring_entries
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_halt;

    #[test]
    fn halt_pattern_durations() {
        assert_eq!(parse_halt("300us"), Ok(300_000));
        assert_eq!(parse_halt("2ms"), Ok(2_000_000));
        assert_eq!(parse_halt("1500ns"), Ok(1_500));
        assert_eq!(parse_halt("1000ms"), Ok(1_000_000_000));
        assert_eq!(parse_halt("4000ms"), Ok(4_000_000_000));
        for bad in [
            "300",
            "999ns",
            "4001ms",
            "us",
            "3.5us",
            "-4us",
            "99999999999999999999ms",
        ] {
            assert!(parse_halt(bad).is_err(), "{bad}");
        }
    }
}
