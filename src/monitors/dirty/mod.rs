//! dirty (`-d`): guest pages KVM logs as dirty, one row per logged write,
//! exact per-page counts (the counts file) and per-slot summaries (kernel
//! half: src/bpf/dirty.bpf.c).

mod aggregate;
mod bitmap;
mod counts;
mod demo;
mod dense;
mod dense_counts;
mod exited;
mod metrics;
mod read;
mod record;
mod spill;
mod watch;

pub use aggregate::{SlotSummary, SlotSummaryRow, dirty_mib_s};
pub use counts::{PageCount, check_counts_path, parse_counts_file, write_counts_file};
pub use read::{SlotReading, read_counts, read_slots};
pub use record::{DirtyRow, decode};

use std::path::PathBuf;
use std::time::Duration;

use libbpf_rs::MapHandle;

use crate::backend::{Backend, Quirk, THREAD_EXIT, VCPU_RUN, learns_vcpu_threads, need};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, rodata, types};
use crate::hooks::AttachKind::{Fentry, Kprobe, RawTp};
use crate::monitors::{
    Configure, Face, Metrics, Mode, Monitor, OptionKind, OptionSpec, Options, Start, Watching,
    shrink, write_with_vm,
};
use crate::output::{Output, warn};
use crate::procfs::VmNames;
use dense::Dense;
use exited::Exited;
use watch::Watch;

/// The dirty monitor.
pub struct Dirty;

static FACE: Face = Face {
    name: "dirty",
    command: "dirty",
    events_flag: "dirty-events",
    short: 'd',
    about: "One row per dirtied guest page, with per-page counts",
    what: "dirty guest pages",
    demo: Some(&demo::SECTION),
    kind: types::monitor_kind::MONITOR_DIRTY,
    backends: BACKENDS,
    options: OPTIONS,
    summary_fields: &["dirty_map_full", "dirty_distinct_pages"],
    top_columns: aggregate::COLUMNS,
    lost_hint: " or use --summary (per-page counts are complete)",
    ..Face::DEFAULTS
};

/// The backend that sees only VMs with a dirty ring.
const RING_ONLY: &str = "tracepoint";

static BACKENDS: &[Backend] = &[
    Backend {
        name: "fentry",
        needs: &[need(&[(
            "mark_page_dirty_in_slot",
            Fentry,
            "fentry_mark_page_dirty",
        )])],
        quirks: &[],
        note: "every logged write (bitmap and ring VMs) through mark_page_dirty_in_slot",
    },
    Backend {
        name: "kprobe",
        needs: &[need(&[(
            "mark_page_dirty_in_slot",
            Kprobe,
            "kprobe_mark_page_dirty",
        )])],
        // Verifiers before 5.12 reject BPF compare-and-swap even in dead
        // code; and before 5.12 kvm_vcpu_mark_page_dirty() (every guest
        // write the MMU logs) inlines mark_page_dirty_in_slot(): see it
        // through its gfn and the memslot kvm_vcpu_gfn_to_memslot() returns
        // (src/bpf/dirty.bpf.c).
        quirks: &[Quirk {
            before: (5, 12),
            replace: &[("kprobe_mark_page_dirty", "kprobe_mark_page_dirty_nocas")],
            also: &[
                (
                    "kvm_vcpu_mark_page_dirty",
                    Kprobe,
                    "kprobe_vcpu_mark_page_dirty",
                ),
                (
                    "kvm_vcpu_gfn_to_memslot",
                    Kprobe,
                    "kretprobe_gfn_to_memslot",
                ),
            ],
        }],
        note: "every logged write (bitmap and ring VMs) through a kprobe on mark_page_dirty_in_slot",
    },
    Backend {
        name: RING_ONLY,
        needs: &[
            need(&[("kvm:kvm_dirty_ring_push", RawTp, "tp_dirty_ring_push")]),
            VCPU_RUN,
            THREAD_EXIT,
        ],
        quirks: &[],
        note: "kvm:kvm_dirty_ring_push sees only VMs that use the dirty ring (KVM_CAP_DIRTY_LOG_RING); writes of VMs with bitmap dirty logging are invisible (the vCPU ioctl hook spots such VMs and warns)",
    },
];

/// Largest `--max-pages`: 64 Mi pages (256 GiB of 4 KiB pages), whose hash
/// table alone takes about 3 GiB of kernel memory.
const MAX_PAGES_LIMIT: u64 = 1 << 26;

const MAX_PAGES: &str = "max_pages";
const COUNTS_FILE: &str = "counts_file";
const COUNTS_EVERY: &str = "counts_every";

static OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        id: MAX_PAGES,
        long: "max-pages",
        value_name: "PAGES",
        help: "Most distinct (pid, slot, page) pages counted in the kernel; more are counted as overflow and reported. Default covers a 16 GiB guest of 4 KiB pages",
        kind: OptionKind::Count {
            min: 1,
            max: MAX_PAGES_LIMIT,
        },
        default: Some("4194304"),
        requires: None,
        serve: true,
    },
    OptionSpec {
        id: COUNTS_FILE,
        long: "counts-file",
        value_name: "PATH",
        help: "Write per-page dirty counts (PID GFN REL_GFN SLOT_ID COUNTS, most dirtied first) to this file on exit, atomically, mode 0600",
        kind: OptionKind::Path,
        default: None,
        requires: None,
        serve: false,
    },
    OptionSpec {
        id: COUNTS_EVERY,
        long: "counts-every",
        value_name: "SECONDS",
        help: "Also rewrite the counts file every this many seconds",
        kind: OptionKind::Seconds,
        default: None,
        requires: Some(COUNTS_FILE),
        serve: false,
    },
];

/// Distinct pages per interval need BPF compare-and-swap (Linux 5.12+).
fn tracks_distinct(mode: Mode, version: (u32, u32)) -> bool {
    mode == Mode::Summary && version >= (5, 12)
}

/// Dense per-slot storage needs BPF atomic OR (Linux 5.12+); the page hash
/// alone before.
fn dense_on(version: (u32, u32)) -> bool {
    version >= (5, 12)
}

/// The hash's size next to dense storage: pages of slots before their
/// storage exists, and of slots --max-pages cannot hold.
const OVERFLOW_PAGES: u64 = 1 << 15;

fn max_pages(options: &Options) -> u64 {
    options.count(MAX_PAGES).unwrap_or(4 << 20)
}

impl Monitor for Dirty {
    fn face(&self) -> &'static Face {
        &FACE
    }

    fn check(&self, options: &Options) -> anyhow::Result<()> {
        match options.path(COUNTS_FILE) {
            Some(path) => check_counts_path(path),
            None => Ok(()),
        }
    }

    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()> {
        let running = cx.resolved.is_some();
        let distinct = running && tracks_distinct(cx.mode, cx.version);
        if running && cx.mode == Mode::Summary && !distinct {
            warn(&format!(
                "distinct dirty pages per interval need BPF cmpxchg (Linux 5.12+), this kernel is {}.{}: summaries show writes only",
                cx.version.0, cx.version.1
            ));
        }
        let ro = rodata(open)?;
        ro.stream_dirty = running && cx.mode == Mode::Rows;
        ro.count_dirty = running;
        ro.learn_vcpu_threads |= learns_vcpu_threads(cx.resolved);
        ro.dirty_summary = distinct;
        ro.mark_dirty_has_kvm = cx.version >= (5, 16);
        let dense = running && dense_on(cx.version);
        ro.dirty_dense = dense;
        ro.dirty_dense_counts = dense && cx.options.path(COUNTS_FILE).is_some();
        // The page hash's bucket array alone is 64 MiB at 4 Mi entries.
        let pages = match (running, dense) {
            (false, _) => 1,
            (true, true) => max_pages(cx.options).min(OVERFLOW_PAGES),
            (true, false) => max_pages(cx.options),
        };
        open.maps
            .dirty_counts
            .set_max_entries(u32::try_from(pages)?)
            .map_err(|e| anyhow::anyhow!("cannot size the dirty-page map: {e}"))?;
        if !running {
            shrink(&mut open.maps.dirty_slot_stats)?;
            shrink(&mut open.maps.pending_dirty_gfn)?;
        }
        if !distinct {
            shrink(&mut open.maps.dirty_epoch_pages)?;
        }
        if !dense {
            shrink(&mut open.maps.dirty_slot_sids)?;
            shrink(&mut open.maps.dirty_sid_writes)?;
            shrink(&mut open.maps.dirty_bitmaps)?;
            shrink(&mut open.maps.dirty_page_counts)?;
        }
        Ok(())
    }

    fn write_record(&self, data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
        write_with_vm(decode(data), |r| &mut r.common, out, names)
    }

    fn watch(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        let ring_only = cx.resolved.backend.name == RING_ONLY;
        if ring_only {
            // Said once; per-VM warnings follow when a VM without a dirty ring is seen.
            eprintln!(
                "kvm-watcher: dirty pages come from kvm:kvm_dirty_ring_push (tracepoint backend): only VMs with a dirty ring are visible"
            );
        }
        let summary = (cx.mode == Mode::Summary)
            .then(|| SlotSummary::new(tracks_distinct(cx.mode, crate::procfs::kernel_version())));
        let counts_every = cx
            .options
            .seconds(COUNTS_EVERY)
            .map(Duration::from_secs_f64);
        let version = crate::procfs::kernel_version();
        let dense = match dense_on(version) {
            true => Some(Dense::new(
                skel,
                cx.options.path(COUNTS_FILE).is_some(),
                max_pages(cx.options),
            )?),
            false => None,
        };
        Ok(Box::new(Watch {
            dense,
            epoch: 1,
            counts: MapHandle::try_from(&skel.maps.dirty_counts)?,
            slot_stats: MapHandle::try_from(&skel.maps.dirty_slot_stats)?,
            epoch_pages: MapHandle::try_from(&skel.maps.dirty_epoch_pages)?,
            threads: MapHandle::try_from(&skel.maps.vcpu_threads)?,
            summary,
            counts_file: cx.options.path(COUNTS_FILE).map(PathBuf::from),
            counts_every,
            next_counts: counts_every.map(|d| cx.start + d),
            counts_failing: false,
            ring_only,
            warned: Vec::new(),
            next_bitmap_check: cx.start,
            max_pages: max_pages(cx.options),
            exited: Exited::new(cx.options.path(COUNTS_FILE).map(Into::into)),
            next_exit_sweep: cx.start,
            fd_reserve: match cx.options.path(COUNTS_FILE) {
                // The temporary file and its directory.
                Some(_) => (0..2)
                    .filter_map(|_| std::fs::File::open("/dev/null").ok())
                    .collect(),
                None => Vec::new(),
            },
            counters: MapHandle::try_from(&skel.maps.counters)?,
            map_full: 0,
        }))
    }

    fn metrics(&self, skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        let dense = match dense_on(crate::procfs::kernel_version()) {
            true => Some(Dense::new(skel, false, max_pages(_cx.options))?),
            false => None,
        };
        Ok(Box::new(metrics::DirtyMetrics::new(
            MapHandle::try_from(&skel.maps.dirty_slot_stats)?,
            MapHandle::try_from(&skel.maps.dirty_counts)?,
            dense,
        )))
    }
}
