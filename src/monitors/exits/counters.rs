//! One vCPU thread's cumulative exits as the kernel counts them, per
//! (kind, reason) and per port or address, as the ledger's readings, and
//! the keys its metric families are made of. No kernel needed.

use std::collections::BTreeMap;

use super::aggregate::{ExitTotals, Kind, TargetKind, TargetReading};
use super::reasons::Reasons;
use crate::monitors::Thread;
use crate::monitors::families::{Key, Keyed, KeyedHistogram, Per};
use crate::monitors::histogram::buckets_in;
use crate::monitors::ledger::{Counters, since, since_each};
use crate::monitors::metrics::Hist;

/// One (kind, reason)'s cumulative figures.
#[derive(Clone, Debug, Default)]
pub struct ReasonTotals {
    /// The reason's name.
    pub name: String,
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

/// One port or address's cumulative figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetTotals {
    /// Accesses (handled in KVM or not).
    pub count: u64,
    /// Of them, writes.
    pub writes: u64,
    /// Of them, exits to the VMM.
    pub user_exits: u64,
    /// Time in the VMM for those, ns.
    pub vmm_ns: u64,
}

/// One thread's exits: per (kind, reason) and per port or address, each
/// counter's change taken on its own (one that went back was made anew).
#[derive(Clone, Debug, Default)]
pub struct ThreadExits {
    /// The thread.
    pub thread: Thread,
    /// By kind and reason.
    pub reasons: BTreeMap<(Kind, u32), ReasonTotals>,
    /// By port or address.
    pub targets: BTreeMap<(TargetKind, u64), TargetTotals>,
}

impl Counters for ThreadExits {
    fn delta(&self, prev: &ThreadExits) -> ThreadExits {
        let reasons = self.reasons.iter().map(|(key, r)| {
            let p = prev.reasons.get(key).cloned().unwrap_or_default();
            let d = ReasonTotals {
                count: since(r.count, p.count),
                timed: since(r.timed, p.timed),
                ns: since(r.ns, p.ns),
                hist: since_each(&r.hist, &p.hist),
                ..r.clone()
            };
            (*key, d)
        });
        let targets = self.targets.iter().map(|(key, t)| {
            let p = prev.targets.get(key).copied().unwrap_or_default();
            let d = TargetTotals {
                count: since(t.count, p.count),
                writes: since(t.writes, p.writes),
                user_exits: since(t.user_exits, p.user_exits),
                vmm_ns: since(t.vmm_ns, p.vmm_ns),
            };
            (*key, d)
        });
        ThreadExits {
            thread: self.thread.clone(),
            reasons: reasons.collect(),
            targets: targets.collect(),
        }
    }

    fn zero(&self, _last_read_ns: u64) -> ThreadExits {
        ThreadExits::named(self.thread.clone())
    }
}

/// Reasons of exits to the VMM that no exit from the guest precedes: a
/// signal or immediate_exit (KVM_EXIT_INTR) and failures.
fn needs_guest_exit(reason: u32) -> bool {
    reason != 10 && reason < super::reasons::USER_ERROR
}

impl ThreadExits {
    /// Whether kvm:kvm_exit fires for it: an exit from the guest was seen,
    /// or exits to the VMM that come from one were while none was; None
    /// while nothing tells.
    pub fn kvm_fires(&self) -> Option<bool> {
        let made = |k: Kind, of: fn(u32) -> bool| {
            self.reasons
                .iter()
                .any(|((kind, reason), r)| *kind == k && r.count > 0 && of(*reason))
        };
        if made(Kind::Kvm, |_| true) {
            Some(true)
        } else {
            made(Kind::User, needs_guest_exit).then_some(false)
        }
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &ReasonTotals> {
        self.reasons
            .iter()
            .filter(move |((k, _), _)| *k == kind)
            .map(|(_, r)| r)
    }

    /// Exits from the guest per reason.
    pub fn kvm_reasons(&self) -> Vec<Key> {
        self.reason_keys(Kind::Kvm)
    }

    /// Exits to the VMM per reason.
    pub fn user_reasons(&self) -> Vec<Key> {
        self.reason_keys(Kind::User)
    }

    fn reason_keys(&self, kind: Kind) -> Vec<Key> {
        self.of(kind)
            .map(|r| Key {
                group: None,
                name: r.name.clone(),
                values: vec![r.count],
            })
            .collect()
    }

    /// Accesses and exits to the VMM per port or address, by kind.
    pub fn target_keys(&self) -> Vec<Key> {
        self.targets
            .iter()
            .map(|((kind, addr), t)| Key {
                group: Some(("kind", kind.name())),
                name: format!("{addr:#x}"),
                values: vec![t.count, t.user_exits],
            })
            .collect()
    }

    /// The times of exits of `kind` per reason, for those whose end was seen.
    fn times(&self, kind: Kind) -> Vec<(String, Hist)> {
        self.of(kind)
            .filter(|r| r.timed > 0)
            .map(|r| {
                let h = Hist {
                    sum: r.ns as f64 / 1e9,
                    count: r.timed,
                    buckets: buckets_in(&r.hist, 1e-9),
                };
                (r.name.clone(), h)
            })
            .collect()
    }
}

/// Exits from the guest or to the VMM per vCPU and reason, each vCPU's
/// `--metrics.top-reasons` most frequent on their own.
pub const fn reasons(kind: Kind) -> Keyed<ThreadExits> {
    Keyed {
        label: "reason",
        per: Per::Vcpu,
        top: |e| e.top_reasons,
        choice: match kind {
            Kind::Kvm => "kvm",
            Kind::User => "vmm",
        },
        keys: match kind {
            Kind::Kvm => ThreadExits::kvm_reasons,
            Kind::User => ThreadExits::user_reasons,
        },
        value: 0,
    }
}

/// Accesses (`value` 0) or exits to the VMM (1) per VM and port or
/// address, each VM's `--metrics.top-k` most used on their own.
pub const fn targets(value: usize) -> Keyed<ThreadExits> {
    Keyed {
        label: "target",
        per: Per::Vm,
        top: |e| e.top_k,
        choice: "targets",
        keys: ThreadExits::target_keys,
        value,
    }
}

/// Time histograms of exits from the guest or to the VMM, per reason with
/// `--metrics.reason-histograms`.
pub const fn times(kind: Kind) -> KeyedHistogram<ThreadExits> {
    KeyedHistogram {
        label: "reason",
        split: |e| e.reason_histograms,
        get: match kind {
            Kind::Kvm => |t| t.times(Kind::Kvm),
            Kind::User => |t| t.times(Kind::User),
        },
    }
}

/// The readings of each thread: `threads` (the exits in progress, which
/// name their threads), the kernel's rows by reason and by target; a row
/// of a thread not named is named by its figures.
pub fn by_thread(
    threads: Vec<Thread>,
    totals: Vec<ExitTotals>,
    targets: Vec<TargetReading>,
    reasons: &Reasons,
) -> Vec<ThreadExits> {
    let mut out: BTreeMap<u32, ThreadExits> = threads
        .into_iter()
        .map(|thread| (thread.tid, ThreadExits::named(thread)))
        .collect();
    for t in totals {
        let who = Thread {
            pid: t.pid,
            tid: t.tid,
            comm: t.comm,
            vcpu_id: t.vcpu_id,
        };
        let e = out
            .entry(t.tid)
            .or_insert_with(|| ThreadExits::named(who.clone()));
        e.thread.vcpu_id = e.thread.vcpu_id.or(who.vcpu_id);
        let name = match t.kind {
            Kind::Kvm => reasons.kvm(t.reason),
            Kind::User => reasons.user(t.reason),
        };
        let r = ReasonTotals {
            name,
            count: t.count,
            timed: t.timed,
            ns: t.ns,
            epoch: t.epoch,
            max_ns: t.max_ns,
            hist: t.hist,
        };
        e.reasons.insert((t.kind, t.reason), r);
    }
    for g in targets {
        // A thread's entry is made before its first target's: one not read
        // yet is read with its target at the next reading.
        if let Some(e) = out.get_mut(&g.tid) {
            let t = TargetTotals {
                count: g.count,
                writes: g.writes,
                user_exits: g.user_exits,
                vmm_ns: g.vmm_ns,
            };
            e.targets.insert((g.kind, g.addr), t);
        }
    }
    out.into_values().collect()
}

impl ThreadExits {
    fn named(thread: Thread) -> ThreadExits {
        ThreadExits {
            thread,
            ..ThreadExits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitors::exits::reasons::Vendor;

    fn row(tid: u32, reason: u32, count: u64) -> ExitTotals {
        ExitTotals {
            pid: 100,
            tid,
            vcpu_id: None,
            kind: Kind::Kvm,
            reason,
            count,
            hist: vec![count],
            ..ExitTotals::default()
        }
    }

    #[test]
    fn a_thread_is_read_while_it_has_exits_in_progress_even_without_a_counted_one() {
        let named = Thread {
            pid: 100,
            tid: 12,
            comm: "CPU 1/KVM".into(),
            vcpu_id: Some(1),
        };
        let svm = Reasons::builtin(Some(Vendor::Svm));
        let rows = by_thread(vec![named.clone()], vec![row(11, 0x78, 2)], vec![], &svm);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].thread.tid, 11);
        assert_eq!(rows[0].reasons[&(Kind::Kvm, 0x78)].name, "hlt");
        assert_eq!(rows[1].thread.vcpu_id, Some(1));
        assert!(rows[1].reasons.is_empty() && rows[1].kvm_fires().is_none());
    }

    #[test]
    fn each_counter_changes_on_its_own_and_one_made_anew_counts_from_zero() {
        let svm = Reasons::builtin(Some(Vendor::Svm));
        let at = |hlt, io| {
            by_thread(
                vec![],
                vec![row(11, 0x78, hlt), row(11, 0x7b, io)],
                vec![],
                &svm,
            )
        };
        let (before, after) = (at(10, 4), at(3, 9));
        let d = after[0].delta(&before[0]);
        assert_eq!(d.reasons[&(Kind::Kvm, 0x78)].count, 3, "made anew");
        assert_eq!(d.reasons[&(Kind::Kvm, 0x7b)].count, 5);
        assert_eq!(d.reasons[&(Kind::Kvm, 0x7b)].hist, [5]);
        assert_eq!(d.kvm_fires(), Some(true));
    }
}
