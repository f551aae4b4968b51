//! Part 4b: dirty tracking's memory against the dirty-logged guest memory
//! watched (1, 4 and 16 GiB), as a line: kernel map memory and user RSS of
//! `dirty --summary` alone and with `--counts-file`, both watching the same
//! guests at once.

use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::env::Env;
use crate::procfs::{fdinfos, num, status_kib};

/// The guest caps --memory at 3820 MiB: bigger sizes are several guests.
const GUEST_MIB: u64 = 2048;

/// One size: what each watcher holds while the guests run.
#[derive(Serialize)]
pub struct ScalePoint {
    pub guest_mib: u64,
    pub vms: u64,
    /// Pages each guest dirties (only part of its memory: the storage
    /// follows the memslots, not the pages written).
    pub dirtied_pages_per_vm: u64,
    pub summary_dirty_maps_bytes: u64,
    pub summary_all_maps_bytes: u64,
    pub summary_rss_kib: u64,
    pub counts_dirty_maps_bytes: u64,
    pub counts_all_maps_bytes: u64,
    pub counts_rss_kib: u64,
}

/// A least-squares line through the points: bytes = per_gib * GiB + base.
#[derive(Serialize)]
pub struct Line {
    pub per_gib_bytes: f64,
    pub base_bytes: f64,
}

#[derive(Serialize)]
pub struct ScaleResult {
    pub points: Vec<ScalePoint>,
    pub summary_dirty_maps: Line,
    pub summary_rss: Line,
    pub counts_dirty_maps: Line,
    pub counts_rss: Line,
    pub note: &'static str,
}

/// (dirty maps, all maps) memlock bytes of process `pid`, each map once.
fn map_bytes(pid: u32) -> (u64, u64) {
    let names: std::collections::HashMap<u32, String> = libbpf_rs::query::MapInfoIter::default()
        .map(|m| (m.id, m.name.to_string_lossy().into_owned()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let (mut dirty, mut all) = (0, 0);
    for m in fdinfos(pid) {
        let (Some(id), Some(bytes)) = (num(&m, "map_id"), num(&m, "memlock")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        all += bytes;
        if names
            .get(&(id as u32))
            .is_some_and(|n| n.starts_with("dirty_"))
        {
            dirty += bytes;
        }
    }
    (dirty, all)
}

fn line(points: &[(f64, f64)]) -> Line {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let per_gib = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    Line {
        per_gib_bytes: per_gib,
        base_bytes: my - per_gib * mx,
    }
}

fn point(env: &Env, guest_mib: u64) -> Result<ScalePoint> {
    let vms = guest_mib.div_ceil(GUEST_MIB);
    let mib = guest_mib / vms;
    // 16 Ki pages (64 MiB) per guest keeps 16 GiB of guests within the host's memory.
    let dirtied = (mib * 256).min(if env.quick { 1024 } else { 16384 });
    let dir = std::env::temp_dir().join(format!("kvm-watcher-bench-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let counts = dir.join("counts.txt");
    let summary = env.start_kw(
        "dirty --summary (memory per GiB)",
        &["dirty", "--summary", "-i", "1", "--output", "json"],
    )?;
    let with_counts = env.start_kw(
        "dirty --summary --counts-file (memory per GiB)",
        &[
            "dirty",
            "--summary",
            "-i",
            "1",
            "--output",
            "json",
            "--counts-file",
            counts.to_str().unwrap_or("counts.txt"),
        ],
    )?;
    let mut guests = Vec::new();
    for _ in 0..vms {
        guests.push(env.start_vm(&[
            "--memory",
            &mib.to_string(),
            "--dirty-pages",
            &dirtied.to_string(),
            "--dirty-log",
            "ring",
            "--seconds",
            "4",
        ])?);
    }
    for g in &guests {
        g.signal(libc::SIGUSR1);
    }
    // Every slot seen and its storage made: well inside the guests' 4 s.
    std::thread::sleep(Duration::from_millis(2500));
    let (sd, sa) = map_bytes(summary.pid());
    let (cd, ca) = map_bytes(with_counts.pid());
    let (sr, cr) = (
        status_kib(summary.pid(), "VmRSS:"),
        status_kib(with_counts.pid(), "VmRSS:"),
    );
    for g in guests {
        let st = g.wait_exit(Duration::from_secs(120))?;
        if st.status != Some(0) {
            bail!("kvm-watcher vm failed: {}", st.stderr.trim());
        }
    }
    for w in [summary, with_counts] {
        let st = w.stop(libc::SIGINT, Duration::from_secs(120))?;
        if st.status != Some(0) {
            bail!("kvm-watcher dirty failed: {}", st.stderr.trim());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ScalePoint {
        guest_mib: mib * vms,
        vms,
        dirtied_pages_per_vm: dirtied,
        summary_dirty_maps_bytes: sd,
        summary_all_maps_bytes: sa,
        summary_rss_kib: sr,
        counts_dirty_maps_bytes: cd,
        counts_all_maps_bytes: ca,
        counts_rss_kib: cr,
    })
}

pub fn measure(env: &Env) -> Result<ScaleResult> {
    let sizes: &[u64] = if env.quick {
        &[64, 256, 1024]
    } else {
        &[1024, 4096, 16384]
    };
    let mut points = Vec::new();
    for &mib in sizes {
        eprintln!("  memory per GiB: {mib} MiB of dirty-logged guest memory");
        points.push(point(env, mib)?);
    }
    let fit = |f: &dyn Fn(&ScalePoint) -> u64| {
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.guest_mib as f64 / 1024.0, f(p) as f64))
            .collect();
        line(&xy)
    };
    Ok(ScaleResult {
        summary_dirty_maps: fit(&|p| p.summary_dirty_maps_bytes),
        summary_rss: fit(&|p| p.summary_rss_kib * 1024),
        counts_dirty_maps: fit(&|p| p.counts_dirty_maps_bytes),
        counts_rss: fit(&|p| p.counts_rss_kib * 1024),
        points,
        note: "two watchers (dirty --summary; dirty --summary --counts-file) on the same synthetic guests of up to 2 GiB each, every guest memslot dirty-logged, each guest writing only part of its pages; map memory is fdinfo's memlock of the maps named dirty_* (the dense storages included), RSS is VmRSS while the guests run; the line is a least-squares fit over the sizes",
    })
}
