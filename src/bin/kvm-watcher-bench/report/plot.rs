//! The plot of kernel cost per event (bench.svg), drawn from the run's JSON.

use std::fmt::Write as _;

use serde_json::Value;

/// Grouped bars of ns/event per monitor and mode, log scale, as SVG (hand-written:
/// a few rectangles do not need a plotting crate and its dependencies). `cases`
/// are bench.json's kernel_cost.cases.
pub fn plot(cases: &[Value], title: &str) -> String {
    let median = |c: &Value, k: &str| c[k]["median"].as_f64().unwrap_or(f64::NAN);
    let series: [(&str, &str, &str); 4] = [
        (
            "empty program, raw_tp (floor)",
            "#9e9e9e",
            "floor_raw_tp_ns",
        ),
        (
            "empty program, classic tracepoint",
            "#cfcfcf",
            "floor_classic_tp_ns",
        ),
        ("kvm-watcher", "#1f77b4", "kvm_watcher_ns"),
        ("bpftrace (count / printf)", "#d62728", "bpftrace_ns"),
    ];
    let (w, h) = (960.0, 520.0);
    let (left, right, top, bottom) = (70.0, 20.0, 60.0, 110.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let (lo, hi) = (1.0f64, 100_000.0f64);
    let y =
        |v: f64| top + ph * (1.0 - (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        w / 2.0,
        xml(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"40\" text-anchor=\"middle\" fill=\"#555\">kernel time per hook event, ns (log scale; BPF stats run_time_ns / run_cnt, medians)</text>",
        w / 2.0
    );
    for e in 0..=5 {
        let v = 10f64.powi(e);
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e0e0e0\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            yy + 4.0,
            v
        );
    }
    let group = pw / cases.len().max(1) as f64;
    let bw = group * 0.8 / series.len() as f64;
    for (i, c) in cases.iter().enumerate() {
        let gx = left + group * i as f64 + group * 0.1;
        for (j, (_, color, key)) in series.iter().enumerate() {
            let v = median(c, key);
            if !v.is_finite() || v <= 0.0 {
                continue;
            }
            let x = gx + bw * j as f64;
            let yy = y(v);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{v:.1} ns</title></rect>",
                bw - 2.0,
                top + ph - yy
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                x + bw / 2.0 - 1.0,
                yy - 3.0,
                if v >= 1000.0 {
                    format!("{:.1}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                }
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} {}</text>",
            gx + group * 0.4,
            top + ph + 18.0,
            c["monitor"].as_str().unwrap_or(""),
            c["mode"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"black\"/>",
        top + ph
    );
    for (j, (name, color, _)) in series.iter().enumerate() {
        let x = left + 10.0 + (j % 2) as f64 * 420.0;
        let yy = h - 60.0 + (j / 2) as f64 * 20.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            yy - 10.0,
            x + 20.0,
            yy,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
