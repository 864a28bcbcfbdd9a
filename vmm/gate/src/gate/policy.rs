//! Loading p.rules for a gate: always against the builtin catalog (unknown tools and
//! arguments that fail a schema are denied by the invariants), with its learned
//! rules (`p.rules.learned`, when present). The policy stays live: a rule learned
//! from an answer is put in force while the VM runs.

use std::path::Path;
use std::sync::Arc;

use ironvmm_policy::{CatalogError, Diagnostics};

use crate::approvals::LivePolicy;
use crate::services::builtin_catalog;

/// Why the policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A bug in ironvmm, not in the policy.
    #[error("the builtin catalog is invalid: {0}")]
    Catalog(CatalogError),
    /// The engine's diagnostics, every one of them.
    #[error("invalid policy:\n{0}")]
    Invalid(Diagnostics),
}

impl LoadError {
    /// 127 for an invalid policy, 125 for ironvmm's own failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            LoadError::Catalog(_) => ironvmm_wire::exit::VMM_ERROR,
            LoadError::Invalid(_) => ironvmm_wire::exit::BAD_POLICY,
        }
    }
}

/// Loads the policy at `path`; returns the policy and the formatted warnings.
pub fn load(path: &Path) -> Result<(Arc<LivePolicy>, String), LoadError> {
    let catalog = builtin_catalog().map_err(LoadError::Catalog)?;
    let (live, warnings) = LivePolicy::load(path, Some(catalog)).map_err(LoadError::Invalid)?;
    let warnings = if warnings.is_empty() {
        String::new()
    } else {
        format!("{warnings}")
    };
    Ok((live, warnings))
}
