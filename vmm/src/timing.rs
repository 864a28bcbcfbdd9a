//! Milliseconds since process start, for `--timings` (docs/boot.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Marks process start; call first thing in `main`. Later calls change nothing.
pub fn mark_process_start() {
    START.get_or_init(Instant::now);
}

/// Milliseconds since `mark_process_start` (fractional).
pub fn now_ms() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

/// One optional moment, settable from any thread; only the first set counts.
#[derive(Debug, Default)]
pub struct Mark(AtomicU64);

const UNSET: u64 = 0;

impl Mark {
    /// Records now if nothing was recorded yet. Returns whether this call recorded.
    pub fn set_once(&self) -> bool {
        let micros = (now_ms() * 1000.0) as u64 + 1; // +1 keeps 0 meaning unset
        self.0
            .compare_exchange(UNSET, micros, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn get_ms(&self) -> Option<f64> {
        match self.0.load(Ordering::Acquire) {
            UNSET => None,
            v => Some((v - 1) as f64 / 1000.0),
        }
    }
}

/// The moments `--timings` reports.
#[derive(Debug, Default)]
pub struct Timings {
    pub vm_created: Mark,
    pub kernel_loaded: Mark,
    pub first_run: Mark,
    pub init: Mark,
    pub agent_start: Mark,
    pub agent_exit: Mark,
    pub exit: Mark,
}

impl Timings {
    /// The one JSON line of `--timings`; `null` for what never happened.
    pub fn to_json(&self) -> String {
        let f = |m: &Mark| {
            m.get_ms().map_or(serde_json::Value::Null, |v| {
                serde_json::json!((v * 1000.0).round() / 1000.0)
            })
        };
        serde_json::json!({
            "vm_created_ms": f(&self.vm_created),
            "kernel_loaded_ms": f(&self.kernel_loaded),
            "first_run_ms": f(&self.first_run),
            "init_ms": f(&self.init),
            "agent_start_ms": f(&self.agent_start),
            "agent_exit_ms": f(&self.agent_exit),
            "exit_ms": f(&self.exit),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_set_once_and_reported_as_null_when_unset() {
        let t = Timings::default();
        assert!(t.init.set_once());
        let first = t.init.get_ms().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(!t.init.set_once());
        assert_eq!(t.init.get_ms().unwrap(), first);
        let v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        assert!(v["init_ms"].is_number());
        assert!(v["agent_exit_ms"].is_null());
        assert_eq!(v.as_object().unwrap().len(), 7);
    }
}
