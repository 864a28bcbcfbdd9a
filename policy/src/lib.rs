//! ironvmm's policy engine: p.rules text in, decisions out.
//!
//! This crate knows nothing of KVM or of the VMM. It does no I/O beyond reading a
//! policy file and the list files it names.
//!
//! CONTRACT (other crates build against these names; keep them stable):
//! - `Catalog::from_json(&str) -> Result<Catalog, CatalogError>` — the `--catalog` file format.
//! - `Policy::load(path, Option<&Catalog>) -> Result<Loaded, Diagnostics>`
//! - `Policy::from_source(src, display_name, base_dir, Option<&Catalog>) -> Result<Loaded, Diagnostics>`
//! - `Loaded { policy: Policy, warnings: Diagnostics }`
//! - `Policy::decide(&self, &Call) -> Decision` (thread-safe: `Policy: Send + Sync`)
//! - `Call { tool: String, args: serde_json::Value }`, `Call::from_json(&serde_json::Value)`
//! - `Decision { verdict: Verdict, rule: Option<u32>, by: DecidedBy, reason: String }`
//! - `Verdict::{Allow, Deny, Ask}`, `DecidedBy::{Rule, Default, Invariant, Learned, Limit, ...}`
//! - `Diagnostics` implements `Display` (file:line:col, source line, caret, expectation).

pub mod catalog;
