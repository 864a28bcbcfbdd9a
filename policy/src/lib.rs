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
//!
//! Additions:
//! - `Policy::load_with(path, catalog, learned: Option<&Path>)` and
//!   `Policy::from_sources(&Sources, catalog)`: with learned rules (`p.rules.learned`).
//! - `Policy::decide_at(&Call, unix_ms)`: the time `limit` windows use.
//! - `Policy::decide_ref(&Call) -> DecisionRef`: the same decision, reason borrowed
//!   (no allocation on the common path).
//! - `Policy::add_protected_path(path)`: more paths invariant 3 protects (the VMM
//!   registers the audit log, its configuration and secrets, in guest terms too).
//! - `Policy::may_allow_or_ask(tool)`: for `tools/list`.
//! - `Policy::explain(&Call) -> Explanation`; `ast::PolicyAst::format()` for `fmt`.
//! - `learned::{parse_header, render_entry, entries, remove_entry}`.
//! - `Policy::adopt_limits(&old)`: a reloaded policy (new learned rules) keeps the
//!   `limit` windows of the one it replaces.

pub mod ast;
pub mod catalog;
pub mod check;
mod compile;
pub mod diag;
mod eval;
pub mod learned;
pub mod lexer;
pub mod limit;
pub mod lists;
pub mod norm;
pub mod parser;
pub mod schema;
mod value;

pub use catalog::{Catalog, CatalogError, Role, Tool};
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use eval::{DecisionRef, StepOutcome};

use diag::SourceFile;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    Ask,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Ask => "ask",
        }
    }
    pub fn parse(s: &str) -> Option<Verdict> {
        Some(match s {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            "ask" => Verdict::Ask,
            _ => return None,
        })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who decided (docs/protocol.md, "Who decided"): one enum everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecidedBy {
    Rule,
    Default,
    Invariant,
    Learned,
    Limit,
    Breaker,
    User,
    Timeout,
    NonInteractive,
    Answers,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Rule => "rule",
            DecidedBy::Default => "default",
            DecidedBy::Invariant => "invariant",
            DecidedBy::Learned => "learned",
            DecidedBy::Limit => "limit",
            DecidedBy::Breaker => "breaker",
            DecidedBy::User => "user",
            DecidedBy::Timeout => "timeout",
            DecidedBy::NonInteractive => "non-interactive",
            DecidedBy::Answers => "answers",
        }
    }
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the engine answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding rule's line (in the learned file for `learned`), or `None` for
    /// the default and the invariants.
    pub rule: Option<u32>,
    pub by: DecidedBy,
    pub reason: String,
}

/// One request: `{"tool": "mail.send", "args": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub tool: String,
    pub args: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError(pub String);

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed call: {}", self.0)
    }
}
impl std::error::Error for CallError {}

impl Call {
    pub fn new(tool: impl Into<String>, args: Value) -> Call {
        Call {
            tool: tool.into(),
            args,
        }
    }

    /// `{"tool": STRING, "args": OBJECT}`; `args` may be omitted (empty). Other
    /// keys are refused. A tool name that is a string but not a valid name is
    /// accepted here and denied by the engine (an invariant).
    pub fn from_json(v: &Value) -> Result<Call, CallError> {
        let o = v.as_object().ok_or(CallError(
            "expected an object {\"tool\": ..., \"args\": {...}}".into(),
        ))?;
        if let Some(k) = o.keys().find(|k| *k != "tool" && *k != "args") {
            return Err(CallError(format!(
                "unknown key `{k}` (expected `tool` and `args`)"
            )));
        }
        let tool = o
            .get("tool")
            .and_then(Value::as_str)
            .ok_or(CallError("`tool` must be a string".into()))?;
        let args = match o.get("args") {
            None => Value::Object(Default::default()),
            Some(a @ Value::Object(_)) => a.clone(),
            Some(_) => return Err(CallError("`args` must be an object".into())),
        };
        Ok(Call {
            tool: tool.to_string(),
            args,
        })
    }
}

/// A policy that loaded, with the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub policy: Policy,
    pub warnings: Diagnostics,
}

/// The texts a policy is made of (for loading from memory).
pub struct Sources<'a> {
    pub policy: &'a str,
    /// The name diagnostics give the policy (usually its path).
    pub name: &'a str,
    /// Where `list NAME = file "..."` paths are resolved; `None`: the working directory.
    pub base_dir: Option<&'a Path>,
    /// Learned rules: the text and its display name.
    pub learned: Option<(&'a str, &'a str)>,
}

/// A loaded, compiled policy. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct Policy {
    program: compile::Program,
    protected: Vec<Box<str>>,
    ast: ast::PolicyAst,
    files: Vec<PathBuf>,
}

/// Largest policy file read.
pub const MAX_POLICY_FILE: u64 = 16 << 20;

fn read_text(path: &Path) -> Result<String, Diagnostics> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path)
        .map_err(|e| Diagnostics::file_error(&name, format!("cannot read `{name}`: {e}")))?;
    if meta.len() > MAX_POLICY_FILE {
        return Err(Diagnostics::file_error(
            &name,
            format!("`{name}` is larger than {} MiB", MAX_POLICY_FILE >> 20),
        ));
    }
    std::fs::read_to_string(path)
        .map_err(|e| Diagnostics::file_error(&name, format!("cannot read `{name}`: {e}")))
}

impl Policy {
    /// Reads and compiles a policy file and its lists.
    pub fn load(path: &Path, catalog: Option<&Catalog>) -> Result<Loaded, Diagnostics> {
        Policy::load_with(path, catalog, None)
    }

    /// Like `load`, with a learned-rules file.
    pub fn load_with(
        path: &Path,
        catalog: Option<&Catalog>,
        learned: Option<&Path>,
    ) -> Result<Loaded, Diagnostics> {
        let text = read_text(path)?;
        let learned_text = learned.map(read_text).transpose()?;
        let name = path.display().to_string();
        let lname = learned.map(|l| l.display().to_string()).unwrap_or_default();
        let base = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        });
        let src = Sources {
            policy: &text,
            name: &name,
            base_dir: base,
            learned: learned_text.as_deref().map(|t| (t, lname.as_str())),
        };
        let mut loaded = Policy::from_sources(&src, catalog)?;
        let mut own = vec![path.to_path_buf()];
        own.extend(learned.map(Path::to_path_buf));
        for f in own.iter().chain(loaded.policy.files.clone().iter()) {
            loaded.policy.add_protected_path(f);
        }
        loaded.policy.files.splice(0..0, own);
        Ok(loaded)
    }

    /// Compiles a policy from text. List files are read from `base_dir` (`None`: the
    /// working directory).
    pub fn from_source(
        src: &str,
        display_name: &str,
        base_dir: Option<&Path>,
        catalog: Option<&Catalog>,
    ) -> Result<Loaded, Diagnostics> {
        Policy::from_sources(
            &Sources {
                policy: src,
                name: display_name,
                base_dir,
                learned: None,
            },
            catalog,
        )
    }

    pub fn from_sources(s: &Sources<'_>, catalog: Option<&Catalog>) -> Result<Loaded, Diagnostics> {
        let mut diags = Diagnostics::new();
        let file = SourceFile {
            name: s.name,
            text: s.policy,
        };
        let (ast, errs) = parser::parse(s.policy);
        for e in errs {
            diags.push(file.diag(Severity::Error, e.span, e.message));
        }
        let learned = s.learned.map(|(text, name)| {
            let (last, errs) = parser::parse(text);
            let lf = SourceFile { name, text };
            for e in errs {
                diags.push(lf.diag(Severity::Error, e.span, e.message));
            }
            (lf, last)
        });
        let checked = check::check(
            check::Input {
                policy: file,
                ast,
                base_dir: s.base_dir,
                learned,
                catalog,
            },
            &mut diags,
        );
        diags.sort();
        if diags.has_errors() {
            return Err(diags);
        }
        let program = compile::compile(&checked, catalog);
        let mut policy = Policy {
            program,
            protected: Vec::new(),
            ast: checked.ast,
            files: Vec::new(),
        };
        for f in &checked.files {
            policy.add_protected_path(f);
        }
        policy.files = checked.files;
        Ok(Loaded {
            policy,
            warnings: diags,
        })
    }

    /// Denies (invariant 3) every path argument that is `path` or lies under it.
    /// Relative paths are made absolute against the current directory; the path
    /// is compared lexically, as the guest names it.
    pub fn add_protected_path(&mut self, path: impl AsRef<Path>) {
        let p = path.as_ref();
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        };
        let text = abs.to_string_lossy();
        if let Some(n) = norm::path(&text) {
            let n: Box<str> = n.into();
            if !self.protected.contains(&n) {
                self.protected.push(n);
            }
        }
    }

    /// Takes over the `limit` windows of `old`, rule by rule (a policy rule is
    /// matched by its line and text, a learned one by its text), so reloading a
    /// policy with new learned rules never resets a limit.
    pub fn adopt_limits(&self, old: &Policy) {
        for r in &self.program.rules {
            let Some(mine) = &r.limit else { continue };
            let theirs = old.program.rules.iter().find(|o| {
                o.learned == r.learned && o.text == r.text && (r.learned || o.line == r.line)
            });
            if let Some(theirs) = theirs.and_then(|o| o.limit.as_ref()) {
                mine.adopt(theirs);
            }
        }
    }

    /// The protected paths (normalised).
    pub fn protected_paths(&self) -> impl Iterator<Item = &str> {
        self.protected.iter().map(|s| &**s)
    }

    /// The files this policy was read from: the policy, its learned rules, its lists.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The syntax tree (comments included).
    pub fn ast(&self) -> &ast::PolicyAst {
        &self.ast
    }

    /// Decides a call now.
    pub fn decide(&self, call: &Call) -> Decision {
        self.decide_ref(call).to_owned()
    }

    /// Decides a call as if at `unix_ms` (milliseconds since 1970; `limit` windows).
    pub fn decide_at(&self, call: &Call, unix_ms: i64) -> Decision {
        self.program
            .decide(
                &self.protected,
                &call.tool,
                &call.args,
                &mut eval::Clock::fixed(unix_ms),
                true,
                &mut eval::NoTrace,
            )
            .to_owned()
    }

    /// Decides a call now; the reason is borrowed from the policy where it can be.
    pub fn decide_ref(&self, call: &Call) -> DecisionRef<'_> {
        self.decide_parts(&call.tool, &call.args)
    }

    /// Decides from a tool name and arguments (no `Call` to build).
    pub fn decide_parts(&self, tool: &str, args: &Value) -> DecisionRef<'_> {
        self.program.decide(
            &self.protected,
            tool,
            args,
            &mut eval::Clock::now(),
            true,
            &mut eval::NoTrace,
        )
    }

    /// Could some rule (or the default) allow or ask for `tool`? Used to limit
    /// `tools/list` to tools that are not denied outright.
    pub fn may_allow_or_ask(&self, tool: &str) -> bool {
        let Some(e) = self.program.entry(tool) else {
            return false;
        };
        self.program.default != Verdict::Deny
            || e.steps
                .iter()
                .any(|s| self.program.rules[s.rule_index() as usize].verdict != Verdict::Deny)
    }

    /// Every rule that could apply, in order, and what each did with the call.
    /// Limits are looked at, not consumed.
    pub fn explain(&self, call: &Call, unix_ms: Option<i64>) -> Explanation {
        struct Rec(Vec<(u32, StepOutcome)>);
        impl eval::Tracer for Rec {
            const ON: bool = true;
            fn step(&mut self, rule: u32, o: StepOutcome) {
                self.0.push((rule, o));
            }
        }
        let mut rec = Rec(Vec::new());
        let mut clock = match unix_ms {
            Some(t) => eval::Clock::fixed(t),
            None => eval::Clock::now(),
        };
        let d = self
            .program
            .decide(
                &self.protected,
                &call.tool,
                &call.args,
                &mut clock,
                false,
                &mut rec,
            )
            .to_owned();
        let tried: Vec<u32> = self
            .program
            .entry(&call.tool)
            .map(|e| e.steps.iter().map(|s| s.rule_index()).collect())
            .unwrap_or_default();
        let mut steps = Vec::new();
        for (i, m) in self.program.rules.iter().enumerate() {
            let i = i as u32;
            let outcome = match rec.0.iter().find(|(r, _)| *r == i) {
                Some((_, o)) => ExplainOutcome::Tried(o.clone()),
                None if d.by == DecidedBy::Invariant => ExplainOutcome::NotReached,
                None if tried.contains(&i) => ExplainOutcome::NotReached,
                None => ExplainOutcome::PatternDoesNotMatch,
            };
            steps.push(ExplainStep {
                line: m.line,
                learned: m.learned,
                text: m.text.to_string(),
                outcome,
            });
        }
        Explanation {
            decision: d,
            steps,
            catalog: self.program.has_catalog,
        }
    }
}

#[derive(Debug, Clone)]
pub enum ExplainOutcome {
    Tried(StepOutcome),
    PatternDoesNotMatch,
    NotReached,
}

#[derive(Debug, Clone)]
pub struct ExplainStep {
    pub line: u32,
    pub learned: bool,
    pub text: String,
    pub outcome: ExplainOutcome,
}

/// What `ironvmm policy explain` prints.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    pub steps: Vec<ExplainStep>,
    pub catalog: bool,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.catalog {
            writeln!(
                f,
                "no catalog: the unknown-tool and schema invariants are skipped"
            )?;
        }
        if self.decision.by == DecidedBy::Invariant {
            writeln!(f, "invariant: {}", self.decision.reason)?;
        }
        for s in &self.steps {
            let what = match &s.outcome {
                ExplainOutcome::Tried(StepOutcome::Matched) => "MATCHED".to_string(),
                ExplainOutcome::Tried(StepOutcome::CondFalse(why)) => format!("no match: {why}"),
                ExplainOutcome::Tried(StepOutcome::LimitReached) => {
                    "matched, but its limit is reached: falls through".into()
                }
                ExplainOutcome::PatternDoesNotMatch => {
                    "skipped: the tool pattern does not match".into()
                }
                ExplainOutcome::NotReached => "not reached".into(),
            };
            let at = if s.learned {
                format!("learned line {}", s.line)
            } else {
                format!("line {}", s.line)
            };
            match s.outcome {
                // Rules that never met the call take one line each.
                ExplainOutcome::PatternDoesNotMatch | ExplainOutcome::NotReached => {
                    writeln!(f, "{at}: {}  ({what})", s.text)?
                }
                ExplainOutcome::Tried(_) => writeln!(f, "{at}: {}\n    {what}", s.text)?,
            }
        }
        let d = &self.decision;
        let rule = d.rule.map_or(String::new(), |l| format!(" line {l}"));
        write!(
            f,
            "decision: {} (by {}{rule}): {}",
            d.verdict, d.by, d.reason
        )
    }
}

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn policy_is_send_sync() {
        assert_send_sync::<super::Policy>();
    }
}
