//! The real engine behind `RuleEngine`: ironvmm-policy's parser, checker and
//! evaluator, with the same catalog the compile uses.

use std::path::Path;

use ironvmm_policy::{Call, Catalog, Policy};
use serde_json::Value;

use crate::engine::{Outcome, RuleEngine};

pub struct PolicyEngine {
    catalog: Catalog,
}

impl PolicyEngine {
    /// Loads the catalog with the engine's own parser, so that a catalog the engine
    /// would refuse is refused before any model is asked.
    pub fn new(catalog_json: &str) -> Result<PolicyEngine, String> {
        Ok(PolicyEngine {
            catalog: Catalog::from_json(catalog_json).map_err(|e| e.to_string())?,
        })
    }

    fn load(&self, source: &str, path: &Path) -> Result<ironvmm_policy::Loaded, String> {
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Diagnostics name the file only: they go into prompts, and a prompt that
        // held the folder would make the cache depend on where the compile ran.
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "p.rules".into());
        Policy::from_source(source, &name, Some(base), Some(&self.catalog))
            .map_err(|d| d.to_string())
    }
}

impl RuleEngine for PolicyEngine {
    fn check(&self, source: &str, path: &Path) -> Result<Vec<String>, String> {
        let loaded = self.load(source, path)?;
        Ok(loaded.warnings.warnings().map(|w| w.to_string()).collect())
    }

    fn decide_all(
        &self,
        source: &str,
        path: &Path,
        calls: &[Value],
    ) -> Result<Vec<Outcome>, String> {
        let mut loaded = self.load(source, path)?;
        // As `Policy::load` (and so `policy test`) does: the policy file itself is a
        // protected path, so scenarios are decided exactly as they will be later.
        loaded.policy.add_protected_path(path);
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let call = Call::from_json(c).map_err(|e| format!("call {i}: {e}"))?;
                let d = loaded.policy.decide(&call);
                Ok(Outcome {
                    verdict: d.verdict,
                    rule: d.rule,
                    by: d.by,
                    reason: d.reason,
                })
            })
            .collect()
    }

    fn decide_each(
        &self,
        source: &str,
        path: &Path,
        calls: &[Value],
    ) -> Result<Vec<Outcome>, String> {
        // Only `limit` counters carry from one call to the next: without any, one
        // load decides every call as a fresh one would (and the lists are read once).
        let limited = self
            .load(source, path)?
            .policy
            .ast()
            .rules()
            .any(|r| r.limit.is_some());
        if limited {
            let mut out = Vec::with_capacity(calls.len());
            for (i, c) in calls.iter().enumerate() {
                let mut one = self
                    .decide_all(source, path, std::slice::from_ref(c))
                    .map_err(|e| format!("call {i}: {e}"))?;
                out.push(one.pop().ok_or_else(|| format!("call {i}: no decision"))?);
            }
            Ok(out)
        } else {
            self.decide_all(source, path, calls)
        }
    }
}
