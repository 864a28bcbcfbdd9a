//! The seam between the gate and whoever answers an `ask`.
//!
//! The gate parks an asked call as a table entry and hands the question to an
//! `Approver`; no thread waits on it. The approver answers exactly once, from any
//! thread, by calling `done`; the gate then audits the answer and serves or denies
//! the call. Approvers (terminal, control socket, web page, answers file, timeout,
//! breaker) live in `crate::approvals`; `DenyAll` is what runs without one.

use serde_json::Value;

use super::DecidedBy;

/// One question for the owner: a call some `ask` rule matched.
#[derive(Debug, Clone)]
pub struct AskRequest {
    /// The audit `seq` of the `decision` record (`decision: "ask"`) written when the
    /// call was parked: the answer's record points back to it.
    pub ask_seq: u64,
    /// The guest connection, as in audit records.
    pub conn: String,
    pub rpc_id: Value,
    pub tool: String,
    /// The arguments exactly as decided (not redacted: the owner must see them).
    pub args: Value,
    /// The line of the `ask` rule that fired, and its reason.
    pub rule: Option<u32>,
    pub reason: String,
}

/// Who answered, and how: goes into the answer's audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answerer {
    /// `user`, `timeout`, `answers`, `non-interactive`, `breaker` or `learned`.
    pub by: DecidedBy,
    /// The channel: `tty`, `socket`, `web`, `answers-file`, `timer`, `none`...
    pub channel: String,
    /// Who, where known (a uid, `pid 1234`, the answers file's rule line...).
    pub who: Option<String>,
}

/// The owner's answer to one `AskRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub allow: bool,
    pub answerer: Answerer,
    /// Shown to the guest on a denial, and audited.
    pub reason: String,
}

/// Called exactly once with the answer. It must not block for long: it only
/// records the answer and schedules the call.
pub type AnswerSink = Box<dyn FnOnce(Answer) + Send + 'static>;

/// Answers asks. `ask` must return at once: a parked call holds no thread.
pub trait Approver: Send + Sync {
    fn ask(&self, req: AskRequest, done: AnswerSink);
}

/// Without an approver nobody can answer: every ask is denied at once, saying so.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenyAll;

impl Approver for DenyAll {
    fn ask(&self, _req: AskRequest, done: AnswerSink) {
        done(Answer {
            allow: false,
            answerer: Answerer {
                by: DecidedBy::NonInteractive,
                channel: "none".into(),
                who: None,
            },
            reason: "no approver: nobody can answer an ask in this run".into(),
        });
    }
}

impl Answer {
    /// A denial the gate gives itself when the approver could not answer (it
    /// panicked): fail closed, decided by an invariant.
    pub fn failed(reason: &str) -> Answer {
        Answer {
            allow: false,
            answerer: Answerer {
                by: DecidedBy::Invariant,
                channel: "none".into(),
                who: None,
            },
            reason: reason.into(),
        }
    }
}
