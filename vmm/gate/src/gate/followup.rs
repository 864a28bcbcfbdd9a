//! Follow-up calls: an action a service takes on its own while serving an allowed
//! call (each redirect hop of `http.fetch`) is decided by the same policy and
//! written to the audit log as a decision of its own, before it happens.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::{Decider, DecisionRef, Verdict};
use crate::audit::{AuditLog, DecisionRecord};
use crate::services::Decide;

/// The `conn` of follow-up decision records.
pub const FOLLOWUP_CONN: &str = "followup";

/// The gate's decider and audit log, as a service sees them.
pub struct GateDecide {
    decider: Arc<dyn Decider>,
    audit: Arc<AuditLog>,
}

impl GateDecide {
    pub fn new(decider: Arc<dyn Decider>, audit: Arc<AuditLog>) -> GateDecide {
        GateDecide { decider, audit }
    }
}

impl Decide for GateDecide {
    fn decide(&self, tool: &str, args: &Value) -> Result<(), String> {
        if let Some(f) = self.audit.failure() {
            return Err(format!("the audit log can no longer be written: {f}"));
        }
        let t0 = Instant::now();
        let ruling = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decider.decide(tool, args)
        }))
        .unwrap_or_else(|_| DecisionRef {
            verdict: Verdict::Deny,
            rule: None,
            by: super::DecidedBy::Invariant,
            reason: "internal error in the policy engine".into(),
        });
        let policy_ns = t0.elapsed().as_nanos() as u64;
        // An ask is not parked in the middle of a service call (the call holds a
        // worker and its own time limit): it is a deny.
        let allowed = ruling.verdict == Verdict::Allow;
        let asked = ruling.verdict == Verdict::Ask;
        let reason = if asked {
            "a follow-up call cannot wait for an approver"
        } else {
            &*ruling.reason
        };
        let by = if asked {
            super::DecidedBy::NonInteractive
        } else {
            ruling.by
        };
        self.audit
            .decision(&DecisionRecord {
                conn: FOLLOWUP_CONN,
                rpc_id: &Value::Null,
                tool,
                args,
                decision: if allowed {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                },
                asked: false,
                answer: None,
                rule: ruling.rule,
                decided_by: by,
                reason,
                policy_ns,
            })
            .map_err(|e| format!("the audit log can no longer be written: {e}"))?;
        if allowed {
            Ok(())
        } else {
            Err(match ruling.rule {
                Some(r) => format!("{reason} (rule {r})"),
                None => reason.to_string(),
            })
        }
    }
}
