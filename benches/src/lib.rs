//! Shared reporting for ironvmm's benchmarks: every bench prints medians and the
//! ratio against its peer the same way, so figures from different runs line up.

/// Median of a sample set (sorted in place). `None` for an empty set.
pub fn median(samples: &mut [f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    Some(if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    })
}

/// Percentile `p` in 0..=100 by nearest rank (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

/// One line of a side-by-side comparison: `ours` against `peer`, with the ratio.
pub fn ratio_line(what: &str, unit: &str, ours: f64, peer_name: &str, peer: f64) -> String {
    format!(
        "{what}: ironvmm {ours:.3} {unit}, {peer_name} {peer:.3} {unit}, ratio {:.3}",
        ours / peer
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 0.0), Some(1.0));
    }
}
