//! The gate's view of the policy engine: a call in, a decision out.
//!
//! The gate talks to the engine through `Decider` so that its framing and audit
//! paths can be tested with a tiny rule set, and so that approvers can later wrap the
//! engine. The types are the engine's own (one `DecidedBy` enum everywhere).

use serde_json::Value;

pub use ironvmm_policy::{Call, DecidedBy, DecisionRef, Verdict};

/// The policy engine as the gate uses it. Must be cheap and thread-safe: every
/// connection of a VM calls it.
pub trait Decider: Send + Sync {
    /// Decides one call, parsed once: the service later reads this same `args`.
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a>;
    /// Whether some rule (or the default) could allow or ask for `tool`, whatever
    /// its arguments (`tools/list` shows only those tools).
    fn could_allow_or_ask(&self, tool: &str) -> bool;
}

impl Decider for ironvmm_policy::Policy {
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a> {
        self.decide_parts(tool, args)
    }

    fn could_allow_or_ask(&self, tool: &str) -> bool {
        self.may_allow_or_ask(tool)
    }
}
