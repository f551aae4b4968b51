//! Log2 histograms built in the kernel (bucket 0 counts values under 2
//! units, bucket i > 0 values of [2^i, 2^(i+1)) units, the last bucket
//! everything longer): as bcc-style bars and as Prometheus buckets.

/// A bcc-style bar histogram of `hist` (in microseconds), titled `title`.
pub fn histogram_lines(title: &str, hist: &[u64]) -> Vec<String> {
    let Some(first) = hist.iter().position(|&c| c > 0) else {
        return Vec::new();
    };
    let last = hist.iter().rposition(|&c| c > 0).unwrap_or(first);
    let max = hist.iter().copied().max().unwrap_or(1).max(1);
    let mut lines = vec![format!("{title:>26} : {:<8} distribution", "count")];
    for (i, &count) in hist.iter().enumerate().take(last + 1).skip(first) {
        let lo: u64 = if i == 0 { 0 } else { 1 << i };
        let hi: u64 = (1u64 << (i + 1)) - 1;
        let bar = "*".repeat(((count * 40).div_ceil(max)) as usize);
        lines.push(format!("{lo:>12} -> {hi:<10} : {count:<8} |{bar:<40}|"));
    }
    lines
}

/// Prometheus buckets (upper bound in seconds, count) of a histogram of
/// microseconds; the last bucket is +Inf. Per-bucket counts: the encoder
/// accumulates them.
pub fn buckets(hist: &[u64]) -> Vec<(f64, u64)> {
    buckets_in(hist, 1e-6)
}

/// Prometheus buckets of a log2 histogram of `unit` seconds (1e-9 for one of
/// nanoseconds), as [`buckets`].
pub fn buckets_in(hist: &[u64], unit: f64) -> Vec<(f64, u64)> {
    let last = hist.len().saturating_sub(1);
    hist.iter()
        .enumerate()
        .map(|(i, &c)| {
            let le = if i == last {
                f64::INFINITY
            } else {
                (1u64 << (i + 1)) as f64 * unit
            };
            (le, c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_show_the_occupied_range_scaled_to_the_largest_bucket() {
        let mut hist = vec![0; 40];
        hist[0] = 1; // under 2 us
        hist[8] = 40; // 256..511 us
        let lines = histogram_lines("halt duration (us)", &hist);
        assert_eq!(
            lines[0],
            "        halt duration (us) : count    distribution"
        );
        assert_eq!(lines.len(), 1 + 9, "buckets 0..=8, the empty ones included");
        assert!(lines[1].contains("0 -> 1") && lines[1].contains("|*  "));
        assert!(lines[9].contains("256 -> 511") && lines[9].contains(&"*".repeat(40)));
        assert!(histogram_lines("x", &[0; 40]).is_empty());
    }

    #[test]
    fn kernel_buckets_become_upper_bounds_in_seconds_with_inf_last() {
        let b = buckets(&[3, 0, 5, 1]);
        assert_eq!(b[0], (2e-6, 3), "slot 0: under 2 us");
        assert_eq!(b[1], (4e-6, 0));
        assert_eq!(b[2], (8e-6, 5), "slot 2: [4, 8) us");
        assert_eq!(b[3].0, f64::INFINITY);
        assert_eq!(b[3].1, 1);
    }
}
