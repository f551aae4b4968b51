//! Part 5: start + attach and detach + exit time of each monitor, and bpftrace's.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::bpftrace::{
    BT_DIRTY_COUNT, BT_HALT_POLL_PRINTF, BT_VCPU_LOAD, BT_WAKEUP_PRINTF, BtScript,
};
use crate::env::Env;
use crate::stats::{Spread, shuffle, spread};

#[derive(Serialize)]
pub struct AttachResult {
    pub tool: &'static str,
    pub monitor: &'static str,
    pub command: String,
    pub start_attach_ms: Spread,
    pub detach_exit_ms: Spread,
    pub total_ms: Spread,
    pub peak_rss_mib: Spread,
}

pub fn measure(env: &Env) -> Result<Vec<AttachResult>> {
    struct Item {
        tool: &'static str,
        monitor: &'static str,
        kw: Option<&'static [&'static str]>,
        bt: Option<&'static BtScript>,
    }
    let items = [
        Item {
            tool: "kvm-watcher",
            monitor: "wakeup",
            kw: Some(&["wakeup", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "halt_poll",
            kw: Some(&["halt-poll", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "dirty",
            kw: Some(&["dirty", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "kvm-watcher",
            monitor: "vcpu_load",
            kw: Some(&["vcpu-load", "--output", "json"]),
            bt: None,
        },
        Item {
            tool: "bpftrace",
            monitor: "wakeup",
            kw: None,
            bt: Some(&BT_WAKEUP_PRINTF),
        },
        Item {
            tool: "bpftrace",
            monitor: "halt_poll",
            kw: None,
            bt: Some(&BT_HALT_POLL_PRINTF),
        },
        Item {
            tool: "bpftrace",
            monitor: "dirty",
            kw: None,
            bt: Some(&BT_DIRTY_COUNT),
        },
        Item {
            tool: "bpftrace",
            monitor: "vcpu_load",
            kw: None,
            bt: Some(&BT_VCPU_LOAD),
        },
    ];
    let mut res: Vec<[Vec<f64>; 3]> = items.iter().map(|_| Default::default()).collect();
    for r in 0..env.rounds {
        eprintln!("  attach/detach: round {}/{}", r + 1, env.rounds);
        let mut order: Vec<usize> = (0..items.len()).collect();
        shuffle(&mut order, r as u64 + 1001);
        for i in order {
            let it = &items[i];
            let p = match (it.kw, it.bt) {
                (Some(args), _) => env.start_kw(it.monitor, args)?,
                (_, Some(s)) => env.start_bt(&format!("bt_{}", it.monitor), s)?,
                _ => unreachable!(),
            };
            let attach = p.ready_after.as_secs_f64() * 1e3;
            let st = p.stop(libc::SIGINT, Duration::from_secs(30))?;
            res[i][0].push(attach);
            res[i][1].push(st.exit_after.as_secs_f64() * 1e3);
            res[i][2].push(st.maxrss_kib as f64 / 1024.0);
        }
    }
    Ok(items
        .iter()
        .zip(res)
        .map(|(it, [a, d, rss])| {
            let total: Vec<f64> = a.iter().zip(&d).map(|(x, y)| x + y).collect();
            AttachResult {
                tool: it.tool,
                monitor: it.monitor,
                command: match (it.kw, it.bt) {
                    (Some(args), _) => format!("kvm-watcher {}", args.join(" ")),
                    (_, Some(s)) => s.command(),
                    _ => String::new(),
                },
                start_attach_ms: spread(&a),
                detach_exit_ms: spread(&d),
                total_ms: spread(&total),
                peak_rss_mib: spread(&rss),
            }
        })
        .collect())
}
