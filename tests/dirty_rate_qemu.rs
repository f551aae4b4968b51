//! dirty-rate's first windows on a real QEMU: a guest that rewrites 32 MiB
//! of its 256 MiB all the time (`writer_image`, QEMU's `-kernel`) changes
//! exactly those pages in any window, from the first one after attach on.
//! The estimate of a window whose sampled pages have no earlier reading
//! must not be reported as a measurement (a QEMU guest rewriting 31 MiB/s
//! once read 0.0 MiB/s, interval 0..7.5, in its first window): so
//! dirty-rate is attached again and again to the running guest, and its
//! first windows and first printed rate, like all its other windows, are
//! trials of its 95 % interval against the region (the rate's truth: the
//! region over the rate's window).

mod common;

use std::time::{Duration, Instant};

use common::qemu::{Qemu, writer_image};
use common::windows::{Trial, binomial_cdf, f, meets, trials, vm_rows};

/// The region the guest rewrites.
const REGION: u64 = 32 << 20;
/// Attaches to the same guest, each watching for `SECONDS`.
const ATTACHES: usize = 10;
const SECONDS: u64 = 3;

fn ready() -> bool {
    common::require_root() && common::require_kvm() && common::require_bpf()
}

/// Waits (up to 60 s) until the guest runs its loop: firmware copies and
/// remaps memory before it, which dirty-rate would rightly count.
fn wait_for_the_loop(q: &mut Qemu) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // The loop's code, right after the image's 32-byte header at 1 MiB.
    let code = 0x10_0020..0x10_0040;
    while !q.rip().is_some_and(|rip| code.contains(&rip)) {
        assert!(
            Instant::now() < deadline,
            "the guest never ran its loop (RIP {:?})",
            q.rip()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A rate printed: pages/s (estimate, low, high), over so many seconds.
type Rate = ((f64, f64, f64), f64);

/// One attach: every window of `pid` it reported, and its first rate.
fn attach(pid: u32) -> (Vec<Trial>, Option<Rate>) {
    let rows = vm_rows(pid, SECONDS, (4096, 1024), &[]);
    let rate = rows
        .iter()
        .find(|r| !r["rate_pages_per_s"].is_null())
        .map(|r| {
            let x = &r["rate_pages_per_s"];
            (
                (f(&x["estimate"]), f(&x["low"]), f(&x["high"])),
                f(&r["window_s"]),
            )
        });
    (trials(&rows, pid), rate)
}

#[test]
fn on_a_real_qemu_the_first_windows_hold_what_the_guest_rewrites() {
    if !ready() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvm-watcher-drq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("writer.bin");
    std::fs::write(&image, writer_image(REGION)).unwrap();
    let Some(mut q) = Qemu::start_with("dr-first", 1, 256, &["-kernel", image.to_str().unwrap()])
    else {
        panic!("QEMU is needed here");
    };
    wait_for_the_loop(&mut q);
    let pid = q.pid();
    // The region's pages change in every window (a sweep takes microseconds),
    // no other page does once the loop runs.
    let truth = ((REGION / 4096) as f64, (REGION / 4096) as f64);
    let (mut firsts, mut all) = (Vec::new(), Vec::new());
    let mut table = Vec::new();
    for n in 0..ATTACHES {
        let (ts, rate) = attach(pid);
        // The first rate printed: the region over the rate's window.
        let ((est, low, high), window_s) =
            rate.unwrap_or_else(|| panic!("attach {n}: no rate in {SECONDS} s"));
        let rate_truth = truth.0 / window_s;
        let ok = low <= rate_truth && rate_truth <= high;
        firsts.push(ok);
        table.push(format!(
            "attach {n}, first rate: {est:.0} pages/s ({low:.0}..{high:.0}) over {window_s:.2} s, truth {rate_truth:.0}{}",
            if ok { "" } else { "  MISSED" }
        ));
        for len in [0.1, 1.0] {
            let first = ts
                .iter()
                .filter(|t| t.window_s == len)
                .min_by_key(|t| t.ended_ns)
                .unwrap_or_else(|| panic!("attach {n}: no window of {len} s in {SECONDS} s"));
            firsts.push(meets(first, truth));
        }
        let t0 = ts.iter().map(|t| t.ended_ns).min().unwrap_or(0);
        for t in &ts {
            let ok = meets(t, truth);
            all.push(ok);
            table.push(format!(
                "attach {n}, window {:.1} s ending at +{:.2} s: {:.0} pages ({:.0}..{:.0}) of {:.0}, truth {:.0}{}",
                t.window_s,
                (t.ended_ns - t0) as f64 / 1e9,
                t.share.0 * t.pages,
                t.share.1 * t.pages,
                t.share.2 * t.pages,
                t.pages,
                truth.0,
                if ok { "" } else { "  MISSED" }
            ));
        }
    }
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
    let count = |v: &[bool]| v.iter().filter(|&&ok| ok).count();
    let (f_held, a_held) = (count(&firsts), count(&all));
    eprintln!("{}", table.join("\n"));
    eprintln!(
        "first windows: {f_held} of {} hold the region; all windows: {a_held} of {}",
        firsts.len(),
        all.len()
    );
    // With a true 95 %, fewer happens less than once in 10,000 runs.
    for (what, held, n) in [
        ("first windows", f_held, firsts.len()),
        ("windows", a_held, all.len()),
    ] {
        assert!(
            binomial_cdf(held, n, 0.95) >= 1e-4,
            "{what}: only {held} of {n} intervals hold the region the guest rewrites:\n{}",
            table.join("\n")
        );
    }
}
