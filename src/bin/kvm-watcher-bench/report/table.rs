//! The table a run prints (and writes as bench.txt), from its JSON.

use std::fmt::Write as _;

use serde_json::Value;

pub fn table(res: &Value) -> String {
    let mut s = String::new();
    let f = |v: &Value, d: usize| -> String {
        let Some(m) = v["median"].as_f64() else {
            return "n/a".into();
        };
        let (lo, hi) = (
            v["min"].as_f64().unwrap_or(m),
            v["max"].as_f64().unwrap_or(m),
        );
        if v["n"].as_u64().unwrap_or(0) > 1 {
            format!("{m:.d$} ({lo:.d$}..{hi:.d$})")
        } else {
            format!("{m:.d$}")
        }
    };
    let _ = writeln!(
        s,
        "\n== 1. Kernel cost per event (ns, median (min..max) over trials; every candidate attached in the same trial)"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<10} {:>9} {:>22} {:>22} {:>24} {:>18} {:>18}",
        "monitor",
        "mode",
        "events",
        "floor raw_tp",
        "floor classic tp",
        "kvm-watcher",
        "x floor",
        "bpftrace/ours"
    );
    for c in res["kernel_cost"]["cases"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<10} {:<10} {:>9.0} {:>22} {:>22} {:>24} {:>18} {:>18}",
            c["monitor"].as_str().unwrap_or(""),
            c["mode"].as_str().unwrap_or(""),
            c["events_per_trial"]["median"].as_f64().unwrap_or(0.0),
            f(&c["floor_raw_tp_ns"], 1),
            f(&c["floor_classic_tp_ns"], 1),
            f(&c["kvm_watcher_ns"], 1),
            f(&c["ratio_to_floor"], 2),
            f(&c["bpftrace_over_kvm_watcher"], 1),
        );
        let _ = writeln!(
            s,
            "{:<21} bpftrace ({}): {} ns",
            "",
            c["bpftrace_job"].as_str().unwrap_or(""),
            f(&c["bpftrace_ns"], 1)
        );
    }
    let _ = writeln!(
        s,
        "\n== 2. Guest-visible overhead (work rate, % lost vs the same round's unwatched run)"
    );
    for g in res["guest_overhead"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<6} {:<28} {:>28} {:<16} lost {:>22} %",
            g["workload"].as_str().unwrap_or(""),
            g["config"].as_str().unwrap_or(""),
            f(&g["rate"], 0),
            g["unit"].as_str().unwrap_or(""),
            f(&g["work_lost_pct"], 2)
        );
    }
    let p = &res["pipeline"];
    let _ = writeln!(
        s,
        "\n== 3. User-space pipeline: max {} events/s with 0 lost; consumer CPU {} % at 100k/s, {} % at 1M/s",
        f(&p["max_rate_zero_lost"], 0),
        f(&p["cpu_pct_at_100k"], 1),
        f(&p["cpu_pct_at_1m"], 1)
    );
    let m = &res["memory"];
    let _ = writeln!(
        s,
        "\n== 4. Memory: {} distinct pages tracked, peak RSS {:.1} MiB, BPF maps {:.1} MiB memlock",
        m["distinct_pages"],
        m["peak_rss_mib"].as_f64().unwrap_or(0.0),
        m["maps_memlock_mib"].as_f64().unwrap_or(0.0)
    );
    for map in m["maps"].as_array().into_iter().flatten().take(6) {
        let _ = writeln!(
            s,
            "   {:<18} {:>10} entries max {:>12} bytes",
            map["name"].as_str().unwrap_or(""),
            map["max_entries"],
            map["memlock_bytes"]
        );
    }
    let sc = &m["scale"];
    let kib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    let _ = writeln!(
        s,
        "   per GiB of dirty-logged guest memory: --summary {:.1} KiB maps + {:.1} KiB RSS; with --counts-file {:.1} KiB maps + {:.1} KiB RSS (fixed: {:.0} / {:.0} KiB maps)",
        kib(&sc["summary_dirty_maps"]["per_gib_bytes"]),
        kib(&sc["summary_rss"]["per_gib_bytes"]),
        kib(&sc["counts_dirty_maps"]["per_gib_bytes"]),
        kib(&sc["counts_rss"]["per_gib_bytes"]),
        kib(&sc["summary_dirty_maps"]["base_bytes"]),
        kib(&sc["counts_dirty_maps"]["base_bytes"])
    );
    for p in sc["points"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "   {:>6} MiB ({} VMs): --summary dirty maps {:>9.1} KiB (all {:>8.1}), RSS {:>7.1} MiB; --counts-file dirty maps {:>9.1} KiB (all {:>8.1}), RSS {:>7.1} MiB",
            p["guest_mib"],
            p["vms"],
            kib(&p["summary_dirty_maps_bytes"]),
            kib(&p["summary_all_maps_bytes"]),
            p["summary_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            kib(&p["counts_dirty_maps_bytes"]),
            kib(&p["counts_all_maps_bytes"]),
            p["counts_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0
        );
    }
    let _ = writeln!(
        s,
        "\n== 5. Start + attach, detach + exit (ms), peak RSS (MiB)"
    );
    for a in res["attach"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<12} {:<10} attach {:>22} detach {:>22} total {:>22} rss {:>18}",
            a["tool"].as_str().unwrap_or(""),
            a["monitor"].as_str().unwrap_or(""),
            f(&a["start_attach_ms"], 1),
            f(&a["detach_exit_ms"], 1),
            f(&a["total_ms"], 1),
            f(&a["peak_rss_mib"], 1)
        );
    }
    // Runs before part 6 existed have no host tax: their table is unchanged.
    s.push_str(&super::host_tax::section(res));
    s.push_str(&super::guest_tax::section(res));
    s.push_str(&targets_section(res));
    s
}

/// The targets of `res`: met, missed, or undecided (a mean whose 95 %
/// interval holds the target); a run from before the verdict had three
/// values says met or missed.
pub fn targets_section(res: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n== Targets");
    for t in res["targets"].as_array().into_iter().flatten() {
        let verdict = match (t["verdict"].as_str(), t["met"].as_bool()) {
            (Some("met"), _) | (None, Some(true)) => "MET",
            (Some("undecided"), _) => "UNDECIDED",
            _ => "MISSED",
        };
        let _ = writeln!(
            s,
            "[{verdict:<9}] {:<84} {:>24} {}",
            t["target"].as_str().unwrap_or(""),
            t["spread"].as_str().unwrap_or(""),
            t["unit"].as_str().unwrap_or("")
        );
    }
    s
}
