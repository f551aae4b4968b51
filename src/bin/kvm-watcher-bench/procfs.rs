//! What /proc says about a process: its BPF programs, links and maps (from
//! fdinfo, with the kernel's BPF statistics), and its memory.

use std::collections::HashMap;

pub fn fdinfos(pid: u32) -> Vec<HashMap<String, String>> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let m: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        v.push(m);
    }
    v
}

pub fn num(m: &HashMap<String, String>, k: &str) -> Option<u64> {
    m.get(k).and_then(|v| v.parse().ok())
}

/// prog id -> (run_time_ns, run_cnt) of every program `pid` holds.
pub fn prog_stats(pid: u32) -> HashMap<u32, (u64, u64)> {
    let mut out = HashMap::new();
    for m in fdinfos(pid) {
        if m.contains_key("prog_type")
            && let (Some(id), Some(t), Some(c)) = (
                num(&m, "prog_id"),
                num(&m, "run_time_ns"),
                num(&m, "run_cnt"),
            )
        {
            out.insert(id as u32, (t, c));
        }
    }
    out
}

/// prog id -> raw tracepoint name, from the bpf links `pid` holds.
pub fn raw_tp_links(pid: u32) -> HashMap<u32, String> {
    fdinfos(pid)
        .into_iter()
        .filter(|m| m.get("link_type").is_some_and(|t| t == "raw_tracepoint"))
        .filter_map(|m| Some((num(&m, "prog_id")? as u32, m.get("tp_name")?.clone())))
        .collect()
}

pub fn prog_id_of_fd(fd: i32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("prog_id:"))
        .and_then(|v| v.trim().parse().ok())
}

pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// perf events (BPF links to tracepoints) process `pid` holds open.
pub fn perf_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("perf_event"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// utime + stime of process `pid`, in clock ticks.
pub fn clock_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad /proc/PID/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}
