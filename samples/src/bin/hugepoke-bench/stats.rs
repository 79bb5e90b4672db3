//! Order statistics of a row's samples: median and p90 by nearest rank.

/// The `q`-quantile (0 < q <= 1) of `samples` by the nearest-rank method:
/// the smallest sample with at least `q` of all samples at or below it.
/// A sample that was measured, never an interpolation between two.
pub fn quantile(samples: &[i64], q: f64) -> Option<i64> {
    if samples.is_empty() || !(q > 0.0 && q <= 1.0) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn median(samples: &[i64]) -> Option<i64> {
    quantile(samples, 0.5)
}

pub fn p90(samples: &[i64]) -> Option<i64> {
    quantile(samples, 0.9)
}

/// A duration in ns as people read it: `812 ns`, `41.3 µs`, `2.45 ms`, `1.20 s`.
pub fn human_ns(ns: i64) -> String {
    let sign = if ns < 0 { "−" } else { "" };
    let a = ns.unsigned_abs() as f64;
    let (v, unit) = match a {
        a if a < 1e3 => return format!("{sign}{a:.0} ns"),
        a if a < 1e6 => (a / 1e3, "µs"),
        a if a < 1e9 => (a / 1e6, "ms"),
        a => (a / 1e9, "s"),
    };
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{sign}{v:.digits$} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        // 1..=100: the median is the 50th sample, p90 the 90th.
        let v: Vec<i64> = (1..=100).rev().collect();
        assert_eq!(median(&v), Some(50));
        assert_eq!(p90(&v), Some(90));
        // Odd count: the middle one; p90 of 5 is the 5th (ceil(4.5)).
        assert_eq!(median(&[5, 1, 3, 2, 4]), Some(3));
        assert_eq!(p90(&[5, 1, 3, 2, 4]), Some(5));
        assert_eq!(median(&[7]), Some(7));
        assert_eq!(p90(&[7]), Some(7));
        assert_eq!(median(&[]), None);
        assert_eq!(quantile(&[1, 2], 0.0), None);
        // Negative samples (a collapse that finished before RESTORE returned).
        assert_eq!(median(&[-3, -1, 2]), Some(-1));
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human_ns(812), "812 ns");
        assert_eq!(human_ns(41_300), "41.3 µs");
        assert_eq!(human_ns(2_450_000), "2.45 ms");
        assert_eq!(human_ns(123_400_000), "123 ms");
        assert_eq!(human_ns(1_200_000_000), "1.20 s");
        assert_eq!(human_ns(-41_300), "−41.3 µs");
    }
}
