//! Part 4: peak RSS and BPF map memory while tracking ~1M distinct dirty pages.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::env::Env;
use crate::process::{Proc, Ready};
use crate::procfs::{fdinfos, num, status_kib};

#[derive(Serialize)]
pub struct MapMem {
    pub id: u64,
    pub name: String,
    pub map_type: u64,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

#[derive(Serialize)]
pub struct MemoryResult {
    pub vms: usize,
    pub vm_memory_mib: u64,
    pub distinct_pages: u64,
    pub peak_rss_mib: f64,
    pub rss_before_exit_mib: f64,
    pub maps: Vec<MapMem>,
    pub maps_memlock_mib: f64,
    pub note: &'static str,
    /// Memory against the dirty-logged guest memory (part 4b).
    pub scale: Option<crate::memory_scale::ScaleResult>,
}

pub fn measure(env: &Env) -> Result<MemoryResult> {
    // The synthetic VM caps --memory at 3820 MiB: two 2 GiB VMs give 2^20 pages.
    let (vms, mib) = if env.quick { (2, 16u64) } else { (2, 2048u64) };
    let pages_per_vm = mib * 256;
    let dir = std::env::temp_dir().join(format!("kvm-watcher-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let counts = dir.join("counts.txt");
    let kw = env.start_kw(
        "dirty (memory)",
        &[
            "dirty",
            "--summary",
            "-i",
            "1",
            "--output",
            "json",
            "--counts-file",
            counts.to_str().unwrap(),
        ],
    )?;
    let mut vmp = Vec::new();
    for _ in 0..vms {
        let mut c = env.kw(&["vm"]);
        c.args([
            "--memory",
            &mib.to_string(),
            "--dirty-pages",
            &pages_per_vm.to_string(),
            "--dirty-log",
            "ring",
            "--passes",
            "1",
            "--wait-for-signal",
        ]);
        vmp.push(Proc::start(
            "kvm-watcher vm (memory)",
            c,
            Ready {
                marker: "kvm-watcher vm: ready",
                on_stdout: false,
                perf_fds: 0,
            },
            false,
        )?);
    }
    eprintln!("  memory: {vms} VMs dirtying {pages_per_vm} pages each");
    for v in &vmp {
        v.signal(libc::SIGUSR1);
    }
    for v in vmp {
        let st = v.wait_exit(Duration::from_secs(300))?;
        if st.status != Some(0) {
            bail!("kvm-watcher vm failed: {}", st.stderr.trim());
        }
    }
    std::thread::sleep(Duration::from_millis(1500)); // one summary interval
    let pid = kw.pid();
    let rss_before = status_kib(pid, "VmHWM:");
    let names: HashMap<u32, String> = libbpf_rs::query::MapInfoIter::default()
        .map(|m| (m.id, m.name.to_string_lossy().into_owned()))
        .collect();
    let mut maps: Vec<MapMem> = fdinfos(pid)
        .into_iter()
        .filter(|m| m.contains_key("map_type"))
        .map(|m| MapMem {
            id: num(&m, "map_id").unwrap_or(0),
            name: num(&m, "map_id")
                .and_then(|id| names.get(&(id as u32)).cloned())
                .unwrap_or_default(),
            map_type: num(&m, "map_type").unwrap_or(0),
            max_entries: num(&m, "max_entries").unwrap_or(0),
            memlock_bytes: num(&m, "memlock").unwrap_or(0),
        })
        .collect();
    // A map can be open more than once (skeleton fd, MapHandle): count each once.
    let mut seen = std::collections::HashSet::new();
    maps.retain(|m| seen.insert(m.id));
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock_bytes));
    let st = kw.stop(libc::SIGINT, Duration::from_secs(120))?;
    if st.status != Some(0) {
        bail!("kvm-watcher dirty failed: {}", st.stderr.trim());
    }
    let text = std::fs::read_to_string(&counts).unwrap_or_default();
    let distinct = text.lines().count().saturating_sub(1) as u64;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(MemoryResult {
        vms,
        vm_memory_mib: mib,
        distinct_pages: distinct,
        peak_rss_mib: st.maxrss_kib as f64 / 1024.0,
        rss_before_exit_mib: rss_before as f64 / 1024.0,
        maps_memlock_mib: maps.iter().map(|m| m.memlock_bytes).sum::<u64>() as f64
            / (1 << 20) as f64,
        maps,
        note: "kvm-watcher dirty --summary --counts-file, two synthetic VMs (the VM caps --memory at 3820 MiB), one pass over every page; peak RSS includes writing the counts file at exit",
        scale: None,
    })
}
