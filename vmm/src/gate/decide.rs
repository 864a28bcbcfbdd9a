//! The gate's view of the policy engine: a call in, a ruling out.
//!
//! The gate talks to the engine through `Decider` so that the gate does not care
//! whether the decision came from p.rules, a learned rule or (later) an approver, and
//! so that its framing and audit paths can be tested without a policy file.

use serde_json::Value;

/// One `tools/call`, parsed once; the decider and the service read this same value.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub tool: String,
    pub args: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    Ask,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Ask => "ask",
        }
    }
}

/// Who decided (interfaces.md: one enum everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    Rule,
    Default,
    Invariant,
    Learned,
    Limit,
    Breaker,
    User,
    Timeout,
    NonInteractive,
    Answers,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Rule => "rule",
            DecidedBy::Default => "default",
            DecidedBy::Invariant => "invariant",
            DecidedBy::Learned => "learned",
            DecidedBy::Limit => "limit",
            DecidedBy::Breaker => "breaker",
            DecidedBy::User => "user",
            DecidedBy::Timeout => "timeout",
            DecidedBy::NonInteractive => "non-interactive",
            DecidedBy::Answers => "answers",
        }
    }
}

/// What the engine said about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    pub verdict: Verdict,
    /// Line of the deciding rule in p.rules, if a rule decided.
    pub rule: Option<u32>,
    pub by: DecidedBy,
    pub reason: String,
}

/// The policy engine as the gate uses it. Must be cheap and thread-safe: every
/// connection of a VM calls it.
pub trait Decider: Send + Sync {
    fn decide(&self, call: &ToolCall) -> Ruling;
    /// Whether some rule could allow or ask for `tool`, whatever its arguments
    /// (`tools/list` shows only those tools).
    fn could_allow_or_ask(&self, tool: &str) -> bool;
}
