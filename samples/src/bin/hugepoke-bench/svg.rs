//! `bench.svg`: every sample of every row on one logarithmic time axis
//! (a strip plot), with each row's median and p90 marked; hand-written
//! (`hugepoke::svg`).

use crate::report::Bench;
use crate::stats::{human_ns, median, p90};
use hugepoke::svg::escape as xml;
use std::fmt::Write;

const WIDTH: f64 = 1500.0;
const LABEL_W: f64 = 720.0;
const RIGHT: f64 = 30.0;
const ROW_H: f64 = 24.0;
const TOP: f64 = 50.0;
const AXIS_H: f64 = 40.0;

/// The most dots a row gets: a 10,000-sample row would make the chart
/// megabytes of circles that draw as one smear anyway.
const MAX_DOTS: usize = 1000;

/// The samples a row draws: all of them, or `MAX_DOTS` evenly spaced
/// order statistics (the smallest and the largest among them).
fn dots(samples: &[i64]) -> Vec<i64> {
    if samples.len() <= MAX_DOTS {
        return samples.to_vec();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    (0..MAX_DOTS)
        .map(|k| sorted[k * (sorted.len() - 1) / (MAX_DOTS - 1)])
        .collect()
}

/// Decades that cover every positive sample: `(lo, hi)` in ns, powers of ten.
pub fn decades(b: &Bench) -> (f64, f64) {
    let pos = b
        .rows
        .iter()
        .flat_map(|r| r.samples_ns.iter())
        .filter(|&&v| v > 0)
        .map(|&v| v as f64);
    let (min, max) = pos.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if max == 0.0 {
        return (1e3, 1e9);
    }
    let lo = 10f64.powf(min.log10().floor());
    let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
    (lo, hi)
}

/// The chart as SVG text.
pub fn chart(b: &Bench) -> String {
    let (lo, hi) = decades(b);
    let plot_w = WIDTH - LABEL_W - RIGHT;
    let x =
        |ns: f64| LABEL_W + plot_w * (ns.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
    let height = TOP + ROW_H * b.rows.len() as f64 + AXIS_H;
    let mut s = hugepoke::svg::open(WIDTH, height);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        xml(&format!(
            "hugepoke-bench: latency per sample (log scale); | median, ¦ p90 — {} at {}",
            b.command, b.commit
        ))
    );
    let bottom = TOP + ROW_H * b.rows.len() as f64;
    // Decade grid and labels.
    let mut d = lo;
    while d <= hi * 1.0001 {
        let gx = x(d);
        let _ = writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{bottom}" stroke="#ddd"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bottom + 16.0,
            xml(&human_ns(d as i64))
        );
        d *= 10.0;
    }
    for (i, r) in b.rows.iter().enumerate() {
        let y0 = TOP + ROW_H * i as f64;
        let mid = y0 + ROW_H / 2.0;
        if i % 2 == 1 {
            let _ = writeln!(
                s,
                r##"<rect x="0" y="{y0}" width="{WIDTH}" height="{ROW_H}" fill="#f6f6f6"/>"##
            );
        }
        let hidden = r.samples_ns.iter().filter(|&&v| v <= 0).count();
        let mut label = if hidden > 0 {
            format!("{}. {} ({hidden} ≤ 0 at left edge)", i + 1, r.label)
        } else {
            format!("{}. {}", i + 1, r.label)
        };
        if r.samples_ns.len() > MAX_DOTS {
            label += &format!(" ({MAX_DOTS} of {} samples drawn)", r.samples_ns.len());
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_W - 8.0,
            mid + 4.0,
            xml(&label)
        );
        let _ = write!(s, r##"<g fill="#1f5fa8" fill-opacity="0.35">"##);
        for (k, &v) in dots(&r.samples_ns).iter().enumerate() {
            // Deterministic jitter so that equal samples do not hide each other.
            let jitter = ((k as u64).wrapping_mul(2654435761) % 1000) as f64 / 1000.0 - 0.5;
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2"/>"#,
                x(v as f64),
                mid + jitter * (ROW_H - 8.0)
            );
        }
        let _ = writeln!(s, "</g>");
        if let (Some(m), Some(p)) = (median(&r.samples_ns), p90(&r.samples_ns)) {
            let (mx, px) = (x(m as f64), x(p as f64));
            let _ = writeln!(
                s,
                r##"<line class="median" x1="{mx:.1}" y1="{:.1}" x2="{mx:.1}" y2="{:.1}" stroke="#c0392b" stroke-width="2"/>"##,
                y0 + 2.0,
                y0 + ROW_H - 2.0
            );
            let _ = writeln!(
                s,
                r##"<line class="p90" x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#c0392b" stroke-dasharray="3,2"/>"##,
                y0 + 2.0,
                y0 + ROW_H - 2.0
            );
        }
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_bench;

    #[test]
    fn decades_cover_the_samples() {
        // Samples from 10 ns to 10 ms: 10 ns .. 10 ms exactly.
        assert_eq!(decades(&sample_bench()), (10.0, 1e7));
    }

    #[test]
    fn one_dot_per_sample_and_one_median_per_row() {
        let b = sample_bench();
        let svg = chart(&b);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        let dots = svg.matches("<circle ").count();
        assert_eq!(
            dots,
            b.rows.iter().map(|r| r.samples_ns.len()).sum::<usize>()
        );
        assert_eq!(svg.matches(r#"class="median""#).count(), b.rows.len());
        assert_eq!(svg.matches(r#"class="p90""#).count(), b.rows.len());
        // Labels are escaped, and non-positive samples are said to be clipped.
        assert!(svg.contains("uprobe detach | close"));
        assert!(svg.contains("3. LRU drain (1 ≤ 0 at left edge)"));
        assert!(!svg.contains("<close"));
        // Balanced elements: every opened <g> and <svg> is closed.
        assert_eq!(svg.matches("<g ").count(), svg.matches("</g>").count());
    }

    #[test]
    fn a_long_row_draws_at_most_max_dots_including_its_extremes() {
        let mut b = sample_bench();
        b.rows.truncate(1);
        b.rows[0].samples_ns = (1..=10_000).map(|i| i * 1000).collect();
        let svg = chart(&b);
        assert_eq!(svg.matches("<circle ").count(), MAX_DOTS);
        assert!(svg.contains("(1000 of 10000 samples drawn)"));
        let d = dots(&b.rows[0].samples_ns);
        assert_eq!((d[0], d[MAX_DOTS - 1]), (1000, 10_000_000));
    }

    #[test]
    fn faster_is_further_left() {
        let mut b = sample_bench();
        b.rows.truncate(1);
        b.rows[0].samples_ns = vec![1_000, 1_000_000];
        let svg = chart(&b);
        let xs: Vec<f64> = svg
            .split("<circle cx=\"")
            .skip(1)
            .map(|t| t.split('"').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 2);
        assert!(
            (xs[0] - LABEL_W).abs() < 0.1,
            "1 µs is the left edge: {xs:?}"
        );
        assert!(
            (xs[1] - (WIDTH - RIGHT)).abs() < 0.1,
            "1 ms is the right edge: {xs:?}"
        );
    }
}
