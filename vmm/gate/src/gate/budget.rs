//! The run's budget of calls and egress bytes (`ironvmm run --max-calls`,
//! `--max-egress-bytes`): a `Decider` wrapper, so that it holds whatever the
//! engine, the approvers or the transport do.
//!
//! The call past a limit is denied (`decided_by: limit`) and audited like any other
//! denial; the first time that happens `on_reached` is told once, and the VMM stops
//! the VM, which closes the audit log. Every later call is denied the same way, so
//! calls racing the stop cannot slip through.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use super::decide::{DecidedBy, Decider, DecisionRef, Verdict};

/// Told with the reason when a limit is first reached (once; a hook set at the very
/// moment the limit is reached may be told twice, so it must be idempotent).
pub type ReachedHook = Box<dyn Fn(&str) + Send + Sync>;

/// The limits of one VM and what has been spent of them.
pub struct CallBudget {
    max_calls: Option<u64>,
    max_egress: Option<u64>,
    calls: AtomicU64,
    egress: AtomicU64,
    reached: OnceLock<String>,
    hook: OnceLock<ReachedHook>,
}

impl CallBudget {
    /// `None` leaves a limit off.
    pub fn new(max_calls: Option<u64>, max_egress_bytes: Option<u64>) -> Arc<CallBudget> {
        Arc::new(CallBudget {
            max_calls,
            max_egress: max_egress_bytes,
            calls: AtomicU64::new(0),
            egress: AtomicU64::new(0),
            reached: OnceLock::new(),
            hook: OnceLock::new(),
        })
    }

    /// Whether any limit is set (without one, no wrapper is needed).
    pub fn is_limited(&self) -> bool {
        self.max_calls.is_some() || self.max_egress.is_some()
    }

    /// Sets what happens when a limit is reached (the VMM stops the VM). Called at
    /// once if that already happened. Only the first hook counts.
    pub fn on_reached(&self, hook: ReachedHook) {
        if self.hook.set(hook).is_err() {
            return;
        }
        if let (Some(why), Some(h)) = (self.reached.get(), self.hook.get()) {
            h(why);
        }
    }

    /// Why the VM must stop, once a limit is reached.
    pub fn reached(&self) -> Option<&str> {
        self.reached.get().map(String::as_str)
    }

    /// Calls decided so far (the denied one past the limit included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Egress bytes charged so far.
    pub fn egress_bytes(&self) -> u64 {
        self.egress.load(Ordering::Relaxed)
    }

    fn reach(&self, why: String) -> &str {
        if self.reached.set(why).is_ok() {
            if let (Some(h), Some(w)) = (self.hook.get(), self.reached.get()) {
                h(w);
            }
        }
        self.reached.get().map_or("", String::as_str)
    }

    /// Charges `bytes` of egress (a call's arguments, or bytes a transport sends on
    /// the guest's behalf). Err with the reason once the total passes the limit.
    pub fn charge_egress(&self, bytes: u64) -> Result<(), &str> {
        if let Some(why) = self.reached.get() {
            return Err(why);
        }
        let total = self
            .egress
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        match self.max_egress {
            Some(max) if total > max => Err(self.reach(format!(
                "--max-egress-bytes {max} reached ({total} bytes asked for): the VM stops"
            ))),
            _ => Ok(()),
        }
    }

    /// Counts one call. Err with the reason when it is past `--max-calls`.
    fn charge_call(&self) -> Result<(), &str> {
        if let Some(why) = self.reached.get() {
            return Err(why);
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        match self.max_calls {
            Some(max) if n > max => Err(self.reach(format!(
                "--max-calls {max} reached: call {n} denied and the VM stops"
            ))),
            _ => Ok(()),
        }
    }
}

/// A decider that spends a `CallBudget` before asking the one it wraps.
pub struct Budgeted {
    inner: Box<dyn Decider>,
    budget: Arc<CallBudget>,
}

impl Budgeted {
    pub fn new(inner: Box<dyn Decider>, budget: Arc<CallBudget>) -> Budgeted {
        Budgeted { inner, budget }
    }
}

/// Bytes of `v` as compact JSON, counted without building the string.
fn json_len(v: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

impl Decider for Budgeted {
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a> {
        let limited = self.budget.charge_call().and_then(|()| {
            if self.budget.max_egress.is_some() {
                self.budget.charge_egress(json_len(args))
            } else {
                Ok(())
            }
        });
        match limited {
            Ok(()) => self.inner.decide(tool, args),
            Err(why) => DecisionRef {
                verdict: Verdict::Deny,
                rule: None,
                by: DecidedBy::Limit,
                reason: Cow::Borrowed(why),
            },
        }
    }

    fn could_allow_or_ask(&self, tool: &str) -> bool {
        self.inner.could_allow_or_ask(tool)
    }
}

/// A decider that denies `llm.chat` once the run's model budget (`[llm.budget]`) is
/// spent, naming which budget, before asking the one it wraps.
pub struct LlmBudgeted {
    inner: Box<dyn Decider>,
    budget: Arc<crate::services::llm::LlmBudget>,
}

impl LlmBudgeted {
    pub fn new(inner: Box<dyn Decider>, budget: Arc<crate::services::llm::LlmBudget>) -> Self {
        LlmBudgeted { inner, budget }
    }
}

impl Decider for LlmBudgeted {
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a> {
        if tool == "llm.chat" {
            if let Some(why) = self.budget.exhausted() {
                return DecisionRef {
                    verdict: Verdict::Deny,
                    rule: None,
                    by: DecidedBy::Limit,
                    reason: Cow::Owned(why),
                };
            }
        }
        self.inner.decide(tool, args)
    }

    fn could_allow_or_ask(&self, tool: &str) -> bool {
        self.inner.could_allow_or_ask(tool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct AllowAll;
    impl Decider for AllowAll {
        fn decide<'a>(&'a self, _: &str, _: &Value) -> DecisionRef<'a> {
            DecisionRef {
                verdict: Verdict::Allow,
                rule: Some(1),
                by: DecidedBy::Rule,
                reason: Cow::Borrowed("ok"),
            }
        }
        fn could_allow_or_ask(&self, _: &str) -> bool {
            true
        }
    }

    #[test]
    fn the_call_past_max_calls_is_denied_and_reported_once() {
        let budget = CallBudget::new(Some(2), None);
        let told = Arc::new(AtomicUsize::new(0));
        let t = Arc::clone(&told);
        budget.on_reached(Box::new(move |_| {
            t.fetch_add(1, Ordering::SeqCst);
        }));
        let d = Budgeted::new(Box::new(AllowAll), Arc::clone(&budget));
        let args = serde_json::json!({});
        assert_eq!(d.decide("t", &args).verdict, Verdict::Allow);
        assert_eq!(d.decide("t", &args).verdict, Verdict::Allow);
        let third = d.decide("t", &args);
        assert_eq!(third.verdict, Verdict::Deny);
        assert_eq!(third.by, DecidedBy::Limit);
        assert!(third.reason.contains("--max-calls 2"), "{}", third.reason);
        assert_eq!(d.decide("t", &args).verdict, Verdict::Deny);
        assert_eq!(told.load(Ordering::SeqCst), 1);
        assert!(budget.reached().is_some());
    }

    #[test]
    fn egress_counts_argument_bytes() {
        let budget = CallBudget::new(None, Some(30));
        let d = Budgeted::new(Box::new(AllowAll), Arc::clone(&budget));
        let small = serde_json::json!({"path": "/workspace/a"}); // 23 bytes
        assert_eq!(d.decide("fs.write", &small).verdict, Verdict::Allow);
        assert_eq!(budget.egress_bytes(), 23);
        let r = d.decide("fs.write", &small);
        assert_eq!((r.verdict, r.by), (Verdict::Deny, DecidedBy::Limit));
        assert!(r.reason.contains("--max-egress-bytes 30"), "{}", r.reason);
    }

    #[test]
    fn a_hook_set_late_is_still_told() {
        let budget = CallBudget::new(Some(0), None);
        let d = Budgeted::new(Box::new(AllowAll), Arc::clone(&budget));
        assert_eq!(
            d.decide("t", &serde_json::json!(null)).verdict,
            Verdict::Deny
        );
        let told = Arc::new(AtomicUsize::new(0));
        let t = Arc::clone(&told);
        budget.on_reached(Box::new(move |_| {
            t.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(told.load(Ordering::SeqCst), 1);
    }
}
