//! `limit N per UNIT`: a rolling-window counter per rule, safe across threads.
//!
//! The window keeps the times of the last N matches; a match is allowed when fewer
//! than N of them fall inside the window. Memory is bounded by N (capped at load).

use std::collections::VecDeque;
use std::sync::Mutex;

/// The largest N a `limit` may give (bounds the memory a guest can make us use).
pub const MAX_LIMIT: u64 = 100_000;

#[derive(Debug)]
pub struct Limiter {
    count: usize,
    window_ms: i64,
    times: Mutex<VecDeque<i64>>,
}

impl Limiter {
    pub fn new(count: u64, window_ms: u64) -> Limiter {
        Limiter {
            count: count.min(MAX_LIMIT) as usize,
            window_ms: window_ms as i64,
            times: Mutex::new(VecDeque::new()),
        }
    }

    /// Records a match at `now_ms` if the window has room; false when the limit is
    /// reached (the rule then does not match).
    pub fn try_take(&self, now_ms: i64) -> bool {
        let mut t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        expire(&mut t, now_ms, self.window_ms);
        if t.len() < self.count {
            t.push_back(now_ms);
            true
        } else {
            false
        }
    }

    /// Takes over the matches `other` recorded (a reloaded policy keeps the
    /// windows of the one it replaces, so a reload never resets a limit).
    pub fn adopt(&self, other: &Limiter) {
        let theirs = other
            .times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        *self.times.lock().unwrap_or_else(|e| e.into_inner()) = theirs;
    }

    /// Would a match at `now_ms` fit? Records nothing (for `explain`).
    pub fn would_take(&self, now_ms: i64) -> bool {
        let t = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let live = t
            .iter()
            .filter(|&&x| x > now_ms.saturating_sub(self.window_ms))
            .count();
        live < self.count
    }
}

fn expire(t: &mut VecDeque<i64>, now: i64, window: i64) {
    // Times are recorded in call order; a time from the future (an `at` out of
    // order) stays until it expires, which only makes the limit stricter.
    while let Some(&front) = t.front() {
        if front <= now.saturating_sub(window) {
            t.pop_front();
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_window() {
        let l = Limiter::new(2, 1000);
        assert!(l.try_take(0));
        assert!(l.try_take(500));
        assert!(!l.try_take(999));
        assert!(l.try_take(1000)); // the match at 0 left the window
        assert!(!l.try_take(1400));
        assert!(l.try_take(1500));
    }

    #[test]
    fn shared_across_threads() {
        let l = std::sync::Arc::new(Limiter::new(100, 60_000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..50).filter(|_| l.try_take(1)).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 100);
    }
}
