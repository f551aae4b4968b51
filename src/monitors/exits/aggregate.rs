//! The exits monitor's interval step, with no kernel: from each thread's
//! change since the last reading (see counters.rs), per reason its exits
//! and their time, the longest exit of the interval, the share of the
//! interval, and the ports and addresses the exits to the VMM were about,
//! most time first.
//!
//! Where kvm:kvm_exit never fires (a KVM backend that does not trace its
//! exits from the guest), a thread that made exits to the VMM that come from
//! a guest exit (I/O, MMIO, ...) while no exit from the guest was ever seen
//! says so: its figures of exits from the guest are null, not zeros.

use serde::Serialize;
use serde_json::{Map, Value};

use super::counters::ThreadExits;
use crate::monitors::histogram::histogram_lines;
use crate::monitors::interval::fields_of;
use crate::monitors::ledger::Change;
use crate::monitors::{
    Cell, Column, Figures, Part, Thread, Tick, Unit, VmRule, per_second, percent_of,
};
use crate::output::terminal_safe as printable;

/// Ports and addresses shown per vCPU and interval.
pub const TOP_TARGETS: usize = 5;

/// Which clock an exit's figures are of (`enum exits_kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An exit from the guest (kvm:kvm_exit), timed until the next guest entry.
    #[default]
    Kvm,
    /// An exit to the VMM (kvm:kvm_userspace_exit), timed until the next KVM_RUN.
    User,
}

/// What an exit to the VMM was about (`enum exits_target_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// An I/O port (kvm:kvm_pio).
    Pio,
    /// A guest-physical address (kvm:kvm_mmio).
    Mmio,
}

/// One (thread, kind, reason)'s cumulative figures, as the kernel keeps them.
#[derive(Clone, Debug, Default)]
pub struct ExitTotals {
    /// VMM process.
    pub pid: u32,
    /// vCPU thread.
    pub tid: u32,
    /// Thread name.
    pub comm: String,
    /// vCPU id.
    pub vcpu_id: Option<u32>,
    /// Exits from the guest or to the VMM.
    pub kind: Kind,
    /// The vendor's exit code, or KVM_EXIT_*.
    pub reason: u32,
    /// Exits.
    pub count: u64,
    /// Exits whose end was seen.
    pub timed: u64,
    /// Their total time, ns.
    pub ns: u64,
    /// Interval numbers of the per-interval maxima.
    pub epoch: [u32; 2],
    /// Longest exit per interval slot, ns.
    pub max_ns: [u64; 2],
    /// Times in log2 buckets of nanoseconds.
    pub hist: Vec<u64>,
}

/// One (thread, port or address)'s cumulative figures.
#[derive(Clone, Debug)]
pub struct TargetReading {
    /// vCPU thread.
    pub tid: u32,
    /// VMM process.
    pub pid: u32,
    /// Port or address.
    pub kind: TargetKind,
    /// The port, or the guest-physical address.
    pub addr: u64,
    /// Accesses (handled in KVM or not).
    pub count: u64,
    /// Of them, writes.
    pub writes: u64,
    /// Of them, exits to the VMM.
    pub user_exits: u64,
    /// Time in the VMM for those, ns.
    pub vmm_ns: u64,
}

/// One reason's figures in one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReasonFigures {
    /// The vendor's exit code, or KVM_EXIT_*.
    pub reason: u32,
    /// Its name.
    pub name: String,
    /// Exits.
    pub count: u64,
    /// Exits whose end was seen in the interval (`ns` is theirs).
    pub timed: u64,
    /// Their total time, ns (in KVM, or in the VMM).
    pub ns: u64,
    /// Their mean, ns.
    pub mean_ns: Option<u64>,
    /// The longest, ns.
    pub max_ns: Option<u64>,
    /// `ns` as a share of the interval (0..1).
    pub share: f64,
    /// Times in log2 buckets of nanoseconds.
    pub hist: Vec<u64>,
}

/// A port or address the exits to the VMM were about, in one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetFigures {
    /// `pio` or `mmio`.
    pub kind: TargetKind,
    /// The port, or the guest-physical address.
    pub addr: u64,
    /// Accesses.
    pub count: u64,
    /// Of them, writes.
    pub writes: u64,
    /// Of them, exits to the VMM.
    pub user_exits: u64,
    /// Time in the VMM for those, ns.
    pub vmm_ns: u64,
    /// `vmm_ns` as a share of the interval (0..1).
    pub share: f64,
}

/// One thread's exits in one interval.
#[derive(Clone, Debug, Default)]
pub struct ExitsInterval {
    /// The thread.
    pub thread: Thread,
    /// Whether kvm:kvm_exit fires for it: None while nothing tells.
    pub kvm_fires: Option<bool>,
    /// Exits from the guest by reason, most time first.
    pub kvm: Vec<ReasonFigures>,
    /// Exits to the VMM by reason, most time first.
    pub user: Vec<ReasonFigures>,
    /// The ports and addresses behind exits to the VMM, most time first.
    pub targets: Vec<TargetFigures>,
    /// The interval's length, ns.
    pub interval_ns: u64,
}

/// One thread's interval from its change, None when it made no exit.
fn interval_of(c: Change<ThreadExits>, tick: &Tick) -> Option<ExitsInterval> {
    let interval_ns = tick.interval_ns.max(1);
    let mut i = ExitsInterval {
        thread: c.who,
        kvm_fires: c.total.kvm_fires(),
        interval_ns,
        ..ExitsInterval::default()
    };
    for ((kind, reason), r) in c.delta.reasons {
        if r.count == 0 && r.timed == 0 {
            continue;
        }
        let max_ns = (0..2)
            .filter(|&s| r.epoch[s] == tick.ended || r.epoch[s] == tick.ended.wrapping_add(1))
            .map(|s| r.max_ns[s])
            .max()
            .filter(|_| r.timed > 0);
        let figures = ReasonFigures {
            reason,
            name: r.name,
            count: r.count,
            timed: r.timed,
            ns: r.ns,
            mean_ns: (r.timed > 0).then(|| r.ns / r.timed),
            max_ns,
            share: r.ns as f64 / interval_ns as f64,
            hist: r.hist,
        };
        match kind {
            Kind::Kvm => i.kvm.push(figures),
            Kind::User => i.user.push(figures),
        }
    }
    if i.kvm.is_empty() && i.user.is_empty() {
        return None;
    }
    // An IN's exit can come an interval before its access (KVM completes
    // it in the next KVM_RUN).
    i.targets = c
        .delta
        .targets
        .into_iter()
        .filter(|(_, t)| t.count > 0 || t.user_exits > 0)
        .map(|((kind, addr), t)| TargetFigures {
            kind,
            addr,
            count: t.count,
            writes: t.writes,
            user_exits: t.user_exits,
            vmm_ns: t.vmm_ns,
            share: t.vmm_ns as f64 / interval_ns as f64,
        })
        .collect();
    let order = |a: &ReasonFigures, b: &ReasonFigures| {
        b.ns.cmp(&a.ns)
            .then(b.count.cmp(&a.count))
            .then(a.reason.cmp(&b.reason))
    };
    i.kvm.sort_by(order);
    i.user.sort_by(order);
    i.targets.sort_by(|a, b| {
        b.vmm_ns
            .cmp(&a.vmm_ns)
            .then(b.count.cmp(&a.count))
            .then(a.addr.cmp(&b.addr))
    });
    i.targets.truncate(TOP_TARGETS);
    Some(i)
}

/// The interval `tick`'s figures per thread (threads without exits left
/// out), from every thread's change.
pub fn intervals(changes: Vec<Change<ThreadExits>>, tick: &Tick) -> Vec<ExitsInterval> {
    let mut out: Vec<ExitsInterval> = changes
        .into_iter()
        .filter_map(|c| interval_of(c, tick))
        .collect();
    out.sort_by_key(|r| (r.thread.pid, r.thread.vcpu_id, r.thread.tid));
    out
}

impl ExitsInterval {
    /// Exits from the guest and their time, None where kvm:kvm_exit does not fire.
    pub fn kvm_totals(&self) -> Option<(u64, u64)> {
        (self.kvm_fires != Some(false)).then(|| {
            self.kvm
                .iter()
                .fold((0, 0), |(c, n), r| (c + r.count, n + r.ns))
        })
    }

    /// Exits to the VMM and their time.
    pub fn user_totals(&self) -> (u64, u64) {
        self.user
            .iter()
            .fold((0, 0), |(c, n), r| (c + r.count, n + r.ns))
    }
}

/// The exits monitor's fields of a vCPU's interval record (`vcpu_interval`).
#[derive(Serialize)]
struct Fields<'a> {
    exits_kvm_exit_fires: Option<bool>,
    exits: Option<u64>,
    exits_ns: Option<u64>,
    exits_by_reason: Option<&'a [ReasonFigures]>,
    exits_user: u64,
    exits_user_ns: u64,
    exits_user_by_reason: &'a [ReasonFigures],
    exits_targets: &'a [TargetFigures],
}

/// The names of [`Fields`], in order.
pub const FIELDS: &[&str] = &[
    "exits_kvm_exit_fires",
    "exits",
    "exits_ns",
    "exits_by_reason",
    "exits_user",
    "exits_user_ns",
    "exits_user_by_reason",
    "exits_targets",
];

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

impl TargetKind {
    /// `pio` or `mmio`.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Pio => "pio",
            TargetKind::Mmio => "mmio",
        }
    }
}

impl TargetFigures {
    /// `port 0x1f0` or `mmio 0xfed00000`.
    pub fn label(&self) -> String {
        match self.kind {
            TargetKind::Pio => format!("port {:#x}", self.addr),
            TargetKind::Mmio => format!("mmio {:#x}", self.addr),
        }
    }
}

/// The exits monitor's columns in `top`.
pub static COLUMNS: &[Column] = &[
    Column {
        title: "EXIT/s",
        width: 7,
        help: "exits from the guest per second (blank where kvm:kvm_exit does not fire)",
        unit: Unit::PerSecond,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "VMM%",
        width: 6,
        help: "time in the VMM after exits to it, until the next KVM_RUN (a VM's: its vCPUs' added up)",
        unit: Unit::Percent,
        vm: VmRule::Sum,
        idle: Cell::Value(0.0),
    },
    Column {
        title: "REASON",
        width: 16,
        help: "the exit reason with the most time (from the guest if seen, else to the VMM)",
        unit: Unit::Text,
        vm: VmRule::Blank,
        idle: Cell::Blank,
    },
];

fn reason_line(r: &ReasonFigures) -> String {
    format!(
        "      {:<24} {:>9} {:>12.1} {:>10.2} {:>10.2} {:>6.1}%",
        printable(&r.name),
        r.count,
        us(r.ns),
        r.mean_ns.map_or(0.0, us),
        r.max_ns.map_or(0.0, us),
        r.share * 100.0
    )
}

const REASON_HEADER: &str =
    "      REASON                       COUNT     TOTAL(us)   MEAN(us)    MAX(us) SHARE";

impl Figures for ExitsInterval {
    fn top_cells(&self, interval_ns: u64) -> Vec<Cell> {
        let (user, user_ns) = self.user_totals();
        let top = self
            .kvm
            .first()
            .map(|r| r.name.clone())
            .or_else(|| self.user.first().map(|r| format!("vmm:{}", r.name)));
        vec![
            self.kvm_totals().map_or(Cell::Blank, |(c, _)| {
                Cell::Value(per_second(c, interval_ns))
            }),
            Cell::Value(percent_of(user_ns, interval_ns)),
            top.filter(|_| user > 0 || !self.kvm.is_empty())
                .map_or(Cell::Blank, Cell::Text),
        ]
    }

    fn fields(&self) -> Map<String, Value> {
        let kvm = self.kvm_totals();
        let (user, user_ns) = self.user_totals();
        fields_of(&Fields {
            exits_kvm_exit_fires: self.kvm_fires,
            exits: kvm.map(|k| k.0),
            exits_ns: kvm.map(|k| k.1),
            exits_by_reason: kvm.map(|_| self.kvm.as_slice()),
            exits_user: user,
            exits_user_ns: user_ns,
            exits_user_by_reason: &self.user,
            exits_targets: &self.targets,
        })
    }

    fn lines(&self, interval_ns: u64) -> Vec<String> {
        let mut lines = Vec::new();
        match self.kvm_totals() {
            None => lines.push(
                "    exits from the guest: not seen, kvm:kvm_exit does not fire on this host (exits to the VMM only)"
                    .to_string(),
            ),
            Some((count, ns)) => {
                lines.push(format!(
                    "    exits from the guest: {count} ({:.0}/s), {:.1} us in KVM ({:.1}% of the interval)",
                    per_second(count, interval_ns),
                    us(ns),
                    percent_of(ns, interval_ns)
                ));
                if !self.kvm.is_empty() {
                    lines.push(REASON_HEADER.to_string());
                    lines.extend(self.kvm.iter().map(reason_line));
                }
                if let Some(top) = self.kvm.first() {
                    lines.extend(
                        histogram_lines(&format!("{} (ns)", printable(&top.name)), &top.hist)
                            .into_iter()
                            .map(|l| format!("    {l}")),
                    );
                }
            }
        }
        let (user, user_ns) = self.user_totals();
        if user > 0 {
            lines.push(format!(
                "    exits to the VMM: {user}, {:.1} us in the VMM ({:.1}% of the interval)",
                us(user_ns),
                percent_of(user_ns, interval_ns)
            ));
            lines.push(REASON_HEADER.to_string());
            lines.extend(self.user.iter().map(reason_line));
        }
        for t in &self.targets {
            lines.push(format!(
                "    {}: {} accesses ({} writes), {} exits to the VMM, {:.1} us there ({:.1}% of the interval)",
                t.label(),
                t.count,
                t.writes,
                t.user_exits,
                us(t.vmm_ns),
                t.share * 100.0
            ));
        }
        lines
    }
}

/// The interval's part: the figures of threads that made exits in it.
pub fn part(changes: Vec<Change<ThreadExits>>, tick: &Tick) -> Part {
    Part::of(
        intervals(changes, tick)
            .into_iter()
            .map(|i| (i.thread.clone(), i)),
    )
}

#[cfg(test)]
mod tests;
