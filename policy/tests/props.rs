//! Property tests: the canonical formatting round-trips, and the compiled,
//! indexed evaluator agrees with a direct interpreter of the syntax tree on random
//! policies and calls.

use ironvmm_policy::ast::*;
use ironvmm_policy::diag::Span;
use ironvmm_policy::lists::{classify, ListKind};
use ironvmm_policy::{norm, parser, Call, Policy, Verdict};
use proptest::prelude::*;
use serde_json::{json, Value as J};
use std::cmp::Ordering;

const S: Span = Span { start: 0, end: 0 };
const NAMES: [&str; 8] = ["to", "path", "host", "url", "n", "s", "limit", "opts"];
const TOOLS: [&str; 5] = ["mail.send", "mail.read", "fs.read", "net.connect", "x.y"];
const LISTS: [&str; 3] = ["hosts", "mails", "words"];

fn list_entries(name: &str) -> Vec<String> {
    let v: &[&str] = match name {
        "hosts" => &["example.com", "*.bbc.co.uk", "bücher.de"],
        "mails" => &["alice@example.com", "Bob <bob@Example.org>"],
        _ => &["a", "B", "/workspace/x"],
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// Strings that exercise normalisation: paths, hosts, emails, URLs, case.
fn interesting() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "/workspace/x",
            "/workspace/../etc",
            "x/../../y",
            "/w\0x",
            "a",
            "B",
            "b",
            "example.com",
            "EXAMPLE.com.",
            "www.bbc.co.uk",
            "bbc.co.uk",
            "xn--bcher-kva.de",
            "BÜCHER.de",
            "alice@example.com",
            "Alice <alice@EXAMPLE.com>",
            "bob@example.org",
            "eve@evil.com",
            "https://example.com/a",
            "https://x@evil.com/",
            "http://EXAMPLE.com:8080/",
            "not a url",
            "",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z0-9./@:*?\\[\\]-]{0,12}",
    ]
}

fn arb_value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        4 => prop::collection::vec(prop::sample::select(NAMES.to_vec()), 1..3)
            .prop_map(|p| Value::Arg(p.into_iter().map(str::to_string).collect(), S)),
        2 => interesting().prop_map(|s| Value::Str(s, S)),
        1 => (0u64..2000).prop_map(|n| Value::Num(n, None, S)),
        1 => (0u64..5, prop::sample::select(vec![SizeUnit::KB, SizeUnit::MB]))
            .prop_map(|(n, u)| Value::Num(n * u.factor(), Some(u), S)),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        3 => leaf,
        1 => (prop::sample::select(Func::ALL.to_vec()), arb_value(depth - 1))
            .prop_map(|(f, v)| Value::Call(f, Box::new(v), S)),
    ]
    .boxed()
}

fn arb_set() -> impl Strategy<Value = SetRef> {
    prop_oneof![
        prop::sample::select(LISTS.to_vec()).prop_map(|n| SetRef::Named(n.to_string(), S)),
        prop::collection::vec(interesting(), 0..4)
            .prop_map(|v| SetRef::Inline(v.into_iter().map(|s| (s, S)).collect())),
    ]
}

fn arb_test() -> impl Strategy<Value = Test> {
    let ops = vec![
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ];
    prop_oneof![
        (arb_value(2), prop::sample::select(ops), arb_value(2)).prop_map(|(l, op, r)| Test::Cmp {
            left: l,
            op,
            right: r,
            span: S
        }),
        (
            prop::sample::select(vec![Quant::One, Quant::All, Quant::Any]),
            arb_value(1),
            arb_set()
        )
            .prop_map(|(q, v, set)| Test::In {
                quant: q,
                value: v,
                set,
                span: S
            }),
        (
            arb_value(1),
            prop::sample::select(vec!["/", "/workspace", "/workspace/x/.."])
        )
            .prop_map(|(v, d)| Test::Under {
                value: v,
                dir: d.to_string(),
                dir_span: S,
                span: S
            }),
        (
            arb_value(1),
            prop::sample::select(vec!["*.com", "/workspace/*", "[ab]*", "?"])
        )
            .prop_map(|(v, g)| Test::Matches {
                value: v,
                glob: g.to_string(),
                glob_span: S,
                span: S
            }),
        (
            arb_value(1),
            prop::sample::select(vec!["[a-z]+", ".*@example\\.com", "(a|b)*"])
        )
            .prop_map(|(v, r)| Test::Regex {
                value: v,
                regex: r.to_string(),
                regex_span: S,
                span: S
            }),
        arb_value(1).prop_map(|v| Test::Exists { value: v, span: S }),
    ]
}

fn arb_cond() -> impl Strategy<Value = Cond> {
    arb_test()
        .prop_map(Cond::Test)
        .prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(Cond::And),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Cond::Or),
                inner.prop_map(|c| Cond::Not(Box::new(c))),
            ]
        })
}

fn arb_pattern() -> impl Strategy<Value = ToolPattern> {
    prop_oneof![
        3 => prop::sample::select(TOOLS.to_vec()).prop_map(|t| ToolPattern::Exact(t.to_string())),
        1 => prop::sample::select(vec!["mail", "fs", "x"]).prop_map(|s| ToolPattern::Service(s.to_string())),
        1 => Just(ToolPattern::Any),
    ]
}

fn arb_verdict() -> impl Strategy<Value = VerdictKw> {
    prop::sample::select(vec![VerdictKw::Allow, VerdictKw::Deny, VerdictKw::Ask])
}

fn comment() -> impl Strategy<Value = String> {
    "( [a-z#\"]{0,8})?".prop_map(|s| s.trim_end().to_string())
}

fn arb_rule(with_limit: bool) -> impl Strategy<Value = Rule> {
    (
        arb_verdict(),
        arb_pattern(),
        prop::option::weighted(0.8, arb_cond()),
        prop::option::of((
            1u64..100,
            prop::sample::select(vec![TimeUnit::Second, TimeUnit::Hour]),
        )),
        prop::option::of("\\PC{0,10}"),
        prop::option::of(comment()),
    )
        .prop_map(move |(verdict, pattern, cond, limit, reason, comment)| {
            let limit = if with_limit && verdict != VerdictKw::Deny {
                limit.map(|(count, per)| Limit {
                    count,
                    per,
                    span: S,
                })
            } else {
                None
            };
            Rule {
                verdict,
                pattern,
                pattern_span: S,
                cond,
                limit,
                reason,
                line: LineNo(0),
                span: S,
                comment,
            }
        })
}

fn arb_policy(with_limit: bool) -> impl Strategy<Value = PolicyAst> {
    (
        prop::collection::vec(
            prop_oneof![
                6 => arb_rule(with_limit).prop_map(Item::Rule),
                1 => comment().prop_map(Item::Comment),
                1 => Just(Item::Blank),
            ],
            0..12,
        ),
        prop::option::of(arb_verdict()),
    )
        .prop_map(|(body, default)| {
            let mut items = vec![Item::Version {
                number: 1,
                span: S,
                comment: None,
            }];
            for name in LISTS {
                let entries = list_entries(name).into_iter().map(|s| (s, S)).collect();
                items.push(Item::List(ListDecl {
                    name: name.into(),
                    name_span: S,
                    source: ListSource::Inline(entries),
                    comment: None,
                }));
            }
            for it in body {
                // Blank lines never come twice in a row (fmt collapses them).
                if matches!(it, Item::Blank) && matches!(items.last(), Some(Item::Blank)) {
                    continue;
                }
                items.push(it);
            }
            if let Some(v) = default {
                items.push(Item::Default {
                    verdict: v,
                    span: S,
                    comment: None,
                });
            }
            while matches!(items.last(), Some(Item::Blank)) {
                items.pop();
            }
            PolicyAst { items }
        })
}

fn arb_json_value() -> impl Strategy<Value = J> {
    prop_oneof![
        4 => interesting().prop_map(J::from),
        1 => (0i64..2000).prop_map(J::from),
        1 => Just(J::Null),
        1 => any::<bool>().prop_map(J::from),
        2 => prop::collection::vec(interesting().prop_map(J::from), 0..3).prop_map(J::Array),
        1 => prop::collection::vec(prop::sample::select(NAMES.to_vec()), 1..2)
            .prop_flat_map(|k| interesting().prop_map(move |v| json!({ k[0]: v }))),
    ]
}

fn arb_call() -> impl Strategy<Value = Call> {
    (
        prop::sample::select(vec![
            "mail.send",
            "mail.read",
            "fs.read",
            "net.connect",
            "x.y",
            "x.z",
            "q.r",
            "Bad",
        ]),
        prop::collection::btree_map(prop::sample::select(NAMES.to_vec()), arb_json_value(), 0..5),
    )
        .prop_map(|(t, m)| {
            Call::new(
                t,
                J::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
            )
        })
}

// ---- the reference interpreter: the syntax tree, read directly ----

#[derive(Debug, Clone)]
enum RV {
    Missing,
    Null,
    Str(String, bool), // bool: a host (from host() or domain())
    Num(f64, Option<i128>),
    Arr(Vec<J>),
    Other,
}

fn of_json(v: Option<&J>) -> RV {
    match v {
        None => RV::Missing,
        Some(J::Null) => RV::Null,
        Some(J::String(s)) => RV::Str(s.clone(), false),
        Some(J::Number(n)) => RV::Num(n.as_f64().unwrap(), n.as_i64().map(i128::from)),
        Some(J::Array(a)) => RV::Arr(a.clone()),
        Some(_) => RV::Other,
    }
}

fn arg<'a>(args: &'a J, path: &[String]) -> Option<&'a J> {
    let mut cur = args;
    for p in path {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

fn func(f: Func, v: RV) -> RV {
    let s = |o: Option<String>, host: bool| o.map_or(RV::Missing, |s| RV::Str(s, host));
    match (f, v) {
        (Func::Len, RV::Str(x, _)) => {
            RV::Num(x.chars().count() as f64, Some(x.chars().count() as i128))
        }
        (Func::Len, RV::Arr(a)) => RV::Num(a.len() as f64, Some(a.len() as i128)),
        (Func::Lower, RV::Str(x, _)) => RV::Str(x.to_lowercase(), false),
        (Func::Host, RV::Str(x, true)) => RV::Str(x, true),
        (Func::Host, RV::Str(x, false)) => s(norm::url_host(&x), true),
        (Func::Port, RV::Str(x, false)) => {
            norm::url_port(&x).map_or(RV::Missing, |p| RV::Num(p as f64, Some(p as i128)))
        }
        (Func::Scheme, RV::Str(x, false)) => s(norm::url_scheme(&x), false),
        (Func::Domain, RV::Str(x, true)) => RV::Str(x, true),
        (Func::Domain, RV::Str(x, false)) => s(norm::domain(&x), true),
        _ => RV::Missing,
    }
}

fn val_on(v: &Value, base: RV) -> RV {
    match v {
        Value::Call(f, inner, _) => func(*f, val_on(inner, base)),
        _ => base,
    }
}

fn val(v: &Value, args: &J) -> RV {
    match v {
        Value::Arg(p, _) => of_json(arg(args, p)),
        Value::Str(s, _) => RV::Str(s.clone(), false),
        Value::Num(n, _, _) => RV::Num(*n as f64, Some(*n as i128)),
        Value::Call(f, inner, _) => func(*f, val(inner, args)),
    }
}

fn is_host_valued(v: &Value) -> bool {
    matches!(v, Value::Call(Func::Host | Func::Domain, _, _))
}

fn base_arg(v: &Value) -> Option<&Vec<String>> {
    match v {
        Value::Arg(p, _) => Some(p),
        Value::Call(_, inner, _) => base_arg(inner),
        _ => None,
    }
}

fn set_entries(set: &SetRef) -> Vec<String> {
    match set {
        SetRef::Named(n, _) => list_entries(n),
        SetRef::Inline(v) => v.iter().map(|(s, _)| s.clone()).collect(),
    }
}

fn member(v: &RV, entries: &[String]) -> bool {
    let RV::Str(s, host) = v else { return false };
    let kind = if *host {
        ListKind::Host
    } else {
        classify(entries)
    };
    match kind {
        ListKind::Host => {
            let Some(h) = norm::host(s) else { return false };
            entries.iter().any(|e| match e.strip_prefix("*.") {
                Some(suffix) => norm::host(suffix)
                    .is_some_and(|d| h.len() > d.len() && h.ends_with(&format!(".{d}"))),
                None => norm::host(e).is_some_and(|e| e == h),
            })
        }
        ListKind::Email => {
            let Some(a) = norm::email(s) else {
                return false;
            };
            entries
                .iter()
                .any(|e| norm::email(e).is_some_and(|e| e == a))
        }
        ListKind::Plain => entries.iter().any(|e| e == s),
    }
}

fn glob_match(g: &str, s: &str) -> bool {
    let re = ironvmm_policy::check::glob_text(g).unwrap();
    regex::Regex::new(&re).unwrap().is_match(s)
}

fn test(t: &Test, args: &J) -> bool {
    match t {
        Test::Cmp {
            left, op, right, ..
        } => {
            let norm_host = |v: RV, other_is_host: bool, lit: bool| match v {
                RV::Str(s, h) if other_is_host && lit => {
                    norm::host(&s).map_or(RV::Missing, |n| RV::Str(n.into_owned(), h))
                }
                v => v,
            };
            let a = norm_host(
                val(left, args),
                is_host_valued(right),
                matches!(left, Value::Str(..)),
            );
            let b = norm_host(
                val(right, args),
                is_host_valued(left),
                matches!(right, Value::Str(..)),
            );
            match (a, b) {
                (RV::Str(a, _), RV::Str(b, _)) => match op {
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                    _ => false,
                },
                (RV::Num(a, ai), RV::Num(b, bi)) => {
                    let o = match (ai, bi) {
                        (Some(x), Some(y)) => Some(x.cmp(&y)),
                        _ => a.partial_cmp(&b),
                    };
                    match (o, op) {
                        (None, _) => false,
                        (Some(o), CmpOp::Eq) => o == Ordering::Equal,
                        (Some(o), CmpOp::Ne) => o != Ordering::Equal,
                        (Some(o), CmpOp::Lt) => o == Ordering::Less,
                        (Some(o), CmpOp::Le) => o != Ordering::Greater,
                        (Some(o), CmpOp::Gt) => o == Ordering::Greater,
                        (Some(o), CmpOp::Ge) => o != Ordering::Less,
                    }
                }
                _ => false,
            }
        }
        Test::In {
            quant, value, set, ..
        } => {
            let entries = set_entries(set);
            match quant {
                Quant::One => member(&val(value, args), &entries),
                Quant::All | Quant::Any => {
                    let Some(p) = (match value {
                        Value::Str(..) | Value::Num(..) => None,
                        v => base_arg(v),
                    }) else {
                        return false;
                    };
                    let Some(J::Array(a)) = arg(args, p) else {
                        return false;
                    };
                    if a.is_empty() {
                        return false;
                    }
                    let each = |e: &J| member(&val_on(value, of_json(Some(e))), &entries);
                    if *quant == Quant::All {
                        a.iter().all(each)
                    } else {
                        a.iter().any(each)
                    }
                }
            }
        }
        Test::Under { value, dir, .. } => match val(value, args) {
            RV::Str(s, false) => {
                let d = norm::path(dir).unwrap();
                norm::path(&s)
                    .is_some_and(|p| p == d || d == "/" || p.starts_with(&format!("{d}/")))
            }
            _ => false,
        },
        Test::Matches { value, glob, .. } => match val(value, args) {
            RV::Str(s, _) => glob_match(glob, &s),
            _ => false,
        },
        Test::Regex { value, regex, .. } => match val(value, args) {
            RV::Str(s, _) => regex::Regex::new(&format!("^(?:{regex})$"))
                .unwrap()
                .is_match(&s),
            _ => false,
        },
        Test::Exists { value, .. } => match val(value, args) {
            RV::Missing | RV::Null => false,
            RV::Str(s, _) => !s.is_empty(),
            RV::Arr(a) => !a.is_empty(),
            RV::Num(..) | RV::Other => true,
        },
    }
}

fn cond(c: &Cond, args: &J) -> bool {
    match c {
        Cond::And(cs) => cs.iter().all(|c| cond(c, args)),
        Cond::Or(cs) => cs.iter().any(|c| cond(c, args)),
        Cond::Not(c) => !cond(c, args),
        Cond::Test(t) => test(t, args),
    }
}

/// (verdict, line): the whole language minus limits, without a catalog.
fn reference(ast: &PolicyAst, call: &Call) -> (Verdict, Option<u32>) {
    if !parser::valid_tool_name(&call.tool) {
        return (Verdict::Deny, None);
    }
    let bad_path = |v: &J| v.as_str().is_some_and(|s| norm::path(s).is_none());
    match call.args.get("path") {
        Some(J::String(_)) if bad_path(&call.args["path"]) => return (Verdict::Deny, None),
        Some(J::Array(a)) if a.iter().any(bad_path) => return (Verdict::Deny, None),
        _ => {}
    }
    for r in ast.rules() {
        if r.pattern.matches(&call.tool) && r.cond.as_ref().is_none_or(|c| cond(c, &call.args)) {
            let v = match r.verdict {
                VerdictKw::Allow => Verdict::Allow,
                VerdictKw::Deny => Verdict::Deny,
                VerdictKw::Ask => Verdict::Ask,
            };
            return (v, Some(r.line.0));
        }
    }
    let d = ast.items.iter().find_map(|i| match i {
        Item::Default { verdict, .. } => Some(*verdict),
        _ => None,
    });
    let v = match d.unwrap_or(VerdictKw::Deny) {
        VerdictKw::Allow => Verdict::Allow,
        VerdictKw::Deny => Verdict::Deny,
        VerdictKw::Ask => Verdict::Ask,
    };
    (v, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, max_global_rejects: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn fmt_round_trips(ast in arb_policy(true)) {
        let text = ast.format();
        let (parsed, errs) = parser::parse(&text);
        prop_assert!(errs.is_empty(), "{text}\n{errs:?}");
        prop_assert_eq!(&parsed, &ast, "{}", text);
        prop_assert_eq!(parsed.format(), text);
    }

    #[test]
    fn compiled_evaluator_agrees_with_reference(ast in arb_policy(false), calls in prop::collection::vec(arb_call(), 1..12)) {
        let text = ast.format();
        let loaded = Policy::from_source(&text, "gen.rules", None, None);
        // Generated policies may be refused by the checker (a string compared with
        // a number); those say nothing about evaluation.
        prop_assume!(loaded.is_ok());
        let p = loaded.unwrap().policy;
        let (parsed, _) = parser::parse(&text);
        for c in &calls {
            let d = p.decide(c);
            let want = reference(&parsed, c);
            prop_assert_eq!((d.verdict, d.rule), want, "{}\ncall: {:?}\nreason: {}", text, c, d.reason);
        }
    }
}
