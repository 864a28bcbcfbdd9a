//! One test per construct of the language, and the adversarial cases of issue 4.

use ironvmm_policy::{Call, Catalog, DecidedBy, Policy, Verdict};
use serde_json::{json, Value};
use std::path::Path;

const CATALOG: &str = include_str!("../../examples/catalog.json");

fn catalog() -> Catalog {
    Catalog::from_json(CATALOG).unwrap()
}

fn load(src: &str) -> Policy {
    match Policy::from_source(src, "t.rules", None, None) {
        Ok(l) => l.policy,
        Err(d) => panic!("policy did not load:\n{d}"),
    }
}

fn load_cat(src: &str) -> Policy {
    let c = catalog();
    match Policy::from_source(src, "t.rules", None, Some(&c)) {
        Ok(l) => l.policy,
        Err(d) => panic!("policy did not load:\n{d}"),
    }
}

fn errors(src: &str, catalog: Option<&Catalog>) -> String {
    match Policy::from_source(src, "t.rules", None, catalog) {
        Ok(_) => panic!("policy loaded but should not:\n{src}"),
        Err(d) => d.to_string(),
    }
}

fn warnings(src: &str, catalog: Option<&Catalog>) -> String {
    Policy::from_source(src, "t.rules", None, catalog)
        .unwrap()
        .warnings
        .to_string()
}

fn v(p: &Policy, tool: &str, args: Value) -> Verdict {
    p.decide(&Call::new(tool, args)).verdict
}

fn allowed(p: &Policy, tool: &str, args: Value) -> bool {
    v(p, tool, args) == Verdict::Allow
}

// ---- declarations and rule forms ----

#[test]
fn first_match_wins_and_default() {
    let p = load("allow a.b\ndeny a.b\nask a.*\ndefault deny\n");
    let d = p.decide(&Call::new("a.b", json!({})));
    assert_eq!(
        (d.verdict, d.rule, d.by),
        (Verdict::Allow, Some(1), DecidedBy::Rule)
    );
    let d = p.decide(&Call::new("a.c", json!({})));
    assert_eq!((d.verdict, d.rule), (Verdict::Ask, Some(3)));
    let d = p.decide(&Call::new("x.y", json!({})));
    assert_eq!(
        (d.verdict, d.rule, d.by),
        (Verdict::Deny, None, DecidedBy::Default)
    );
}

#[test]
fn default_absent_is_deny_and_others_apply() {
    assert_eq!(v(&load("allow a.b\n"), "c.d", json!({})), Verdict::Deny);
    assert_eq!(
        v(&load("default allow\n"), "c.d", json!({})),
        Verdict::Allow
    );
    assert_eq!(v(&load("default ask\n"), "c.d", json!({})), Verdict::Ask);
}

#[test]
fn star_pattern_and_reason() {
    let p = load("deny * \"nothing\"\n");
    let d = p.decide(&Call::new("q.r", json!({})));
    assert_eq!((d.verdict, d.reason.as_str()), (Verdict::Deny, "nothing"));
}

#[test]
fn version_and_errors() {
    load("version 1\nallow a.b\n");
    assert!(errors("version 2\n", None).contains("unsupported version 2"));
    assert!(errors("allow a.b\nversion 1\n", None).contains("must come before"));
    assert!(errors("default allow\ndefault deny\n", None)
        .contains("`default` given twice (first on line 1)"));
}

#[test]
fn line_continuation() {
    let p = load("allow a.b when x == \"1\" \\\n   and y == \"2\"\nallow a.c\n");
    assert!(allowed(&p, "a.b", json!({"x": "1", "y": "2"})));
    assert!(!allowed(&p, "a.b", json!({"x": "1"})));
    assert_eq!(p.decide(&Call::new("a.c", json!({}))).rule, Some(3));
}

#[test]
fn string_escapes() {
    let p = load(r#"allow a.b when x == "q\"\\\n\t\u{e9}""#);
    assert!(allowed(&p, "a.b", json!({"x": "q\"\\\n\té"})));
}

#[test]
fn inline_and_file_lists() {
    let dir = tempdir();
    std::fs::write(dir.join("c.txt"), "# contacts\nbob@example.com\n\n").unwrap();
    std::fs::write(
        dir.join("c.vcf"),
        "BEGIN:VCARD\nEMAIL;TYPE=home:carol@example.com\nEND:VCARD\n",
    )
    .unwrap();
    let src = "list c = file \"c.txt\"\nlist v = file \"c.vcf\"\nlist n = [\"x\", \"y\",]\n\
               allow a.b when to in @c or to in @v or k in @n\n";
    let p = Policy::from_source(src, "p.rules", Some(&dir), None)
        .unwrap()
        .policy;
    assert!(allowed(&p, "a.b", json!({"to": "bob@example.com"})));
    assert!(allowed(&p, "a.b", json!({"to": "carol@example.com"})));
    assert!(allowed(&p, "a.b", json!({"k": "y"})));
    assert!(!allowed(&p, "a.b", json!({"k": "z"})));
    let e = Policy::from_source(
        "list m = file \"missing.txt\"\nallow a.b when x in @m\n",
        "p.rules",
        Some(&dir),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cannot read list file") && e.contains("p.rules:1:15"),
        "{e}"
    );
}

#[test]
fn limit_rolling_window_falls_through() {
    let p = load("allow a.b limit 2 per minute \"ok\"\nask a.b \"slow down\"\n");
    let c = Call::new("a.b", json!({}));
    assert_eq!(p.decide_at(&c, 0).verdict, Verdict::Allow);
    assert_eq!(p.decide_at(&c, 1_000).verdict, Verdict::Allow);
    let d = p.decide_at(&c, 2_000);
    assert_eq!(
        (d.verdict, d.by, d.rule),
        (Verdict::Ask, DecidedBy::Limit, Some(1))
    );
    assert!(
        d.reason.contains("limit 2 per minute of line 1 reached"),
        "{}",
        d.reason
    );
    assert_eq!(p.decide_at(&c, 60_000).verdict, Verdict::Allow);
    assert!(errors("deny a.b limit 1 per hour\n", None).contains("only to `allow` and `ask`"));
    assert!(errors("allow a.b limit 0 per hour\n", None).contains("expected a limit from 1"));
}

// ---- conditions ----

#[test]
fn boolean_operators_and_precedence() {
    let p = load("allow a.b when x == \"1\" or y == \"1\" and z == \"1\"\n");
    assert!(allowed(&p, "a.b", json!({"x": "1"})));
    assert!(!allowed(&p, "a.b", json!({"y": "1"})));
    assert!(allowed(&p, "a.b", json!({"y": "1", "z": "1"})));
    let p = load("allow a.b when (x == \"1\" or y == \"1\") and not z == \"1\"\n");
    assert!(allowed(&p, "a.b", json!({"y": "1"})));
    assert!(!allowed(&p, "a.b", json!({"y": "1", "z": "1"})));
}

#[test]
fn comparisons() {
    let p = load("allow a.b when n == 3\nallow a.c when n != 3\nallow a.d when n < 10KB and n >= 2\nallow a.e when s > 1 and s <= 1MB\n");
    assert!(allowed(&p, "a.b", json!({"n": 3})));
    assert!(allowed(&p, "a.b", json!({"n": 3.0})));
    assert!(!allowed(&p, "a.b", json!({"n": "3"})));
    assert!(allowed(&p, "a.c", json!({"n": 4})));
    assert!(
        !allowed(&p, "a.c", json!({})),
        "a missing argument makes `!=` false too"
    );
    assert!(allowed(&p, "a.d", json!({"n": 9999})));
    assert!(!allowed(&p, "a.d", json!({"n": 10000})));
    assert!(!allowed(&p, "a.d", json!({"n": 1})));
    assert!(allowed(&p, "a.e", json!({"s": 1000000})));
    assert!(!allowed(&p, "a.e", json!({"s": 1000001})));
    assert!(errors("allow a.b when x < \"a\"\n", None).contains("expected a number"));
}

#[test]
fn nested_args_and_keyword_names() {
    let p = load("allow a.b when opts.mode == \"r\" and args.limit == 5 and args.args == \"x\"\n");
    assert!(allowed(
        &p,
        "a.b",
        json!({"opts": {"mode": "r"}, "limit": 5, "args": "x"})
    ));
    assert!(!allowed(
        &p,
        "a.b",
        json!({"opts": "r", "limit": 5, "args": "x"})
    ));
    assert!(errors("allow a.b when limit == 5\n", None).contains("written `args.limit`"));
}

#[test]
fn in_all_any() {
    let p = load("list ok = [\"a\", \"b\"]\nallow t.one when x in @ok\nallow t.all when all x in @ok\nallow t.any when any x in [\"a\"]\n");
    assert!(allowed(&p, "t.one", json!({"x": "a"})));
    assert!(
        !allowed(&p, "t.one", json!({"x": ["a"]})),
        "an array under plain `in` is false"
    );
    assert!(allowed(&p, "t.all", json!({"x": ["a", "b"]})));
    assert!(
        !allowed(&p, "t.all", json!({"x": ["a", "evil"]})),
        "one outsider"
    );
    assert!(
        !allowed(&p, "t.all", json!({"x": []})),
        "empty array under all"
    );
    assert!(!allowed(&p, "t.all", json!({})), "missing array under all");
    assert!(
        !allowed(&p, "t.all", json!({"x": "a"})),
        "a scalar under all is the wrong type"
    );
    assert!(allowed(&p, "t.any", json!({"x": ["z", "a"]})));
    assert!(!allowed(&p, "t.any", json!({"x": ["z"]})));
}

#[test]
fn in_on_catalog_array_is_a_load_error() {
    let c = catalog();
    let e = errors("allow mail.send when to in [\"a@b.c\"]\n", Some(&c));
    assert!(
        e.contains("`to` is an array for mail.send: write `all to in ...`"),
        "{e}"
    );
}

#[test]
fn under_normalises_paths() {
    let p = load("allow fs.read when path under \"/workspace\"\n");
    for (path, ok) in [
        ("/workspace/a.txt", true),
        ("/workspace", true),
        ("a/b.txt", true),
        ("/workspace/../etc/passwd", false),
        ("/workspace/./x/../../workspace2/x", false),
        ("/workspace2/x", false),
        ("/../../workspace/x", false),
        ("../../../../../../workspace/x", false),
        ("/workspace/a\u{0}b", false),
        ("//workspace//a", true),
    ] {
        assert_eq!(
            allowed(&p, "fs.read", json!({"path": path})),
            ok,
            "{path:?}"
        );
    }
    assert!(!allowed(&p, "fs.read", json!({"path": 5})));
}

#[test]
fn matches_glob_and_regex() {
    let p =
        load("allow a.g when name matches \"*.md\"\nallow a.r when name regex \"[a-z]+[0-9]?\"\n");
    assert!(allowed(&p, "a.g", json!({"name": "docs/README.md"})));
    assert!(!allowed(&p, "a.g", json!({"name": "README.md.exe"})));
    assert!(allowed(&p, "a.r", json!({"name": "abc1"})));
    assert!(
        !allowed(&p, "a.r", json!({"name": "abc12"})),
        "regex is a whole-string match"
    );
    assert!(errors("allow a.r when x regex \"(\"\n", None).contains("invalid pattern"));
    assert!(errors("allow a.g when x matches \"[ab\"\n", None).contains("unclosed `[`"));
}

#[test]
fn exists_semantics() {
    let p = load("allow a.b when exists x\nallow a.c when not exists cc\n");
    for (args, want) in [
        (json!({"x": "v"}), true),
        (json!({"x": 0}), true),
        (json!({"x": false}), true),
        (json!({"x": ""}), false),
        (json!({"x": []}), false),
        (json!({"x": null}), false),
        (json!({}), false),
    ] {
        assert_eq!(allowed(&p, "a.b", args.clone()), want, "{args}");
    }
    assert!(allowed(&p, "a.c", json!({"cc": []})));
    assert!(!allowed(&p, "a.c", json!({"cc": ["x"]})));
}

#[test]
fn functions() {
    let p = load(
        "allow f.len when len(s) <= 3 and len(a) == 2\n\
         allow f.lower when lower(s) == \"abc\"\n\
         allow f.url when host(u) == \"example.com\" and port(u) == 443 and scheme(u) == \"https\"\n\
         allow f.dom when domain(e) == \"example.com\" and domain(u) == \"x.example.com\"\n",
    );
    assert!(allowed(&p, "f.len", json!({"s": "héé", "a": [1, 2]})));
    assert!(!allowed(&p, "f.len", json!({"s": "abcd", "a": [1, 2]})));
    assert!(allowed(&p, "f.lower", json!({"s": "AbC"})));
    assert!(allowed(&p, "f.url", json!({"u": "https://EXAMPLE.com./x"})));
    assert!(!allowed(
        &p,
        "f.url",
        json!({"u": "https://example.com:8443/"})
    ));
    assert!(!allowed(&p, "f.url", json!({"u": "not a url"})));
    assert!(allowed(
        &p,
        "f.dom",
        json!({"e": "Bob <bob@EXAMPLE.com>", "u": "https://x.example.com/"})
    ));
    assert!(errors("allow a.b when nope(x) == 1\n", None).contains("unknown function `nope`"));
    assert!(errors("allow a.b when lower(len(x)) == \"a\"\n", None)
        .contains("expected a string for `lower(...)`"));
}

#[test]
fn all_any_apply_functions_to_each_element() {
    let p = load("allow mail.send when all domain(to) in [\"example.com\"]\n");
    assert!(allowed(
        &p,
        "mail.send",
        json!({"to": ["a@Example.com", "Bob <b@example.com>"]})
    ));
    assert!(!allowed(
        &p,
        "mail.send",
        json!({"to": ["a@example.com", "e@evil.com"]})
    ));
}

// ---- normalisation and adversarial cases ----

#[test]
fn host_lists() {
    let p = load("list news = [\"apnews.com\", \"*.bbc.co.uk\", \"bücher.de\"]\nallow net.connect when host in @news and port == 443\n");
    for (h, ok) in [
        ("apnews.com", true),
        ("APNEWS.COM", true),
        ("apnews.com.", true),
        ("www.bbc.co.uk", true),
        ("WWW.BBC.CO.UK.", true),
        ("bbc.co.uk", false),
        ("evilbbc.co.uk", false),
        ("bbc.co.uk.evil.com", false),
        ("xn--bcher-kva.de", true),
        ("BÜCHER.de", true),
        ("apnews.com..", false),
        ("apnews.com\u{0}.evil", false),
    ] {
        assert_eq!(
            allowed(&p, "net.connect", json!({"host": h, "port": 443})),
            ok,
            "{h:?}"
        );
    }
    assert!(!allowed(
        &p,
        "net.connect",
        json!({"host": "apnews.com", "port": 80})
    ));
}

#[test]
fn url_tricks() {
    let p =
        load("allow http.fetch when host(url) in [\"allowed.com\"] and scheme(url) == \"https\"\n");
    for (u, ok) in [
        ("https://allowed.com/x", true),
        ("https://ALLOWED.com./x", true),
        ("https://allowed.com@evil.com/", false),
        ("https://evil.com/?allowed.com", false),
        ("https://evil.com#@allowed.com", false),
        ("https://allowed.com.evil.com/", false),
        ("http://allowed.com/", false),
        // WHATWG reads `\` as `/` in special schemes: the host is allowed.com, and
        // the http service fetches with the same parser.
        ("https://allowed.com\\@evil.com/", true),
        ("//allowed.com/", false),
    ] {
        assert_eq!(allowed(&p, "http.fetch", json!({"url": u})), ok, "{u}");
    }
}

#[test]
fn url_role_normalises_before_every_operator() {
    let p = load_cat("allow http.fetch when url == \"https://Example.COM:443/a/../b\"\n");
    assert!(allowed(
        &p,
        "http.fetch",
        json!({"url": "https://example.com/b"})
    ));
    assert!(allowed(
        &p,
        "http.fetch",
        json!({"url": "HTTPS://EXAMPLE.com./b"})
    ));
    let p = load_cat("deny http.fetch when url == \"https://evil.com/x\"\ndefault allow\n");
    assert!(!allowed(
        &p,
        "http.fetch",
        json!({"url": "https://EVIL.com./x"})
    ));
    assert!(!allowed(
        &p,
        "http.fetch",
        json!({"url": "https://evil.com:443/x"})
    ));
    let p = load_cat("allow http.fetch when url matches \"https://example.com/*\"\n");
    assert!(allowed(
        &p,
        "http.fetch",
        json!({"url": "HTTPS://EXAMPLE.COM/x"})
    ));
}

#[test]
fn email_lists_and_tricks() {
    let p = load("list c = [\"alice@example.com\", \"Bob <bob@Example.org>\"]\nallow mail.send when all to in @c\n");
    for (to, ok) in [
        (json!(["alice@example.com"]), true),
        (json!(["alice@EXAMPLE.COM"]), true),
        (json!(["Alice Smith <alice@example.com>"]), true),
        (json!(["bob@example.org"]), true),
        (json!(["Alice@example.com"]), false),
        (json!(["\"alice@example.com\" <eve@evil.com>"]), false),
        (json!(["alice@example.com <eve@evil.com>"]), false),
        (json!(["alice@example.com, eve@evil.com"]), false),
        (json!(["alice@example.com\r\nBcc: eve@evil.com"]), false),
        (json!(["alice@example.com", "eve@evil.com"]), false),
        (json!(["eve@evil.com <alice@example.com>"]), true),
    ] {
        assert_eq!(
            allowed(&p, "mail.send", json!({"to": to.clone()})),
            ok,
            "{to}"
        );
    }
}

#[test]
fn roles_from_catalog_apply_to_equality() {
    let p = load_cat("allow fs.read when path == \"/workspace/a\"\nallow net.connect when host == \"Example.com\" and port == 443\n");
    assert!(allowed(&p, "fs.read", json!({"path": "/workspace/x/../a"})));
    assert!(allowed(&p, "fs.read", json!({"path": "a"})));
    assert!(allowed(
        &p,
        "net.connect",
        json!({"host": "EXAMPLE.com.", "port": 443})
    ));
}

#[test]
fn invariants_in_order() {
    let c = catalog();
    let p = Policy::from_source("default allow\n", "/etc/p.rules", None, Some(&c))
        .unwrap()
        .policy;
    let d = p.decide(&Call::new("nope.tool", json!({})));
    assert_eq!((d.verdict, d.by), (Verdict::Deny, DecidedBy::Invariant));
    assert!(d.reason.contains("unknown tool"));
    let d = p.decide(&Call::new("fs.read", json!({"path": "/x", "extra": 1})));
    assert_eq!(d.by, DecidedBy::Invariant);
    assert!(
        d.reason
            .contains("invalid arguments: unknown argument `extra`"),
        "{}",
        d.reason
    );
    let d = p.decide(&Call::new("fs.read", json!({"path": 5})));
    assert!(d.reason.contains("`path` must be a string"), "{}", d.reason);
    let d = p.decide(&Call::new("fs.read", json!({})));
    assert!(d.reason.contains("missing required argument `path`"));
    let d = p.decide(&Call::new("BAD", json!({})));
    assert_eq!(d.by, DecidedBy::Invariant);
}

#[test]
fn protected_paths() {
    let c = catalog();
    let mut p = Policy::from_source("allow fs.*\n", "p.rules", None, Some(&c))
        .unwrap()
        .policy;
    p.add_protected_path("/workspace/.ironvmm");
    p.add_protected_path("/workspace/p.rules");
    for path in [
        "/workspace/p.rules",
        "p.rules",
        "/workspace/x/../p.rules",
        "/workspace/.ironvmm/secret",
        "//workspace/.ironvmm",
    ] {
        let d = p.decide(&Call::new("fs.read", json!({"path": path})));
        assert_eq!(
            (d.verdict, d.by),
            (Verdict::Deny, DecidedBy::Invariant),
            "{path}"
        );
        assert!(d.reason.contains("protected path"));
    }
    let d = p.decide(&Call::new(
        "fs.move",
        json!({"from": "/workspace/a", "to": "/workspace/p.rules"}),
    ));
    assert_eq!(d.by, DecidedBy::Invariant);
    assert!(allowed(
        &p,
        "fs.read",
        json!({"path": "/workspace/p.rules2"})
    ));
    let d = p.decide(&Call::new("fs.read", json!({"path": "/../x"})));
    assert_eq!(d.by, DecidedBy::Invariant);
}

#[test]
fn policy_file_and_lists_are_protected() {
    let dir = tempdir();
    std::fs::write(
        dir.join("p.rules"),
        "list l = file \"l.txt\"\nallow fs.* when path in @l or path under \"/\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("l.txt"), "x\n").unwrap();
    let p = Policy::load(&dir.join("p.rules"), None).unwrap().policy;
    for f in ["p.rules", "l.txt"] {
        let path = dir.join(f).display().to_string();
        let d = p.decide(&Call::new("fs.write", json!({"path": path})));
        assert_eq!(d.by, DecidedBy::Invariant, "{f}");
    }
}

#[test]
fn wrong_types_and_missing_args_are_false_not_errors() {
    let p = load("deny a.b when x == \"1\"\nallow a.b when not x == \"1\"\n");
    assert!(allowed(&p, "a.b", json!({"x": 1})));
    assert!(allowed(&p, "a.b", json!({})));
    assert!(allowed(&p, "a.b", json!({"x": {"y": 1}})));
}

#[test]
fn huge_strings_and_deep_json() {
    let p = load("allow a.b when s regex \"(a|aa)*b\" and t under \"/w\"\n");
    let s = "a".repeat(10 << 20);
    let t0 = std::time::Instant::now();
    assert!(!allowed(&p, "a.b", json!({"s": s, "t": "/w/x"})));
    let t = format!("/w/{}", "x/".repeat(5 << 20));
    assert!(!allowed(&p, "a.b", json!({"s": "a", "t": t})));
    assert!(t0.elapsed().as_secs() < 10, "linear time on 10 MB");
    // 10,000 levels deep, built by hand (serde_json's parser stops at 128). Clone
    // and drop of such a value recurse in serde_json, so the test moves it and
    // leaks it; the engine itself must neither recurse on it nor copy it.
    fn deep() -> Value {
        let mut v = json!("leaf");
        for _ in 0..10_000 {
            let mut m = serde_json::Map::new();
            m.insert("s".into(), v);
            v = Value::Object(m);
        }
        v
    }
    let c = catalog();
    let q = Policy::from_source(
        "allow fs.read when path under \"/workspace\"\n",
        "t",
        None,
        Some(&c),
    )
    .unwrap()
    .policy;
    let mut args = serde_json::Map::new();
    args.insert("path".into(), json!("/workspace/a"));
    args.insert("x".into(), deep());
    let call = Call::new("fs.read", Value::Object(args));
    let d = q.decide(&call);
    assert_eq!(d.by, DecidedBy::Invariant);
    std::mem::forget(call);
    let call = Call::new("a.b", deep());
    let d = load("allow a.b when s.s.s == \"x\" or exists s.s.s.s\n").decide(&call);
    assert_eq!(d.verdict, Verdict::Allow);
    std::mem::forget(call);
}

#[test]
fn exponential_backtracking_regex_is_linear() {
    let p = load("allow a.b when s regex \"(a+)+$\" and s matches \"*a*a*a*a*a*a*a*a*b\"\n");
    let s = format!("{}!", "a".repeat(100_000));
    let t0 = std::time::Instant::now();
    assert!(!allowed(&p, "a.b", json!({ "s": s })));
    assert!(t0.elapsed().as_secs() < 5);
}

// ---- diagnostics ----

#[test]
fn every_error_in_one_pass_with_position_and_caret() {
    let src = "alow mail.read\nallow Mail.send\nallow a.b when x ==\nallow a.b when x in @nope\nallow a.b \"r\" extra\n";
    let e = errors(src, None);
    for needle in [
        "t.rules:1:1",
        "t.rules:2:7",
        "t.rules:3:20",
        "t.rules:4:21",
        "t.rules:5:15",
        "unknown list `@nope`",
        "expected a tool pattern",
        "expected a value",
    ] {
        assert!(e.contains(needle), "missing {needle} in\n{e}");
    }
    assert!(e.contains("1 | alow mail.read\n  | ^^^^"), "{e}");
}

#[test]
fn warnings_shadowed_unmatched_unused() {
    let c = catalog();
    let w = warnings(
        "list unused = [\"x\"]\nallow mail.*\ndeny mail.send\nallow mail.sendd\n",
        Some(&c),
    );
    assert!(
        w.contains("list `unused` is declared but never used"),
        "{w}"
    );
    assert!(
        w.contains("this rule can never match: the rule on line 2"),
        "{w}"
    );
    assert!(
        w.contains("`mail.sendd` matches no tool of the catalog"),
        "{w}"
    );
}

// ---- learned rules ----

#[test]
fn learned_rules_refine_their_ask() {
    let src = "deny mail.send when any to in [\"boss@x.com\"]\nask mail.send \"ask me\"\n";
    let learned = "# seq 7, refines line 2\nallow mail.send when all to in [\"carol@x.com\"] \"carol is fine\"\n";
    let s = ironvmm_policy::Sources {
        policy: src,
        name: "p.rules",
        base_dir: None,
        learned: Some((learned, "p.rules.learned")),
    };
    let p = Policy::from_sources(&s, None).unwrap().policy;
    let d = p.decide(&Call::new("mail.send", json!({"to": ["carol@x.com"]})));
    assert_eq!(
        (d.verdict, d.by, d.rule),
        (Verdict::Allow, DecidedBy::Learned, Some(2))
    );
    let d = p.decide(&Call::new(
        "mail.send",
        json!({"to": ["carol@x.com", "boss@x.com"]}),
    ));
    assert_eq!(
        (d.verdict, d.by),
        (Verdict::Deny, DecidedBy::Rule),
        "earlier rules still win"
    );
    let d = p.decide(&Call::new("mail.send", json!({"to": ["dave@x.com"]})));
    assert_eq!(d.verdict, Verdict::Ask);

    let bad = "# seq 7, refines line 1\nallow mail.send\n";
    let s = ironvmm_policy::Sources {
        policy: src,
        name: "p.rules",
        base_dir: None,
        learned: Some((bad, "l")),
    };
    assert!(Policy::from_sources(&s, None)
        .unwrap_err()
        .to_string()
        .contains("not an `ask` rule"));
    let bad = "allow mail.send\n";
    let s = ironvmm_policy::Sources {
        policy: src,
        name: "p.rules",
        base_dir: None,
        learned: Some((bad, "l")),
    };
    assert!(Policy::from_sources(&s, None)
        .unwrap_err()
        .to_string()
        .contains("# seq N, refines line L"));
}

#[test]
fn a_learned_rule_its_ask_does_not_cover_is_refused() {
    // Line 1 asks for mail.send only; an answer may not widen it to mail.* or fs.read.
    let src = "ask mail.send \"ask me\"\ndefault deny\n";
    for (learned, pattern) in [
        ("# seq 3, refines line 1\nallow mail.*\n", "mail.*"),
        ("# seq 3, refines line 1\nallow fs.read\n", "fs.read"),
    ] {
        let s = ironvmm_policy::Sources {
            policy: src,
            name: "p.rules",
            base_dir: None,
            learned: Some((learned, "p.rules.learned")),
        };
        let err = Policy::from_sources(&s, None).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "`{pattern}` is not covered by the rule it refines (line 1: `mail.send`)"
            )),
            "{err}"
        );
        assert!(err.contains("p.rules.learned:2"), "{err}");
    }
    // What the ask covers loads.
    let s = ironvmm_policy::Sources {
        policy: src,
        name: "p.rules",
        base_dir: None,
        learned: Some(("# seq 3, refines line 1\nallow mail.send\n", "l")),
    };
    assert!(Policy::from_sources(&s, None).is_ok());
}

#[test]
fn explain_names_the_failing_part() {
    let p = load("list c = [\"a@b.com\"]\nallow mail.send when all to in @c and not exists cc\nask mail.send\nallow fs.read\n");
    let e = p
        .explain(&Call::new("mail.send", json!({"to": ["x@y.com"]})), None)
        .to_string();
    assert!(
        e.contains(
            "no match: `all to in @c` is false (`to` is [\"x@y.com\"]): \"x@y.com\" is not in @c"
        ),
        "{e}"
    );
    assert!(e.contains("line 3: ask mail.send\n    MATCHED"), "{e}");
    assert!(
        e.contains("line 4: allow fs.read  (skipped: the tool pattern does not match)"),
        "{e}"
    );
    assert!(e.contains("decision: ask (by rule line 3)"), "{e}");
}

#[test]
fn may_allow_or_ask_for_tools_list() {
    let p = load("deny mail.*\nallow fs.read\n");
    assert!(!p.may_allow_or_ask("mail.send"));
    assert!(p.may_allow_or_ask("fs.read"));
    assert!(!p.may_allow_or_ask("fs.write"));
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "ironvmm-policy-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    let _ = Path::new(&d);
    d
}

#[test]
fn move_decides_both_ends_through_the_path_alias() {
    let p = load_cat("allow fs.* when path under \"/workspace/scratch\"\nask fs.move\n");
    assert!(allowed(
        &p,
        "fs.move",
        json!({"from": "/workspace/scratch/a", "to": "/workspace/scratch/b"})
    ));
    assert_eq!(
        v(
            &p,
            "fs.move",
            json!({"from": "/workspace/scratch/a", "to": "/workspace/keep"})
        ),
        Verdict::Ask
    );
    assert_eq!(
        v(
            &p,
            "fs.move",
            json!({"from": "/workspace/keep", "to": "/workspace/scratch/b"})
        ),
        Verdict::Ask
    );
    let p =
        load_cat("allow fs.move when from under \"/workspace\" and to under \"/workspace/out\"\n");
    assert!(allowed(
        &p,
        "fs.move",
        json!({"from": "/workspace/a", "to": "/workspace/out/a"})
    ));
}

// ---- issue 10, item 1: tree arguments (moves and deletes act on whole trees) ----

/// The attack: `.git` moved aside, a hook written, the folder moved back. Each call
/// used to be allowed, since no single path named `.git/hooks`.
#[test]
fn moving_an_ancestor_of_a_denied_folder_is_denied() {
    let p = load_cat(
        "deny fs.* when path under \"/workspace/.git\"\n\
         allow fs.* when path under \"/workspace\"\n",
    );
    for (from, to) in [
        ("/workspace/.git", "/workspace/g"),
        ("/workspace/g", "/workspace/.git"),
        ("/workspace/proj/..", "/workspace/x"),
    ] {
        let d = p.decide(&Call::new("fs.move", json!({"from": from, "to": to})));
        assert_eq!(d.verdict, Verdict::Deny, "{from} -> {to}");
    }
    // Moving an ancestor: the deny covers /workspace/.git, which lies under it.
    let p = load_cat(
        "deny fs.* when path under \"/workspace/proj/.git\"\n\
         allow fs.* when path under \"/workspace\"\n",
    );
    assert_eq!(
        v(
            &p,
            "fs.move",
            json!({"from": "/workspace/proj", "to": "/workspace/p2"})
        ),
        Verdict::Deny
    );
    assert_eq!(
        v(&p, "fs.delete", json!({"path": "/workspace/proj"})),
        Verdict::Deny
    );
    // Not an ancestor, not a descendant: allowed as before.
    assert!(allowed(
        &p,
        "fs.move",
        json!({"from": "/workspace/proj/src", "to": "/workspace/proj/src2"})
    ));
    assert!(allowed(
        &p,
        "fs.delete",
        json!({"path": "/workspace/proj/.gitignore"})
    ));
    // A path argument that is not a tree keeps the literal meaning.
    assert!(allowed(&p, "fs.list", json!({"path": "/workspace/proj"})));
    assert!(allowed(
        &p,
        "fs.write",
        json!({"path": "/workspace/proj/a", "content": ""})
    ));
}

#[test]
fn ask_rules_overlap_allow_rules_stay_literal() {
    let p = load_cat(
        "ask fs.delete when path under \"/workspace/src\"\n\
         allow fs.delete when path under \"/workspace/src\"\n\
         allow fs.move when path under \"/workspace/out\"\n",
    );
    assert_eq!(
        v(&p, "fs.delete", json!({"path": "/workspace"})),
        Verdict::Ask
    );
    assert_eq!(
        v(&p, "fs.delete", json!({"path": "/workspace/src/a"})),
        Verdict::Ask
    );
    // Allow: literal, so moving /workspace (which contains out/) is not allowed by it.
    assert_eq!(
        v(
            &p,
            "fs.move",
            json!({"from": "/workspace", "to": "/workspace/out/w"})
        ),
        Verdict::Deny
    );
    assert!(allowed(
        &p,
        "fs.move",
        json!({"from": "/workspace/out/a", "to": "/workspace/out/b"})
    ));
}

/// Under `not`, overlap would make a deny match less: the literal meaning is kept
/// there, so `deny fs.delete when not path under X` still refuses an ancestor of X.
#[test]
fn negated_under_in_a_deny_fails_closed() {
    let p = load_cat(
        "deny fs.delete when not path under \"/workspace/out\"\n\
         allow fs.delete\n",
    );
    assert_eq!(
        v(&p, "fs.delete", json!({"path": "/workspace/a"})),
        Verdict::Deny
    );
    // /workspace contains /workspace/out: overlap would have said "under" and let it through.
    assert_eq!(
        v(&p, "fs.delete", json!({"path": "/workspace/"})),
        Verdict::Deny
    );
    assert!(allowed(
        &p,
        "fs.delete",
        json!({"path": "/workspace/out/x"})
    ));
}

#[test]
fn protected_paths_refuse_moving_or_deleting_a_folder_that_holds_them() {
    let mut p = load_cat("allow fs.* when path under \"/workspace\"\n");
    p.add_protected_path("/workspace/.ironvmm/p.rules");
    for (tool, args) in [
        (
            "fs.move",
            json!({"from": "/workspace/.ironvmm", "to": "/workspace/old"}),
        ),
        (
            "fs.move",
            json!({"from": "/workspace/x", "to": "/workspace/.ironvmm"}),
        ),
        ("fs.delete", json!({"path": "/workspace/.ironvmm"})),
    ] {
        let d = p.decide(&Call::new(tool, args.clone()));
        assert_eq!(
            (d.verdict, d.by),
            (Verdict::Deny, DecidedBy::Invariant),
            "{args}"
        );
        assert!(d.reason.contains("protected path"), "{}", d.reason);
    }
    // Listing the folder is not a tree operation: it stays allowed.
    assert!(allowed(
        &p,
        "fs.list",
        json!({"path": "/workspace/.ironvmm"})
    ));
    assert!(allowed(
        &p,
        "fs.delete",
        json!({"path": "/workspace/.ironvmm2"})
    ));
}

#[test]
fn check_warns_when_a_deny_is_bypassed_through_a_move() {
    let c = catalog();
    let w = warnings(
        "deny fs.write when path under \"/workspace/.git/hooks\"\n\
         allow fs.move when path under \"/workspace\"\n\
         allow fs.write when path under \"/workspace\"\n",
        Some(&c),
    );
    assert!(w.contains("bypasses this deny"), "{w}");
    assert!(w.contains("fs.move"), "{w}");
    // Denying the move too (before the allow) closes it: no warning.
    let w = warnings(
        "deny fs.write when path under \"/workspace/.git/hooks\"\n\
         deny fs.move when path under \"/workspace/.git\"\n\
         deny fs.delete when path under \"/workspace/.git\"\n\
         allow fs.move when path under \"/workspace\"\n\
         allow fs.delete when path under \"/workspace\"\n\
         allow fs.write when path under \"/workspace\"\n",
        Some(&c),
    );
    assert!(!w.contains("bypasses"), "{w}");
    // So does a deny on every fs tool.
    let w = warnings(
        "deny fs.* when path under \"/workspace/.git\"\n\
         allow fs.* when path under \"/workspace\"\n",
        Some(&c),
    );
    assert!(!w.contains("bypasses"), "{w}");
}
