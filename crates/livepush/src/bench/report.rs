//! What a bench run prints: a latency histogram that many tasks record into at once, the
//! percentiles and the distribution (for plots) read from it, deliveries counted per time
//! bucket as they arrive, and the final report as a markdown table or one JSON object.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: values are kept with a relative error below 1/128 (0.8 %).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values at or above 2^40 µs (12 days) land in the last bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 1) as u64 * SUB) as usize;

/// A log-linear histogram of microsecond values with atomic counters, so that thousands of
/// subscriber tasks can record into one without locks and without keeping every sample.
#[derive(Debug)]
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
    max: AtomicU64,
    sum: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            max: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

/// The bucket of a value: exact below 256, then 128 buckets per power of two.
fn bucket_of(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let e = (63 - v.leading_zeros()).min(MAX_EXP - 1);
    let v = v.min((1 << (e + 1)) - 1);
    let shift = e - SUB_BITS;
    ((shift as u64) * SUB + (v >> shift)) as usize
}

/// The smallest and largest value of a bucket.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, i);
    }
    let shift = i / SUB - 1;
    let m = SUB + i % SUB;
    (m << shift, ((m + 1) << shift) - 1)
}

impl Histogram {
    pub fn record(&self, micros: u64) {
        self.counts[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(micros, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The value at percentile `p` (0-100, nearest rank), as the middle of its bucket (the
    /// exact maximum for p = 100).
    pub fn percentile(&self, p: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let max = self.max.load(Ordering::Relaxed);
        let rank = ((p / 100.0) * total as f64).ceil().clamp(1.0, total as f64) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                let (lo, hi) = bucket_range(i);
                return (lo + (hi - lo) / 2).min(max);
            }
        }
        max
    }

    /// The usual latency summary, in milliseconds.
    pub fn summary_ms(&self) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        let n = self.count();
        Latency {
            samples: n,
            mean_ms: if n == 0 {
                0.0
            } else {
                ms(self.sum.load(Ordering::Relaxed)) / n as f64
            },
            p50_ms: ms(self.percentile(50.0)),
            p90_ms: ms(self.percentile(90.0)),
            p99_ms: ms(self.percentile(99.0)),
            p999_ms: ms(self.percentile(99.9)),
            max_ms: ms(self.max.load(Ordering::Relaxed)),
        }
    }

    /// The distribution for a plot: `[ms, fraction of samples at or below]`, one point per
    /// group of 8 buckets that holds samples (16 per power of two, < 7 % apart), the last
    /// at the exact maximum. A few hundred points at most, whatever the sample count.
    pub fn cdf_ms(&self) -> Vec<[f64; 2]> {
        const GROUP: usize = 8;
        let total = self.count();
        let max = self.max.load(Ordering::Relaxed);
        let mut out = Vec::new();
        let (mut seen, mut top) = (0u64, None);
        for (i, c) in self.counts.iter().enumerate() {
            let c = c.load(Ordering::Relaxed);
            if c > 0 {
                seen += c;
                top = Some(bucket_range(i).1.min(max));
            }
            if (i + 1) % GROUP == 0
                && let Some(v) = top.take()
            {
                out.push([v as f64 / 1000.0, seen as f64 / total as f64]);
            }
        }
        if let Some(v) = top {
            out.push([v as f64 / 1000.0, seen as f64 / total as f64]);
        }
        out
    }
}

/// Events (deliveries, connects) counted per time bucket from a start as they happen: one
/// relaxed add to a preallocated counter, no allocation, so that the hot path can afford it.
#[derive(Debug)]
pub struct Timeline {
    /// µs since the epoch; 0 until [`Timeline::start`]: nothing is counted before.
    start_us: AtomicU64,
    bucket_us: u64,
    counts: Box<[AtomicU64]>,
    /// Events after the last bucket.
    late: AtomicU64,
}

/// The default timeline: 10 ms buckets (a burst of a few hundred ms still has tens of them)
/// over 10 minutes (60,000 counters, 480 KB).
impl Default for Timeline {
    fn default() -> Self {
        Timeline::new(Duration::from_millis(10), Duration::from_secs(600))
    }
}

impl Timeline {
    pub fn new(bucket: Duration, span: Duration) -> Timeline {
        let bucket_us = (bucket.as_micros() as u64).max(1);
        let n = (span.as_micros() as u64).div_ceil(bucket_us).max(1);
        Timeline {
            start_us: AtomicU64::new(0),
            bucket_us,
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            late: AtomicU64::new(0),
        }
    }

    /// Start counting from `at_us` (µs since the epoch).
    pub fn start(&self, at_us: u64) {
        self.start_us.store(at_us.max(1), Ordering::Relaxed);
    }

    /// Count `n` events at `at_us` (µs since the epoch; before the start: the first bucket).
    pub fn add(&self, at_us: u64, n: u64) {
        let start = self.start_us.load(Ordering::Relaxed);
        if start == 0 {
            return;
        }
        let i = (at_us.saturating_sub(start) / self.bucket_us) as usize;
        match self.counts.get(i) {
            Some(c) => c.fetch_add(n, Ordering::Relaxed),
            None => self.late.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// The counts up to the last bucket with events.
    pub fn rates(&self) -> Rates {
        let mut counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let len = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        counts.truncate(len);
        Rates {
            bucket_ms: self.bucket_us as f64 / 1000.0,
            counts,
            late: self.late.load(Ordering::Relaxed),
        }
    }
}

/// Events per time bucket, the first bucket starting at the bench's start (for deliveries:
/// the first publish).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub bucket_ms: f64,
    pub counts: Vec<u64>,
    /// Events after the last bucket (not in `counts`).
    #[serde(default)]
    pub late: u64,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// `p50 / p90 / p99 / p99.9 / max` in one cell.
    pub fn cell(&self) -> String {
        format!(
            "{} / {} / {} / {} / {}",
            ms(self.p50_ms),
            ms(self.p90_ms),
            ms(self.p99_ms),
            ms(self.p999_ms),
            ms(self.max_ms)
        )
    }
}

/// A millisecond figure with a precision that suits its size.
pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// An integer with thin thousands separators (`1 234 567`), for tables read by people.
pub fn count(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A byte size in KiB, MiB or GiB.
pub fn bytes(v: f64) -> String {
    let a = v.abs();
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", v / (1024.0 * 1024.0 * 1024.0))
    } else if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / (1024.0 * 1024.0))
    } else if a >= 10.0 * 1024.0 {
        format!("{:.1} KiB", v / 1024.0)
    } else {
        format!("{v:.0} B")
    }
}

/// A two-column markdown table: one figure per row.
#[derive(Debug, Default)]
pub struct Table {
    title: String,
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Table {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, figure: impl Into<String>, value: impl Into<String>) -> &mut Table {
        self.rows.push((figure.into(), value.into()));
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&format!("### {}\n\n", self.title));
        }
        out.push_str("| figure | value |\n| --- | ---: |\n");
        for (k, v) in &self.rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}

/// Print the report: the JSON object with `--json`, else the table.
pub fn emit<T: Serialize>(json: bool, report: &T, table: &Table) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{}", table.render());
    }
    Ok(())
}

/// Latency percentile (nearest rank) of sorted samples, in milliseconds.
pub fn percentile_ms(sorted: &[std::time::Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Ratio with a zero denominator giving 0 (figures of an empty run).
pub fn per(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev_hi = None;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "bucket {i} does not follow on");
            }
            assert!(lo <= hi);
            // relative width below 1/128 once past the exact range
            assert!((hi - lo) as f64 <= lo as f64 / 128.0 + 1.0);
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            prev_hi = Some(hi);
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        for (p, want) in [
            (50.0, 5000.0),
            (90.0, 9000.0),
            (99.0, 9900.0),
            (99.9, 9990.0),
        ] {
            let got = h.percentile(p) as f64;
            assert!((got - want).abs() / want < 0.01, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(100.0), 10_000);
        assert_eq!(h.percentile(0.0), 1);
        let s = h.summary_ms();
        assert_eq!(s.max_ms, 10.0);
        assert!((s.mean_ms - 5.0005).abs() < 1e-9);
    }

    #[test]
    fn small_values_are_exact_and_empty_is_zero() {
        let h = Histogram::default();
        assert_eq!(h.percentile(50.0), 0);
        for v in [3, 3, 7, 200] {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), 3);
        assert_eq!(h.percentile(75.0), 7);
        assert_eq!(h.percentile(100.0), 200);
    }

    #[test]
    fn cdf_points_rise_to_one_at_the_max() {
        let h = Histogram::default();
        assert!(h.cdf_ms().is_empty());
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let cdf = h.cdf_ms();
        assert!(cdf.len() < 200, "{} points", cdf.len());
        assert!(
            cdf.windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
        assert_eq!(*cdf.last().unwrap(), [10.0, 1.0]);
        // Each point: the fraction at or below its value (the value is a bucket's top).
        for [ms, f] in cdf {
            let want = (ms * 1000.0).round() / 10_000.0;
            assert!((f - want).abs() < 1e-9, "{ms} ms: {f} vs {want}");
        }
    }

    #[test]
    fn timeline_counts_per_bucket_from_the_start() {
        let t = Timeline::new(Duration::from_millis(100), Duration::from_secs(1));
        t.add(5_000_000, 1); // not started: not counted
        t.start(1_000_000);
        t.add(900_000, 2); // before the start: first bucket
        t.add(1_050_000, 3);
        t.add(1_250_000, 4);
        t.add(1_999_999, 5);
        t.add(2_000_000, 6); // past the span
        let r = t.rates();
        assert_eq!(r.counts, vec![5, 0, 4, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!((r.bucket_ms, r.late), (100.0, 6));
        assert!(Timeline::default().rates().counts.is_empty());
    }

    #[test]
    fn formatting() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1 000");
        assert_eq!(count(1234567), "1 234 567");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(20.0 * 1024.0), "20.0 KiB");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
        assert_eq!(ms(1.234), "1.23");
        assert_eq!(ms(12.34), "12.3");
        assert_eq!(ms(123.4), "123");
        let mut t = Table::new("x");
        t.row("a", "1");
        assert_eq!(
            t.render(),
            "### x\n\n| figure | value |\n| --- | ---: |\n| a | 1 |\n"
        );
        assert_eq!(per(1.0, 0.0), 0.0);
    }
}
