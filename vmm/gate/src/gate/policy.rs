//! Loading p.rules for a gate: always against the builtin catalog (unknown tools and
//! arguments that fail a schema are denied by the invariants), with its learned
//! rules (`p.rules.learned`, when present). The policy stays live: a rule learned
//! from an answer is put in force while the VM runs.

use std::path::Path;
use std::sync::Arc;

use super::setup::SetupError;
use crate::approvals::LivePolicy;
use crate::services::builtin_catalog;

/// Loads the policy at `path`; returns the policy and the formatted warnings. An invalid policy is exit 127 with
/// the engine's diagnostics.
pub fn load(path: &Path) -> Result<(Arc<LivePolicy>, String), SetupError> {
    let catalog = builtin_catalog().map_err(|e| SetupError {
        code: ironvmm_wire::exit::VMM_ERROR,
        message: format!("the builtin catalog is invalid: {e}"),
    })?;
    let (live, warnings) = LivePolicy::load(path, Some(catalog)).map_err(|d| SetupError {
        code: ironvmm_wire::exit::BAD_POLICY,
        message: format!("invalid policy:\n{d}"),
    })?;
    let warnings = if warnings.is_empty() {
        String::new()
    } else {
        format!("{warnings}")
    };
    Ok((live, warnings))
}
