//! Evaluator: a call against the compiled program. The common path (a tool found
//! by one hash lookup, string arguments already in canonical form, hash-set and
//! regex tests) allocates nothing: values are borrowed from the call and
//! normalisation only copies when it has to change something.

use crate::ast::{CmpOp, Func, Quant};
use crate::catalog::Role;
use crate::compile::{CCond, CTest, CVal, Konst, Program, Step, TestKind, ToolEntry};
use crate::lists::MatchKind;
use crate::norm;
use crate::value::{apply, by_role, kind_after, Num, RV};
use crate::{DecidedBy, Verdict};
use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;

/// A decision that borrows from the policy: what `decide` returns before the
/// reason is copied out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRef<'p> {
    pub verdict: Verdict,
    pub rule: Option<u32>,
    pub by: DecidedBy,
    pub reason: Cow<'p, str>,
}

impl DecisionRef<'_> {
    pub fn to_owned(&self) -> crate::Decision {
        crate::Decision {
            verdict: self.verdict,
            rule: self.rule,
            by: self.by,
            reason: self.reason.to_string(),
        }
    }
}

/// The time a call is decided at (only read when a rule with a `limit` matches).
pub(crate) struct Clock {
    at: Option<i64>,
}

impl Clock {
    pub fn fixed(ms: i64) -> Clock {
        Clock { at: Some(ms) }
    }
    pub fn now() -> Clock {
        Clock { at: None }
    }
    fn get(&mut self) -> i64 {
        *self.at.get_or_insert_with(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        })
    }
}

/// What explain records. The decision path calls it through a no-op.
pub(crate) trait Tracer {
    const ON: bool;
    fn step(&mut self, _rule: u32, _outcome: StepOutcome) {}
}

pub(crate) struct NoTrace;
impl Tracer for NoTrace {
    const ON: bool = false;
}

#[derive(Debug, Clone)]
pub enum StepOutcome {
    Matched,
    /// The condition was false; why, as text.
    CondFalse(String),
    LimitReached,
}

impl Program {
    pub(crate) fn entry(&self, tool: &str) -> Option<&ToolEntry> {
        if let Some(e) = self.exact.get(tool) {
            return Some(e);
        }
        if self.has_catalog {
            return None;
        }
        let svc = tool.split_once('.').map_or(tool, |(s, _)| s);
        Some(self.service.get(svc).unwrap_or(&self.star))
    }

    pub(crate) fn decide<'p, T: Tracer>(
        &'p self,
        protected: &[Box<str>],
        tool: &str,
        args: &Value,
        clock: &mut Clock,
        consume: bool,
        tracer: &mut T,
    ) -> DecisionRef<'p> {
        let inv = |reason: Cow<'p, str>| DecisionRef {
            verdict: Verdict::Deny,
            rule: None,
            by: DecidedBy::Invariant,
            reason,
        };
        if !crate::parser::valid_tool_name(tool) {
            return inv(Cow::Borrowed("unknown tool: malformed tool name"));
        }
        let Some(entry) = self.entry(tool) else {
            return inv(Cow::Owned(format!("unknown tool `{tool}`")));
        };
        if let Some(t) = &entry.tool {
            if let Err(e) = t.validate(args) {
                return inv(Cow::Owned(format!("invalid arguments: {e}")));
            }
        } else if !args.is_object() {
            return inv(Cow::Borrowed(
                "invalid arguments: the arguments must be an object",
            ));
        }
        for (p, tree) in &entry.path_args {
            if let Some(reason) = check_protected(lookup(args, p), protected, *tree) {
                return inv(reason);
            }
        }
        if let Some((alias, targets)) = &entry.alias {
            return self.decide_each(entry, alias, targets, args, clock, consume, tracer);
        }
        self.rules_decide(entry, args, clock, consume, tracer)
    }

    /// A tool with an alias: decided once per target argument, with the alias bound
    /// to it; the most restrictive decision wins (deny, then ask, then allow).
    #[allow(clippy::too_many_arguments)]
    fn decide_each<'p, T: Tracer>(
        &'p self,
        entry: &'p ToolEntry,
        alias: &str,
        targets: &[Box<str>],
        args: &Value,
        clock: &mut Clock,
        consume: bool,
        tracer: &mut T,
    ) -> DecisionRef<'p> {
        let rank = |v: Verdict| match v {
            Verdict::Deny => 2,
            Verdict::Ask => 1,
            Verdict::Allow => 0,
        };
        let mut worst: Option<DecisionRef<'p>> = None;
        for t in targets {
            let Some(obj) = args.as_object() else { break };
            let Some(target) = obj.get(&**t) else {
                continue;
            };
            let mut bound = obj.clone();
            bound.insert(alias.to_string(), target.clone());
            let d = self.rules_decide(entry, &Value::Object(bound), clock, consume, tracer);
            if worst
                .as_ref()
                .is_none_or(|w| rank(d.verdict) > rank(w.verdict))
            {
                worst = Some(d);
            }
        }
        worst.unwrap_or_else(|| self.rules_decide(entry, args, clock, consume, tracer))
    }

    fn rules_decide<'p, T: Tracer>(
        &'p self,
        entry: &'p ToolEntry,
        args: &Value,
        clock: &mut Clock,
        consume: bool,
        tracer: &mut T,
    ) -> DecisionRef<'p> {
        let mut limited: Option<u32> = None;
        for step in &entry.steps {
            let meta = &self.rules[step.rule as usize];
            let hit = match &step.cond {
                None => true,
                Some(c) => eval_cond(c, args),
            };
            if !hit {
                if T::ON {
                    let why = step
                        .cond
                        .as_ref()
                        .map(|c| why_false(c, args))
                        .unwrap_or_default();
                    tracer.step(step.rule, StepOutcome::CondFalse(why));
                }
                continue;
            }
            if let Some(l) = &meta.limit {
                let now = clock.get();
                let ok = if consume {
                    l.try_take(now)
                } else {
                    l.would_take(now)
                };
                if !ok {
                    if T::ON {
                        tracer.step(step.rule, StepOutcome::LimitReached);
                    }
                    limited.get_or_insert(step.rule);
                    continue;
                }
            }
            if T::ON {
                tracer.step(step.rule, StepOutcome::Matched);
            }
            let by = if meta.learned {
                DecidedBy::Learned
            } else {
                DecidedBy::Rule
            };
            let d = DecisionRef {
                verdict: meta.verdict,
                rule: Some(meta.line),
                by,
                reason: Cow::Borrowed(&meta.reason),
            };
            return self.after_limit(limited, d);
        }
        let d = DecisionRef {
            verdict: self.default,
            rule: None,
            by: DecidedBy::Default,
            reason: Cow::Borrowed(match self.default {
                Verdict::Allow => "no rule matched: default allow",
                Verdict::Deny => "no rule matched: default deny",
                Verdict::Ask => "no rule matched: default ask",
            }),
        };
        self.after_limit(limited, d)
    }

    /// When a rule's limit made the call fall through, the decision says so: by
    /// `limit`, the line of the limited rule, and what decided after it.
    fn after_limit<'p>(&'p self, limited: Option<u32>, d: DecisionRef<'p>) -> DecisionRef<'p> {
        let Some(r) = limited else { return d };
        let m = &self.rules[r as usize];
        let then = match d.rule {
            Some(line) => format!("then line {line}: {}", d.reason),
            None => format!("then {}", d.reason),
        };
        DecisionRef {
            verdict: d.verdict,
            rule: Some(m.line),
            by: DecidedBy::Limit,
            reason: Cow::Owned(format!(
                "{} of line {} reached; {then}",
                m.limit_text.as_deref().unwrap_or("limit"),
                m.line
            )),
        }
    }
}

/// Invariant 3. A `tree` argument (a move, a delete) is also refused when a protected
/// path lies under it: moving the folder that holds the policy swaps the policy.
fn check_protected<'p>(
    v: Option<&Value>,
    protected: &[Box<str>],
    tree: bool,
) -> Option<Cow<'p, str>> {
    let one = |s: &str| -> Option<Cow<'p, str>> {
        let Some(p) = norm::path(s) else {
            return Some(Cow::Borrowed(
                "invalid path: it contains NUL or climbs above `/`",
            ));
        };
        if let Some(d) = protected.iter().find(|d| norm::path_under(&p, d)) {
            return Some(Cow::Owned(format!(
                "protected path: `{p}` is `{d}` or lies under it"
            )));
        }
        // Not naming it: it may be a host path the guest has no business knowing.
        if tree && protected.iter().any(|d| norm::path_under(d, &p)) {
            return Some(Cow::Owned(format!(
                "protected path: `{p}` holds a protected file"
            )));
        }
        None
    };
    match v? {
        Value::String(s) => one(s),
        Value::Array(a) => a.iter().filter_map(Value::as_str).find_map(one),
        _ => None,
    }
}

/// `args` at `path` (iterative: a deep value cannot exhaust the stack).
#[inline]
pub(crate) fn lookup<'a>(args: &'a Value, path: &[Box<str>]) -> Option<&'a Value> {
    let mut cur = args;
    for seg in path {
        cur = get(cur.as_object()?, seg)?;
    }
    Some(cur)
}

/// A key of an object. Tool arguments are small objects: a scan of a few keys beats
/// hashing the key (serde_json's ordered map hashes with SipHash).
#[inline]
fn get<'a>(m: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    if m.len() <= 8 {
        m.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v)
    } else {
        m.get(key)
    }
}

#[inline]
fn raw(v: Option<&Value>) -> RV<'_> {
    match v {
        None => RV::Missing,
        Some(Value::Null) => RV::Null,
        Some(Value::String(s)) => RV::Str(Cow::Borrowed(s)),
        Some(Value::Number(n)) => RV::Num(Num::of(n)),
        Some(Value::Array(a)) => RV::Arr(a),
        Some(_) => RV::Other,
    }
}

/// Evaluates a value on a base (the argument at its path, or an array element).
#[inline]
fn finish<'a>(base: RV<'a>, role: Option<Role>, funcs: &[Func]) -> RV<'a> {
    let mut v = by_role(base, role);
    let mut kind = role;
    for f in funcs {
        v = apply(*f, v, kind);
        kind = kind_after(*f);
    }
    v
}

#[inline]
fn eval_val<'a>(v: &'a CVal, args: &'a Value) -> RV<'a> {
    match v {
        CVal::Const(Konst::Str(s), _) => RV::Str(Cow::Borrowed(s)),
        CVal::Const(Konst::Num(n), _) => RV::Num(Num::Int(*n as i128)),
        CVal::Const(Konst::Missing, _) => RV::Missing,
        CVal::Arg { path, role, funcs } => {
            let base = raw(lookup(args, path));
            if let RV::Arr(_) = base {
                // Roles apply to elements; a function of the whole array is `len`.
                return match funcs.first() {
                    None => base,
                    Some(f) => {
                        let mut v = apply(*f, base, *role);
                        let mut kind = kind_after(*f);
                        for f in &funcs[1..] {
                            v = apply(*f, v, kind);
                            kind = kind_after(*f);
                        }
                        v
                    }
                };
            }
            finish(base, *role, funcs)
        }
    }
}

pub(crate) fn eval_cond(c: &CCond, args: &Value) -> bool {
    match c {
        CCond::And(cs) => cs.iter().all(|c| eval_cond(c, args)),
        CCond::Or(cs) => cs.iter().any(|c| eval_cond(c, args)),
        CCond::Not(c) => !eval_cond(c, args),
        CCond::Test(t) => eval_test(t, args),
    }
}

#[inline]
fn in_set(v: &RV, set: &crate::lists::CSet, norm_kind: MatchKind) -> bool {
    let RV::Str(s) = v else { return false };
    match norm_kind {
        MatchKind::Host => norm::host(s).is_some_and(|h| set.contains(&h)),
        MatchKind::Email => norm::email(s).is_some_and(|e| set.contains(&e)),
        _ => set.contains(s),
    }
}

fn eval_test(t: &CTest, args: &Value) -> bool {
    match &t.kind {
        TestKind::Cmp { l, op, r } => {
            let (a, b) = (eval_val(l, args), eval_val(r, args));
            match (a, b) {
                (RV::Str(a), RV::Str(b)) => match op {
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                    _ => false,
                },
                (RV::Num(a), RV::Num(b)) => match (a.cmp(b), op) {
                    (None, _) => false,
                    (Some(o), CmpOp::Eq) => o == Ordering::Equal,
                    (Some(o), CmpOp::Ne) => o != Ordering::Equal,
                    (Some(o), CmpOp::Lt) => o == Ordering::Less,
                    (Some(o), CmpOp::Le) => o != Ordering::Greater,
                    (Some(o), CmpOp::Gt) => o == Ordering::Greater,
                    (Some(o), CmpOp::Ge) => o != Ordering::Less,
                },
                _ => false,
            }
        }
        TestKind::In {
            quant,
            v,
            set,
            norm,
        } => match quant {
            Quant::One => in_set(&eval_val(v, args), set, *norm),
            Quant::All | Quant::Any => {
                let CVal::Arg { path, role, funcs } = v else {
                    return false;
                };
                let Some(Value::Array(a)) = lookup(args, path) else {
                    return false;
                };
                if a.is_empty() {
                    return false;
                }
                let each = |e: &Value| in_set(&finish(raw(Some(e)), *role, funcs), set, *norm);
                if *quant == Quant::All {
                    a.iter().all(each)
                } else {
                    a.iter().any(each)
                }
            }
        },
        TestKind::Under { v, dir, overlap } => {
            let is_path = matches!(v, CVal::Arg { role: Some(r), funcs, .. } if r.is_path() && funcs.is_empty());
            match eval_val(v, args) {
                RV::Str(s) if *overlap => norm::path_under(&s, dir) || norm::path_under(dir, &s),
                RV::Str(s) if is_path => norm::path_under(&s, dir),
                RV::Str(s) if v.kind() == crate::compile::Kind::Plain => {
                    norm::path(&s).is_some_and(|p| norm::path_under(&p, dir))
                }
                _ => false,
            }
        }
        TestKind::Re { v, re } => match eval_val(v, args) {
            RV::Str(s) => re.is_match(&s),
            _ => false,
        },
        TestKind::Exists { v } => {
            // Presence, not validity: `exists` looks at the raw value so that a
            // value that fails normalisation still counts as given.
            let r = match v {
                CVal::Arg { path, funcs, .. } if funcs.is_empty() => raw(lookup(args, path)),
                _ => eval_val(v, args),
            };
            match r {
                RV::Missing | RV::Null => false,
                RV::Str(s) => !s.is_empty(),
                RV::Arr(a) => !a.is_empty(),
                RV::Num(_) | RV::Other => true,
            }
        }
    }
}

// ---- explain ------------------------------------------------------------------

fn describe(v: &RV) -> String {
    match v {
        RV::Missing => "missing (or not normalisable)".into(),
        RV::Null => "null".into(),
        RV::Str(s) => {
            let mut q = serde_json::to_string(&**s).unwrap_or_default();
            if q.chars().count() > 80 {
                q = q.chars().take(77).collect::<String>() + "...";
            }
            q
        }
        RV::Num(Num::Int(i)) => i.to_string(),
        RV::Num(Num::Float(f)) => f.to_string(),
        RV::Arr(a) => {
            // Element by element, one level deep: a hostile value may nest deeply.
            let mut parts: Vec<String> = a
                .iter()
                .take(5)
                .map(|e| match e {
                    Value::String(s) => describe(&RV::Str(Cow::Borrowed(s))),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => "null".into(),
                    Value::Array(_) => "[...]".into(),
                    Value::Object(_) => "{...}".into(),
                })
                .collect();
            if a.len() > 5 {
                parts.push(format!("... ({} elements)", a.len()));
            }
            format!("[{}]", parts.join(","))
        }
        RV::Other => "a boolean or an object".into(),
    }
}

fn test_values(t: &CTest, args: &Value) -> String {
    let one = |v: &CVal| -> Option<String> {
        match v {
            CVal::Arg { path, .. } => {
                let name = path.iter().map(|s| &**s).collect::<Vec<_>>().join(".");
                Some(format!("`{name}` is {}", describe(&eval_val(v, args))))
            }
            CVal::Const(..) => None,
        }
    };
    let parts: Vec<String> = match &t.kind {
        TestKind::Cmp { l, r, .. } => [one(l), one(r)].into_iter().flatten().collect(),
        TestKind::In { v, .. }
        | TestKind::Under { v, .. }
        | TestKind::Re { v, .. }
        | TestKind::Exists { v } => one(v).into_iter().collect(),
    };
    parts.join(", ")
}

/// For `all ARG in SET` that is false: the first element that is not in the set,
/// so that explain names the value that failed (which address was not a contact).
fn first_outside(t: &CTest, args: &Value) -> Option<String> {
    let TestKind::In {
        quant: Quant::All,
        v: CVal::Arg { path, role, funcs },
        set,
        norm,
    } = &t.kind
    else {
        return None;
    };
    let Some(Value::Array(a)) = lookup(args, path) else {
        return None;
    };
    let e = a
        .iter()
        .find(|e| !in_set(&finish(raw(Some(e)), *role, funcs), set, *norm))?;
    let shown = match e {
        Value::String(s) => describe(&RV::Str(Cow::Borrowed(s))),
        other => describe(&raw(Some(other))),
    };
    let set_src = t.src.rsplit_once(" in ").map_or("the set", |(_, s)| s);
    Some(format!("{shown} is not in {set_src}"))
}

/// Why a condition is false, as one line.
pub(crate) fn why_false(c: &CCond, args: &Value) -> String {
    match c {
        CCond::Test(t) => {
            let vals = test_values(t, args);
            let outside = first_outside(t, args)
                .map(|o| format!(": {o}"))
                .unwrap_or_default();
            if vals.is_empty() {
                format!("`{}` is false{outside}", t.src)
            } else {
                format!("`{}` is false ({vals}){outside}", t.src)
            }
        }
        CCond::And(cs) => cs
            .iter()
            .find(|c| !eval_cond(c, args))
            .map(|c| why_false(c, args))
            .unwrap_or_default(),
        CCond::Or(cs) => {
            let all: Vec<String> = cs.iter().map(|c| why_false(c, args)).collect();
            format!("none holds: {}", all.join("; "))
        }
        CCond::Not(inner) => format!("`not` of a true test: {}", why_true(inner, args)),
    }
}

fn why_true(c: &CCond, args: &Value) -> String {
    match c {
        CCond::Test(t) => {
            let vals = test_values(t, args);
            if vals.is_empty() {
                format!("`{}` is true", t.src)
            } else {
                format!("`{}` is true ({vals})", t.src)
            }
        }
        CCond::And(cs) => {
            let all: Vec<String> = cs.iter().map(|c| why_true(c, args)).collect();
            all.join("; ")
        }
        CCond::Or(cs) => cs
            .iter()
            .find(|c| eval_cond(c, args))
            .map(|c| why_true(c, args))
            .unwrap_or_default(),
        CCond::Not(inner) => why_false(inner, args),
    }
}

impl Step {
    pub(crate) fn rule_index(&self) -> u32 {
        self.rule
    }
}
