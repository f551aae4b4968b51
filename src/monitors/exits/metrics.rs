//! The exits monitor's metric families: exits from the guest and exits to
//! the VMM by reason per vCPU (the most frequent reasons, the rest `other`),
//! their time in KVM and in the VMM as histograms built in the kernel (per
//! VM; per reason and per vCPU when asked), and the ports and guest-physical
//! addresses behind them per VM (the top K, the rest `other`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::encoding::DescriptorEncoder;

use super::aggregate::{ExitTotals, Kind, TargetKind, TargetReading};
use super::reasons::Reasons;
use super::{Maps, read_totals};
use crate::monitors::histogram::buckets_in;
use crate::monitors::metrics::{Family, Hist, Labeler, Labels, Metrics, Refresh, TopK, with};

pub struct ExitsMetrics {
    maps: Maps,
    reasons: Reasons,
    /// By (tid, kind, reason).
    series: BTreeMap<(u32, u8, u32), ExitTotals>,
    /// By (tid, kind, address).
    targets: BTreeMap<(u32, u8, u64), TargetReading>,
    /// The reasons of each vCPU and the targets of each VM that have series.
    chosen: RefCell<(TopK, TopK)>,
}

impl ExitsMetrics {
    pub(super) fn new(maps: Maps, reasons: Reasons) -> Self {
        ExitsMetrics {
            maps,
            reasons,
            series: BTreeMap::new(),
            targets: BTreeMap::new(),
            chosen: RefCell::default(),
        }
    }

    fn of(&self, kind: Kind) -> impl Iterator<Item = &ExitTotals> {
        self.series.values().filter(move |t| t.kind == kind)
    }

    fn name(&self, t: &ExitTotals) -> String {
        match t.kind {
            Kind::Kvm => self.reasons.kvm(t.reason),
            Kind::User => self.reasons.user(t.reason),
        }
    }

    /// Exits of `kind` per vCPU and reason, the most frequent reasons of
    /// each vCPU on their own.
    fn counts(&self, kind: Kind, labels: &Labeler, topk: &mut TopK) -> Family<u64> {
        let mut per_vcpu: BTreeMap<Labels, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
        for t in self.of(kind) {
            let by_reason = per_vcpu.entry(labels.vcpu(t.tid)).or_default();
            by_reason.entry(self.name(t)).or_insert_with(|| vec![0])[0] += t.count;
        }
        let mut family = Family::default();
        for (vcpu, by_reason) in &per_vcpu {
            let group = with(vcpu.clone(), "kind", kind as u8);
            for (reason, v) in topk.select(&group, labels.export.top_reasons, by_reason) {
                family.add(with(vcpu.clone(), "reason", reason), v[0]);
            }
        }
        family
    }

    /// Time histograms of `kind`: per VM, or per vCPU and reason as asked.
    fn times(&self, kind: Kind, labels: &Labeler) -> Family<Hist> {
        let mut family = Family::default();
        for t in self.of(kind).filter(|t| t.timed > 0) {
            let mut l = labels.histogram(t.tid);
            if labels.export.reason_histograms {
                l = with(l, "reason", self.name(t));
            }
            family.add(
                l,
                Hist {
                    sum: t.ns as f64 / 1e9,
                    count: t.timed,
                    buckets: buckets_in(&t.hist, 1e-9),
                },
            );
        }
        family
    }

    /// Accesses and exits to the VMM per VM and port or address, the top
    /// K of each VM on their own.
    fn targets(&self, labels: &Labeler, topk: &mut TopK) -> (Family<u64>, Family<u64>) {
        let mut per_vm: BTreeMap<Labels, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
        for t in self.targets.values() {
            let kind = match t.kind {
                TargetKind::Pio => "pio",
                TargetKind::Mmio => "mmio",
            };
            let group = with(labels.vm(t.pid), "kind", kind);
            let v = per_vm
                .entry(group)
                .or_default()
                .entry(format!("{:#x}", t.addr))
                .or_insert_with(|| vec![0, 0]);
            v[0] += t.count;
            v[1] += t.user_exits;
        }
        let (mut accesses, mut exits) = (Family::default(), Family::default());
        for (group, by_target) in &per_vm {
            for (target, v) in topk.select(group, labels.export.top_k, by_target) {
                let l = with(group.clone(), "target", target);
                accesses.add(l.clone(), v[0]);
                exits.add(l, v[1]);
            }
        }
        topk.retain(&per_vm.keys().cloned().collect::<BTreeSet<_>>());
        (accesses, exits)
    }
}

impl Metrics for ExitsMetrics {
    fn refresh(&mut self, cx: &mut Refresh) -> anyhow::Result<()> {
        for t in read_totals(&self.maps.stats)? {
            cx.saw(t.tid, t.pid, t.vcpu_id);
            let kind = u8::from(t.kind == Kind::User);
            self.series.insert((t.tid, kind, t.reason), t);
        }
        for t in super::read::read_targets(&self.maps.targets)? {
            self.targets.insert((t.tid, t.kind as u8, t.addr), t);
        }
        self.maps.sweep();
        Ok(())
    }

    fn forget_thread(&mut self, tid: u32) {
        self.series.retain(|(t, _, _), _| *t != tid);
        self.targets.retain(|(t, _, _), _| *t != tid);
    }

    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        labels: &Labeler,
    ) -> Result<(), std::fmt::Error> {
        let mut chosen = self.chosen.borrow_mut();
        let (reasons, targets) = &mut *chosen;
        let kvm = self.counts(Kind::Kvm, labels, reasons);
        let user = self.counts(Kind::User, labels, reasons);
        let live: BTreeSet<Labels> = self
            .series
            .values()
            .flat_map(|t| {
                let v = labels.vcpu(t.tid);
                [with(v.clone(), "kind", 0u8), with(v, "kind", 1u8)]
            })
            .collect();
        reasons.retain(&live);
        labels.counters(
            encoder,
            (
                "vcpu_exits",
                "Exits from the guest (kvm:kvm_exit), by reason (each vCPU's most frequent reasons, the rest `other`)",
                None,
            ),
            &kvm,
        )?;
        labels.histograms(
            encoder,
            (
                "vcpu_exit_handling",
                "Time from an exit from the guest to the next guest entry (or the return to the VMM), log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
            ),
            &self.times(Kind::Kvm, labels),
        )?;
        labels.counters(
            encoder,
            (
                "vcpu_userspace_exits",
                "Exits to the VMM (kvm:kvm_userspace_exit), by KVM_EXIT_* reason (each vCPU's most frequent reasons, the rest `other`)",
                None,
            ),
            &user,
        )?;
        labels.histograms(
            encoder,
            (
                "vcpu_userspace_exit",
                "Time in the VMM after an exit to it, until the next KVM_RUN, log2 buckets built in the kernel; per VM (per vCPU, per reason with --metrics.vcpu-histograms, --metrics.reason-histograms)",
            ),
            &self.times(Kind::User, labels),
        )?;
        let (accesses, exits) = self.targets(labels, targets);
        labels.counters(
            encoder,
            (
                "vm_io_accesses",
                "Guest accesses to I/O ports (kind pio) and MMIO addresses (kind mmio), per VM: the --metrics.top-k most used targets, the rest `other`",
                None,
            ),
            &accesses,
        )?;
        labels.counters(
            encoder,
            (
                "vm_io_userspace_exits",
                "Of those accesses, exits to the VMM, per VM and target as vm_io_accesses",
                None,
            ),
            &exits,
        )?;
        Ok(())
    }
}
