//! The five ways a subtly wrong but plausible model got a compile to say more than
//! the English (each replayed from a scripted transcript in tests/transcripts/).
//! Each compile must end in a correct policy or in a non-zero exit whose report
//! names the disputed call.

mod support;

use std::path::Path;

use ironvmm_policy::{Call, Catalog, Policy, Verdict};
use ironvmm_policy_compiler::config::LlmSettings;
use ironvmm_policy_compiler::driver::{self, Common};
use serde_json::{json, Value};
use support::{inbox_inputs, ScriptedServer, TempDir};

/// Queues the answers of `tests/transcripts/NAME` (its first line is a note).
fn script(server: &ScriptedServer, name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/transcripts")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    for line in text.lines().skip(1) {
        let v: Value = serde_json::from_str(line).unwrap();
        server.answers(
            v["step"].as_str().unwrap(),
            &[v["answer"].as_str().unwrap()],
        );
    }
}

fn compile(dir: &TempDir, server: &ScriptedServer, accept: &[&str]) -> (u8, String) {
    let c = Common {
        constitution: dir.join("constitution.md"),
        out: dir.join("p.rules"),
        catalog: Some(dir.join("catalog.json")),
        lists: vec![("contacts".into(), dir.join("contacts.txt"))],
        llm: LlmSettings {
            retry_base_ms: Some(10),
            max_retries: Some(0),
            ..Default::default()
        },
        accept: accept.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let base = server.openai_base();
    let env = support::env(&[
        ("IRONVMM_LLM_BASE_URL", &base),
        ("IRONVMM_LLM_MODEL", "scripted"),
    ]);
    let mut err = Vec::new();
    let code = driver::run_compile(&c, &env, &mut err);
    (code, String::from_utf8(err).unwrap())
}

fn read(dir: &TempDir, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
}

/// How the written p.rules decides `call`, exactly as the gate will.
fn decide(dir: &TempDir, call: Value) -> Verdict {
    let catalog = Catalog::from_json(&read(dir, "catalog.json")).unwrap();
    let loaded = Policy::load(&dir.join("p.rules"), Some(&catalog))
        .unwrap_or_else(|d| panic!("p.rules does not load:\n{d}"));
    loaded
        .policy
        .decide(&Call::from_json(&call).unwrap())
        .verdict
}

fn send(to: &[&str], cc: &[&str], bcc: &[&str]) -> Value {
    json!({"tool": "mail.send", "args": {"to": to, "cc": cc, "bcc": bcc, "subject": "s", "body": "b"}})
}

const ALICE: &str = "alice@example.com";
const MALLORY: &str = "mallory@evil.example";

/// The rules say what the English says about strangers: ask, wherever they hide.
fn strangers_are_asked_about(dir: &TempDir) {
    assert_eq!(decide(dir, send(&[ALICE], &[], &[])), Verdict::Allow);
    for call in [
        send(&[MALLORY], &[], &[]),
        send(&[ALICE], &[MALLORY], &[]),
        send(&[ALICE], &[], &[MALLORY]),
    ] {
        assert_eq!(decide(dir, call.clone()), Verdict::Ask, "{call}");
    }
}

#[test]
fn case1_a_judge_that_widens_a_scenario_is_overruled_and_the_rule_repaired() {
    let dir = TempDir::new("case1a");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case1-judge-widens.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    let report = read(&dir, "p.report.md");
    assert_eq!(code, 0, "{err}\n{report}");
    assert_eq!(
        server.steps(),
        ["lists", "draft", "scenarios", "judge", "repair"]
    );
    // The repair was told to follow the scenarios, not the judge.
    let repair = server.requests()[4].last_user();
    assert!(
        repair.contains(
            "the compiler keeps the scenario's reading: the rules must decide this call ask"
        ),
        "{repair}"
    );
    strangers_are_asked_about(&dir);
    // The scenarios keep their English-only reading.
    let scen = read(&dir, "p.scenarios.jsonl");
    assert!(
        !scen
            .lines()
            .any(|l| l.contains(MALLORY) && l.contains("\"allow\"")),
        "{scen}"
    );
    assert!(
        report.contains("the judge would have read scenario s9 (S3) as allow rather than ask"),
        "{report}"
    );
}

#[test]
fn case1_a_judge_that_rewrites_a_call_is_overruled() {
    let dir = TempDir::new("case1b");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case1-judge-rewrites-call.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    assert!(server.steps().contains(&"repair".to_string()));
    strangers_are_asked_about(&dir);
    // The calls the judge wanted gone are still tested.
    let scen = read(&dir, "p.scenarios.jsonl");
    assert!(
        scen.contains(r#""cc":["mallory@evil.example"]"#)
            && scen.contains(r#""bcc":["mallory@evil.example"]"#),
        "{scen}"
    );
    let verify: Value = serde_json::from_str(&read(&dir, "p.compile/verify.json")).unwrap();
    assert_eq!(verify["held"][0]["id"], "s9");
    assert!(verify["held"][0]["proposed_call"].is_object());
}

#[test]
fn case1_a_widening_the_rules_do_not_follow_is_held_for_the_owner_until_accepted() {
    let dir = TempDir::new("case1c");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case1-held-for-owner.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("HELD for the owner") && err.contains("s6"),
        "{err}"
    );
    assert!(server.unused().is_empty(), "{:?}", server.unused());
    assert!(!dir.join("p.rules").exists());
    let report = read(&dir, "p.report.unverified.md");
    assert!(report.contains("**HELD FOR THE OWNER.**"), "{report}");
    // The call, both readings and the sentence.
    assert!(
        report.contains(
            "- **s6** (S2: \"It may send email to people in my contacts without asking.\")"
        ),
        "{report}"
    );
    assert!(report.contains("Bob <bob@EXAMPLE.org>"), "{report}");
    assert!(
        report.contains("the scenario, written from the English: **ask**"),
        "{report}"
    );
    assert!(report.contains("the judge: **allow**"), "{report}");
    assert!(report.contains("`--accept s6` applies"), "{report}");

    // The owner agrees with the judge: replayed from the cache, no model asked.
    let silent = ScriptedServer::start();
    let (code, err) = compile(&dir, &silent, &["s6"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(silent.connections(), 0);
    let report = read(&dir, "p.report.md");
    assert!(
        report.contains("scenario s6 (S2) was judged wrong and corrected (it gives the agent more: applied because you passed `--accept`): expect ask → allow"),
        "{report}"
    );
    assert!(!dir.join("p.report.unverified.md").exists());
    strangers_are_asked_about(&dir);
}

#[test]
fn case2_default_allow_that_no_sentence_grants_is_repaired() {
    let dir = TempDir::new("case2");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case2-default-allow.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    assert_eq!(server.steps(), ["lists", "draft", "draft", "scenarios"]);
    let fb = server.requests()[2].last_user();
    assert!(
        fb.contains(
            "\"default\": \"allow\" lets through every call no rule names; no sentence grants that"
        ),
        "{fb}"
    );
    assert!(read(&dir, "p.rules").ends_with("default deny\n"));
    assert_eq!(
        decide(&dir, json!({"tool": "mail.delete", "args": {"id": "m-1"}})),
        Verdict::Deny
    );
}

#[test]
fn case3_the_owners_list_wins_over_a_proposed_one() {
    let dir = TempDir::new("case3");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case3-owner-list-dropped.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    let report = read(&dir, "p.report.md");
    assert_eq!(code, 0, "{err}\n{report}");
    assert_eq!(server.steps(), ["lists", "lists", "draft", "scenarios"]);
    let fb = server.requests()[1].last_user();
    assert!(fb.contains("the owner's list always wins"), "{fb}");
    assert!(read(&dir, "p.rules").contains("list contacts = file \"contacts.txt\""));
    assert!(!dir.join("p.contacts.list").exists());
    assert_eq!(
        decide(&dir, send(&["eve@evil.example"], &[], &[])),
        Verdict::Ask
    );
    // Every list: its source and size.
    assert!(
        report.contains("- `@contacts` (email list, S2): `contacts.txt`, 3 entries, the owner's file for the mail service"),
        "{report}"
    );
}

#[test]
fn case4_a_sentence_declared_to_state_no_policy_is_read_again() {
    let dir = TempDir::new("case4");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case4-coverage-claimed.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        server.steps(),
        ["lists", "draft", "scenarios", "scenarios", "recheck"]
    );
    assert!(server.requests()[3]
        .last_user()
        .contains("S1 has 1: write at least 3"));
    assert!(!dir.join("p.rules").exists());
    let report = read(&dir, "p.report.unverified.md");
    assert!(
        report.contains("3 sentence(s) declared to state no policy state policy on a second reading (S2, S3, S4)"),
        "{report}"
    );
    assert!(
        report.contains("**S3 was declared to state no policy** (\"a courtesy, not a rule\"), **but a second reading says it does**"),
        "{report}"
    );
    // Per-sentence counts, the second reading's scenarios included.
    assert!(report.contains("- S1: 3 written, 0 derived"), "{report}");
    assert!(report.contains("- S3: 5 written, "), "{report}");
}

#[test]
fn case5_a_blind_spot_in_bcc_is_found_with_no_scenario_about_bcc() {
    let dir = TempDir::new("case5");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    script(&server, "case5-bcc-blind-spot.jsonl");
    let (code, err) = compile(&dir, &server, &[]);
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    // No judge: a derived scenario's disagreement is the rules' fault by construction.
    assert_eq!(server.steps(), ["lists", "draft", "scenarios", "repair"]);
    let repair = server.requests()[3].last_user();
    assert!(
        repair.contains(
            "derived by the compiler from s8: \"mallory@evil.example\" moved from `to` to `bcc`"
        ),
        "{repair}"
    );
    assert!(read(&dir, "p.rules").contains("(not exists bcc or all bcc in @contacts)"));
    strangers_are_asked_about(&dir);
    let written = read(&dir, "p.compile/scenarios.jsonl");
    assert!(
        !written.contains("\"bcc\""),
        "the model wrote a bcc scenario after all"
    );
}
