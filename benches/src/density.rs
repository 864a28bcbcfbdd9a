//! The density bench's bookkeeping: what counts as lost, from each VM's `iron bench`
//! result, its exit status and its audit log's close record.

use serde_json::Value;

/// Calls and losses across the VMs of one round.
#[derive(Debug, Default)]
pub struct Tally {
    /// Calls answered ok, all VMs together.
    pub ok: u64,
    /// Each VM's own calls/s, summed.
    pub rate_sum: f64,
    /// One line per loss: which VM, what was lost.
    pub lost: Vec<String>,
}

impl Tally {
    /// Adds VM `vm`, which was to make `calls` calls: its `iron bench` JSON (None if
    /// it never printed one) and its exit status (None if killed by a signal).
    pub fn add(&mut self, vm: usize, result: Option<&Value>, exit: Option<i32>, calls: u64) {
        if exit != Some(0) {
            self.lost
                .push(format!("vm {vm}: exited with {exit:?}, not 0"));
        }
        let Some(r) = result else {
            self.lost.push(format!(
                "vm {vm}: no result from its agent ({calls} calls lost)"
            ));
            return;
        };
        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        let ok = n("ok");
        self.ok += ok;
        self.rate_sum += r.get("calls_per_s").and_then(Value::as_f64).unwrap_or(0.0);
        if ok != calls {
            self.lost.push(format!(
                "vm {vm}: {ok} of {calls} calls ok ({} denied, {} tool errors, {} errors)",
                n("denied"),
                n("tool_errors"),
                n("errors")
            ));
        }
    }
}

/// Why the close record `close` (the audit log's last line) shows a loss for a VM
/// that made `calls` allowed calls, or None when it counts every one as allowed
/// and served.
pub fn lost_in_close(close: Option<&Value>, calls: u64) -> Option<String> {
    let Some(c) = close.filter(|c| c.get("kind").and_then(Value::as_str) == Some("close")) else {
        return Some("its audit log has no close record".into());
    };
    let n = |k: &str| c["counts"].get(k).and_then(Value::as_u64).unwrap_or(0);
    if n("allow") == calls && n("ok") == calls {
        None
    } else {
        Some(format!(
            "its audit log counts {} allowed and {} served calls of {calls}",
            n("allow"),
            n("ok")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_round_loses_nothing() {
        let mut t = Tally::default();
        let r = json!({"ok": 10, "calls_per_s": 50.0, "errors": 0});
        t.add(0, Some(&r), Some(0), 10);
        t.add(1, Some(&r), Some(0), 10);
        assert_eq!(t.ok, 20);
        assert_eq!(t.rate_sum, 100.0);
        assert!(t.lost.is_empty(), "{:?}", t.lost);
    }

    #[test]
    fn missing_results_short_counts_and_bad_exits_are_losses() {
        let mut t = Tally::default();
        t.add(0, None, Some(0), 10);
        t.add(1, Some(&json!({"ok": 7, "errors": 3})), Some(1), 10);
        t.add(2, Some(&json!({"ok": 10})), None, 10);
        assert_eq!(t.ok, 17);
        assert_eq!(t.lost.len(), 4, "{:?}", t.lost);
        assert!(t.lost[0].starts_with("vm 0: no result"));
        assert!(t
            .lost
            .iter()
            .any(|l| l == "vm 1: exited with Some(1), not 0"));
        assert!(t
            .lost
            .iter()
            .any(|l| l.contains("7 of 10 calls ok") && l.contains("3 errors")));
        assert!(t
            .lost
            .iter()
            .any(|l| l.starts_with("vm 2: exited with None")));
    }

    #[test]
    fn the_close_record_must_count_every_call() {
        let full = json!({"kind": "close", "counts": {"allow": 5, "deny": 0, "ok": 5}});
        assert_eq!(lost_in_close(Some(&full), 5), None);
        let short = json!({"kind": "close", "counts": {"allow": 5, "ok": 4}});
        assert_eq!(
            lost_in_close(Some(&short), 5).as_deref(),
            Some("its audit log counts 5 allowed and 4 served calls of 5")
        );
        let not_close = json!({"kind": "outcome"});
        assert!(lost_in_close(Some(&not_close), 5)
            .unwrap()
            .contains("no close record"));
        assert!(lost_in_close(None, 5).is_some());
    }
}
