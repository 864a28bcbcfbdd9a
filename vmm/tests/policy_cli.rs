//! `ironvmm policy ...` end to end: the built binary, its output and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn ironvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ironvmm-policy-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_example_passes_its_scenarios() {
    let dir = root().join("examples/policies");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rules") {
            let scen = p.with_extension("scenarios.jsonl");
            assert!(scen.exists(), "{} has no scenarios", p.display());
            // Against the example catalog and the one compiled into ironvmm alike.
            for catalog in ["examples/catalog.json", "builtin"] {
                let o = ironvmm(&[
                    "policy",
                    "test",
                    p.to_str().unwrap(),
                    scen.to_str().unwrap(),
                    "--catalog",
                    catalog,
                ]);
                assert_eq!(
                    o.status.code(),
                    Some(0),
                    "{} --catalog {catalog}\n{}{}",
                    p.display(),
                    stdout(&o),
                    stderr(&o)
                );
                let o = ironvmm(&["policy", "check", p.to_str().unwrap(), "--catalog", catalog]);
                assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
                assert!(stdout(&o).contains(", 0 warnings"), "{}", stdout(&o));
            }
            n += 1;
        }
    }
    assert!(n >= 3, "expected the three example policies, found {n}");
}

#[test]
fn check_exit_codes_and_diagnostics() {
    let d = tmp("check");
    let bad = d.join("bad.rules");
    std::fs::write(
        &bad,
        "allow mail.read\nalow mail.send\nallow fs.read when path under\n",
    )
    .unwrap();
    let o = ironvmm(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("bad.rules:2:1") && out.contains("bad.rules:3:30"),
        "{out}"
    );
    assert!(out.contains("2 | alow mail.send\n  | ^^^^"), "{out}");
    assert!(out.contains("2 errors"), "{out}");
    let warn = d.join("warn.rules");
    std::fs::write(&warn, "list x = [\"a\"]\nallow mail.*\nallow mail.send\n").unwrap();
    let o = ironvmm(&["policy", "check", warn.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("never used") && stdout(&o).contains("can never match"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn eval_prints_one_json_line_per_call() {
    let o = ironvmm(&[
        "policy",
        "eval",
        "examples/policies/inbox.rules",
        "--call",
        r#"{"tool":"mail.send","args":{"to":["eve@evil.com"],"subject":"s","body":"b"}}"#,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "{\"decision\":\"ask\",\"rule\":15,\"by\":\"rule\",\"reason\":\"not a contact: ask me first\"}\n"
    );
    let d = tmp("eval");
    let calls = d.join("calls.jsonl");
    std::fs::write(
        &calls,
        "{\"tool\":\"mail.read\",\"args\":{\"id\":\"1\"}}\n\n{\"tool\":\"x.y\",\"args\":{}}\n{\"tool\":\"nope\"}\n",
    )
    .unwrap();
    let o = ironvmm(&[
        "policy",
        "eval",
        "examples/policies/inbox.rules",
        "--calls",
        calls.to_str().unwrap(),
        "--catalog",
        "examples/catalog.json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[0]["rule"], 11);
    assert_eq!(lines[1]["by"], "invariant");
    assert_eq!(lines[2]["reason"], "unknown tool: malformed tool name");
}

#[test]
fn eval_malformed_input_exits_2() {
    for call in [
        "{",
        r#"{"tool":1}"#,
        r#"{"tool":"a.b","args":[]}"#,
        r#"{"tool":"a.b","extra":1}"#,
        r#"{"tool":"a.b","at":"yesterday"}"#,
    ] {
        let o = ironvmm(&[
            "policy",
            "eval",
            "examples/policies/inbox.rules",
            "--call",
            call,
        ]);
        assert_eq!(o.status.code(), Some(2), "{call}");
        assert!(stderr(&o).contains("--call"), "{}", stderr(&o));
    }
    let d = tmp("eval2");
    let bad = d.join("bad.rules");
    std::fs::write(&bad, "allow\n").unwrap();
    let o = ironvmm(&[
        "policy",
        "eval",
        bad.to_str().unwrap(),
        "--call",
        r#"{"tool":"a.b","args":{}}"#,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bad.rules:1:6"), "{}", stderr(&o));
    let o = ironvmm(&[
        "policy",
        "eval",
        "examples/policies/inbox.rules",
        "--catalog",
        "/nonexistent.json",
        "--call",
        r#"{"tool":"a.b"}"#,
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn eval_limit_uses_at_times() {
    let d = tmp("limit");
    let p = d.join("p.rules");
    std::fs::write(&p, "allow a.b limit 1 per minute\n").unwrap();
    let calls = d.join("c.jsonl");
    std::fs::write(
        &calls,
        "{\"tool\":\"a.b\",\"at\":\"2026-01-01T00:00:00Z\"}\n{\"tool\":\"a.b\",\"at\":\"2026-01-01T00:00:30Z\"}\n{\"tool\":\"a.b\",\"at\":\"2026-01-01T00:01:00Z\"}\n",
    )
    .unwrap();
    let o = ironvmm(&[
        "policy",
        "eval",
        p.to_str().unwrap(),
        "--calls",
        calls.to_str().unwrap(),
    ]);
    let v: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v[0]["decision"], "allow");
    assert_eq!(
        (
            v[1]["decision"].as_str(),
            v[1]["by"].as_str(),
            v[1]["rule"].as_u64()
        ),
        (Some("deny"), Some("limit"), Some(1))
    );
    assert_eq!(v[2]["decision"], "allow");
}

#[test]
fn test_reports_mismatches_and_exits_1() {
    let d = tmp("test");
    let s = d.join("s.jsonl");
    std::fs::write(&s, "{\"call\":{\"tool\":\"mail.purge\",\"args\":{\"id\":\"1\"}},\"expect\":\"allow\"}\n{\"call\":{\"tool\":\"mail.read\",\"args\":{\"id\":\"1\"}},\"expect\":\"allow\"}\n").unwrap();
    let o = ironvmm(&[
        "policy",
        "test",
        "examples/policies/inbox.rules",
        s.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("s.jsonl:1: expected allow, got deny (by rule, line 16): never delete anything permanently"), "{out}");
    assert!(out.contains("2 scenarios, 1 passed, 1 failed"), "{out}");
    std::fs::write(
        &s,
        "{\"call\":{\"tool\":\"mail.read\"},\"expect\":\"maybe\"}\n",
    )
    .unwrap();
    let o = ironvmm(&[
        "policy",
        "test",
        "examples/policies/inbox.rules",
        s.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn explain_shows_the_failing_part() {
    let o = ironvmm(&[
        "policy",
        "explain",
        "examples/policies/inbox.rules",
        "--catalog",
        "examples/catalog.json",
        "--call",
        r#"{"tool":"mail.send","args":{"to":["alice@example.com"],"cc":["x@y.z"],"subject":"s","body":"b"}}"#,
    ]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.contains("`not` of a true test: `exists cc` is true"),
        "{out}"
    );
    assert!(out.contains("decision: ask (by rule line 15)"), "{out}");
}

#[test]
fn fmt_is_canonical_and_idempotent() {
    let d = tmp("fmt");
    let p = d.join("p.rules");
    std::fs::write(&p, "allow x.y when a and \\\n  b\n").unwrap();
    let o = ironvmm(&["policy", "fmt", p.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "`a and b` has no tests: fmt refuses what does not parse"
    );
    std::fs::write(&p, "# top\n\n\nallow   mail.send when (a == \"1\" or b == \"2\") and not (c == \"3\")   limit 5 per hour \"r\" # trailing\n").unwrap();
    let o = ironvmm(&["policy", "fmt", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert_eq!(out, "# top\n\nallow mail.send when (a == \"1\" or b == \"2\") and not c == \"3\" limit 5 per hour \"r\"  # trailing\n");
    let o = ironvmm(&["policy", "fmt", "--check", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let o = ironvmm(&["policy", "fmt", "-w", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), out);
    let o = ironvmm(&["policy", "fmt", "--check", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    for ex in ["inbox", "coding", "ci"] {
        let o = ironvmm(&["policy", "fmt", &format!("examples/policies/{ex}.rules")]);
        assert_eq!(o.status.code(), Some(0), "{ex}");
    }
}

#[test]
fn learned_rules_list_use_and_remove() {
    let d = tmp("learned");
    let p = d.join("p.rules");
    std::fs::write(&p, "allow mail.read\nask mail.send \"ask me\"\n").unwrap();
    let l = d.join("p.rules.learned");
    std::fs::write(
        &l,
        "# Rules learned from answers.\n# seq 3, refines line 2\nallow mail.send when all to in [\"carol@x.com\"]\n# seq 9, refines line 2\ndeny mail.send when any to in [\"eve@x.com\"]\n",
    )
    .unwrap();
    let call = r#"{"tool":"mail.send","args":{"to":["carol@x.com"]}}"#;
    let o = ironvmm(&["policy", "eval", p.to_str().unwrap(), "--call", call]);
    assert!(
        stdout(&o).contains("\"ask\""),
        "learned rules are read only with --learned"
    );
    let o = ironvmm(&[
        "policy",
        "eval",
        p.to_str().unwrap(),
        "--learned",
        l.to_str().unwrap(),
        "--call",
        call,
    ]);
    assert_eq!(
        stdout(&o),
        "{\"decision\":\"allow\",\"rule\":3,\"by\":\"learned\",\"reason\":\"learned: allow mail.send when all to in [\\\"carol@x.com\\\"]\"}\n"
    );
    let o = ironvmm(&["policy", "learned", p.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("seq 3 (refines line 2") && stdout(&o).contains("2 learned rules"),
        "{}",
        stdout(&o)
    );
    let o = ironvmm(&["policy", "learned", p.to_str().unwrap(), "--remove", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = ironvmm(&[
        "policy",
        "eval",
        p.to_str().unwrap(),
        "--learned",
        l.to_str().unwrap(),
        "--call",
        call,
    ]);
    assert!(stdout(&o).contains("\"ask\""), "{}", stdout(&o));
    let o = ironvmm(&["policy", "learned", p.to_str().unwrap(), "--remove", "3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(std::fs::read_to_string(&l).unwrap().contains("seq 9"));
}

#[test]
fn builtin_catalog_is_the_compiled_in_services() {
    let dir =
        std::env::temp_dir().join(format!("ironvmm-policy-cli-builtin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("fs.rules");
    std::fs::write(
        &p,
        "version 1\nallow fs.read when path under \"/workspace\"\ndefault deny\n",
    )
    .unwrap();
    let o = ironvmm(&[
        "policy",
        "check",
        p.to_str().unwrap(),
        "--catalog",
        "builtin",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let o = ironvmm(&[
        "policy",
        "eval",
        p.to_str().unwrap(),
        "--catalog",
        "builtin",
        "--call",
        r#"{"tool":"files.read_file","args":{}}"#,
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("unknown tool"), "{}", stdout(&o));
}

#[test]
fn check_names_what_it_could_not_check_and_suggests_names() {
    let d = tmp("check-names");
    let p = d.join("p.rules");
    std::fs::write(
        &p,
        "allow mail.read\ndeny mail.purg\nallow mail.send when all tto in [\"a@b.c\"]\n",
    )
    .unwrap();
    // Without a catalog: loads, and says what was not checked.
    let o = ironvmm(&["policy", "check", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("no --catalog, so tool names and argument names were not checked")
            && stderr(&o).contains("--catalog builtin"),
        "{}",
        stderr(&o)
    );
    // With one: a misspelt tool or argument is an error, with "did you mean".
    let o = ironvmm(&[
        "policy",
        "check",
        p.to_str().unwrap(),
        "--catalog",
        "examples/catalog.json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("p.rules:2:6: error: unknown tool `mail.purg`: did you mean `mail.purge`?"),
        "{out}"
    );
    assert!(
        out.contains("p.rules:3:26: error: unknown argument `tto`: did you mean `to`?"),
        "{out}"
    );
    assert!(!stderr(&o).contains("no --catalog"), "{}", stderr(&o));
}

#[test]
fn fmt_check_prints_a_diff() {
    let d = tmp("fmt-diff");
    let p = d.join("p.rules");
    std::fs::write(&p, "allow   mail.read\ndeny mail.purge\n").unwrap();
    let o = ironvmm(&["policy", "fmt", "--check", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("-allow   mail.read\n+allow mail.read\n") && out.contains("(canonical)"),
        "{out}"
    );
}

#[test]
fn explain_names_the_value_that_failed() {
    let o = ironvmm(&[
        "policy",
        "explain",
        "examples/policies/inbox.rules",
        "--catalog",
        "examples/catalog.json",
        "--call",
        r#"{"tool":"mail.send","args":{"to":["alice@example.com","mallory@evil.example"],"subject":"s","body":"b"}}"#,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\"mallory@evil.example\" is not in @contacts"),
        "{}",
        stdout(&o)
    );
}

/// A reader that went away (`ironvmm ... | head`) ends the command quietly, as
/// ripgrep does: exit 0, nothing on stderr, no panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let policy = root().join("examples/policies/coding.rules");
    for args in [
        &["tools"][..],
        &["tools", "--json"],
        &["policy", "check", policy.to_str().unwrap()],
        &["policy", "fmt", policy.to_str().unwrap()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // every write to the pipe now fails with EPIPE
        let o = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
            .args(args)
            .current_dir(root())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

#[test]
fn compile_replays_the_committed_inbox_cache_offline() {
    let d = tmp("compile-offline");
    let inbox = root().join("examples/inbox");
    for f in ["constitution.md", "catalog.json", "contacts.txt"] {
        std::fs::copy(inbox.join(f), d.join(f)).unwrap();
    }
    let cache = inbox.join("p.compile/cache");
    let args = |out: &str| {
        vec![
            "policy".to_string(),
            "compile".into(),
            d.join("constitution.md").display().to_string(),
            "--catalog".into(),
            d.join("catalog.json").display().to_string(),
            "--list".into(),
            format!("contacts={}", d.join("contacts.txt").display()),
            "--offline".into(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "-o".into(),
            d.join(out).display().to_string(),
        ]
    };
    // No model configured: the error names the one the cache holds.
    let o = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args("p.rules"))
        .env_remove("IRONVMM_LLM_MODEL")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pass --model recorded-transcript"),
        "{}",
        stderr(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args("p.rules"))
        .env("IRONVMM_LLM_MODEL", "recorded-transcript")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for f in ["p.rules", "p.scenarios.jsonl", "p.report.md"] {
        assert_eq!(
            std::fs::read_to_string(d.join(f)).unwrap(),
            std::fs::read_to_string(inbox.join(f)).unwrap(),
            "{f}"
        );
    }
}
