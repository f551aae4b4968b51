//! From sampled pages to a dirty rate: the share of a VM's pages whose
//! content changed within a window, with a 95 % confidence interval, scaled
//! to pages (and bytes) per second. Pure: the sampler counts, this decides
//! what the counts mean.

use serde::Serialize;

use statrs::distribution::{Beta, ContinuousCDF};

/// Outside a two-sided 95 % interval: 2.5 % on each side.
const TAIL: f64 = 0.025;

/// One window's sample: `changed` of `compared` randomly chosen pages of
/// `population` changed within `window_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Pages the samples were drawn from (the VM's RAM).
    pub population: u64,
    /// Pages compared at both ends of the window.
    pub compared: u64,
    /// Of those, pages whose content differed.
    pub changed: u64,
    /// The window, seconds.
    pub window_s: f64,
}

/// A share with its 95 % interval, 0..=1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Share {
    /// Point estimate (changed / compared).
    pub estimate: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
}

impl Share {
    /// Scales every end by `factor`.
    pub fn scaled(self, factor: f64) -> Share {
        Share {
            estimate: self.estimate * factor,
            low: self.low * factor,
            high: self.high * factor,
        }
    }

    /// Whether `value` lies in the interval.
    pub fn contains(&self, value: f64) -> bool {
        self.low <= value && value <= self.high
    }
}

/// The exact (Clopper-Pearson) 95 % interval of `k` successes in `n`
/// trials: the shares under which `k` or more, and `k` or fewer, successes
/// each have a chance of at least 2.5 % (Beta quantiles). It holds the true
/// share at least 95 % of the time whatever that share is; Wilson's score
/// interval, used before, holds it only 91 to 94 % of the time when a
/// window's sample expects a handful of changed pages (0.5 to 25 of 4096),
/// which is the common case: most pages of most guests do not change in a
/// second.
pub fn clopper_pearson(k: u64, n: u64) -> Option<Share> {
    if n == 0 || k > n {
        return None;
    }
    let quantile = |a: u64, b: u64, q: f64| {
        Beta::new(a as f64, b as f64)
            .ok()
            .map(|d| d.inverse_cdf(q).clamp(0.0, 1.0))
    };
    let low = if k == 0 {
        0.0
    } else {
        quantile(k, n - k + 1, TAIL)?
    };
    let high = if k == n {
        1.0
    } else {
        quantile(k + 1, n - k, 1.0 - TAIL)?
    };
    Some(Share {
        estimate: k as f64 / n as f64,
        low,
        high,
    })
}

impl Sample {
    /// The share of the VM's pages that changed within the window.
    pub fn share(&self) -> Option<Share> {
        clopper_pearson(self.changed, self.compared)
    }

    /// Changed distinct pages per second, with its interval.
    pub fn pages_per_second(&self) -> Option<Share> {
        if self.window_s <= 0.0 {
            return None;
        }
        Some(self.share()?.scaled(self.population as f64 / self.window_s))
    }
}

/// How many pages to sample from `population` pages: `per_gib` per GiB of
/// 4 KiB pages (at least 1 for a non-empty VM), then cut so that reading each
/// twice per round, `rounds_per_s` rounds a second, stays under
/// `max_bytes_per_s`. Returns (samples, whether the cap cut them).
pub fn sample_count(
    population: u64,
    per_gib: u64,
    rounds_per_s: f64,
    max_bytes_per_s: u64,
) -> (u64, bool) {
    const PAGES_PER_GIB: u64 = (1 << 30) / 4096;
    if population == 0 {
        return (0, false);
    }
    let wanted = (population as u128 * per_gib as u128).div_ceil(PAGES_PER_GIB as u128) as u64;
    let wanted = wanted.clamp(1, population);
    let bytes_per_sample = 2.0 * 4096.0 * rounds_per_s;
    let allowed = (max_bytes_per_s as f64 / bytes_per_sample).floor() as u64;
    if allowed < wanted {
        (allowed.max(1), true)
    } else {
        (wanted, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, eps: f64) -> bool {
        (a - b).abs() <= eps
    }

    #[test]
    fn the_exact_interval_matches_worked_values() {
        // 10 of 100: the textbook Clopper-Pearson interval is 0.0490 .. 0.1762.
        let s = clopper_pearson(10, 100).unwrap();
        assert!(close(s.estimate, 0.1, 1e-12));
        assert!(close(s.low, 0.0490, 1e-4), "{s:?}");
        assert!(close(s.high, 0.1762, 1e-4), "{s:?}");
        // 0 of 512: 0 .. 1 - 0.025^(1/512) = 0.007179.
        let z = clopper_pearson(0, 512).unwrap();
        assert_eq!(z.low, 0.0);
        assert_eq!(z.estimate, 0.0);
        assert!(close(z.high, 0.007_179, 1e-5), "{z:?}");
        // All of them: the interval touches 1, and starts at 0.025^(1/20) = 0.8316.
        let all = clopper_pearson(20, 20).unwrap();
        assert_eq!(all.high, 1.0);
        assert!(close(all.low, 0.8316, 1e-4), "{all:?}");
        assert!(clopper_pearson(1, 0).is_none());
        assert!(clopper_pearson(3, 2).is_none());
    }

    #[test]
    fn the_interval_covers_the_truth_at_least_95_percent_of_the_time() {
        // Exact coverage, summed over the binomial distribution of k, at the
        // shares dirty-rate meets: a handful of 4096 samples changed (where
        // Wilson's interval covers 91 to 94 %) up to a fifth of them.
        use statrs::distribution::{Binomial, Discrete};
        let n = 4096u64;
        for expected in [0.5, 1.0, 2.0, 6.0, 25.0, 60.0, 800.0] {
            let p = expected / n as f64;
            let dist = Binomial::new(p, n).unwrap();
            let mut coverage = 0.0;
            for k in 0..=n {
                if clopper_pearson(k, n).unwrap().contains(p) {
                    coverage += dist.pmf(k);
                }
                if k as f64 > expected * 4.0 + 50.0 {
                    break;
                }
            }
            assert!(
                coverage >= 0.95,
                "{expected} expected of {n}: coverage {coverage}"
            );
        }
    }

    #[test]
    fn a_sample_scales_to_pages_per_second() {
        // 1 GiB, 5 of 512 pages changed in 0.5 s: 2560 pages/s.
        let s = Sample {
            population: 262_144,
            compared: 512,
            changed: 5,
            window_s: 0.5,
        };
        let r = s.pages_per_second().unwrap();
        assert!(close(r.estimate, 5.0 / 512.0 * 262_144.0 * 2.0, 1e-6));
        assert!(r.low < r.estimate && r.estimate < r.high);
        let none = Sample { changed: 0, ..s };
        let r = none.pages_per_second().unwrap();
        assert_eq!((r.estimate, r.low), (0.0, 0.0));
        assert!(r.high > 0.0);
        assert!(Sample { window_s: 0.0, ..s }.pages_per_second().is_none());
        assert!(
            Sample {
                compared: 0,
                changed: 0,
                ..s
            }
            .pages_per_second()
            .is_none()
        );
    }

    #[test]
    fn sample_counts_follow_the_size_and_the_read_cap() {
        const GIB: u64 = 262_144;
        // 512 per GiB, 1 round/s, plenty of room: 512 and 8192.
        assert_eq!(sample_count(GIB, 512, 1.0, 1 << 30), (512, false));
        assert_eq!(sample_count(16 * GIB, 512, 1.0, 1 << 30), (8192, false));
        // Small VMs get at least one page, never more than they have.
        assert_eq!(sample_count(10, 512, 1.0, 1 << 30), (1, false));
        assert_eq!(sample_count(10, 1 << 20, 1.0, 1 << 30), (10, false));
        assert_eq!(sample_count(0, 512, 1.0, 1 << 30), (0, false));
        // 16 GiB under 16 MiB/s at 1 round/s: 16 MiB / 8 KiB = 2048 pages.
        assert_eq!(sample_count(16 * GIB, 512, 1.0, 16 << 20), (2048, true));
        // Two rounds a second halve it.
        assert_eq!(sample_count(16 * GIB, 512, 2.0, 16 << 20), (1024, true));
    }
}
