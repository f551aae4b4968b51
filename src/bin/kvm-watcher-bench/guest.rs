//! Part 2: guest-visible overhead, the synthetic guest's work rate with
//! nothing, each monitor, the original four together and bpftrace attached.

use std::collections::HashMap;

use anyhow::Result;
use serde::Serialize;

use crate::bpftrace::{BT_ALL_COUNT, BT_ALL_PRINTF, BT_EXITS_COUNT, BtScript};
use crate::env::Env;
use crate::process::stop_all;
use crate::stats::{Spread, shuffle, spread};
use crate::workload::{Workload, run_vm};

struct GuestConfig {
    name: &'static str,
    kw: &'static [&'static [&'static str]],
    bt: Option<&'static BtScript>,
}

const ALL_SUMMARY_SEPARATE: &[&[&str]] = &[
    &["wakeup", "--summary", "-i", "1", "--output", "json"],
    &["halt-poll", "--summary", "-i", "1", "--output", "json"],
    &["dirty", "--summary", "-i", "1", "--output", "json"],
    &["vcpu-load", "-i", "1", "--output", "json"],
];
const ALL_ROWS_SEPARATE: &[&[&str]] = &[
    &["wakeup", "--output", "json"],
    &["halt-poll", "--output", "json"],
    &["dirty", "--output", "json"],
    &["vcpu-load", "-i", "1", "--output", "json"],
];

fn guest_configs(env: &Env) -> Vec<GuestConfig> {
    let (all_summary, all_rows): (
        &'static [&'static [&'static str]],
        &'static [&'static [&'static str]],
    ) = if env.has_watch {
        (
            &[&[
                "watch", "-w", "-n", "-d", "-o", "-i", "1", "--output", "json",
            ]],
            &[&[
                "watch", "-w", "-n", "-d", "-o", "--rows", "-i", "1", "--output", "json",
            ]],
        )
    } else {
        (ALL_SUMMARY_SEPARATE, ALL_ROWS_SEPARATE)
    };
    vec![
        GuestConfig {
            name: "none",
            kw: &[],
            bt: None,
        },
        GuestConfig {
            name: "wakeup rows",
            kw: &[&["wakeup", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "halt-poll rows",
            kw: &[&["halt-poll", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "dirty rows",
            kw: &[&["dirty", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "dirty --summary",
            kw: &[&["dirty", "--summary", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "exits rows",
            kw: &[&["exits", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "exits --summary",
            kw: &[&["exits", "--summary", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "bpftrace exits (counts)",
            kw: &[],
            bt: Some(&BT_EXITS_COUNT),
        },
        GuestConfig {
            name: "vcpu-load",
            kw: &[&["vcpu-load", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "run-delay --summary",
            kw: &[&["run-delay", "--summary", "-i", "1", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "run-delay rows",
            kw: &[&["run-delay", "--output", "json"]],
            bt: None,
        },
        GuestConfig {
            name: "all four (summary)",
            kw: all_summary,
            bt: None,
        },
        GuestConfig {
            name: "all four (rows)",
            kw: all_rows,
            bt: None,
        },
        GuestConfig {
            name: "bpftrace all four (counts)",
            kw: &[],
            bt: Some(&BT_ALL_COUNT),
        },
        GuestConfig {
            name: "bpftrace all four (printf)",
            kw: &[],
            bt: Some(&BT_ALL_PRINTF),
        },
    ]
}

#[derive(Serialize)]
pub struct GuestResult {
    pub workload: &'static str,
    pub unit: &'static str,
    pub config: &'static str,
    pub rate: Spread,
    pub work_lost_pct: Spread,
}

pub fn measure(env: &Env) -> Result<Vec<GuestResult>> {
    let seconds = if env.quick { 0.3 } else { 2.5 };
    let mut configs = guest_configs(env);
    if env.quick {
        // Only what the targets need (and the unwatched baseline, first).
        configs.retain(|c| c.name == "none" || c.name.starts_with("all four"));
    }
    // (workload, config index) -> per-round rates
    let mut rates: HashMap<(&str, usize), Vec<f64>> = HashMap::new();
    for r in 0..env.rounds {
        let mut trials: Vec<(Workload, usize)> = [Workload::Dirty, Workload::Halt, Workload::Exits]
            .iter()
            .flat_map(|&w| (0..configs.len()).map(move |i| (w, i)))
            .collect();
        shuffle(&mut trials, r as u64 + 101);
        for (w, i) in trials {
            let cfg = &configs[i];
            eprintln!(
                "  guest overhead: round {}/{}, {} workload, {}",
                r + 1,
                env.rounds,
                w.name(),
                cfg.name
            );
            let (report, procs) = run_vm(env, w, seconds, || {
                let mut procs = Vec::new();
                for args in cfg.kw {
                    procs.push(env.start_kw(cfg.name, args)?);
                }
                if let Some(s) = cfg.bt {
                    procs.push(env.start_bt(&format!("bt_{}", cfg.name), s)?);
                }
                Ok(procs)
            })?;
            stop_all(procs)?;
            rates
                .entry((w.name(), i))
                .or_default()
                .push(w.rate(&report)?);
        }
    }
    let mut out = Vec::new();
    for w in [Workload::Dirty, Workload::Halt, Workload::Exits] {
        let base = rates.get(&(w.name(), 0)).cloned().unwrap_or_default();
        for (i, cfg) in configs.iter().enumerate() {
            let v = rates.get(&(w.name(), i)).cloned().unwrap_or_default();
            // Paired with the same round's unwatched run.
            let lost: Vec<f64> = v
                .iter()
                .zip(&base)
                .map(|(x, b)| 100.0 * (1.0 - x / b))
                .collect();
            out.push(GuestResult {
                workload: w.name(),
                unit: w.unit(),
                config: cfg.name,
                rate: spread(&v),
                work_lost_pct: spread(&lost),
            });
        }
    }
    Ok(out)
}
