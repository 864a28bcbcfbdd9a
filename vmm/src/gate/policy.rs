//! The p.rules engine (ironvmm-policy) as the gate's `Decider`.
//!
//! TEMPORARY until the `policy` branch is merged: loading fails with a clear message.

use std::path::{Path, PathBuf};

use super::setup::SetupError;
use super::Decider;

/// Loads the policy at `path` against the builtin catalog, protecting `protected`
/// paths from every call. Returns the decider and the formatted warnings.
pub fn load(path: &Path, _protected: &[PathBuf]) -> Result<(Box<dyn Decider>, String), SetupError> {
    Err(SetupError {
        code: crate::exit::BAD_POLICY,
        message: format!(
            "{}: the policy engine is not built into this ironvmm yet",
            path.display()
        ),
    })
}
