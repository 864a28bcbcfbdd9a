//! The running policy, with its learned rules, replaceable while the VM runs: a
//! rule learned from an answer takes effect for the very next call.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use ironvmm_policy::{Catalog, DecisionRef, Diagnostics, Policy};
use serde_json::Value;

use crate::gate::Decider;

pub use crate::gate::setup::learned_path;

/// The scenarios of `policy`: `p.scenarios.jsonl` beside `p.rules` (the policy's
/// file name without its extension, plus `.scenarios.jsonl`).
pub fn scenarios_path(policy: &Path) -> PathBuf {
    let stem = policy
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "p".into());
    policy.with_file_name(format!("{stem}.scenarios.jsonl"))
}

/// A policy, its learned rules and the paths it protects, reloadable.
pub struct LivePolicy {
    policy_path: PathBuf,
    learned_path: PathBuf,
    catalog: Option<Catalog>,
    /// More paths invariant 3 denies, kept across reloads.
    protected: Mutex<Vec<PathBuf>>,
    current: RwLock<Arc<Policy>>,
}

impl std::fmt::Debug for LivePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePolicy")
            .field("policy", &self.policy_path)
            .field("learned", &self.learned_path)
            .finish()
    }
}

impl LivePolicy {
    /// Loads `policy` with its learned rules when the file exists. The learned
    /// file is protected (invariant 3) even before it exists.
    pub fn load(
        policy: &Path,
        catalog: Option<Catalog>,
    ) -> Result<(Arc<LivePolicy>, Diagnostics), Diagnostics> {
        let learned = learned_path(policy);
        let protected = vec![learned.clone()];
        let (p, warnings) = read(policy, &learned, catalog.as_ref(), &protected)?;
        let live = LivePolicy {
            policy_path: policy.to_path_buf(),
            learned_path: learned,
            catalog,
            protected: Mutex::new(protected),
            current: RwLock::new(Arc::new(p)),
        };
        Ok((Arc::new(live), warnings))
    }

    fn read(&self) -> Result<(Policy, Diagnostics), Diagnostics> {
        let protected = self
            .protected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        read(
            &self.policy_path,
            &self.learned_path,
            self.catalog.as_ref(),
            &protected,
        )
    }

    /// More paths invariant 3 denies (the gate's own files, as the host and the
    /// guest name them), now and after every reload.
    pub fn protect(&self, paths: &[PathBuf]) -> Result<(), Diagnostics> {
        self.protected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(paths);
        self.reload()
    }

    /// Reads the policy and its learned rules again and puts them in force. The
    /// `limit` windows carry over. On an error the running policy stays.
    pub fn reload(&self) -> Result<(), Diagnostics> {
        let (p, _) = self.read()?;
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        p.adopt_limits(&cur);
        *cur = Arc::new(p);
        Ok(())
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    pub fn learned_path(&self) -> &Path {
        &self.learned_path
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_ref()
    }
}

fn read(
    policy: &Path,
    learned: &Path,
    catalog: Option<&Catalog>,
    protected: &[PathBuf],
) -> Result<(Policy, Diagnostics), Diagnostics> {
    let learned = learned.exists().then_some(learned);
    let loaded = Policy::load_with(policy, catalog, learned)?;
    let mut p = loaded.policy;
    for path in protected {
        p.add_protected_path(path);
    }
    Ok((p, loaded.warnings))
}

/// The gate's `Decider` over a `LivePolicy`.
pub struct LiveDecider(pub Arc<LivePolicy>);

impl Decider for LiveDecider {
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a> {
        // The read lock is held only while deciding; a reload waits for it.
        let cur = self.0.current.read().unwrap_or_else(|e| e.into_inner());
        let d = cur.decide_parts(tool, args);
        DecisionRef {
            verdict: d.verdict,
            rule: d.rule,
            by: d.by,
            reason: Cow::Owned(d.reason.into_owned()),
        }
    }

    fn could_allow_or_ask(&self, tool: &str) -> bool {
        self.0.current().may_allow_or_ask(tool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_beside_the_policy() {
        assert_eq!(
            learned_path(Path::new("/x/p.rules")),
            PathBuf::from("/x/p.rules.learned")
        );
        assert_eq!(
            scenarios_path(Path::new("/x/p.rules")),
            PathBuf::from("/x/p.scenarios.jsonl")
        );
        assert_eq!(
            scenarios_path(Path::new("inbox.rules")),
            PathBuf::from("inbox.scenarios.jsonl")
        );
    }
}
