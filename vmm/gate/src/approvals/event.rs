//! What channels see: the events of the hub, one JSON object each on the control
//! socket (`{"event": "ask"|"decided"|"decision", ...}`).

use serde::Serialize;
use serde_json::{Map, Value};

/// A pending question.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AskView {
    /// The question's id: what `allow`/`deny` name.
    pub id: u64,
    pub vm: String,
    /// The audit `seq` of the first asked call's decision record.
    pub seq: u64,
    pub conn: String,
    pub rpc_id: Value,
    pub tool: String,
    pub args: Value,
    /// The line of the `ask` rule, and its reason.
    pub rule: Option<u32>,
    pub reason: String,
    /// Parked calls this one answer will decide (identical asks are one question).
    pub calls: usize,
    pub waited_ms: u64,
    /// Time left before the question is denied by `timeout`.
    pub timeout_in_ms: u64,
    /// Questions pending in this VM, this one included.
    pub pending: usize,
}

/// A question answered.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecidedView {
    pub id: u64,
    pub vm: String,
    pub tool: String,
    pub decision: &'static str,
    pub decided_by: &'static str,
    pub channel: String,
    pub who: Option<String>,
    pub reason: String,
    pub calls: usize,
    pub learned: Option<LearnedView>,
}

/// A rule learned from an answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LearnedView {
    pub rule: String,
    pub file: String,
    /// The audit `seq` its header names.
    pub seq: u64,
    pub refines: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Ask(AskView),
    Decided(DecidedView),
    /// An audit `decision` record of this VM (arguments redacted): the feed of
    /// everything the gate decided, asked or not.
    Decision(Map<String, Value>),
}

impl Event {
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}
