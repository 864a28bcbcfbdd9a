//! Compiler: a checked policy to the evaluator's program. Rules are indexed by
//! tool: each catalog tool (or, without a catalog, each tool a pattern names, each
//! service with a wildcard, and `*`) gets the ordered list of steps that can match
//! it, learned rules placed just before the ask rule they refine. Argument roles are
//! resolved here, per tool, and constants are normalised once.

use crate::ast::{self, CmpOp, Cond, Func, Quant, SetRef, Test, ToolPattern, Value, VerdictKw};
use crate::catalog::{Catalog, Role, Tool};
use crate::check::{glob_text, regex_text, Checked};
use crate::limit::Limiter;
use crate::lists::{classify, CSet, FxHashMap, MatchKind};
use crate::norm;
use crate::value::{apply, kind_after, Num, RV};
use crate::Verdict;
use regex::Regex;
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct RuleMeta {
    pub line: u32,
    pub verdict: Verdict,
    pub reason: Box<str>,
    /// Canonical text of the rule (for `explain`).
    pub text: Box<str>,
    pub limit: Option<Limiter>,
    pub limit_text: Option<Box<str>>,
    pub learned: bool,
}

#[derive(Debug)]
pub(crate) struct Step {
    pub rule: u32,
    pub cond: Option<CCond>,
}

#[derive(Debug)]
pub(crate) enum CCond {
    And(Box<[CCond]>),
    Or(Box<[CCond]>),
    Not(Box<CCond>),
    Test(Box<CTest>),
}

#[derive(Debug)]
pub(crate) struct CTest {
    pub kind: TestKind,
    /// The test as written (canonical), for `explain`.
    pub src: Box<str>,
}

#[derive(Debug)]
pub(crate) enum TestKind {
    Cmp {
        l: CVal,
        op: CmpOp,
        r: CVal,
    },
    /// `norm`: how to normalise a value that has no role of its own.
    In {
        quant: Quant,
        v: CVal,
        set: Arc<CSet>,
        norm: MatchKind,
    },
    Under {
        v: CVal,
        dir: Box<str>,
        /// The value is a `tree` argument in a deny or ask rule, not under `not`:
        /// the test holds when the paths overlap, so that moving or deleting an
        /// ancestor of `dir` is caught as well (fails closed).
        overlap: bool,
    },
    Re {
        v: CVal,
        re: Arc<Regex>,
    },
    Exists {
        v: CVal,
    },
}

/// The kind of value a CVal yields, after its role and functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    Role(Role),
    Num,
}

#[derive(Debug)]
pub(crate) enum CVal {
    /// A constant, and the kind its functions gave it (`host("...")` is a host).
    Const(Konst, Kind),
    Arg {
        path: Box<[Box<str>]>,
        role: Option<Role>,
        funcs: Box<[Func]>,
    },
}

#[derive(Debug, Clone)]
pub(crate) enum Konst {
    /// A constant that cannot be normalised for the kind it is compared with.
    Missing,
    Str(Box<str>),
    Num(u64),
}

impl CVal {
    pub fn kind(&self) -> Kind {
        match self {
            CVal::Const(Konst::Num(_), _) => Kind::Num,
            CVal::Const(_, k) => *k,
            CVal::Arg { role, funcs, .. } => match funcs.last() {
                None => role.map_or(Kind::Plain, Kind::Role),
                Some(f) => func_kind(*f),
            },
        }
    }
}

pub(crate) fn func_kind(f: Func) -> Kind {
    match f {
        Func::Len | Func::Port => Kind::Num,
        Func::Host | Func::Domain => Kind::Role(Role::Host),
        Func::Lower | Func::Scheme => Kind::Plain,
    }
}

/// Argument names (one segment each).
pub(crate) type ArgPaths = Box<[Box<str>]>;

#[derive(Debug, Default)]
pub(crate) struct ToolEntry {
    pub steps: Vec<Step>,
    /// Arguments whose role is `path` or `tree` (invariant 3 checks them); `true`
    /// for a tree, which is refused when it overlaps a protected path.
    pub path_args: Vec<(Box<[Box<str>]>, bool)>,
    pub tool: Option<Tool>,
    /// `path` standing for `from` and then `to` (catalog `aliases`): the call is
    /// decided once per target.
    pub alias: Option<(Box<str>, ArgPaths)>,
}

#[derive(Debug)]
pub(crate) struct Program {
    pub rules: Vec<RuleMeta>,
    pub exact: FxHashMap<Box<str>, ToolEntry>,
    pub service: FxHashMap<Box<str>, ToolEntry>,
    pub star: ToolEntry,
    pub default: Verdict,
    pub has_catalog: bool,
}

pub(crate) fn verdict(v: VerdictKw) -> Verdict {
    match v {
        VerdictKw::Allow => Verdict::Allow,
        VerdictKw::Deny => Verdict::Deny,
        VerdictKw::Ask => Verdict::Ask,
    }
}

struct Compiler<'a> {
    checked: &'a Checked,
    sets: FxHashMap<(String, MatchKind), Arc<CSet>>,
}

/// One rule to place: the policy's rules in order, learned ones before the ask
/// they refine.
struct Placed<'a> {
    rule: &'a ast::Rule,
    meta: u32,
}

pub(crate) fn compile(checked: &Checked, catalog: Option<&Catalog>) -> Program {
    let mut rules = Vec::new();
    let mut order: Vec<Placed> = Vec::new();
    let policy_rules: Vec<&ast::Rule> = checked.ast.rules().collect();
    let meta_of = |r: &ast::Rule, learned: bool, rules: &mut Vec<RuleMeta>| -> u32 {
        let text: String = r.to_string();
        let reason = match &r.reason {
            Some(s) => s.clone(),
            None if learned => format!("learned: {}", short(&text)),
            None => short(&text),
        };
        rules.push(RuleMeta {
            line: r.line.0,
            verdict: verdict(r.verdict),
            reason: reason.into(),
            text: text.into(),
            limit: r
                .limit
                .as_ref()
                .map(|l| Limiter::new(l.count, l.per.millis())),
            limit_text: r
                .limit
                .as_ref()
                .map(|l| format!("limit {} per {}", l.count, l.per.as_str()).into()),
            learned,
        });
        rules.len() as u32 - 1
    };
    for r in &policy_rules {
        if r.verdict == VerdictKw::Ask {
            for l in checked
                .learned
                .iter()
                .filter(|l| l.header.refines == r.line.0)
            {
                let meta = meta_of(&l.rule, true, &mut rules);
                order.push(Placed {
                    rule: &l.rule,
                    meta,
                });
            }
        }
        let meta = meta_of(r, false, &mut rules);
        order.push(Placed { rule: r, meta });
    }

    let mut c = Compiler {
        checked,
        sets: FxHashMap::default(),
    };
    let mut exact: FxHashMap<Box<str>, ToolEntry> = FxHashMap::default();
    let mut service: FxHashMap<Box<str>, ToolEntry> = FxHashMap::default();
    match catalog {
        Some(cat) => {
            for t in cat.tools() {
                let mut e = c.entry(&order, |p| p.matches(&t.name), Some(t));
                e.path_args = t
                    .roles
                    .iter()
                    .filter(|(_, r)| r.is_path())
                    .map(|(k, r)| (k.split('.').map(Box::from).collect(), *r == Role::Tree))
                    .collect();
                e.tool = Some(t.clone());
                // One alias per tool is enough for the catalogs we have (fs.move).
                e.alias = t.aliases.iter().next().map(|(a, ts)| {
                    (
                        Box::from(a.as_str()),
                        ts.iter().map(|t| Box::from(t.as_str())).collect(),
                    )
                });
                exact.insert(t.name.as_str().into(), e);
            }
        }
        None => {
            for p in &order {
                match &p.rule.pattern {
                    ToolPattern::Exact(t) if !exact.contains_key(t.as_str()) => {
                        let mut e = c.entry(&order, |q| q.matches(t), None);
                        e.path_args = vec![(Box::new([Box::from("path")]), false)];
                        exact.insert(t.as_str().into(), e);
                    }
                    ToolPattern::Service(s) if !service.contains_key(s.as_str()) => {
                        let mut e = c.entry(
                            &order,
                            |q| {
                                matches!(q, ToolPattern::Any)
                                    || matches!(q, ToolPattern::Service(x) if x == s)
                            },
                            None,
                        );
                        e.path_args = vec![(Box::new([Box::from("path")]), false)];
                        service.insert(s.as_str().into(), e);
                    }
                    _ => {}
                }
            }
        }
    }
    let mut star = c.entry(&order, |q| matches!(q, ToolPattern::Any), None);
    if catalog.is_none() {
        star.path_args = vec![(Box::new([Box::from("path")]), false)];
    }
    Program {
        rules,
        exact,
        service,
        star,
        default: verdict(checked.default),
        has_catalog: catalog.is_some(),
    }
}

fn short(s: &str) -> String {
    if s.chars().count() <= 160 {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(157).collect();
        t.push_str("...");
        t
    }
}

impl Compiler<'_> {
    fn entry(
        &mut self,
        order: &[Placed],
        pat: impl Fn(&ToolPattern) -> bool,
        tool: Option<&Tool>,
    ) -> ToolEntry {
        let steps = order
            .iter()
            .filter(|p| pat(&p.rule.pattern))
            .map(|p| {
                // Overlap widens `under` only where a wider match is the safe side.
                let widen = p.rule.verdict != ast::VerdictKw::Allow;
                Step {
                    rule: p.meta,
                    cond: p.rule.cond.as_ref().map(|c| self.cond(c, tool, widen)),
                }
            })
            .collect();
        ToolEntry {
            steps,
            path_args: Vec::new(),
            tool: None,
            alias: None,
        }
    }

    /// `widen`: a test made true more often makes this rule safer (a deny or ask
    /// rule, flipped by each `not`).
    fn cond(&mut self, c: &Cond, tool: Option<&Tool>, widen: bool) -> CCond {
        match c {
            Cond::And(cs) => CCond::And(cs.iter().map(|c| self.cond(c, tool, widen)).collect()),
            Cond::Or(cs) => CCond::Or(cs.iter().map(|c| self.cond(c, tool, widen)).collect()),
            Cond::Not(c) => CCond::Not(Box::new(self.cond(c, tool, !widen))),
            Cond::Test(t) => CCond::Test(Box::new(CTest {
                kind: self.test(t, tool, widen),
                src: t.to_string().into(),
            })),
        }
    }

    fn test(&mut self, t: &Test, tool: Option<&Tool>, widen: bool) -> TestKind {
        match t {
            Test::Cmp {
                left, op, right, ..
            } => {
                let (l, r) = (self.value(left, tool), self.value(right, tool));
                // A constant compared with a value of a role is normalised by that role.
                let (lk, rk) = (l.kind(), r.kind());
                let l = normalise_const(l, rk);
                let r = normalise_const(r, lk);
                TestKind::Cmp { l, op: *op, r }
            }
            Test::In {
                quant, value, set, ..
            } => {
                let v = self.value(value, tool);
                let (entries, key): (Vec<String>, String) = match set {
                    SetRef::Named(n, _) => (self.checked.lists[n].entries.clone(), format!("@{n}")),
                    SetRef::Inline(items) => {
                        let e: Vec<String> = items.iter().map(|(s, _)| s.clone()).collect();
                        let key = format!("{:?}", e);
                        (e, key)
                    }
                };
                let list_kind = match set {
                    SetRef::Named(n, _) => self.checked.lists[n].kind,
                    SetRef::Inline(_) => classify(&entries),
                };
                let (kind, norm) = match v.kind() {
                    Kind::Role(r) => (MatchKind::from_role(r), MatchKind::Exact),
                    _ => (
                        MatchKind::from_list(list_kind),
                        MatchKind::from_list(list_kind),
                    ),
                };
                let set = self
                    .sets
                    .entry((key, kind))
                    .or_insert_with(|| Arc::new(CSet::build(&entries, kind)))
                    .clone();
                TestKind::In {
                    quant: quant.clone(),
                    v,
                    set,
                    norm,
                }
            }
            Test::Under { value, dir, .. } => {
                let v = self.value(value, tool);
                let overlap = widen
                    && matches!(&v, CVal::Arg { role: Some(Role::Tree), funcs, .. } if funcs.is_empty());
                TestKind::Under {
                    v,
                    // The checker refused a directory that does not normalise.
                    dir: norm::path(dir)
                        .map(|d| d.into_owned())
                        .unwrap_or_default()
                        .into(),
                    overlap,
                }
            }
            Test::Matches { value, glob, .. } => {
                let text = glob_text(glob).unwrap_or_default();
                TestKind::Re {
                    v: self.value(value, tool),
                    re: self.checked.regexes[&text].clone(),
                }
            }
            Test::Regex { value, regex, .. } => TestKind::Re {
                v: self.value(value, tool),
                re: self.checked.regexes[&regex_text(regex)].clone(),
            },
            Test::Exists { value, .. } => TestKind::Exists {
                v: self.value(value, tool),
            },
        }
    }

    fn value(&mut self, v: &Value, tool: Option<&Tool>) -> CVal {
        let mut funcs = Vec::new();
        let mut cur = v;
        while let Value::Call(f, inner, _) = cur {
            funcs.push(*f);
            cur = inner;
        }
        funcs.reverse(); // innermost first
        match cur {
            Value::Arg(path, _) => CVal::Arg {
                path: path.iter().map(|s| Box::from(s.as_str())).collect(),
                role: tool.and_then(|t| t.role_of(path)),
                funcs: funcs.into(),
            },
            Value::Str(s, _) => {
                // A function of a constant is a constant.
                let k = fold(s, &funcs);
                CVal::Const(k, funcs.last().map_or(Kind::Plain, |f| func_kind(*f)))
            }
            Value::Num(n, _, _) => {
                if funcs.is_empty() {
                    CVal::Const(Konst::Num(*n), Kind::Num)
                } else {
                    CVal::Const(Konst::Missing, Kind::Plain)
                }
            }
            Value::Call(..) => unreachable!("unwrapped above"),
        }
    }
}

fn normalise_const(v: CVal, other: Kind) -> CVal {
    match (v, other) {
        (CVal::Const(Konst::Str(s), k), Kind::Role(r)) => {
            let n = match r {
                Role::Path | Role::Tree => norm::path(&s).map(|c| c.into_owned()),
                Role::Url => norm::url(&s).map(|c| c.into_owned()),
                Role::Host => norm::host(&s).map(|c| c.into_owned()),
                Role::Email => norm::email(&s).map(|c| c.into_owned()),
            };
            CVal::Const(n.map_or(Konst::Missing, |n| Konst::Str(n.into())), k)
        }
        (v, _) => v,
    }
}

/// A function chain over a constant string, at compile time.
fn fold(s: &str, funcs: &[Func]) -> Konst {
    let mut v = RV::Str(Cow::Borrowed(s));
    let mut kind = None;
    for f in funcs {
        v = apply(*f, v, kind);
        kind = kind_after(*f);
    }
    match v {
        RV::Str(s) => Konst::Str(s.into_owned().into()),
        RV::Num(Num::Int(i)) => Konst::Num(i.clamp(0, u64::MAX as i128) as u64),
        _ => Konst::Missing,
    }
}
