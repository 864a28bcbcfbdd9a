//! The seam between the compiler and the policy engine. The pipeline only needs two
//! things from an engine: load a p.rules (errors and warnings as the engine words
//! them) and decide calls under it. `PolicyEngine` is the real one.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// The engine's own verdict: one type for allow/deny/ask across the workspace.
pub use ironvmm_policy::{DecidedBy, Verdict};

/// What the engine decided for one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The line of the deciding rule, if a rule decided.
    pub rule: Option<u32>,
    /// Who decided, as the engine says.
    pub by: DecidedBy,
    pub reason: String,
}

pub trait RuleEngine {
    /// Loads `source` as if it were the file `path` (its lists are resolved from
    /// `path`'s folder). `Ok` holds the warnings, `Err` the diagnostics, each as the
    /// engine prints them.
    fn check(&self, source: &str, path: &Path) -> Result<Vec<String>, String>;

    /// Loads `source` once and decides each call in order, as `policy test` does
    /// (limit counters carry from one call to the next). A call the engine cannot
    /// read is an `Err` naming its index.
    fn decide_all(
        &self,
        source: &str,
        path: &Path,
        calls: &[Value],
    ) -> Result<Vec<Outcome>, String>;

    /// Decides each call on its own, as the first call of a fresh load (no `limit`
    /// counter carried from another call): how derived scenarios are decided.
    fn decide_each(
        &self,
        source: &str,
        path: &Path,
        calls: &[Value],
    ) -> Result<Vec<Outcome>, String> {
        let mut out = Vec::with_capacity(calls.len());
        for (i, c) in calls.iter().enumerate() {
            let mut one = self
                .decide_all(source, path, std::slice::from_ref(c))
                .map_err(|e| format!("call {i}: {e}"))?;
            out.push(one.pop().ok_or_else(|| format!("call {i}: no decision"))?);
        }
        Ok(out)
    }
}
