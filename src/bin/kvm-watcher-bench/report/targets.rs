//! The targets each figure is held against: met, missed, or (for a mean
//! with a confidence interval that straddles the target) undecided.

use serde::Serialize;

use crate::attach::AttachResult;
use crate::guest::GuestResult;
use crate::guest_tax::GuestTaxResult;
use crate::host_tax::HostTaxResult;
use crate::kernel_cost::CaseResult;
use crate::memory::MemoryResult;
use crate::pipeline::PipelineResult;
use crate::stats::Paired;

/// How a figure stands against its target.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Met,
    Missed,
    /// The figure's 95 % interval holds the target: the run cannot tell.
    Undecided,
}

impl Verdict {
    pub fn of(met: bool) -> Verdict {
        if met { Verdict::Met } else { Verdict::Missed }
    }

    /// A mean with its interval against "at most `limit`": met when the
    /// whole interval is at or under it, missed when the whole interval is
    /// over it, undecided otherwise (also without an interval).
    pub fn at_most(p: &Paired, limit: f64) -> Verdict {
        if p.ci_hi <= limit {
            Verdict::Met
        } else if p.ci_lo > limit {
            Verdict::Missed
        } else {
            Verdict::Undecided
        }
    }
}

#[derive(Serialize)]
pub struct TargetResult {
    pub target: String,
    pub figure: f64,
    pub spread: String,
    pub unit: &'static str,
    pub verdict: Verdict,
    /// `verdict` is met (what runs before `verdict` existed carry alone).
    pub met: bool,
}

impl TargetResult {
    fn new(
        target: String,
        figure: f64,
        spread: String,
        unit: &'static str,
        verdict: Verdict,
    ) -> TargetResult {
        TargetResult {
            target,
            figure,
            spread,
            unit,
            met: verdict == Verdict::Met,
            verdict,
        }
    }
}

pub fn targets(
    cases: &[CaseResult],
    guest: &[GuestResult],
    pipe: &PipelineResult,
    mem: &MemoryResult,
    attach: &[AttachResult],
) -> Vec<TargetResult> {
    let mut t = Vec::new();
    for c in cases {
        let (max_floor, min_bt) = if c.mode == "aggregate" {
            (2.0, 2.0)
        } else {
            (3.0, 20.0)
        };
        t.push(TargetResult::new(
            format!(
                "{} {}: kernel cost <= {max_floor}x raw_tp floor",
                c.monitor, c.mode
            ),
            c.ratio_to_floor.median,
            c.ratio_to_floor.show(2),
            "x floor",
            Verdict::of(c.ratio_to_floor.median <= max_floor),
        ));
        t.push(TargetResult::new(
            format!(
                "{} {}: >= {min_bt}x cheaper than bpftrace ({})",
                c.monitor, c.mode, c.bpftrace_job
            ),
            c.bpftrace_over_kvm_watcher.median,
            c.bpftrace_over_kvm_watcher.show(2),
            "x cheaper",
            Verdict::of(c.bpftrace_over_kvm_watcher.median >= min_bt),
        ));
    }
    for g in guest.iter().filter(|g| g.config.starts_with("all four")) {
        t.push(TargetResult::new(
            format!(
                "<= 2% guest work lost, {} workload, {}",
                g.workload, g.config
            ),
            g.work_lost_pct.median,
            g.work_lost_pct.show(2),
            "% lost",
            Verdict::of(g.work_lost_pct.median <= 2.0),
        ));
    }
    t.push(TargetResult::new(
        ">= 2M events/s streamed to NDJSON with 0 lost".into(),
        pipe.max_rate_zero_lost.median,
        pipe.max_rate_zero_lost.show(0),
        "events/s",
        Verdict::of(pipe.max_rate_zero_lost.median >= 2e6),
    ));
    t.push(TargetResult::new(
        format!(
            "<= 32 MiB peak RSS at 1M distinct dirty pages ({} tracked)",
            mem.distinct_pages
        ),
        mem.peak_rss_mib,
        format!("{:.1}", mem.peak_rss_mib),
        "MiB",
        Verdict::of(mem.peak_rss_mib <= 32.0 && mem.distinct_pages >= 1_000_000),
    ));
    if let Some(sc) = &mem.scale {
        let per_gib = sc.summary_dirty_maps.per_gib_bytes / 1024.0;
        t.push(TargetResult::new(
            "dirty --summary kernel maps <= 64 KiB per GiB of dirty-logged guest memory".into(),
            per_gib,
            format!("{per_gib:.1}"),
            "KiB/GiB",
            Verdict::of(per_gib <= 64.0),
        ));
    }
    for a in attach.iter().filter(|a| a.tool == "kvm-watcher") {
        t.push(TargetResult::new(
            format!("{}: start + attach + detach < 150 ms", a.monitor),
            a.total_ms.median,
            a.total_ms.show(1),
            "ms",
            Verdict::of(a.total_ms.median < 150.0),
        ));
    }
    t
}

/// Part 6: serve's default monitors add at most 1 % to a syscall-bound and a
/// context-switch-bound workload (judged by the paired rounds' 95 %
/// interval, which is in the spread), as they come (exits on its kvm-only
/// backend) and with exits' exact time in the VMM (`--backend
/// exits=tracepoint`).
pub fn host_tax(tax: &HostTaxResult) -> Vec<TargetResult> {
    let serves = [
        ("kvm-watcher serve", "serve (default monitors)"),
        (
            "kvm-watcher serve --backend exits=tracepoint",
            "serve --backend exits=tracepoint",
        ),
    ];
    tax.loads
        .iter()
        .flat_map(|l| serves.iter().map(move |s| (l, s)))
        .filter_map(|(l, (condition, who))| {
            let a = l.attached.iter().find(|a| a.condition == *condition)?;
            Some(TargetResult::new(
                format!(
                    "{who} adds <= 1% to a {}-bound host workload",
                    l.workload.replace('_', "-")
                ),
                a.added_pct.mean,
                a.added_pct.show(2),
                "% added",
                Verdict::at_most(&a.added_pct, 1.0),
            ))
        })
        .collect()
}

/// Part 7: at most 2 % more vCPU CPU time per unit of guest work with the
/// default set (`serve`) or any one monitor in summary mode, on each
/// workload (judged by the paired rounds' 95 % interval, which is in the
/// spread).
pub fn guest_tax(tax: &GuestTaxResult) -> Vec<TargetResult> {
    tax.workloads
        .iter()
        .flat_map(|w| {
            w.attached
                .iter()
                .filter(|a| a.tool == "kvm-watcher" && a.mode == "summary")
                .map(move |a| {
                    TargetResult::new(
                        format!(
                            "{} (summary) adds <= 2% vCPU CPU per {} of the {} workload",
                            a.monitor,
                            w.unit.split(" (").next().unwrap_or(w.unit),
                            w.workload
                        ),
                        a.added_cpu_pct.mean,
                        a.added_cpu_pct.show(2),
                        "% added",
                        Verdict::at_most(&a.added_cpu_pct, 2.0),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(lo: f64, hi: f64) -> Paired {
        Paired {
            mean: (lo + hi) / 2.0,
            ci_lo: lo,
            ci_hi: hi,
            median: (lo + hi) / 2.0,
            n: 12,
        }
    }

    /// A figure near zero whose interval straddles the target is neither
    /// met nor missed: the run cannot tell them apart.
    #[test]
    fn an_interval_decides_only_on_one_side_of_the_target() {
        assert_eq!(Verdict::at_most(&p(-3.4, 0.9), 1.0), Verdict::Met);
        assert_eq!(Verdict::at_most(&p(-3.4, 6.5), 1.0), Verdict::Undecided);
        assert_eq!(Verdict::at_most(&p(-3.4, 6.5), 7.0), Verdict::Met);
        assert_eq!(Verdict::at_most(&p(1.2, 6.5), 1.0), Verdict::Missed);
        assert_eq!(Verdict::at_most(&p(1.0, 6.5), 1.0), Verdict::Undecided);
        let none = Paired {
            ci_lo: f64::NAN,
            ci_hi: f64::NAN,
            ..p(0.0, 0.0)
        };
        assert_eq!(Verdict::at_most(&none, 1.0), Verdict::Undecided);
        let t = TargetResult::new("t".into(), 0.5, "".into(), "%", Verdict::Undecided);
        assert!(!t.met);
        assert_eq!(
            serde_json::to_value(&t).unwrap()["verdict"],
            serde_json::json!("undecided")
        );
        assert!(TargetResult::new("t".into(), 0.5, "".into(), "%", Verdict::of(true)).met);
    }
}
