//! Loading p.rules for a gate: always against the builtin catalog (unknown tools and
//! arguments that fail a schema are denied by the invariants), with the gate's own
//! files added to the paths the policy protects.

use std::path::Path;

use ironvmm_policy::Policy;

use super::setup::SetupError;
use crate::services::builtin_catalog;

/// Loads the policy at `path`; returns the policy and the formatted warnings. An invalid policy is exit 127 with
/// the engine's diagnostics.
pub fn load(path: &Path) -> Result<(Policy, String), SetupError> {
    let catalog = builtin_catalog().map_err(|e| SetupError {
        code: ironvmm_wire::exit::VMM_ERROR,
        message: format!("the builtin catalog is invalid: {e}"),
    })?;
    let loaded = Policy::load(path, Some(&catalog)).map_err(|d| SetupError {
        code: ironvmm_wire::exit::BAD_POLICY,
        message: format!("invalid policy:\n{d}"),
    })?;
    let warnings = if loaded.warnings.is_empty() {
        String::new()
    } else {
        format!("{}", loaded.warnings)
    };
    Ok((loaded.policy, warnings))
}
