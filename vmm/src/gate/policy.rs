//! The p.rules engine (ironvmm-policy) as the gate's `Decider`.
//!
//! TEMPORARY until the `policy` branch is merged: loading fails with a clear message.

use std::path::Path;

use super::Decider;

/// Loads the policy at `path` against the builtin catalog. Errors carry the exit
/// code (127 for an invalid policy) and the diagnostics.
pub fn load(path: &Path) -> Result<Box<dyn Decider>, (u8, String)> {
    Err((
        crate::exit::BAD_POLICY,
        format!(
            "{}: the policy engine is not built into this ironvmm yet",
            path.display()
        ),
    ))
}
