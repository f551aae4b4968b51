//! The monitors, one folder each, named like its kernel half in src/bpf/.
//!
//! A monitor is one unit: its folder holds its backend table, its record
//! types and decoder, the only code that reads its maps, the pure step that
//! turns two readings into an interval, and its metric families. Everything
//! generic (the loader, the session, summaries, output, `doctor`, the
//! exporter, the command line) iterates [`REGISTRY`] and asks each monitor
//! for its part through the [`Monitor`] trait. Adding one: see
//! docs/architecture.md.

mod columns;
pub mod demo;
pub mod dirty;
pub mod dirty_rate;
pub mod exits;
pub mod families;
pub mod halt_poll;
pub mod histogram;
mod interval;
pub mod ledger;
pub mod metrics;
pub mod options;
pub mod run_delay;
mod seed;
mod task_aggregates;
pub mod threads;
pub mod tracked;
pub mod vcpu_load;
pub mod wakeup;

use std::time::Instant;

use serde_json::Value;

pub use columns::{Cell, Column, Unit, VmRule, per_second, percent_of};
pub use interval::{Figures, Part, Quiet, Thread, Tick, VcpuFigures, VmRow};
pub use metrics::Metrics;
pub use options::{OptionKind, OptionSpec, OptionValue, Options};

use crate::backend::{Backend, Resolved};
use crate::bpf::{KvmWatcherSkel, OpenKvmWatcherSkel, comm_to_string, read_record, types};
use crate::output::{Common, Output, Row};
use crate::procfs::VmNames;

/// Every monitor, in the seed tool's order (-w -n -d -o). Everything generic
/// iterates this list, in this order.
pub static REGISTRY: &[&dyn Monitor] = &[
    &wakeup::Wakeup,
    &halt_poll::HaltPoll,
    &dirty::Dirty,
    &vcpu_load::VcpuLoad,
    &run_delay::RunDelay,
    &exits::Exits,
    &dirty_rate::DirtyRate,
];

/// The monitor named `name` (its JSON name, e.g. `halt_poll`).
pub fn by_name(name: &str) -> Option<&'static dyn Monitor> {
    REGISTRY.iter().copied().find(|m| m.name() == name)
}

/// What a monitor is, as data: its names, command-line face and help
/// texts, its kernel record kind, backends, options, fields and columns.
/// Each monitor's `static FACE` gives the first eight and takes the rest
/// from [`Face::DEFAULTS`] where it has none.
pub struct Face {
    /// Name in JSON (`"monitor"`), `doctor` and metrics (`halt_poll`).
    pub name: &'static str,
    /// Its subcommand, also its long flag in `watch` (`halt-poll`).
    pub command: &'static str,
    /// Its top-level long flag (`halt-poll-events`).
    pub events_flag: &'static str,
    /// Its short flag (`-n`), at the top level and in `watch`.
    pub short: char,
    /// Help of its subcommand (no final period).
    pub about: &'static str,
    /// What it watches, for `watch -n` and the top-level flag's help.
    pub what: &'static str,
    /// Its `enum monitor_kind` (record kind and `counters` index), from the skeleton.
    pub kind: types::monitor_kind,
    /// Its backends, most preferred first.
    pub backends: &'static [Backend],
    /// Whether `watch`, `top` and `serve` run it when no monitor is named
    /// (dirty-rate is not: it reads guest memory).
    pub by_default: bool,
    /// Options of its own, on its subcommand, `watch` and the top level.
    pub options: &'static [OptionSpec],
    /// Its fields in the interval record of each vCPU, null when it has no
    /// figures for that vCPU (see [`Figures::fields`]).
    pub vcpu_fields: &'static [&'static str],
    /// Its fields in the last record of a run (`"monitor": "summary"`),
    /// present with 0 when it did not run.
    pub summary_fields: &'static [&'static str],
    /// Its columns in `kvm-watcher top`, filled by the `top_cells` of its
    /// [`Figures`] and [`VmRow`]s, in this order.
    pub top_columns: &'static [Column],
    /// What to add to the warning about events lost in the ring buffer.
    pub lost_hint: &'static str,
    /// Its section of `kvm-watcher demo` (what it sees of the synthetic
    /// guest next to the guest's own counts); None when it has none.
    pub demo: Option<&'static demo::DemoSection>,
}

impl Face {
    /// The defaults of a monitor's `static FACE` (`..Face::DEFAULTS`): on by
    /// default, no options, fields, columns, hint or demo. Its names, kind
    /// and backends are placeholders every monitor replaces (the registry's
    /// tests find a name, flag or kind given twice).
    pub const DEFAULTS: Face = Face {
        name: "",
        command: "",
        events_flag: "",
        short: '?',
        about: "",
        what: "",
        kind: types::monitor_kind::MONITOR_WAKEUP,
        backends: &[],
        by_default: true,
        options: &[],
        vcpu_fields: &[],
        summary_fields: &[],
        top_columns: &[],
        lost_hint: "",
        demo: None,
    };
}

/// How the loaded programs are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One ring-buffer record per event.
    Rows,
    /// In-kernel aggregates read every interval (`--summary`, `watch`).
    Summary,
    /// In-kernel cumulative aggregates read at every scrape (`serve`).
    Metrics,
}

impl Mode {
    /// Whether the kernel keeps aggregates (summaries and metrics).
    pub fn aggregates(self) -> bool {
        self != Mode::Rows
    }
}

/// The in-kernel filters: only these VMs, this thread, this vCPU.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// VMM pids to watch (empty: all).
    pub pids: Vec<u32>,
    /// Only this thread.
    pub tid: Option<u32>,
    /// Only this vCPU id.
    pub vcpu: Option<u32>,
}

impl Filter {
    /// Whether thread `tid` of VMM `pid`, running vCPU `vcpu_id` (None: not
    /// known yet), passes: the kernel's test, for threads user space finds.
    pub fn admits(&self, pid: u32, tid: u32, vcpu_id: Option<u32>) -> bool {
        (self.pids.is_empty() || self.pids.contains(&pid))
            && self.tid.is_none_or(|t| t == tid)
            && self.vcpu.is_none_or(|v| vcpu_id.is_none_or(|id| id == v))
    }
}

/// What a monitor's [`Monitor::configure`] needs to know.
pub struct Configure<'a> {
    /// The backend chosen for it, or None when it does not run (its maps
    /// should then be made tiny: every map of the object gets created).
    pub resolved: Option<&'a Resolved>,
    /// How the programs are used.
    pub mode: Mode,
    /// The options the user gave.
    pub options: &'a Options,
    /// The running kernel (major, minor).
    pub version: (u32, u32),
}

/// What a monitor's user-space half (a session's or the exporter's) starts with.
pub struct Start<'a> {
    /// The backend it runs on.
    pub resolved: &'a Resolved,
    /// How the programs are used.
    pub mode: Mode,
    /// The options the user gave.
    pub options: &'a Options,
    /// The in-kernel filters (e.g. to enter known threads at attach).
    pub filter: &'a Filter,
    /// When the session started.
    pub start: Instant,
}

/// One monitor, as every generic layer sees it: what it is ([`Face`],
/// data) and what it does.
pub trait Monitor: Sync {
    /// What it is.
    fn face(&self) -> &'static Face;

    /// Its name in JSON, `doctor` and metrics.
    fn name(&self) -> &'static str {
        self.face().name
    }

    /// [`Face::kind`].
    fn kind(&self) -> types::monitor_kind {
        self.face().kind
    }

    /// [`Face::backends`].
    fn backends(&self) -> &'static [Backend] {
        self.face().backends
    }

    /// [`Face::by_default`].
    fn by_default(&self) -> bool {
        self.face().by_default
    }

    /// [`Face::options`].
    fn options(&self) -> &'static [OptionSpec] {
        self.face().options
    }

    /// Checks its options before anything is loaded (e.g. a path it will write).
    fn check(&self, _options: &Options) -> anyhow::Result<()> {
        Ok(())
    }

    /// Sets its configuration and map sizes in the opened object.
    fn configure(&self, open: &mut OpenKvmWatcherSkel<'_>, cx: &Configure) -> anyhow::Result<()>;

    /// Decodes one ring-buffer record of its kind and writes it; false if
    /// it cannot be decoded.
    fn write_record(&self, _data: &[u8], _out: &mut Output, _names: &mut VmNames) -> bool {
        false
    }

    /// Its user-space half where one serves `watch`, `top` and `serve`
    /// alike (a [`tracked::Table`] monitor's [`tracked::Tracked`]); a
    /// monitor with two halves implements `watch` and `metrics` instead.
    fn start(&self, _skel: &KvmWatcherSkel<'_>, _cx: &Start) -> anyhow::Result<Box<dyn Half>> {
        anyhow::bail!("{} has no user-space half", self.name())
    }

    /// Its user-space half for `watch`, `--summary` and the rows modes.
    fn watch(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Watching>> {
        Ok(self.start(skel, cx)?)
    }

    /// Its metric families for `serve`.
    fn metrics(&self, skel: &KvmWatcherSkel<'_>, cx: &Start) -> anyhow::Result<Box<dyn Metrics>> {
        Ok(self.start(skel, cx)?)
    }

    /// [`Face::vcpu_fields`].
    fn vcpu_fields(&self) -> &'static [&'static str] {
        self.face().vcpu_fields
    }

    /// [`Face::summary_fields`].
    fn summary_fields(&self) -> &'static [&'static str] {
        self.face().summary_fields
    }

    /// [`Face::top_columns`].
    fn top_columns(&self) -> &'static [Column] {
        self.face().top_columns
    }

    /// `doctor`'s live check of what its hooks see while a guest runs (e.g.
    /// that a tracepoint which exists never fires here); None when it has none.
    fn live_check(&self) -> Option<LiveCheck> {
        None
    }

    /// [`Face::lost_hint`].
    fn lost_hint(&self) -> &'static str {
        self.face().lost_hint
    }

    /// [`Face::demo`].
    fn demo(&self) -> Option<&'static demo::DemoSection> {
        self.face().demo
    }
}

impl std::fmt::Debug for dyn Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a monitor's user-space half asks of the session's schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Begun {
    /// It writes a report every interval in the rows mode too
    /// ([`Watching::interval_rows`]).
    pub rows_every_interval: bool,
}

/// A user-space half that serves a session and `serve` alike.
pub trait Half: Watching + Metrics {}

impl<T: Watching + Metrics> Half for T {}

/// A monitor's user-space half during a session: every method has a default,
/// so a monitor implements only the steps it takes part in.
pub trait Watching {
    /// The first interval begins now, at `start_ns` (CLOCK_MONOTONIC): a
    /// monitor whose intervals are differences of cumulative readings takes
    /// its first reading here, so the first interval holds nothing from
    /// before it (e.g. vcpu-load's pairs opened at attach).
    fn begin(&mut self, _start_ns: u64) -> anyhow::Result<Begun> {
        Ok(Begun::default())
    }

    /// Summary mode: its part of the interval that just ended.
    fn interval(&mut self, _tick: &Tick) -> anyhow::Result<Part> {
        Ok(Part::default())
    }

    /// Rows mode: writes its report of the interval that just ended (when
    /// [`Begun::rows_every_interval`]).
    fn interval_rows(
        &mut self,
        _tick: &Tick,
        _out: &mut Output,
        _names: &mut VmNames,
    ) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called after every pass of the session's loop; `pruning` says the
    /// session's prune clock struck: time to forget what exited. Returns
    /// when it next wants to be called (e.g. `--counts-every`), if sooner
    /// than the session's own timers.
    fn poll(&mut self, _now: Instant, _pruning: bool) -> anyhow::Result<Option<Instant>> {
        Ok(None)
    }

    /// The programs are detached and every record is drained: its final
    /// output (e.g. the counts file).
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Values of its [`Monitor::summary_fields`], given its counters; warns
    /// about what the user should know.
    fn summary(&self, _counters: &types::monitor_counters) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
}

/// Writes a monitor's periodic report in rows mode (vcpu-load's and
/// dirty-rate's tables): a title line with the interval, then a table of
/// `rows` (or `empty` when there is none), or one record per row.
pub fn write_periodic<R: Row>(out: &mut Output, tick: &Tick, what: &str, empty: &str, rows: &[R]) {
    let title = format!(
        "\n{}  {what}, interval {:.3} s",
        out.clock().format(tick.now_ns),
        tick.interval_ns as f64 / 1e9
    );
    out.text(&title);
    match rows.first() {
        Some(first) => out.text(&first.header()),
        None => out.text(empty),
    }
    for r in rows {
        if out.format() == crate::output::OutputFormat::Table {
            let line = r.row(out.clock());
            out.text(&line);
        } else {
            out.record(r);
        }
    }
}

/// Makes a map of a monitor that does not run (or a mode that does not use
/// it) tiny: every map of the object gets created.
pub fn shrink(map: &mut libbpf_rs::OpenMapMut<'_>) -> anyhow::Result<()> {
    map.set_max_entries(1)
        .map_err(|e| anyhow::anyhow!("cannot size the BPF maps: {e}"))
}

/// What a monitor's live check in `doctor` found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LiveCheck {
    /// One sentence for people.
    pub text: String,
    /// Hooks that attach but did not fire while they should have.
    pub silent: Vec<&'static str>,
}

/// The fields every record starts with.
pub fn common_of(hdr: &types::event_header) -> Common {
    Common {
        time_ns: hdr.time_ns,
        pid: hdr.pid,
        tid: hdr.tid,
        comm: comm_to_string(&hdr.comm),
        vcpu_id: u32::try_from(hdr.vcpu_id).ok(),
        vm: None,
    }
}

/// Writes a decoded ring-buffer record (None: it could not be decoded)
/// with its VM's name; false if there was none.
pub fn write_with_vm<R: Row>(
    record: Option<R>,
    common: impl FnOnce(&mut R) -> &mut Common,
    out: &mut Output,
    names: &mut VmNames,
) -> bool {
    let Some(mut r) = record else {
        return false;
    };
    let c = common(&mut r);
    c.vm = names.get(c.pid);
    out.record(&r);
    true
}

/// The VCPU_ID column.
pub fn vcpu_cell(vcpu_id: Option<u32>) -> String {
    vcpu_id.map_or_else(|| "?".to_string(), |v| v.to_string())
}

/// Decodes one ring-buffer record and writes it to `out` with its VM's name,
/// through the monitor of its kind. Returns false for a record of no known kind.
pub fn write_record(data: &[u8], out: &mut Output, names: &mut VmNames) -> bool {
    let Some(kind) = read_record::<u32>(data) else {
        return false;
    };
    REGISTRY
        .iter()
        .find(|m| m.kind().0 == kind)
        .is_some_and(|m| m.write_record(data, out, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_admits_what_the_kernel_would() {
        let all = Filter::default();
        assert!(all.admits(1, 2, None));
        let f = Filter {
            pids: vec![10],
            tid: None,
            vcpu: Some(3),
        };
        assert!(f.admits(10, 11, Some(3)));
        assert!(f.admits(10, 11, None), "a vCPU not known yet is let in");
        assert!(!f.admits(10, 11, Some(4)));
        assert!(!f.admits(20, 21, Some(3)));
        let t = Filter {
            tid: Some(5),
            ..Filter::default()
        };
        assert!(t.admits(1, 5, None) && !t.admits(1, 6, None));
    }

    #[test]
    fn the_registry_matches_the_kernels_kinds() {
        let count = types::monitor_kind::MONITOR_COUNT.0 as usize;
        assert_eq!(REGISTRY.len(), count, "one monitor per enum monitor_kind");
        let mut kinds: Vec<u32> = REGISTRY.iter().map(|m| m.kind().0).collect();
        kinds.sort_unstable();
        assert_eq!(kinds, (0..count as u32).collect::<Vec<_>>());
    }

    /// serve spares the host's system calls: every monitor has a backend
    /// that runs nothing on them, so serve's default set never does.
    #[test]
    fn every_monitor_can_leave_the_hosts_system_calls_alone() {
        for m in REGISTRY {
            assert!(
                m.backends().iter().any(|b| !b.on_every_syscall()),
                "{}: every backend runs a program on every system call",
                m.name()
            );
        }
    }

    /// sched_switch runs on every context switch of the host: every
    /// monitor's BTF-typed program there is the one shared program, so the
    /// kernel dispatches one, not one per monitor.
    #[test]
    fn the_btf_typed_sched_switch_program_is_shared() {
        for m in REGISTRY {
            for b in m.backends() {
                for n in b.needs {
                    for &(target, kind, program) in n.alternatives {
                        if target == "sched:sched_switch" && kind == crate::hooks::AttachKind::TpBtf
                        {
                            assert_eq!(
                                program,
                                crate::backend::SCHED_SWITCH,
                                "{} ({}) has its own program on sched_switch",
                                m.name(),
                                b.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn monitors_have_distinct_names_and_flags() {
        let mut seen = std::collections::HashSet::new();
        for m in REGISTRY {
            let f = m.face();
            for key in [
                format!("name {}", f.name),
                format!("command {}", f.command),
                format!("flag {}", f.events_flag),
                format!("short {}", f.short),
            ] {
                assert!(seen.insert(key.clone()), "{key} used twice");
            }
            assert!(!m.backends().is_empty(), "{} has no backend", f.name);
            assert!(std::ptr::eq(by_name(f.name).unwrap().face(), f));
        }
    }

    #[test]
    fn top_columns_fit_their_width_and_have_distinct_titles() {
        let mut titles = std::collections::HashSet::new();
        for c in REGISTRY.iter().flat_map(|m| m.top_columns()) {
            assert!(
                c.title.len() <= usize::from(c.width),
                "{} too wide",
                c.title
            );
            assert!(titles.insert(c.title), "{} used twice", c.title);
            assert!(!c.help.is_empty() && !c.help.contains('\n'));
        }
    }

    #[test]
    fn records_of_unknown_kinds_are_refused() {
        let mut out = Output::new(
            crate::output::OutputFormat::Json,
            crate::output::TimeFormat::Mono,
        );
        let mut names = VmNames::default();
        assert!(!write_record(&99u32.to_ne_bytes(), &mut out, &mut names));
        assert!(!write_record(&[1], &mut out, &mut names));
    }
}
