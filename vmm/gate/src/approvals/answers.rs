//! `--answers FILE`: asks decided in advance, for CI. The file is p.rules syntax
//! with `allow` and `deny` rules only; it is consulted only for calls the policy
//! asks about, and a call no rule of it matches is not answered by it.

use std::path::{Path, PathBuf};

use ironvmm_policy::ast::{Item, VerdictKw};
use ironvmm_policy::{Catalog, DecidedBy, Policy, Verdict};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AnswersError {
    #[error("--answers {path}: {diagnostics}")]
    Invalid { path: String, diagnostics: String },
    #[error("--answers {path}: an answers file holds no `default`: a call no rule matches is not answered by it")]
    Default { path: String },
    #[error("--answers {path}:{line}: an answers file holds only `allow` and `deny` rules (this is `{what}`)")]
    NotAnAnswer {
        path: String,
        line: u32,
        what: String,
    },
}

/// A loaded answers file.
#[derive(Debug)]
pub struct AnswersFile {
    path: PathBuf,
    rules: Policy,
}

/// What the answers file says about one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAnswer {
    pub allow: bool,
    /// The line of the rule in the answers file.
    pub line: u32,
    pub reason: String,
}

impl AnswersFile {
    /// Loads `path` against `catalog` (arguments are normalised by role as in the
    /// policy). `ask` rules and `default` lines are refused: the file only answers.
    pub fn load(path: &Path, catalog: Option<&Catalog>) -> Result<AnswersFile, AnswersError> {
        let name = path.display().to_string();
        let loaded = Policy::load(path, catalog).map_err(|d| AnswersError::Invalid {
            path: name.clone(),
            diagnostics: d.to_string(),
        })?;
        for item in &loaded.policy.ast().items {
            match item {
                Item::Rule(r) if r.verdict == VerdictKw::Ask => {
                    return Err(AnswersError::NotAnAnswer {
                        path: name,
                        line: r.line.0,
                        what: "ask".into(),
                    })
                }
                Item::Default { .. } => return Err(AnswersError::Default { path: name }),
                _ => {}
            }
        }
        Ok(AnswersFile {
            path: path.to_path_buf(),
            rules: loaded.policy,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The answer of the first rule that matches, or None.
    pub fn answer(&self, tool: &str, args: &Value) -> Option<PreAnswer> {
        let d = self.rules.decide_parts(tool, args);
        match (d.by, d.rule) {
            (DecidedBy::Rule | DecidedBy::Limit, Some(line)) if d.verdict != Verdict::Ask => {
                Some(PreAnswer {
                    allow: d.verdict == Verdict::Allow,
                    line,
                    reason: d.reason.into_owned(),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("answers.rules");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn answers_only_what_it_matches() {
        let (_d, p) = file(
            "allow fs.write when path under \"/workspace/ok\" \"ci may write ok\"\n\
             deny fs.write when path under \"/workspace/no\"\n",
        );
        let a = AnswersFile::load(&p, None).unwrap();
        let yes = a
            .answer("fs.write", &json!({"path": "/workspace/ok/x"}))
            .unwrap();
        assert!(yes.allow);
        assert_eq!((yes.line, yes.reason.as_str()), (1, "ci may write ok"));
        let no = a
            .answer("fs.write", &json!({"path": "/workspace/no/x"}))
            .unwrap();
        assert!(!no.allow);
        assert_eq!(no.line, 2);
        assert_eq!(a.answer("fs.write", &json!({"path": "/elsewhere"})), None);
    }

    #[test]
    fn ask_and_default_are_refused() {
        let (_d, p) = file("allow fs.read\nask fs.write\n");
        let e = AnswersFile::load(&p, None).unwrap_err().to_string();
        assert!(
            e.contains(":2:") && e.contains("only `allow` and `deny`"),
            "{e}"
        );
        let (_d, p) = file("allow fs.read\ndefault allow\n");
        let e = AnswersFile::load(&p, None).unwrap_err().to_string();
        assert!(e.contains("default"), "{e}");
        let (_d, p) = file("allow fs.read when\n");
        assert!(matches!(
            AnswersFile::load(&p, None),
            Err(AnswersError::Invalid { .. })
        ));
    }
}
