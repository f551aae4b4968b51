//! The pre-copy model against a real migration: QEMU runs a tiny guest
//! that rewrites a region of its memory as fast as it can, dirty-rate
//! measures it and predicts, for a capped link and a downtime limit, whether
//! a migration converges; then QEMU migrates it (to `exec:cat > /dev/null`,
//! at that bandwidth and downtime limit, no auto-converge) and the outcome
//! is compared with the prediction. A region that fits the downtime
//! converges, one several times bigger does not. QEMU sends the final
//! stop-and-copy at full speed, not at the capped bandwidth, so its times
//! are checked only to be no worse than the model's.

mod common;

use std::time::{Duration, Instant};

use common::observe::u;
use common::qemu::{Qemu, writer_image};
use common::windows::vm_rows;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
/// The link both the model and QEMU get, MiB/s.
const LINK_MIB: u64 = 32;
/// The downtime limit, seconds: 32 MiB/s x 0.3 s = 9.6 MiB may be left.
const DOWNTIME_S: f64 = 0.3;

fn ready() -> bool {
    common::require_root() && common::require_kvm() && common::require_bpf()
}

/// dirty-rate's last VM row of `pid` with a 10 s working set and advice.
fn advice(pid: u32, seconds: u64) -> Value {
    let link = LINK_MIB.to_string();
    let downtime = DOWNTIME_S.to_string();
    let extra = ["--link", &link, "--max-downtime", &downtime];
    vm_rows(pid, seconds, (16384, 4096), &extra)
        .into_iter()
        .rfind(|r| !r["migration"].is_null() && r["working_set"].as_array().unwrap().len() >= 3)
        .unwrap_or_else(|| panic!("no advice with a 10 s working set in {seconds} s"))
}

/// Migrates at the model's link and downtime limit for at most `limit`;
/// query-migrate's answer at the end (the migration is cancelled if it
/// has not ended).
fn migrate(q: &mut Qemu, limit: Duration) -> Value {
    q.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": LINK_MIB * MIB, "downtime-limit": (DOWNTIME_S * 1000.0) as u64}),
    );
    q.execute("migrate", json!({"uri": "exec:cat > /dev/null"}));
    let t0 = Instant::now();
    loop {
        let m = q.execute("query-migrate", json!({}));
        let status = m["status"].as_str().unwrap_or("").to_string();
        if status == "completed" || status == "failed" || t0.elapsed() > limit {
            if status != "completed" && status != "failed" {
                q.execute("migrate_cancel", json!({}));
            }
            return m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(name: &str, region: u64) -> (Value, Value) {
    let dir = std::env::temp_dir().join(format!("kvm-watcher-mig-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("writer.bin");
    std::fs::write(&image, writer_image(region)).unwrap();
    let Some(mut q) = Qemu::start_with(name, 1, 256, &["-kernel", image.to_str().unwrap()]) else {
        panic!("QEMU is needed here");
    };
    let pid = q.pid();
    // Firmware remaps low memory while it boots (memslots come and go):
    // measure once the guest runs its loop. On a busy host the boot can take
    // longer: a 10 s round that starts while firmware still remaps memory has
    // its samples dropped, and the next one starts 10 s later (rounds of a
    // window start every max(window, 1 s)), so it ends about 20 s after the
    // watch starts. 25 s leaves room for that second round (the row used is
    // the last one, so a longer watch only adds samples).
    std::thread::sleep(Duration::from_secs(2));
    let row = advice(pid, 25);
    let outcome = migrate(&mut q, Duration::from_secs(40));
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
    (row, outcome)
}

#[test]
fn a_working_set_that_fits_the_downtime_migrates_one_that_does_not_never_does() {
    if !ready() {
        return;
    }
    // 4 MiB rewritten all the time: 4 MiB left after every round, under the
    // 9.6 MiB the downtime allows.
    let (row, outcome) = run("mig-small", 4 * MIB);
    let m = &row["migration"];
    let ws10 = row["working_set"].as_array().unwrap().last().unwrap()["share"]["estimate"]
        .as_f64()
        .unwrap();
    let ws_mib = ws10 * u(&row["pages"]) as f64 * 4096.0 / MIB as f64;
    eprintln!("small: predicted {m}; working set {ws_mib:.1} MiB; QEMU: {outcome}");
    assert!(
        (2.5..=6.0).contains(&ws_mib),
        "the 4 MiB region's working set: {ws_mib:.1} MiB ({row})"
    );
    assert_eq!(m["converges"], true, "predicted: {m}");
    assert_eq!(outcome["status"], "completed", "QEMU: {outcome}");
    let real_ms = outcome["total-time"].as_f64().unwrap();
    let predicted_ms = m["total_s"].as_f64().unwrap() * 1000.0;
    assert!(
        real_ms < predicted_ms * 4.0 + 2000.0,
        "predicted {predicted_ms:.0} ms, took {real_ms:.0} ms"
    );
    assert!(
        outcome["downtime"].as_f64().unwrap() <= DOWNTIME_S * 1000.0 * 3.0,
        "downtime: {outcome}"
    );

    // 64 MiB rewritten all the time: 64 MiB left after every round, 2 s of
    // the link, more than the downtime allows.
    let (row, outcome) = run("mig-big", 64 * MIB);
    let m = &row["migration"];
    eprintln!("big: predicted {m}; QEMU after 40 s: {outcome}");
    assert_eq!(m["converges"], false, "predicted: {m}");
    let needed = m["downtime_s"].as_f64().unwrap();
    assert!(
        (1.2..=3.0).contains(&needed),
        "downtime needed: {needed} s ({m})"
    );
    assert_eq!(outcome["status"], "active", "QEMU: {outcome}");
    assert!(
        outcome["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 5,
        "rounds: {outcome}"
    );
}
