//! The circuit breaker: the same question more than `max` times in `window` is
//! denied without asking. An agent in a loop must not drown its owner in questions.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// `--breaker N/WINDOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Asks of one question allowed in a window; the next one trips the breaker.
    pub max: u32,
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            max: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl std::str::FromStr for BreakerConfig {
    type Err = String;
    /// `N/DURATION`, for example `5/60s` or `10/5m`; `off` disables it.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(BreakerConfig {
                max: u32::MAX,
                window: Duration::ZERO,
            });
        }
        let (n, w) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected N/WINDOW, for example 5/60s, or off"))?;
        let max = n
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}`: `{n}` is not a count"))?;
        if max == 0 {
            return Err(format!("`{s}`: the count must be at least 1"));
        }
        let window = parse_duration(w)?;
        Ok(BreakerConfig { max, window })
    }
}

/// `300`, `300s`, `5m`, `2h`, `1500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration such as 300s, 5m or 2h"))?;
    let ms = match unit {
        "" | "s" => n.checked_mul(1000),
        "ms" => Some(n),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| format!("`{s}`: expected a duration such as 300s, 5m or 2h"))?;
    Ok(Duration::from_millis(ms))
}

/// Most questions tracked; past it, entries whose window has passed are dropped.
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    seen: HashMap<String, VecDeque<Instant>>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            seen: HashMap::new(),
        }
    }

    /// Counts one ask of `key` at `now`; true when it trips the breaker.
    pub fn trips(&mut self, key: &str, now: Instant) -> bool {
        if self.cfg.window.is_zero() {
            return false;
        }
        let window = self.cfg.window;
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < window;
        if self.seen.len() >= MAX_TRACKED && !self.seen.contains_key(key) {
            self.seen.retain(|_, q| q.back().is_some_and(fresh));
            if self.seen.len() >= MAX_TRACKED {
                // Guest-chosen keys must not grow memory: forget the oldest half.
                let mut by_age: Vec<(Instant, String)> = self
                    .seen
                    .iter()
                    .filter_map(|(k, q)| q.back().map(|t| (*t, k.clone())))
                    .collect();
                by_age.sort();
                for (_, k) in by_age.into_iter().take(MAX_TRACKED / 2) {
                    self.seen.remove(&k);
                }
            }
        }
        let q = self.seen.entry(key.to_string()).or_default();
        while q.front().is_some_and(|t| !fresh(t)) {
            q.pop_front();
        }
        q.push_back(now);
        // Only `max + 1` times matter.
        if q.len() > self.cfg.max as usize + 1 {
            q.pop_front();
        }
        q.len() > self.cfg.max as usize
    }

    pub fn config(&self) -> BreakerConfig {
        self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_past_max_in_window_and_recovers() {
        let mut b = Breaker::new(BreakerConfig {
            max: 2,
            window: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert!(!b.trips("k", t0));
        assert!(!b.trips("k", t0 + Duration::from_secs(1)));
        assert!(b.trips("k", t0 + Duration::from_secs(2)));
        assert!(!b.trips("other", t0 + Duration::from_secs(2)));
        // 11 s later the first asks left the window
        assert!(!b.trips("k", t0 + Duration::from_secs(13)));
    }

    #[test]
    fn many_keys_stay_bounded() {
        let mut b = Breaker::new(BreakerConfig::default());
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED * 3) {
            b.trips(&format!("k{i}"), t0);
        }
        assert!(b.seen.len() <= MAX_TRACKED);
    }

    #[test]
    fn parses() {
        let b: BreakerConfig = "3/30s".parse().unwrap();
        assert_eq!((b.max, b.window), (3, Duration::from_secs(30)));
        assert_eq!(
            "2/5m".parse::<BreakerConfig>().unwrap().window,
            Duration::from_secs(300)
        );
        assert!("x/5m".parse::<BreakerConfig>().is_err());
        assert!("0/5m".parse::<BreakerConfig>().is_err());
        assert!("5".parse::<BreakerConfig>().is_err());
        assert_eq!(parse_duration("300").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("5 parsecs").is_err());
    }
}
