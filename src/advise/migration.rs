//! Live migration: with `--link`, the dirty-rate monitor's pre-copy
//! convergence advice (src/monitors/dirty_rate/precopy.rs) as a finding.

use serde_json::Value;

use super::input::Vm;
use super::{Change, Finding};

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_f64)
}

/// A pre-copy migration over the link that does not converge is a finding;
/// `None` when the dirty-rate monitor did not run (no `--link`).
pub fn rule(vm: &Vm) -> Option<Result<Finding, String>> {
    let row = vm.dirty.as_ref()?;
    let Some(m) = row.get("migration").filter(|m| !m.is_null()) else {
        return Some(Err(
            "migration: no dirty-rate window ended, so no convergence advice (watch longer than --window)"
                .into(),
        ));
    };
    let text = m.get("text").and_then(Value::as_str).unwrap_or("");
    if m.get("converges").and_then(Value::as_bool) != Some(false) {
        return Some(Err(format!("migration: {text}")));
    }
    let rate_mib = f(row, &["rate_mib_per_s"]).unwrap_or(0.0);
    let mut evidence = vec![format!(
        "changed memory {rate_mib:.1} MiB/s ({:.0} pages/s, 95 % interval {:.0}..{:.0}) over {:.1} s windows; {text}",
        f(row, &["rate_pages_per_s", "estimate"]).unwrap_or(0.0),
        f(row, &["rate_pages_per_s", "low"]).unwrap_or(0.0),
        f(row, &["rate_pages_per_s", "high"]).unwrap_or(0.0),
        f(row, &["window_s"]).unwrap_or(0.0),
    )];
    for w in row
        .get("working_set")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        evidence.push(format!(
            "working set: {:.2} % of RAM changed within {} s",
            f(w, &["share", "estimate"]).unwrap_or(0.0) * 100.0,
            f(w, &["window_s"]).unwrap_or(0.0)
        ));
    }
    let throttle = m.get("throttle_percent").and_then(Value::as_u64);
    let limit = f(m, &["dirty_limit_mib_per_s"]).unwrap_or(0.0);
    let downtime = f(m, &["downtime_s"]).unwrap_or(0.0);
    let throttle_text = throttle.map_or("no vCPU throttle up to 99 % is enough".to_string(), |p| {
        format!("migrate-set-parameters cpu-throttle-initial {p} with auto-converge on")
    });
    Some(Ok(Finding {
        rule: "migration",
        // The model's own words: its rate is the fastest window's.
        problem: format!(
            "a pre-copy live migration {}",
            text.split(';').next().unwrap_or("does not converge")
        ),
        evidence,
        cost_cpu: 0.0,
        guest_time_lost: 0.0,
        change: Change {
            setting: format!(
                "{throttle_text}; or a dirty limit of {limit:.1} MiB/s (QEMU set-vcpu-dirty-limit, dirty ring); or downtime-limit {:.0} ms; or a faster link",
                downtime * 1e3
            ),
            scope: "per VM, for the migration".into(),
        },
        predicted: format!(
            "pre-copy converges within the downtime allowed (with the throttle or the dirty limit), or pauses the guest {downtime:.2} s"
        ),
        figures: serde_json::json!({"rate_mib_per_s": row.get("rate_mib_per_s"),
            "rate_pages_per_s": row.get("rate_pages_per_s"), "window_s": row.get("window_s"),
            "pages": row.get("pages"), "samples": row.get("samples"), "changed": row.get("changed"),
            "time_ns": row.get("time_ns"), "working_set": row.get("working_set"), "migration": m}),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(migration: Value) -> Vm {
        Vm {
            pid: 1,
            dirty: Some(
                serde_json::json!({"monitor": "dirty_rate", "pid": 1, "slot": null,
                "window_s": 1.0, "rate_mib_per_s": 500.0,
                "rate_pages_per_s": {"estimate": 128000.0, "low": 120000.0, "high": 136000.0},
                "working_set": [{"window_s": 1.0, "share": {"estimate": 0.5}}],
                "migration": migration}),
            ),
            ..Vm::default()
        }
    }

    #[test]
    fn only_a_migration_that_does_not_converge_is_a_finding() {
        assert!(rule(&Vm::default()).is_none());
        let ok = vm(serde_json::json!({"converges": true, "text": "converges: 2 rounds"}));
        assert_eq!(
            rule(&ok).unwrap().unwrap_err(),
            "migration: converges: 2 rounds"
        );
        assert!(rule(&vm(Value::Null)).unwrap().is_err());
        let bad = vm(serde_json::json!({"converges": false, "downtime_s": 4.0,
            "throttle_percent": 60, "dirty_limit_mib_per_s": 80.0, "text": "does not converge"}));
        let f = rule(&bad).unwrap().unwrap();
        assert_eq!(f.problem, "a pre-copy live migration does not converge");
        assert!(f.evidence[0].contains("500.0 MiB/s"), "{:?}", f.evidence);
        assert!(f.change.setting.contains("cpu-throttle-initial 60"));
        assert!(f.change.setting.contains("80.0 MiB/s") && f.change.setting.contains("4000 ms"));
        assert!(f.evidence[1].contains("50.00 %"));
    }

    #[test]
    fn the_latest_advice_is_kept_over_a_later_row_without() {
        let mut rec = super::super::input::Recording::default();
        let row = |t: u64, m: Value| {
            serde_json::json!({"monitor": "dirty_rate", "pid": 3, "slot": null,
                "time_ns": t, "migration": m})
        };
        rec.add(&row(1, serde_json::json!({"converges": true})));
        rec.add(&row(2, Value::Null));
        rec.add(&serde_json::json!({"monitor": "dirty_rate", "pid": 3, "slot": 1, "time_ns": 3}));
        assert_eq!(rec.vms[&3].dirty.as_ref().unwrap()["time_ns"], 1);
        rec.add(&row(4, serde_json::json!({"converges": false})));
        assert_eq!(rec.vms[&3].dirty.as_ref().unwrap()["time_ns"], 4);
    }
}
