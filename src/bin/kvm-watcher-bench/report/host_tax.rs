//! Part 6 of the table, the host tax, from the run's JSON (nothing for a run
//! that has none).

use std::fmt::Write as _;

use serde_json::Value;

/// "mean [lo, hi]" of a paired figure of the JSON.
pub(super) fn paired(v: &Value, d: usize) -> String {
    let Some(m) = v["mean"].as_f64() else {
        return "n/a".into();
    };
    match (v["ci_lo"].as_f64(), v["ci_hi"].as_f64()) {
        (Some(lo), Some(hi)) => format!("{m:+.d$} [{lo:+.d$}, {hi:+.d$}]"),
        _ => format!("{m:+.d$}"),
    }
}

pub(super) fn median(v: &Value, d: usize) -> String {
    v["median"]
        .as_f64()
        .map_or_else(|| "n/a".into(), |m| format!("{m:.d$}"))
}

pub fn section(res: &Value) -> String {
    let h = &res["host_tax"];
    let mut s = String::new();
    if !h.is_object() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n== 6. Host tax: a workload that is no VM, pinned to CPU {}, with nothing / empty programs / kvm-watcher serve (default monitors; and with exits' exact time in the VMM, a program on every syscall) / bpftrace (same jobs) attached",
        h["cpu"]
    );
    // Runs with the monitors alone say so (older committed runs have none).
    let alone = h["loads"][0]["attached"].as_array().is_some_and(|a| {
        a.iter().any(|c| {
            c["condition"]
                .as_str()
                .is_some_and(|n| n.ends_with(" alone"))
        })
    });
    if alone {
        let _ = writeln!(
            s,
            "   and each monitor whose hooks reach other tasks alone: kvm-watcher watch, and bpftrace doing its job"
        );
    }
    let _ = writeln!(
        s,
        "   {} rounds of one block per condition, {} trials of {} ms per workload and block, kernel.bpf_stats_enabled={} while timed; added = mean over rounds of (block median - the round's unwatched block median) [95 % CI]",
        h["rounds"],
        h["trials_per_block"],
        h["trial_ms"],
        h["bpf_stats_during_timed_trials"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "{:<15} {:<44} {:>10} {:>30} {:>30} {:>14}",
        "workload", "attached", "ns/op", "added ns/op", "added %", "BPF ns/op"
    );
    for l in h["loads"].as_array().into_iter().flatten() {
        let w = l["workload"].as_str().unwrap_or("");
        let _ = writeln!(
            s,
            "{:<15} {:<44} {:>10} {:>30} {:>30} {:>14}",
            w,
            "none",
            median(&l["none_ns_per_op"], 1),
            "",
            "",
            ""
        );
        for a in l["attached"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "{:<15} {:<44} {:>10} {:>30} {:>30} {:>14}",
                w,
                a["condition"].as_str().unwrap_or(""),
                median(&a["ns_per_op"], 1),
                paired(&a["added_ns"], 1),
                paired(&a["added_pct"], 2),
                median(&a["bpf_ns_per_op"], 1)
            );
        }
        let _ = writeln!(s, "{:<15} ({})", "", l["unit"].as_str().unwrap_or(""));
    }
    let _ = writeln!(
        s,
        "   kvm-watcher's programs on foreign events (no VM runs: every event is rejected), kernel ns per run (runs per op):"
    );
    for p in h["programs"].as_array().into_iter().flatten() {
        // Programs on the hooks the workload drives, not those other VMs on the host fire.
        if p["tool"] != "kvm-watcher serve"
            || p["runs_per_op"]["median"].as_f64().unwrap_or(0.0) < 0.01
        {
            continue;
        }
        let _ = writeln!(
            s,
            "   {:<15} {:<10} {:<28} {:>8} ns/run ({} runs/op)",
            p["workload"].as_str().unwrap_or(""),
            p["monitor"].as_str().unwrap_or(""),
            p["program"].as_str().unwrap_or(""),
            median(&p["ns_per_run"], 1),
            median(&p["runs_per_op"], 2)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_run_without_host_tax_adds_nothing() {
        assert_eq!(section(&json!({ "guest_overhead": [] })), "");
    }

    #[test]
    fn rows_show_the_added_figures_with_their_intervals() {
        let res = json!({ "host_tax": {
            "cpu": 1, "rounds": 12, "trials_per_block": 4, "trial_ms": 150.0,
            "loads": [{
                "workload": "syscall", "unit": "ns per getppid() syscall",
                "none_ns_per_op": { "median": 180.0, "min": 170.0, "max": 200.0, "n": 48 },
                "attached": [{
                    "condition": "kvm-watcher serve",
                    "ns_per_op": { "median": 182.0, "min": 170.0, "max": 210.0, "n": 48 },
                    "added_ns": { "mean": 1.5, "ci_lo": -0.5, "ci_hi": 3.5, "median": 1.0, "n": 12 },
                    "added_pct": { "mean": 0.83, "ci_lo": -0.28, "ci_hi": 1.94, "median": 0.5, "n": 12 },
                    "bpf_ns_per_op": { "median": 12.0, "min": 11.0, "max": 14.0, "n": 12 }
                }]
            }],
            "programs": [
                { "tool": "kvm-watcher serve", "monitor": "exits", "program": "tp_sys_enter",
                  "workload": "syscall", "ns_per_run": { "median": 6.0, "n": 12 },
                  "runs_per_op": { "median": 1.0, "n": 12 } },
                { "tool": "kvm-watcher serve", "monitor": "run_delay", "program": "tp_run_delay_switch",
                  "workload": "syscall", "ns_per_run": { "median": 60.0, "n": 12 },
                  "runs_per_op": { "median": 0.0, "n": 12 } },
                { "tool": "bpftrace", "monitor": "", "program": "sys_enter",
                  "workload": "syscall", "ns_per_run": { "median": 30.0, "n": 12 },
                  "runs_per_op": { "median": 1.0, "n": 12 } }
            ]
        }});
        let t = section(&res);
        assert!(t.contains("== 6. Host tax"), "{t}");
        let row = t
            .lines()
            .find(|l| l.contains("kvm-watcher serve") && l.starts_with("syscall"))
            .unwrap();
        assert!(row.contains("182.0"), "{row}");
        assert!(row.contains("+1.5 [-0.5, +3.5]"), "{row}");
        assert!(row.contains("+0.83 [-0.28, +1.94]"), "{row}");
        assert!(row.contains("12.0"), "{row}");
        assert!(t.contains("tp_sys_enter"), "{t}");
        assert!(
            !t.contains("tp_run_delay_switch"),
            "a program that did not run: {t}"
        );
        assert!(
            !t.contains("program\": \"sys_enter"),
            "bpftrace's programs are not listed"
        );
    }
}
