//! Latency statistics for `iron bench`: nearest-rank percentiles and a
//! power-of-two histogram in microseconds.

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// (upper bound in µs, count) for each non-empty power-of-two bucket.
    pub histogram: Vec<(u64, usize)>,
}

/// The nearest-rank percentile `p` (0–100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises latencies given in nanoseconds.
pub fn summarize(latencies_ns: &[u64]) -> Summary {
    let mut v = latencies_ns.to_vec();
    v.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1000.0
    };
    let mut histogram: Vec<(u64, usize)> = Vec::new();
    for &ns in &v {
        let bound = ns.div_ceil(1000).max(1).next_power_of_two();
        match histogram.last_mut() {
            Some((b, n)) if *b == bound => *n += 1,
            _ => histogram.push((bound, 1)),
        }
    }
    Summary {
        count: v.len(),
        min_us: us(v.first().copied().unwrap_or(0)),
        mean_us: mean,
        p50_us: us(percentile(&v, 50.0)),
        p90_us: us(percentile(&v, 90.0)),
        p99_us: us(percentile(&v, 99.0)),
        max_us: us(v.last().copied().unwrap_or(0)),
        histogram,
    }
}

impl Summary {
    /// Text lines: one per bucket, with a bar scaled to the largest bucket.
    pub fn histogram_lines(&self) -> Vec<String> {
        let top = self.histogram.iter().map(|&(_, n)| n).max().unwrap_or(1);
        self.histogram
            .iter()
            .map(|&(b, n)| {
                let bar = "#".repeat((n * 50).div_ceil(top));
                format!("  <= {b:>8} us {n:>9}  {bar}")
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        json!({
            "count": self.count,
            "min_us": r(self.min_us), "mean_us": r(self.mean_us),
            "p50_us": r(self.p50_us), "p90_us": r(self.p90_us),
            "p99_us": r(self.p99_us), "max_us": r(self.max_us),
            "histogram": self.histogram.iter()
                .map(|&(b, n)| json!({"le_us": b, "count": n})).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn histogram_buckets() {
        // 0.5 µs, 1.5 µs, 3 µs, 3 µs, 100 µs
        let s = summarize(&[500, 1500, 3000, 3000, 100_000]);
        assert_eq!(s.histogram, vec![(1, 1), (2, 1), (4, 2), (128, 1)]);
        assert_eq!(s.count, 5);
        assert_eq!(s.p50_us, 3.0);
        assert_eq!(s.max_us, 100.0);
    }
}
