//! Small statistics: a median with its range over trials, and the shuffle
//! that interleaves configurations differently in each round.

use serde::Serialize;

#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(v: &[f64]) -> Spread {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            n: 0,
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    }
}

impl Spread {
    pub fn show(&self, digits: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        if self.n == 1 {
            return format!("{:.*}", digits, self.median);
        }
        format!(
            "{:.*} ({:.*}..{:.*})",
            digits, self.median, digits, self.min, digits, self.max
        )
    }
}

/// A deterministic shuffle (xorshift), so runs interleave configurations differently per round.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// Row `r` of a balanced (Williams) Latin square over `n` conditions: in
/// every `n` rows (`2n` when `n` is odd, the second `n` mirrored) each
/// condition comes once in each position and right after each other one
/// equally often, so drift and warm-up favour none of them.
pub fn williams(n: usize, r: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    // 0, 1, n-1, 2, n-2, ...: every difference between neighbours once.
    let first = (0..n).map(|i| {
        if i % 2 == 1 {
            i.div_ceil(2)
        } else {
            (n - i / 2) % n
        }
    });
    let rows = if n.is_multiple_of(2) { n } else { 2 * n };
    let r = r % rows;
    let mut row: Vec<usize> = first.map(|c| (c + r) % n).collect();
    if r >= n {
        row.reverse();
    }
    row
}

/// The mean of paired differences with its 95 % confidence interval.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct Paired {
    /// Mean of the differences.
    pub mean: f64,
    /// 95 % confidence interval of the mean (Student's t over the pairs).
    pub ci_lo: f64,
    pub ci_hi: f64,
    /// Median of the differences (robust to a disturbed pair).
    pub median: f64,
    /// Number of pairs.
    pub n: usize,
}

/// Student's t, two-sided 95 % (the 0.975 quantile), for `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        // Within 0.002 of the exact quantile beyond the table.
        _ => 1.96 + 2.4 / df as f64,
    }
}

/// The mean of `d` (one difference per pair, non-finite ones dropped) with
/// its t-interval; with one pair the interval is unknown (NaN).
pub fn paired(d: &[f64]) -> Paired {
    let v: Vec<f64> = d.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return Paired {
            mean: f64::NAN,
            ci_lo: f64::NAN,
            ci_hi: f64::NAN,
            median: f64::NAN,
            n: 0,
        };
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let half = if n > 1 {
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        t975(n - 1) * (var / n as f64).sqrt()
    } else {
        f64::NAN
    };
    Paired {
        mean,
        ci_lo: mean - half,
        ci_hi: mean + half,
        median: spread(&v).median,
        n,
    }
}

/// Pairs `treated[i]` with `base[i]` (the same round): the added amount
/// `treated - base` and the added share `100 * (treated / base - 1)` in %.
pub fn added(base: &[f64], treated: &[f64]) -> (Paired, Paired) {
    let diff: Vec<f64> = base.iter().zip(treated).map(|(b, t)| t - b).collect();
    let pct: Vec<f64> = base
        .iter()
        .zip(treated)
        .map(|(b, t)| 100.0 * (t / b - 1.0))
        .collect();
    (paired(&diff), paired(&pct))
}

impl Paired {
    /// "mean [lo, hi]" with `digits` decimals ("n/a" without pairs).
    pub fn show(&self, digits: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        if !self.ci_lo.is_finite() {
            return format!("{:+.*}", digits, self.mean);
        }
        format!(
            "{:+.*} [{:+.*}, {:+.*}]",
            digits, self.mean, digits, self.ci_lo, digits, self.ci_hi
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_interval_matches_a_hand_computed_t_interval() {
        // Differences 1, 2, 3, 4, 5: mean 3, s = sqrt(2.5), t(4) = 2.776.
        let p = paired(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let half = 2.776 * (2.5f64 / 5.0).sqrt();
        assert_eq!(p.n, 5);
        assert!((p.mean - 3.0).abs() < 1e-12);
        assert!((p.ci_lo - (3.0 - half)).abs() < 1e-9, "{p:?}");
        assert!((p.ci_hi - (3.0 + half)).abs() < 1e-9, "{p:?}");
        assert_eq!(p.median, 3.0);
    }

    #[test]
    fn t_quantiles_beyond_the_table_are_close() {
        // Exact: t(40) = 2.021, t(60) = 2.000, t(120) = 1.980.
        for (df, t) in [(40, 2.021), (60, 2.000), (120, 1.980)] {
            assert!((t975(df) - t).abs() < 0.003, "df {df}: {}", t975(df));
        }
        assert_eq!(t975(30), 2.042);
    }

    #[test]
    fn paired_drops_non_finite_and_handles_few_pairs() {
        let p = paired(&[f64::NAN, 2.0, f64::INFINITY]);
        assert_eq!(p.n, 1);
        assert_eq!(p.mean, 2.0);
        assert!(p.ci_lo.is_nan() && p.ci_hi.is_nan());
        assert_eq!(p.show(1), "+2.0");
        assert_eq!(paired(&[]).show(1), "n/a");
        assert_eq!(paired(&[]).n, 0);
    }

    /// Each condition once per row and per position, each ordered pair of
    /// neighbours equally often over a whole cycle of rows.
    #[test]
    fn williams_squares_are_balanced() {
        use std::collections::BTreeMap;
        for n in 2..=9 {
            let rows = if n % 2 == 0 { n } else { 2 * n };
            let mut at: BTreeMap<(usize, usize), usize> = BTreeMap::new();
            let mut after: BTreeMap<(usize, usize), usize> = BTreeMap::new();
            for r in 0..rows {
                let o = williams(n, r);
                let mut sorted = o.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n {n} row {r}: {o:?}");
                for (i, &c) in o.iter().enumerate() {
                    *at.entry((c, i)).or_default() += 1;
                }
                for w in o.windows(2) {
                    *after.entry((w[0], w[1])).or_default() += 1;
                }
            }
            let per_pos = rows / n;
            assert!(at.values().all(|&k| k == per_pos), "n {n}: {at:?}");
            assert_eq!(after.len(), n * (n - 1), "n {n}: {after:?}");
            let once = rows / n;
            assert!(after.values().all(|&k| k == once), "n {n}: {after:?}");
        }
        assert_eq!(williams(4, 1), [1, 2, 0, 3]);
        assert_eq!(williams(4, 5), williams(4, 1), "rows repeat");
        assert!(williams(0, 3).is_empty());
    }

    #[test]
    fn added_pairs_each_round_with_its_own_baseline() {
        // A drifting baseline: each round's treatment is 10 % above its own round.
        let base = [100.0, 200.0, 300.0];
        let treated = [110.0, 220.0, 330.0];
        let (ns, pct) = added(&base, &treated);
        assert!((pct.mean - 10.0).abs() < 1e-9);
        assert!((pct.ci_hi - pct.ci_lo).abs() < 1e-9, "no spread: {pct:?}");
        assert!((ns.mean - 20.0).abs() < 1e-9);
        assert_eq!(ns.median, 20.0);
        assert_eq!(pct.show(2), "+10.00 [+10.00, +10.00]");
    }
}
