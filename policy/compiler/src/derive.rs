//! Scenarios the compiler derives itself, with no model. From every scenario the
//! model wrote, deterministic variants that the English cannot tell apart:
//!
//! - **respellings** of a value by its role (an address's domain in upper case or
//!   with a trailing dot, a display-name form; a path with `./`, `//` or `..`; a URL
//!   with an upper-case scheme or host). Only spellings the engine's own normaliser
//!   maps to the same value are used, so "must decide the same" is sound.
//! - **redistributions** of an argument group's values among its members (a stranger
//!   moved from `cc` to `bcc`; the two ends of a move swapped). They must decide the
//!   same, unless the English names one of the members (then that member is left out).
//! - **array growth**: one more outsider in an array member of a group. It must never
//!   decide more permissively than the scenario it came from.
//!
//! A derived scenario expects what its parent expects; the verification step decides
//! each one on its own (no `limit` counters carried over) and sends a disagreement to
//! the rule repair, as a fault of the rules.

use std::collections::BTreeSet;

use ironvmm_policy::norm;
use serde_json::{Map, Value};

use crate::catalog_view::{CatalogView, Tool};
use crate::scenarios::Scenario;
pub use crate::scenarios::{Bound, Derivation};
use crate::sentences::Sentence;

/// Variants per scenario, and in all: the derived set stays a bounded multiple of
/// what the model wrote.
const MAX_PER_PARENT: usize = 40;
const MAX_DERIVED: usize = 2000;
/// Values of one argument that are respelled.
const MAX_RESPELLED_VALUES: usize = 3;

/// Words that name an argument but are too common in English to mean it.
const COMMON_WORDS: &[&str] = &[
    "to", "from", "by", "in", "at", "on", "of", "for", "as", "is", "id", "body", "path", "url",
    "host", "port", "query", "folder", "limit", "name",
];

/// Does the English single out the argument `arg` (so its group members may be
/// decided differently)? It does when a sentence names it in backticks, or as a
/// word when the name is not an everyday word ("bcc" is, "to" is not).
pub fn singled_out(arg: &str, sentences: &[Sentence]) -> bool {
    let tick = format!("`{arg}`");
    sentences.iter().any(|s| {
        let t = s.text.to_lowercase();
        t.contains(&tick)
            || (!COMMON_WORDS.contains(&arg)
                && t.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == arg))
    })
}

fn same_by_role(role: &str, a: &str, b: &str) -> bool {
    match role {
        "email" => norm::email(a).is_some() && norm::email(a) == norm::email(b),
        "host" => norm::host(a).is_some() && norm::host(a) == norm::host(b),
        "path" => norm::path(a).is_some() && norm::path(a) == norm::path(b),
        "url" => norm::url(a).is_some() && norm::url(a) == norm::url(b),
        _ => false,
    }
}

/// Other spellings of `v` in `role` that the engine reads as the same value.
pub fn respellings(role: &str, v: &str) -> Vec<(String, &'static str)> {
    let mut c: Vec<(String, &'static str)> = Vec::new();
    match role {
        "email" => {
            if let Some(at) = v.rfind('@') {
                let (local, domain) = (&v[..at], &v[at + 1..]);
                if !v.contains('<') {
                    c.push((
                        format!("{local}@{}", domain.to_uppercase()),
                        "the domain in upper case",
                    ));
                    c.push((format!("{local}@{domain}."), "a trailing dot on the domain"));
                    c.push((format!("Someone <{v}>"), "a display-name form"));
                    if !domain.is_ascii() {
                        if let Some(a) = norm::host(domain) {
                            c.push((format!("{local}@{a}"), "the domain in IDNA (punycode)"));
                        }
                    }
                }
            }
        }
        "host" => {
            c.push((v.to_uppercase(), "upper case"));
            c.push((format!("{v}."), "a trailing dot"));
            if !v.is_ascii() {
                if let Some(a) = norm::host(v) {
                    c.push((a.into_owned(), "IDNA (punycode)"));
                }
            }
        }
        "path" => {
            if let Some(rest) = v.strip_prefix('/') {
                c.push((format!("//{rest}"), "a doubled `/`"));
                c.push((format!("/./{rest}"), "a `./` segment"));
                if let Some(first) = rest.split('/').next().filter(|f| !f.is_empty()) {
                    c.push((format!("/{first}/../{rest}"), "a `..` segment"));
                }
            } else if !v.is_empty() {
                c.push((format!("./{v}"), "a leading `./`"));
            }
        }
        "url" => {
            if let Some((scheme, rest)) = v.split_once("://") {
                c.push((
                    format!("{}://{rest}", scheme.to_uppercase()),
                    "an upper-case scheme",
                ));
                let (host, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                if !host.contains('@') {
                    c.push((
                        format!("{scheme}://{}{tail}", host.to_uppercase()),
                        "an upper-case host",
                    ));
                }
            }
        }
        _ => {}
    }
    c.retain(|(x, _)| x != v && same_by_role(role, v, x));
    c
}

/// Spellings that the normaliser keeps apart but that must never get more than the
/// plain value: a URL with userinfo (`https://user@host/`) is the same host.
pub fn disguises(role: &str, v: &str) -> Vec<(String, &'static str)> {
    let mut c = Vec::new();
    if role == "url" {
        if let Some((scheme, rest)) = v.split_once("://") {
            let (host, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            if !host.is_empty() && !host.contains('@') {
                c.push((format!("{scheme}://user@{host}{tail}"), "userinfo"));
            }
        }
    }
    c.retain(|(x, _)| norm::url(x).is_some() && norm::url_host(x) == norm::url_host(v));
    c
}

/// A value no list holds, in the role's shape.
fn outsider(role: Option<&str>) -> String {
    match role {
        Some("email") => "outsider@derived.invalid".into(),
        Some("host") => "outsider.derived.invalid".into(),
        Some("path") => "/derived-outsider/file".into(),
        Some("url") => "https://outsider.derived.invalid/".into(),
        _ => "derived-outsider".into(),
    }
}

/// The strings an argument holds: a string, or an array's string items.
fn values(args: &Map<String, Value>, arg: &str) -> Vec<String> {
    match args.get(arg) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => vec![],
    }
}

struct Out<'a> {
    parent: &'a Scenario,
    seen: &'a mut BTreeSet<String>,
    made: Vec<Scenario>,
}

impl Out<'_> {
    fn push(&mut self, tool: &str, args: Map<String, Value>, how: String, bound: Bound) {
        if self.made.len() >= MAX_PER_PARENT {
            return;
        }
        let call = serde_json::json!({"tool": tool, "args": Value::Object(args)});
        if !self.seen.insert(call.to_string()) {
            return;
        }
        self.made.push(Scenario {
            id: format!("{}.d{}", self.parent.id, self.made.len() + 1),
            sentence: self.parent.sentence,
            why: String::new(),
            call,
            expect: self.parent.expect,
            derived: Some(Derivation {
                from: self.parent.id.clone(),
                how,
                bound,
            }),
        });
    }
}

fn respell(out: &mut Out, tool: &Tool, args: &Map<String, Value>) {
    for (arg, role) in &tool.roles {
        if arg.contains('.') {
            continue;
        }
        for v in values(args, arg).iter().take(MAX_RESPELLED_VALUES) {
            for (alt, what, bound) in respellings(role, v)
                .into_iter()
                .map(|(a, w)| (a, w, Bound::Same))
                .chain(
                    disguises(role, v)
                        .into_iter()
                        .map(|(a, w)| (a, w, Bound::AtMost)),
                )
            {
                let mut a = args.clone();
                match a.get_mut(arg) {
                    Some(Value::String(s)) => *s = alt.clone(),
                    Some(Value::Array(items)) => {
                        for it in items.iter_mut() {
                            if it.as_str() == Some(v.as_str()) {
                                *it = Value::String(alt.clone());
                                break;
                            }
                        }
                    }
                    _ => continue,
                }
                out.push(
                    &tool.name,
                    a,
                    format!("{v:?} in `{arg}` respelled as {alt:?} ({what})"),
                    bound,
                );
            }
        }
    }
}

fn redistribute(out: &mut Out, tool: &Tool, members: &[String], args: &Map<String, Value>) {
    let all_strings = members.iter().all(|m| !tool.arg_is_array(m));
    if all_strings {
        // Two single values (the ends of a move): swap them.
        if let [a, b] = members {
            if let (Some(Value::String(x)), Some(Value::String(y))) = (args.get(a), args.get(b)) {
                if x != y {
                    let mut n = args.clone();
                    n.insert(a.clone(), Value::String(y.clone()));
                    n.insert(b.clone(), Value::String(x.clone()));
                    out.push(
                        &tool.name,
                        n,
                        format!("the values of `{a}` and `{b}` swapped"),
                        Bound::Same,
                    );
                }
            }
        }
        return;
    }
    if !members.iter().all(|m| tool.arg_is_array(m)) {
        return;
    }
    // Move one value at a time from one member to another.
    for from in members {
        let (min_from, _) = tool.arg_items(from);
        let vals = values(args, from);
        if vals.len() <= min_from {
            continue;
        }
        for v in &vals {
            for to in members.iter().filter(|t| *t != from) {
                let (_, max_to) = tool.arg_items(to);
                if values(args, to).len() >= max_to {
                    continue;
                }
                let mut n = args.clone();
                let mut left: Vec<Value> = vals
                    .iter()
                    .filter(|x| *x != v)
                    .cloned()
                    .map(Value::String)
                    .collect();
                // A value listed twice moves once.
                let dup = vals.iter().filter(|x| *x == v).count();
                for _ in 1..dup {
                    left.push(Value::String(v.clone()));
                }
                if left.is_empty() && !tool.arg_required(from) {
                    n.remove(from);
                } else {
                    n.insert(from.clone(), Value::Array(left));
                }
                let mut dest = match n.get(to) {
                    Some(Value::Array(a)) => a.clone(),
                    _ => vec![],
                };
                dest.push(Value::String(v.clone()));
                n.insert(to.clone(), Value::Array(dest));
                out.push(
                    &tool.name,
                    n,
                    format!("{v:?} moved from `{from}` to `{to}`"),
                    Bound::Same,
                );
            }
        }
    }
}

fn grow(out: &mut Out, tool: &Tool, members: &[String], args: &Map<String, Value>) {
    for m in members.iter().filter(|m| tool.arg_is_array(m)) {
        let (_, max) = tool.arg_items(m);
        let mut items = match args.get(m) {
            Some(Value::Array(a)) => a.clone(),
            None => vec![],
            Some(_) => continue,
        };
        if items.len() >= max {
            continue;
        }
        let o = outsider(tool.roles.get(m).map(String::as_str));
        items.push(Value::String(o.clone()));
        let mut n = args.clone();
        n.insert(m.clone(), Value::Array(items));
        out.push(
            &tool.name,
            n,
            format!("one more outsider ({o:?}) in `{m}`"),
            Bound::AtMost,
        );
    }
}

/// The derived scenarios of `scenarios` (those the model wrote; derived ones are
/// skipped), in a deterministic order, without any call already present.
pub fn derive(
    scenarios: &[Scenario],
    catalog: &CatalogView,
    sentences: &[Sentence],
) -> Vec<Scenario> {
    let mut seen: BTreeSet<String> = scenarios.iter().map(|s| s.call.to_string()).collect();
    let mut all = Vec::new();
    for parent in scenarios.iter().filter(|s| s.derived.is_none()) {
        let Some(tool) = parent
            .call
            .get("tool")
            .and_then(Value::as_str)
            .and_then(|t| catalog.tool(t))
        else {
            continue;
        };
        let Some(args) = parent.call.get("args").and_then(Value::as_object) else {
            continue;
        };
        let mut out = Out {
            parent,
            seen: &mut seen,
            made: Vec::new(),
        };
        respell(&mut out, tool, args);
        for members in tool.groups.values() {
            let free: Vec<String> = members
                .iter()
                .filter(|m| !singled_out(m, sentences))
                .cloned()
                .collect();
            if free.len() >= 2 {
                redistribute(&mut out, tool, &free, args);
            }
            grow(&mut out, tool, members, args);
        }
        all.extend(out.made);
        if all.len() >= MAX_DERIVED {
            all.truncate(MAX_DERIVED);
            break;
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Verdict;
    use crate::sentences::split;
    use serde_json::json;

    fn catalog() -> CatalogView {
        CatalogView::parse(
            r#"{"tools":[
            {"name":"mail.send","inputSchema":{"type":"object","properties":{
              "to":{"type":"array","items":{"type":"string"},"minItems":1},
              "cc":{"type":"array","items":{"type":"string"}},
              "bcc":{"type":"array","items":{"type":"string"}},
              "subject":{"type":"string"}},"required":["to"]},
             "roles":{"to":"email","cc":"email","bcc":"email"},"groups":{"recipients":["to","cc","bcc"]}},
            {"name":"fs.move","inputSchema":{"type":"object","properties":{"from":{"type":"string"},"to":{"type":"string"}},"required":["from","to"]},
             "roles":{"from":"path","to":"path"},"groups":{"ends":["from","to"]}}]}"#,
        )
        .unwrap()
    }

    fn sc(id: &str, call: Value, expect: Verdict) -> Scenario {
        Scenario {
            id: id.into(),
            sentence: 1,
            why: String::new(),
            call,
            expect,
            derived: None,
        }
    }

    #[test]
    fn a_stranger_in_cc_is_also_tried_in_bcc_and_to() {
        let s = vec![sc(
            "s9",
            json!({"tool":"mail.send","args":{"to":["alice@example.com"],"cc":["mallory@evil.example"],"subject":"x"}}),
            Verdict::Ask,
        )];
        let d = derive(&s, &catalog(), &split("Ask me for anyone else."));
        let hows: Vec<&str> = d
            .iter()
            .map(|x| x.derived.as_ref().unwrap().how.as_str())
            .collect();
        assert!(
            hows.contains(&"\"mallory@evil.example\" moved from `cc` to `bcc`"),
            "{hows:?}"
        );
        assert!(hows.contains(&"\"mallory@evil.example\" moved from `cc` to `to`"));
        // `to` keeps its one required item.
        assert!(!hows.iter().any(|h| h.contains("from `to`")), "{hows:?}");
        let bcc = d
            .iter()
            .find(|x| x.derived.as_ref().unwrap().how.contains("to `bcc`"))
            .unwrap();
        assert_eq!(bcc.call["args"]["bcc"], json!(["mallory@evil.example"]));
        assert!(bcc.call["args"].get("cc").is_none());
        assert_eq!(bcc.expect, Verdict::Ask);
        assert!(bcc.id.starts_with("s9.d"));
        let grown = d
            .iter()
            .filter(|x| x.derived.as_ref().unwrap().bound == Bound::AtMost)
            .count();
        assert_eq!(grown, 3);
        // Every respelling reads as the same address.
        for x in d
            .iter()
            .filter(|x| x.derived.as_ref().unwrap().how.contains("respelled"))
        {
            let to = x.call["args"]["to"][0].as_str().unwrap();
            assert_eq!(norm::email(to).unwrap(), "alice@example.com", "{to}");
        }
        // Deterministic.
        assert_eq!(d, derive(&s, &catalog(), &split("Ask me for anyone else.")));
    }

    #[test]
    fn a_member_the_english_names_is_not_redistributed() {
        let s = vec![sc(
            "s1",
            json!({"tool":"mail.send","args":{"to":["a@b.c"],"cc":["m@e.x"]}}),
            Verdict::Ask,
        )];
        let d = derive(&s, &catalog(), &split("Anyone in bcc is fine."));
        assert!(!d
            .iter()
            .any(|x| x.derived.as_ref().unwrap().how.contains("`bcc`")
                && x.derived.as_ref().unwrap().bound == Bound::Same));
        assert!(singled_out("bcc", &split("Anyone in bcc is fine.")));
        assert!(!singled_out("to", &split("Send to my contacts.")));
        assert!(singled_out("to", &split("Check the `to` field.")));
    }

    #[test]
    fn the_ends_of_a_move_are_swapped_and_paths_respelled() {
        let s = vec![sc(
            "s2",
            json!({"tool":"fs.move","args":{"from":"/workspace/a","to":"/etc/passwd"}}),
            Verdict::Deny,
        )];
        let d = derive(&s, &catalog(), &split("Never touch /etc."));
        assert!(d
            .iter()
            .any(|x| x.call["args"]["from"] == "/etc/passwd"
                && x.call["args"]["to"] == "/workspace/a"));
        assert!(d.iter().any(|x| x.call["args"]["to"] == "//etc/passwd"));
        assert!(d
            .iter()
            .any(|x| x.call["args"]["to"] == "/etc/../etc/passwd"));
        for (v, role) in [
            ("https://example.com/x", "url"),
            ("Example.org", "host"),
            ("a@b.org", "email"),
        ] {
            for (alt, _) in respellings(role, v) {
                assert!(same_by_role(role, v, &alt), "{alt}");
            }
        }
        let d = disguises("url", "https://example.com/x");
        assert_eq!(d[0].0, "https://user@example.com/x");
        assert!(disguises("url", "https://a@example.com/").is_empty());
        {}
    }
}
