//! `ironvmm policy check|eval|test|explain|fmt|learned`: the policy engine on the
//! command line. Each subcommand returns its exit code; the enum is meant to grow
//! (`compile` and `refine` live in their own modules and add a variant here).

use clap::{Args, Subcommand};
use ironvmm_policy::{ast::PolicyAst, learned, Call, Catalog, Decision, Loaded, Policy, Verdict};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Exit codes of the `policy` subcommands.
pub mod code {
    /// Loaded / every scenario passed / done.
    pub const OK: u8 = 0;
    /// `check`/`fmt`: the policy does not load; `test`: a scenario mismatched.
    pub const FAIL: u8 = 1;
    /// A malformed call, scenario, catalog or policy where one was needed to run.
    pub const BAD_INPUT: u8 = 2;
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the policy's errors and warnings; exit 0 if it loads, 1 if not.
    Check(CheckArgs),
    /// Decide calls; print one JSON line per call: {"decision","rule","by","reason"}.
    Eval(EvalArgs),
    /// Run scenarios ({"call":{…},"expect":"allow|deny|ask"} per line); exit 1 on a mismatch.
    Test(TestArgs),
    /// Show every rule tried for a call, and why each did or did not match.
    Explain(ExplainArgs),
    /// Print the policy in canonical form.
    Fmt(FmtArgs),
    /// List learned rules (p.rules.learned), or revoke one with --remove SEQ.
    Learned(LearnedArgs),
    /// Compile plain English into a verified p.rules (LLM, cached; docs/policy-compiler.md).
    Compile(Box<super::compile::CompileArgs>),
    /// Propose edits to the English from the audit log; recompile on acceptance.
    Refine(Box<super::compile::RefineArgs>),
    /// Propose argument roles for tools that have none (the owner's MCP servers), for review.
    Annotate(Box<super::compile::AnnotateArgs>),
}

/// The policy and what it is loaded with.
#[derive(Args, Debug)]
pub struct PolicyInput {
    /// The policy file (p.rules).
    pub policy: PathBuf,
    /// Tool catalog: a JSON file, or `builtin` for the services compiled into ironvmm.
    /// Without one, the unknown-tool and schema invariants are skipped.
    #[arg(long, value_name = "FILE|builtin")]
    pub catalog: Option<String>,
    /// Learned rules to evaluate (p.rules.learned).
    #[arg(long, value_name = "FILE")]
    pub learned: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// Also tell whether the policy still matches the English it was compiled from.
    #[arg(long, value_name = "CONSTITUTION")]
    pub against: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// One call: '{"tool":"…","args":{…}}' (optionally "at": RFC 3339 time).
    #[arg(long, conflicts_with = "calls", required_unless_present = "calls")]
    pub call: Option<String>,
    /// A file of calls, one JSON object per line.
    #[arg(long, value_name = "FILE.jsonl")]
    pub calls: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// Scenarios: one {"call":{…},"expect":"allow|deny|ask"} per line.
    pub scenarios: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// The call: '{"tool":"…","args":{…}}'.
    #[arg(long)]
    pub call: String,
}

#[derive(Args, Debug)]
pub struct FmtArgs {
    /// The policy file.
    pub policy: PathBuf,
    /// Rewrite the file in place instead of printing.
    #[arg(long, short = 'w', conflicts_with = "check")]
    pub write: bool,
    /// Exit 1 if the file is not in canonical form, printing what would change as a
    /// unified diff.
    #[arg(long)]
    pub check: bool,
}

#[derive(Args, Debug)]
pub struct LearnedArgs {
    /// The policy file; its learned rules are in POLICY.learned unless --learned says.
    pub policy: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub learned: Option<PathBuf>,
    /// Revoke the learned rule of this audit seq.
    #[arg(long, value_name = "SEQ", conflicts_with = "merge")]
    pub remove: Option<u64>,
    /// Print the policy with the learned rules folded in, each just before the
    /// ask rule it refines, for review.
    #[arg(long)]
    pub merge: bool,
    /// With --merge: write the merged policy over POLICY and empty the learned file.
    #[arg(long, requires = "merge")]
    pub in_place: bool,
}

pub fn run(cmd: PolicyCommand) -> u8 {
    match cmd {
        PolicyCommand::Check(a) => check(a),
        PolicyCommand::Eval(a) => eval(a),
        PolicyCommand::Test(a) => test(a),
        PolicyCommand::Explain(a) => explain(a),
        PolicyCommand::Fmt(a) => fmt(a),
        PolicyCommand::Learned(a) => learned_cmd(a),
        PolicyCommand::Compile(a) => super::compile::run_compile(*a),
        PolicyCommand::Refine(a) => super::compile::run_refine(*a),
        PolicyCommand::Annotate(a) => super::compile::run_annotate(*a),
    }
}

/// The catalog of `--catalog builtin`: the services compiled into ironvmm, exactly
/// what `ironvmm tools --json` prints.
pub fn builtin_catalog_json() -> String {
    crate::services::builtin_catalog_json().to_string()
}

fn load_catalog(spec: Option<&str>) -> Result<Option<Catalog>, String> {
    let Some(spec) = spec else { return Ok(None) };
    let text = if spec == "builtin" {
        builtin_catalog_json()
    } else {
        std::fs::read_to_string(spec).map_err(|e| format!("cannot read catalog `{spec}`: {e}"))?
    };
    Catalog::from_json(&text)
        .map(Some)
        .map_err(|e| format!("{spec}: {e}"))
}

/// Loads the policy. Errors are printed; the caller picks the exit code.
fn load(input: &PolicyInput) -> Result<Loaded, LoadFailure> {
    let catalog = load_catalog(input.catalog.as_deref()).map_err(LoadFailure::Catalog)?;
    Policy::load_with(&input.policy, catalog.as_ref(), input.learned.as_deref())
        .map_err(|d| LoadFailure::Policy(d.to_string(), d.errors().count()))
}

/// `eval`, `test` and `explain` all stop the same way on a policy that does not
/// load: the diagnostics on stderr, then exit 2.
fn load_or_report(input: &PolicyInput) -> Result<Loaded, u8> {
    load(input).map_err(|e| {
        e.report(&input.policy);
        code::BAD_INPUT
    })
}

enum LoadFailure {
    Catalog(String),
    Policy(String, usize),
}

impl LoadFailure {
    fn report(&self, policy: &Path) {
        match self {
            LoadFailure::Catalog(e) => eprintln!("ironvmm: {e}"),
            LoadFailure::Policy(text, n) => {
                eprintln!("{text}");
                eprintln!(
                    "ironvmm: {}: {n} error{} (the policy does not load)",
                    policy.display(),
                    plural(*n)
                );
            }
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn check(a: CheckArgs) -> u8 {
    let catalog = match load_catalog(a.input.catalog.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ironvmm: {e}");
            return code::BAD_INPUT;
        }
    };
    match Policy::load_with(
        &a.input.policy,
        catalog.as_ref(),
        a.input.learned.as_deref(),
    ) {
        Ok(l) => {
            if !l.warnings.is_empty() {
                outln!("{}\n", l.warnings);
            }
            // With a catalog, a tool or argument it does not know is a misspelling
            // until shown otherwise: a misspelt `deny` silently denies nothing.
            let unknown: Vec<String> = match &catalog {
                Some(c) => l
                    .warnings
                    .warnings()
                    .filter_map(|w| unknown_name(w, c))
                    .collect(),
                None => Vec::new(),
            };
            for u in &unknown {
                outln!("{u}");
            }
            if !unknown.is_empty() {
                outln!(
                    "{}: does not check: {} tool or argument name{} the catalog does not know",
                    a.input.policy.display(),
                    unknown.len(),
                    plural(unknown.len())
                );
                return code::FAIL;
            }
            let rules = l.policy.ast().rules().count();
            let n = l.warnings.len();
            outln!(
                "{}: ok, {rules} rule{}, {n} warning{}",
                a.input.policy.display(),
                plural(rules),
                plural(n)
            );
            if catalog.is_none() {
                eprintln!(
                    "ironvmm: note: no --catalog, so tool names and argument names were not checked; \
                     pass --catalog builtin (the services compiled into ironvmm) or --catalog FILE"
                );
            }
            match &a.against {
                Some(c) => {
                    super::compile::check_against(&a.input.policy, c, a.input.catalog.as_deref())
                }
                None => code::OK,
            }
        }
        Err(d) => {
            outln!("{d}\n");
            let (e, w) = (d.errors().count(), d.warnings().count());
            outln!(
                "{}: does not load: {e} error{}, {w} warning{}",
                a.input.policy.display(),
                plural(e),
                plural(w)
            );
            code::FAIL
        }
    }
}

/// The first `name` in backticks of a message.
fn backticked(msg: &str) -> Option<&str> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(&msg[start..start + len])
}

/// A warning that names a tool or an argument the catalog does not know, as an
/// error line with a "did you mean" where a known name is near.
fn unknown_name(w: &ironvmm_policy::Diagnostic, c: &Catalog) -> Option<String> {
    let (kind, name, known): (&str, &str, Vec<String>) =
        if w.message.contains("matches no tool of the catalog") {
            let name = backticked(&w.message)?;
            ("tool", name, c.tools().map(|t| t.name.clone()).collect())
        } else if w.message.contains("argument `") && w.message.contains("in the catalog") {
            let at = w.message.find("argument `")? + "argument ".len();
            let name = backticked(&w.message[at..])?;
            let mut args: Vec<String> = c
                .tools()
                .filter_map(|t| t.input_schema.get("properties").and_then(Value::as_object))
                .flat_map(|p| p.keys().cloned())
                .collect();
            args.sort();
            args.dedup();
            ("argument", name, args)
        } else {
            return None;
        };
    let refs: Vec<&str> = known.iter().map(String::as_str).collect();
    let hint = match ironvmm_policy_compiler::config::nearest(name, &refs) {
        Some(n) => format!(": did you mean `{n}`?"),
        None => String::new(),
    };
    Some(format!(
        "{}:{}:{}: error: unknown {kind} `{name}`{hint}",
        w.file, w.line, w.col
    ))
}

/// A call line: the call, and the time it is decided at (ms since 1970).
struct TimedCall {
    call: Call,
    at: Option<i64>,
}

fn parse_call(v: &Value) -> Result<TimedCall, String> {
    let mut v = v.clone();
    let at = match v.as_object_mut().and_then(|o| o.remove("at")) {
        None => None,
        Some(Value::String(s)) => Some(parse_time(&s)?),
        Some(_) => return Err("`at` must be an RFC 3339 time string".into()),
    };
    let call = Call::from_json(&v).map_err(|e| e.to_string())?;
    Ok(TimedCall { call, at })
}

fn parse_time(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`at`: {s:?} is not an RFC 3339 time: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn parse_call_text(text: &str) -> Result<TimedCall, String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("malformed call: not JSON: {e}"))?;
    parse_call(&v)
}

fn decide(p: &Policy, c: &TimedCall) -> Decision {
    match c.at {
        Some(t) => p.decide_at(&c.call, t),
        None => p.decide(&c.call),
    }
}

fn decision_line(d: &Decision) -> String {
    serde_json::json!({
        "decision": d.verdict.as_str(),
        "rule": d.rule,
        "by": d.by.as_str(),
        "reason": d.reason,
    })
    .to_string()
}

/// Reads a JSON-lines file: (line number, value) for each non-blank line.
fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let v = serde_json::from_str(t)
            .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

fn eval(a: EvalArgs) -> u8 {
    let calls: Vec<TimedCall> = match (&a.call, &a.calls) {
        (Some(c), _) => match parse_call_text(c) {
            Ok(c) => vec![c],
            Err(e) => {
                eprintln!("ironvmm: --call: {e}");
                return code::BAD_INPUT;
            }
        },
        (None, Some(f)) => {
            let lines = match read_jsonl(f) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ironvmm: {e}");
                    return code::BAD_INPUT;
                }
            };
            let mut calls = Vec::new();
            for (n, v) in lines {
                match parse_call(&v) {
                    Ok(c) => calls.push(c),
                    Err(e) => {
                        eprintln!("ironvmm: {}:{n}: {e}", f.display());
                        return code::BAD_INPUT;
                    }
                }
            }
            calls
        }
        (None, None) => {
            eprintln!("ironvmm: give --call JSON or --calls FILE.jsonl");
            return code::BAD_INPUT;
        }
    };
    let loaded = match load_or_report(&a.input) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut out = String::new();
    for c in &calls {
        out.push_str(&decision_line(&decide(&loaded.policy, c)));
        out.push('\n');
    }
    out!("{out}");
    code::OK
}

fn test(a: TestArgs) -> u8 {
    let lines = match read_jsonl(&a.scenarios) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ironvmm: {e}");
            return code::BAD_INPUT;
        }
    };
    let name = a.scenarios.display().to_string();
    let mut scenarios = Vec::new();
    for (n, v) in lines {
        let parsed = (|| {
            let o = v
                .as_object()
                .ok_or("expected {\"call\": {...}, \"expect\": \"allow|deny|ask\"}")?;
            if let Some(k) = o
                .keys()
                .find(|k| !["call", "expect", "note"].contains(&k.as_str()))
            {
                return Err(format!(
                    "unknown key `{k}` (expected `call`, `expect` and an optional `note`)"
                ));
            }
            let expect = o
                .get("expect")
                .and_then(Value::as_str)
                .and_then(Verdict::parse)
                .ok_or("`expect` must be \"allow\", \"deny\" or \"ask\"")?;
            let call = parse_call(o.get("call").ok_or("missing `call`")?)?;
            Ok::<_, String>((call, expect))
        })();
        match parsed {
            Ok((c, e)) => scenarios.push((n, c, e)),
            Err(e) => {
                eprintln!("ironvmm: {name}:{n}: {e}");
                return code::BAD_INPUT;
            }
        }
    }
    let loaded = match load_or_report(&a.input) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let p = &loaded.policy;
    let mut failed = 0;
    for (n, c, expect) in &scenarios {
        // Explain first: it looks at limits without consuming them.
        let explanation = p.explain(&c.call, c.at);
        let d = decide(p, c);
        if d.verdict != *expect {
            failed += 1;
            let rule = d.rule.map_or(String::new(), |l| format!(", line {l}"));
            outln!(
                "{name}:{n}: expected {expect}, got {} (by {}{rule}): {}",
                d.verdict,
                d.by,
                d.reason
            );
            outln!(
                "  call: {}",
                serde_json::json!({"tool": c.call.tool, "args": c.call.args})
            );
            for line in explanation.to_string().lines() {
                outln!("  {line}");
            }
        }
    }
    let total = scenarios.len();
    outln!(
        "{name}: {total} scenario{}, {} passed, {failed} failed",
        plural(total),
        total - failed
    );
    if failed == 0 {
        code::OK
    } else {
        code::FAIL
    }
}

fn explain(a: ExplainArgs) -> u8 {
    let c = match parse_call_text(&a.call) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ironvmm: --call: {e}");
            return code::BAD_INPUT;
        }
    };
    let loaded = match load_or_report(&a.input) {
        Ok(l) => l,
        Err(code) => return code,
    };
    outln!("{}", loaded.policy.explain(&c.call, c.at));
    code::OK
}

fn fmt(a: FmtArgs) -> u8 {
    let text = match std::fs::read_to_string(&a.policy) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ironvmm: cannot read `{}`: {e}", a.policy.display());
            return code::FAIL;
        }
    };
    let name = a.policy.display().to_string();
    let ast = match parse_only(&text, &name) {
        Ok(ast) => ast,
        Err(d) => {
            eprintln!("{d}");
            return code::FAIL;
        }
    };
    let out = ast.format();
    // The canonical text must mean the same policy; refuse to write otherwise.
    if parse_only(&out, &name).ok().as_ref() != Some(&ast) {
        eprintln!("ironvmm: internal error: the canonical form of `{name}` does not parse back to the same policy");
        return code::BAD_INPUT;
    }
    if a.check {
        if out == text {
            return code::OK;
        }
        // What would change, as a unified diff.
        out!(
            "{}",
            similar::TextDiff::from_lines(&text, &out)
                .unified_diff()
                .context_radius(2)
                .header(&name, &format!("{name} (canonical)"))
        );
        return code::FAIL;
    }
    if a.write {
        if out != text {
            if let Err(e) = write_atomic(&a.policy, &out) {
                eprintln!("ironvmm: cannot write `{name}`: {e}");
                return code::FAIL;
            }
        }
        return code::OK;
    }
    out!("{out}");
    code::OK
}

fn parse_only(text: &str, name: &str) -> Result<PolicyAst, ironvmm_policy::Diagnostics> {
    let (ast, errs) = ironvmm_policy::parser::parse(text);
    if errs.is_empty() {
        return Ok(ast);
    }
    let f = ironvmm_policy::diag::SourceFile { name, text };
    let mut d = ironvmm_policy::Diagnostics::new();
    for e in errs {
        d.push(f.diag(ironvmm_policy::Severity::Error, e.span, e.message));
    }
    Err(d)
}

/// Replaces a file by writing a sibling and renaming it over, so that a reader
/// never sees half a policy.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The policy text with each learned rule inserted just before the line it refines.
fn merged_policy(policy: &str, learned_text: &str) -> Result<String, String> {
    let entries = learned::entries(learned_text);
    let lines: Vec<&str> = policy.lines().collect();
    for e in &entries {
        if e.header.refines == 0 || e.header.refines as usize > lines.len() {
            return Err(format!(
                "the learned rule of seq {} refines line {}, which the policy does not have",
                e.header.seq, e.header.refines
            ));
        }
    }
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        for e in entries
            .iter()
            .filter(|e| e.header.refines as usize == i + 1)
        {
            out.push_str(&format!(
                "# learned (audit seq {})\n{}\n",
                e.header.seq, e.rule
            ));
        }
        out.push_str(l);
        out.push('\n');
    }
    Ok(out)
}

fn merge_learned(policy: &Path, learned_path: &Path, learned_text: &str, in_place: bool) -> u8 {
    let text = match std::fs::read_to_string(policy) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ironvmm: cannot read `{}`: {e}", policy.display());
            return code::FAIL;
        }
    };
    let merged = match merged_policy(&text, learned_text) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ironvmm: {}: {e}", learned_path.display());
            return code::FAIL;
        }
    };
    // The merged text must load as the policy did (same folder, same lists).
    let name = policy.display().to_string();
    let base = policy.parent().filter(|p| !p.as_os_str().is_empty());
    if let Err(d) = Policy::from_source(&merged, &name, Some(base.unwrap_or(Path::new("."))), None)
    {
        eprintln!("ironvmm: the merged policy does not load:\n{d}");
        return code::FAIL;
    }
    if !in_place {
        print!("{merged}");
        return code::OK;
    }
    if let Err(e) = write_atomic(policy, &merged) {
        eprintln!("ironvmm: cannot write `{}`: {e}", policy.display());
        return code::FAIL;
    }
    // Their line numbers now point into the old policy: the rules live in p.rules.
    if let Err(e) = write_atomic(learned_path, "") {
        eprintln!("ironvmm: cannot empty `{}`: {e}", learned_path.display());
        return code::FAIL;
    }
    eprintln!(
        "merged {} learned rule(s) into {}; {} is now empty",
        learned::entries(learned_text).len(),
        policy.display(),
        learned_path.display()
    );
    code::OK
}

fn learned_cmd(a: LearnedArgs) -> u8 {
    let path = a.learned.clone().unwrap_or_else(|| {
        let mut p = a.policy.as_os_str().to_owned();
        p.push(".learned");
        PathBuf::from(p)
    });
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.remove.is_none() => {
            outln!("{}: no learned rules", path.display());
            return code::OK;
        }
        Err(e) => {
            eprintln!("ironvmm: cannot read `{}`: {e}", path.display());
            return code::FAIL;
        }
    };
    if a.merge {
        return merge_learned(&a.policy, &path, &text, a.in_place);
    }
    match a.remove {
        None => {
            let entries = learned::entries(&text);
            for e in &entries {
                outln!(
                    "seq {} (refines line {}, {}:{}):",
                    e.header.seq,
                    e.header.refines,
                    path.display(),
                    e.line + 1
                );
                for l in e.rule.lines() {
                    outln!("  {l}");
                }
            }
            outln!(
                "{}: {} learned rule{}",
                path.display(),
                entries.len(),
                plural(entries.len())
            );
            code::OK
        }
        Some(seq) => match learned::remove_entry(&text, seq) {
            None => {
                eprintln!(
                    "ironvmm: {}: no learned rule with seq {seq}",
                    path.display()
                );
                code::FAIL
            }
            Some(rest) => match write_atomic(&path, &rest) {
                Ok(()) => {
                    outln!(
                        "removed the learned rule of seq {seq} from {}",
                        path.display()
                    );
                    code::OK
                }
                Err(e) => {
                    eprintln!("ironvmm: cannot write `{}`: {e}", path.display());
                    code::FAIL
                }
            },
        },
    }
}
