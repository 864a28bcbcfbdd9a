//! Answers kept as rules, checked before they are kept.
//!
//! A learned rule refines the `ask` rule that fired (it is placed just before it,
//! so earlier denies, limits and invariants still win). Before it is written it is
//! run against the policy's scenarios (`p.scenarios.jsonl` beside `p.rules`): a rule
//! that would change a scenario's decision is kept only on explicit confirmation.
//! The file is replaced atomically, and the running policy reloaded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ironvmm_policy::{DecidedBy, Decision, Role, Verdict};
use ironvmm_policy_compiler::learned_check::{
    changed_scenarios, parse_scenarios, with_entry, Base, Change, LearnedCheckError, TestCase,
};
use serde::Serialize;
use serde_json::Value;

use super::event::LearnedView;
use super::live::{scenarios_path, LivePolicy};
use crate::audit::{AuditLog, LearnRecord};
use crate::gate::approver::{Answerer, AskRequest};

/// How much of the call a learned rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// This exact call: every argument as it was (arrays: the same values).
    Exact,
    /// The value that matters: this recipient, this host, this directory (`under`).
    Value,
    /// The whole tool.
    Tool,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Exact => "exact",
            Scope::Value => "value",
            Scope::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "exact" => Scope::Exact,
            "value" => Scope::Value,
            "tool" => Scope::Tool,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("the ask came from `default ask`, not from an ask rule: there is no rule to refine")]
    NoAskRule,
    #[error("{tool} has no argument that names a recipient, host, URL or path: choose `exact` or `tool`")]
    NoValue { tool: String },
    #[error("the exact call cannot be written as a rule: argument `{arg}` {why}; choose `value` or `tool`")]
    NotExpressible { arg: String, why: &'static str },
    #[error("the learned rule does not load with the policy:\n{0}")]
    Invalid(String),
    #[error("the rule `{rule}` would not decide this call: it is decided by {by} ({reason}); a learned rule never overrides a deny, a limit or an invariant")]
    NoEffect {
        rule: String,
        by: &'static str,
        reason: String,
    },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}:{line}: {message}")]
    BadScenario {
        path: String,
        line: usize,
        message: String,
    },
    #[error("the rule was written, but the audit log failed: {0}")]
    Audit(String),
}

/// A scenario whose decision a candidate rule would change (the compiler's check,
/// the one place scenarios are decided for a learned rule).
pub type Conflict = Change;

/// A rule ready to be written, and what it would change.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub rule: String,
    pub scope: Scope,
    pub allow: bool,
    pub seq: u64,
    pub refines: u32,
    pub conflicts: Vec<Conflict>,
    /// The learned file with the rule added.
    #[serde(skip)]
    new_text: String,
}

/// Turns answers into learned rules for one policy.
pub struct Learner {
    live: Arc<LivePolicy>,
    scenarios: PathBuf,
    audit: Option<Arc<AuditLog>>,
}

impl Learner {
    /// Learns beside `live`'s policy; `audit` gets a `learn` record per rule.
    pub fn new(live: Arc<LivePolicy>, audit: Option<Arc<AuditLog>>) -> Learner {
        let scenarios = scenarios_path(live.policy_path());
        Learner {
            live,
            scenarios,
            audit,
        }
    }

    pub fn live(&self) -> &Arc<LivePolicy> {
        &self.live
    }

    pub fn learned_path(&self) -> &Path {
        self.live.learned_path()
    }

    /// The decision of the running policy, when a learned rule makes it.
    pub fn decide_learned(&self, tool: &str, args: &Value) -> Option<Decision> {
        let d = self.live.current().decide_parts(tool, args).to_owned();
        (d.by == DecidedBy::Learned).then_some(d)
    }

    /// The rule an answer of `scope` would write, checked against the scenarios
    /// and against the call itself.
    pub fn candidate(
        &self,
        req: &AskRequest,
        allow: bool,
        scope: Scope,
    ) -> Result<Candidate, LearnError> {
        let refines = req.rule.ok_or(LearnError::NoAskRule)?;
        let tool = self.live.catalog().and_then(|c| c.tool(&req.tool));
        let rule = rule_text(&req.tool, &req.args, allow, scope, tool)?;
        let old_text = read_opt(self.learned_path())?;
        let new_text = with_entry(Some(&old_text), req.ask_seq, refines, &rule);

        let ppath = self.live.policy_path();
        let rules = std::fs::read_to_string(ppath).map_err(|e| LearnError::Io {
            path: ppath.display().to_string(),
            message: e.to_string(),
        })?;
        let current = self.live.current();
        let protected: Vec<&str> = current.protected_paths().collect();
        let base = Base {
            rules: &rules,
            rules_path: ppath,
            learned: Some(&old_text),
            catalog: self.live.catalog(),
            protected: &protected,
        };
        // The answered call itself must now be decided by the new rule.
        let after = base.load(Some(&new_text)).map_err(invalid)?;
        let d = after.decide_parts(&req.tool, &req.args);
        let want = if allow { Verdict::Allow } else { Verdict::Deny };
        if d.by != DecidedBy::Learned || d.verdict != want {
            return Err(LearnError::NoEffect {
                rule,
                by: d.by.as_str(),
                reason: d.reason.into_owned(),
            });
        }
        let conflicts = match self.scenarios()? {
            Some(s) => changed_scenarios(&base, &s, &rule, refines).map_err(invalid)?,
            None => Vec::new(),
        };
        Ok(Candidate {
            rule,
            scope,
            allow,
            seq: req.ask_seq,
            refines,
            conflicts,
            new_text,
        })
    }

    /// Writes the candidate's rule (atomically), puts it in force, and audits it.
    pub fn commit(&self, c: &Candidate, by: &Answerer) -> Result<LearnedView, LearnError> {
        let path = self.learned_path();
        write_atomic(path, c.new_text.as_bytes())?;
        self.live
            .reload()
            .map_err(|d| LearnError::Invalid(d.to_string()))?;
        let file = path.display().to_string();
        if let Some(log) = &self.audit {
            log.learn(&LearnRecord {
                ask_seq: c.seq,
                decision: if c.allow { "allow" } else { "deny" },
                scope: c.scope.as_str(),
                rule: &c.rule,
                refines: c.refines,
                file: &file,
                channel: &by.channel,
                who: by.who.as_deref(),
                confirmed_conflicts: c.conflicts.len(),
            })
            .map_err(|e| LearnError::Audit(e.to_string()))?;
        }
        Ok(LearnedView {
            rule: c.rule.clone(),
            file,
            seq: c.seq,
            refines: c.refines,
        })
    }

    /// The policy's scenarios, when it has a p.scenarios.jsonl.
    fn scenarios(&self) -> Result<Option<Vec<TestCase>>, LearnError> {
        let text = match std::fs::read_to_string(&self.scenarios) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LearnError::Io {
                    path: self.scenarios.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        parse_scenarios(&text).map(Some).map_err(|e| match e {
            LearnedCheckError::Scenario { line, message } => LearnError::BadScenario {
                path: self.scenarios.display().to_string(),
                line,
                message,
            },
            e => invalid(e),
        })
    }
}

/// A policy that does not load (before or with the candidate), or a scenario the
/// check could not decide.
fn invalid(e: LearnedCheckError) -> LearnError {
    match e {
        LearnedCheckError::Load { diagnostics, .. } => LearnError::Invalid(diagnostics),
        e => LearnError::Invalid(e.to_string()),
    }
}

fn read_opt(path: &Path) -> Result<String, LearnError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(LearnError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Replaces `path` with `data`: a temporary file beside it, synced, renamed over
/// it, and the directory synced. A reader sees the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), LearnError> {
    let io = |e: std::io::Error| LearnError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io)
}

/// A p.rules string literal.
pub fn lit(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if c.is_control() => o.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn is_name(k: &str) -> bool {
    let mut cs = k.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Longest string an exact rule spells out (a rule is for a person to read).
const MAX_EXACT_STRING: usize = 4096;

/// The rule text for an answer of `scope` to `tool(args)`.
pub fn rule_text(
    tool: &str,
    args: &Value,
    allow: bool,
    scope: Scope,
    spec: Option<&ironvmm_policy::Tool>,
) -> Result<String, LearnError> {
    let verdict = if allow { "allow" } else { "deny" };
    let empty = serde_json::Map::new();
    let obj = args.as_object().unwrap_or(&empty);
    let mut conds: Vec<String> = Vec::new();
    match scope {
        Scope::Tool => {}
        Scope::Exact => {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            for k in keys {
                let not = |why| LearnError::NotExpressible {
                    arg: k.clone(),
                    why,
                };
                if !is_name(k) {
                    return Err(not("has a name p.rules cannot spell"));
                }
                let a = format!("args.{k}");
                match &obj[k.as_str()] {
                    Value::String(s) if s.chars().count() <= MAX_EXACT_STRING => {
                        conds.push(format!("{a} == {}", lit(s)))
                    }
                    Value::String(_) => return Err(not("is too long to spell out")),
                    Value::Number(n) if n.as_u64().is_some() => conds.push(format!("{a} == {n}")),
                    Value::Number(_) => return Err(not("is not a whole number")),
                    Value::Array(xs) if !xs.is_empty() && xs.iter().all(Value::is_string) => {
                        let set: Vec<String> =
                            xs.iter().filter_map(Value::as_str).map(lit).collect();
                        conds.push(format!("all {a} in [{}]", set.join(", ")));
                        conds.push(format!("len({a}) == {}", xs.len()));
                    }
                    Value::Array(_) => return Err(not("is a list of other than strings")),
                    Value::Bool(_) => return Err(not("is a true/false value")),
                    Value::Null => return Err(not("is null")),
                    Value::Object(_) => return Err(not("is an object")),
                }
            }
            // Arguments the call left out stay out.
            if let Some(props) = spec
                .and_then(|t| t.input_schema.get("properties"))
                .and_then(Value::as_object)
            {
                let mut absent: Vec<&String> =
                    props.keys().filter(|p| !obj.contains_key(*p)).collect();
                absent.sort();
                for p in absent.into_iter().filter(|p| is_name(p)) {
                    conds.push(format!("not exists args.{p}"));
                }
            }
        }
        Scope::Value => {
            let spec = spec.ok_or(LearnError::NoValue { tool: tool.into() })?;
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            for k in keys {
                let Some(role) = spec.role_of(std::slice::from_ref(k)) else {
                    continue;
                };
                if !is_name(k) {
                    continue;
                }
                let a = format!("args.{k}");
                let v = &obj[k.as_str()];
                let strings: Vec<&str> = match v {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(xs) => xs.iter().filter_map(Value::as_str).collect(),
                    _ => continue,
                };
                if strings.is_empty() {
                    continue;
                }
                let set = |xs: &[String]| xs.join(", ");
                match role {
                    Role::Email | Role::Host => {
                        let items: Vec<String> = strings.iter().map(|s| lit(s)).collect();
                        if v.is_array() {
                            conds.push(format!("all {a} in [{}]", set(&items)));
                        } else {
                            conds.push(format!("{a} in [{}]", set(&items)));
                        }
                    }
                    Role::Url => {
                        for s in strings {
                            let host =
                                url_host(s).ok_or(LearnError::NoValue { tool: tool.into() })?;
                            conds.push(format!("host({a}) == {}", lit(&host)));
                        }
                    }
                    Role::Path | Role::Tree => {
                        for s in strings {
                            conds.push(format!("{a} under {}", lit(&parent_dir(s))));
                        }
                    }
                }
            }
            if conds.is_empty() {
                return Err(LearnError::NoValue { tool: tool.into() });
            }
        }
    }
    let mut rule = format!("{verdict} {tool}");
    if !conds.is_empty() {
        rule.push_str(" when ");
        rule.push_str(&conds.join(" and "));
    }
    Ok(rule)
}

/// The host of a URL, lowercased (the engine normalises it further).
fn url_host(s: &str) -> Option<String> {
    let rest = s.split_once("://").map(|(_, r)| r)?;
    let auth = rest.split(['/', '?', '#']).next()?;
    let host = auth.rsplit('@').next()?;
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| format!("{h}]"))?
    } else {
        host.split(':').next()?.to_string()
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// The folder that holds `path` (a relative path is taken under /workspace, as the
/// engine does).
fn parent_dir(path: &str) -> String {
    let abs = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/workspace/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for seg in abs.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.pop();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literals_are_escaped() {
        assert_eq!(lit("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u{1}\"");
    }

    #[test]
    fn scopes() {
        let args = json!({"path": "/workspace/out/a.txt", "content": "hi"});
        assert_eq!(
            rule_text("fs.write", &args, true, Scope::Tool, None).unwrap(),
            "allow fs.write"
        );
        assert_eq!(
            rule_text("fs.write", &args, false, Scope::Exact, None).unwrap(),
            "deny fs.write when args.content == \"hi\" and args.path == \"/workspace/out/a.txt\""
        );
        let e = rule_text(
            "fs.write",
            &json!({"path": "/a", "append": true}),
            true,
            Scope::Exact,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`append`"), "{e}");
        assert_eq!(
            rule_text(
                "mail.send",
                &json!({"to": ["a@b", "c@d"]}),
                true,
                Scope::Exact,
                None
            )
            .unwrap(),
            "allow mail.send when all args.to in [\"a@b\", \"c@d\"] and len(args.to) == 2"
        );
        assert_eq!(parent_dir("/workspace/out/../x/a.txt"), "/workspace/x");
        assert_eq!(parent_dir("notes.txt"), "/workspace");
        assert_eq!(
            url_host("https://u:p@Example.COM:8443/x?y").as_deref(),
            Some("example.com")
        );
    }
}
