//! Part 7 of the table, the guest tax, from the run's JSON (nothing for a
//! run that has none).

use std::fmt::Write as _;

use serde_json::Value;

use super::host_tax::{median, paired};

/// The width of a paired figure's interval ("" without one).
fn width(v: &Value, d: usize) -> String {
    match (v["ci_lo"].as_f64(), v["ci_hi"].as_f64()) {
        (Some(lo), Some(hi)) => format!("{:.d$}", hi - lo),
        _ => String::new(),
    }
}

pub fn section(res: &Value) -> String {
    let g = &res["guest_tax"];
    let mut s = String::new();
    if !g.is_object() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n== 7. Guest tax: CPU time of the vCPU threads (schedstat) per unit of the guest's own work, with nothing / each monitor / the default set / bpftrace attached"
    );
    let _ = writeln!(
        s,
        "   {} rounds of one block per watched condition with an unwatched block before each and at the end, {} trial(s) per workload and block (a block: the least vCPU ns/unit, the median rate), kernel.bpf_stats_enabled={}; added = mean over rounds of (block - the mean of the unwatched blocks before and after it) [95 % CI], width = CI width; rate = wall-clock work rate",
        g["rounds"],
        g["trials_per_block"],
        g["bpf_stats_during_trials"].as_str().unwrap_or("?")
    );
    let head = [
        "attached",
        "vCPU ns/unit",
        "added ns/unit",
        "added %",
        "width",
        "units/s",
        "rate change %",
    ];
    let _ = writeln!(
        s,
        "{:<26} {:>12} {:>28} {:>24} {:>6} {:>10} {:>24}",
        head[0], head[1], head[2], head[3], head[4], head[5], head[6]
    );
    for w in g["workloads"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "-- {} workload: per {} ({})",
            w["workload"].as_str().unwrap_or(""),
            w["unit"].as_str().unwrap_or(""),
            w["vm_args"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            s,
            "{:<26} {:>12} {:>28} {:>24} {:>6} {:>10} {:>24}",
            "none",
            median(&w["none_cpu_ns_per_unit"], 1),
            "",
            "",
            "",
            median(&w["none_rate"], 0),
            ""
        );
        for a in w["attached"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "{:<26} {:>12} {:>28} {:>24} {:>6} {:>10} {:>24}",
                a["condition"].as_str().unwrap_or(""),
                median(&a["cpu_ns_per_unit"], 1),
                paired(&a["added_cpu_ns"], 1),
                paired(&a["added_cpu_pct"], 2),
                width(&a["added_cpu_pct"], 2),
                median(&a["rate"], 0),
                paired(&a["rate_change_pct"], 2)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_run_without_guest_tax_adds_nothing() {
        assert_eq!(section(&json!({ "host_tax": {} })), "");
    }

    #[test]
    fn rows_show_the_added_cpu_with_its_interval_and_the_rate() {
        let res = json!({ "guest_tax": {
            "rounds": 12, "trials_per_block": 1, "bpf_stats_during_trials": "0",
            "workloads": [{
                "workload": "dirty", "unit": "page written", "vm_args": "--vcpus 1",
                "none_cpu_ns_per_unit": { "median": 6000.0, "min": 5900.0, "max": 6100.0, "n": 12 },
                "none_rate": { "median": 160000.0, "min": 150000.0, "max": 170000.0, "n": 12 },
                "attached": [{
                    "condition": "dirty summary",
                    "cpu_ns_per_unit": { "median": 6100.0, "min": 6000.0, "max": 6200.0, "n": 12 },
                    "added_cpu_ns": { "mean": 98.5, "ci_lo": 80.0, "ci_hi": 117.0, "median": 99.0, "n": 12 },
                    "added_cpu_pct": { "mean": 1.64, "ci_lo": 1.33, "ci_hi": 1.95, "median": 1.6, "n": 12 },
                    "rate": { "median": 157000.0, "min": 140000.0, "max": 170000.0, "n": 12 },
                    "rate_change_pct": { "mean": -1.9, "ci_lo": -4.0, "ci_hi": 0.2, "median": -2.0, "n": 12 }
                }]
            }]
        }});
        let t = section(&res);
        assert!(t.contains("== 7. Guest tax"), "{t}");
        assert!(t.contains("-- dirty workload: per page written"), "{t}");
        let row = t.lines().find(|l| l.starts_with("dirty summary")).unwrap();
        assert!(row.contains("6100.0"), "{row}");
        assert!(row.contains("+98.5 [+80.0, +117.0]"), "{row}");
        assert!(row.contains("+1.64 [+1.33, +1.95]"), "{row}");
        assert!(row.contains(" 0.62 "), "the interval's width: {row}");
        assert!(row.contains("157000"), "{row}");
        assert!(row.contains("-1.90 [-4.00, +0.20]"), "{row}");
        let none = t.lines().find(|l| l.starts_with("none")).unwrap();
        assert!(none.contains("6000.0") && none.contains("160000"), "{none}");
    }
}
