//! Decisions on calls that do not arrive as a `tools/call`: each request of the
//! guest's network proxy (vsock port 2) is a `net.http` or `net.connect` call.
//!
//! They go through the same decider (the live policy, learned rules, the run's
//! budget), the same approver for an `ask`, and the same `decision` records as a
//! tool call, with `rpc_id: null` and the connection's id as `conn`. The transport
//! has threads of its own, so the calling thread waits through an ask (the device
//! thread never calls this).

use std::sync::{mpsc, Arc};
use std::time::Instant;

use serde_json::Value;

use super::approver::{Answer, AskRequest};
use super::{Call, DecidedBy, Gate, Verdict};
use crate::audit::{AnswerRef, DecisionRecord, OutcomeStatus};

/// What became of a call decided directly, once its decision is audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ruling {
    /// Allowed; `seq` is its `decision` record, which the outcome names.
    Allowed { seq: u64 },
    /// Denied by `rule` (or none), for `reason`: what the guest is told.
    Denied {
        rule: Option<u32>,
        by: DecidedBy,
        reason: String,
    },
}

impl Ruling {
    fn denied(rule: Option<u32>, by: DecidedBy, reason: impl Into<String>) -> Ruling {
        Ruling::Denied {
            rule,
            by,
            reason: reason.into(),
        }
    }
}

impl Gate {
    /// Decides `call` and audits the decision as a tool call's. Blocks through an
    /// `ask` until the approver answers.
    pub fn decide_direct(self: &Arc<Self>, conn: &str, call: &Call) -> Ruling {
        if self.fatal().is_some() {
            return Ruling::denied(None, DecidedBy::Invariant, self.guest_fatal());
        }
        let t0 = Instant::now();
        let ruling = self.rule_on(call, false);
        let policy_ns = t0.elapsed().as_nanos() as u64;
        let record = DecisionRecord {
            conn,
            rpc_id: &Value::Null,
            tool: &call.tool,
            args: &call.args,
            decision: ruling.verdict,
            asked: false,
            answer: None,
            rule: ruling.rule,
            decided_by: ruling.by,
            reason: &ruling.reason,
            policy_ns,
        };
        let Ok(seq) = self.audit.decision(&record) else {
            return Ruling::denied(None, DecidedBy::Invariant, self.guest_fatal());
        };
        match ruling.verdict {
            Verdict::Allow => Ruling::Allowed { seq },
            Verdict::Deny => Ruling::denied(ruling.rule, ruling.by, ruling.reason),
            Verdict::Ask => self.ask_direct(conn, call, seq, ruling.rule, &ruling.reason),
        }
    }

    /// Writes a denial decided before the policy (a request the transport refuses
    /// on its own, such as a Host header that disagrees with the URL), so it is
    /// audited like every other decision.
    pub fn deny_direct(&self, conn: &str, call: &Call, reason: &str) {
        let record = DecisionRecord {
            conn,
            rpc_id: &Value::Null,
            tool: &call.tool,
            args: &call.args,
            decision: Verdict::Deny,
            asked: false,
            answer: None,
            rule: None,
            decided_by: DecidedBy::Invariant,
            reason,
            policy_ns: 0,
        };
        // A failed log denies everything from now on; this request is refused anyway.
        let _ = self.audit.decision(&record);
    }

    /// Writes the outcome of a call decided directly: how its exchange ended, the
    /// bytes each way and how long it lasted.
    pub fn outcome_direct(&self, seq: u64, end: &DirectOutcome) {
        let _ = self.audit.outcome_net(
            seq,
            end.status,
            end.sent,
            end.received,
            end.total_us,
            end.detail.as_deref(),
        );
    }

    fn ask_direct(
        self: &Arc<Self>,
        conn: &str,
        call: &Call,
        ask_seq: u64,
        rule: Option<u32>,
        reason: &str,
    ) -> Ruling {
        let req = AskRequest {
            ask_seq,
            conn: conn.to_string(),
            rpc_id: Value::Null,
            tool: call.tool.clone(),
            args: call.args.clone(),
            rule,
            reason: reason.to_string(),
        };
        let (tx, rx) = mpsc::sync_channel::<Answer>(1);
        let approver = Arc::clone(&self.approver.read().unwrap_or_else(|e| e.into_inner()));
        let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            approver.ask(
                req,
                Box::new(move |a| {
                    let _ = tx.try_send(a);
                }),
            )
        }));
        // An approver that panicked, or dropped the question unanswered: fail closed.
        let answer = match (asked, rx.recv()) {
            (_, Ok(a)) => a,
            _ => Answer::failed("the approver failed"),
        };
        let record = DecisionRecord {
            conn,
            rpc_id: &Value::Null,
            tool: &call.tool,
            args: &call.args,
            decision: if answer.allow {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            asked: true,
            answer: Some(AnswerRef {
                ask_seq,
                channel: &answer.answerer.channel,
                who: answer.answerer.who.as_deref(),
            }),
            rule,
            decided_by: answer.answerer.by,
            reason: &answer.reason,
            policy_ns: 0,
        };
        match self.audit.decision(&record) {
            Err(_) => Ruling::denied(None, DecidedBy::Invariant, self.guest_fatal()),
            Ok(seq) if answer.allow => Ruling::Allowed { seq },
            Ok(_) => Ruling::denied(rule, answer.answerer.by, answer.reason),
        }
    }
}

/// How an exchange allowed by `decide_direct` ended, for its `outcome` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectOutcome {
    pub status: OutcomeStatus,
    /// Bytes the guest sent on (request bodies, tunnel bytes).
    pub sent: u64,
    /// Bytes relayed back to the guest.
    pub received: u64,
    pub total_us: u64,
    /// Why it ended, when not normally (a timeout, a refused address...).
    pub detail: Option<String>,
}
