//! The compiler end to end, against a real HTTP server on loopback that speaks both
//! chat APIs and replays scripted answers, with the real policy engine.

mod support;

use std::path::Path;
use std::time::Duration;

use ironvmm_policy::{Call, Catalog, Policy};
use ironvmm_policy_compiler::config::LlmSettings;
use ironvmm_policy_compiler::driver::{self, Common};
use serde_json::Value;
use support::inbox;
use support::{inbox_inputs, Reply, ScriptedServer, TempDir};

const KEY: &str = "sk-test-key-never-logged-1234";

/// Runs `ironvmm policy compile` on the inbox inputs copied into `dir`.
fn compile(
    dir: &TempDir,
    server: &ScriptedServer,
    provider: &str,
    extra: impl FnOnce(&mut Common),
) -> (u8, String) {
    let mut c = Common {
        constitution: dir.join("constitution.md"),
        out: dir.join("p.rules"),
        catalog: Some(dir.join("catalog.json")),
        lists: vec![("contacts".into(), dir.join("contacts.txt"))],
        llm: LlmSettings {
            retry_base_ms: Some(10),
            retry_max_ms: Some(50),
            timeout_secs: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    extra(&mut c);
    let base = if provider == "anthropic" {
        server.anthropic_base()
    } else {
        server.openai_base()
    };
    let key_var = if provider == "anthropic" {
        "ANTHROPIC_API_KEY"
    } else {
        "OPENAI_API_KEY"
    };
    let env = support::env(&[
        ("IRONVMM_LLM_PROVIDER", provider),
        ("IRONVMM_LLM_BASE_URL", &base),
        ("IRONVMM_LLM_MODEL", "test-model"),
        (key_var, KEY),
    ]);
    let mut err = Vec::new();
    let code = driver::run_compile(&c, &env, &mut err);
    (code, String::from_utf8(err).unwrap())
}

/// What `ironvmm policy test p.rules p.scenarios.jsonl` does, with the engine's API:
/// every scenario decided as expected. Returns the mismatches.
fn policy_test(dir: &Path) -> Vec<String> {
    let catalog =
        Catalog::from_json(&std::fs::read_to_string(dir.join("catalog.json")).unwrap()).unwrap();
    let loaded = Policy::load(&dir.join("p.rules"), Some(&catalog))
        .unwrap_or_else(|d| panic!("p.rules does not load:\n{d}"));
    let text = std::fs::read_to_string(dir.join("p.scenarios.jsonl")).unwrap();
    let mut bad = Vec::new();
    let mut n = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let d = loaded.policy.decide(&Call::from_json(&v["call"]).unwrap());
        n += 1;
        if d.verdict.as_str() != v["expect"].as_str().unwrap() {
            bad.push(format!("{line} -> {}", d.verdict));
        }
    }
    assert!(n > 0, "no scenarios");
    bad
}

fn read(dir: &TempDir, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
}

fn clean_script(server: &ScriptedServer) {
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
}

#[test]
fn clean_compile_of_the_inbox_constitution_then_a_byte_identical_offline_replay() {
    let dir = TempDir::new("clean");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    clean_script(&server);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    assert_eq!(server.steps(), ["lists", "draft", "scenarios"]);
    assert!(server.unused().is_empty());
    // The OpenAI-compatible API, temperature 0, the key in the header only.
    for r in server.requests() {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.headers["authorization"], format!("Bearer {KEY}"));
        assert_eq!(r.body["temperature"], 0.0);
        assert_eq!(r.body["model"], "test-model");
        // Schema-constrained JSON where the server supports it.
        assert_eq!(r.body["response_format"]["type"], "json_schema");
        assert_eq!(
            r.body["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
    }
    // Scenarios are written from the English alone: the draft is never shown.
    let scen = &server.requests()[2];
    assert!(
        !scen.all_user().contains("allow mail.read"),
        "the scenario prompt leaked the rules"
    );
    assert!(
        !scen.body.to_string().contains("@contacts and"),
        "the scenario prompt leaked the rules"
    );

    let rules = read(&dir, "p.rules");
    let sha = |s: &str| ironvmm_policy_compiler::cache::sha256_hex(s.as_bytes());
    assert!(rules.contains(&format!(
        "# constitution-sha256: {}",
        sha(&read(&dir, "constitution.md"))
    )));
    assert!(rules.contains(&format!(
        "# catalog-sha256: {}",
        sha(&read(&dir, "catalog.json"))
    )));
    assert!(rules.contains("# model: openai:test-model"));
    assert!(rules.contains("# prompt-version: ironvmm-compile/"));
    assert!(rules.contains("list contacts = file \"contacts.txt\""));
    // A comment quoting the sentence sits above every rule.
    let lines: Vec<&str> = rules.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("allow ") || l.starts_with("ask ") || l.starts_with("deny ") {
            assert!(
                lines[i - 1].starts_with("# S"),
                "no source comment above {l:?}"
            );
        }
    }
    assert!(rules.contains(
        "# S4: \"It may move mail to Trash, but never delete anything permanently.\"\ndeny mail.purge"
    ));
    assert!(
        policy_test(dir.path()).is_empty(),
        "{:?}",
        policy_test(dir.path())
    );
    let report = read(&dir, "p.report.md");
    assert!(
        report.contains("**VERIFIED.** All 83 scenarios pass on the compiled rules (15 written from the English, 68 derived"),
        "{report}"
    );
    assert!(report.contains("covers listing and searching"), "{report}");
    for f in [
        "catalog.json",
        "sentences.txt",
        "lists.json",
        "draft.json",
        "draft.rules",
        "scenarios.jsonl",
        "verify.json",
        "llm-exchanges.jsonl",
    ] {
        assert!(
            dir.join("p.compile").join(f).exists(),
            "missing artifact {f}"
        );
    }
    // The exchange log holds every exchange and never the key.
    let log = read(&dir, "p.compile/llm-exchanges.jsonl");
    assert_eq!(log.lines().count(), 3);
    assert!(!log.contains(KEY));
    assert!(!rules.contains(KEY) && !report.contains(KEY));

    // Second run: same bytes, no request at all (not even a connection).
    let before = (rules, read(&dir, "p.scenarios.jsonl"), report);
    let silent = ScriptedServer::start();
    let (code, err) = compile(&dir, &silent, "openai", |c| c.offline = true);
    assert_eq!(code, 0, "{err}");
    assert_eq!(silent.count(), 0);
    assert_eq!(silent.connections(), 0);
    assert!(
        err.contains("3 answer(s) from the cache, 0 exchange(s) over HTTP"),
        "{err}"
    );
    assert_eq!(
        before,
        (
            read(&dir, "p.rules"),
            read(&dir, "p.scenarios.jsonl"),
            read(&dir, "p.report.md")
        )
    );
    // And online, the cache still answers first.
    let (code, _) = compile(&dir, &silent, "openai", |_| {});
    assert_eq!((code, silent.connections()), (0, 0));
    assert_eq!(before.0, read(&dir, "p.rules"));
}

#[test]
fn offline_with_an_empty_cache_fails_clearly() {
    let dir = TempDir::new("offline");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    let (code, err) = compile(&dir, &server, "openai", |c| c.offline = true);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--offline: no cached answer for step 'lists'"),
        "{err}"
    );
    assert!(
        err.contains("the cache holds no earlier compile: run once without --offline"),
        "{err}"
    );
    assert_eq!(server.connections(), 0);
    assert!(!dir.join("p.rules").exists());
    assert!(read(&dir, "p.report.unverified.md").contains("**FAILED** at step `lists`"));
}

#[test]
fn a_draft_with_syntax_errors_is_repaired_from_the_engines_diagnostics() {
    let dir = TempDir::new("syntax");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server
        .answers("lists", &[&inbox::lists()])
        .answers(
            "draft",
            &[&inbox::syntax_error_draft(), &inbox::good_draft()],
        )
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}");
    let reqs = server.requests();
    let repair = reqs
        .iter()
        .filter(|r| r.step == "draft")
        .nth(1)
        .expect("a repair request");
    let fb = repair.last_user();
    // The engine's own diagnostics go back: file:line:col, the line, a caret.
    assert!(fb.contains("The policy engine rejected"), "{fb}");
    assert!(fb.contains("p.rules:"), "{fb}");
    assert!(fb.contains('^'), "{fb}");
    assert!(fb.contains("(not exists cc or all cc in @contacts"), "{fb}");
    // The whole conversation is sent: the rejected answer is in it.
    assert_eq!(repair.body["messages"].as_array().unwrap().len(), 4);
    assert!(read(&dir, "p.report.md").contains("draft: 2 tries"));
    assert!(policy_test(dir.path()).is_empty());
}

#[test]
fn a_rule_that_contradicts_a_scenario_is_repaired_over_the_anthropic_api() {
    let dir = TempDir::new("rulefix");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::no_bcc_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()])
        .answers(
            "judge",
            &[&inbox::judge(&[(
                "s10",
                "rule",
                None,
                "S3: anyone not a contact, bcc included, needs asking",
            )])],
        )
        .answers("repair", &[&inbox::good_draft()]);
    let (code, err) = compile(&dir, &server, "anthropic", |_| {});
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    assert_eq!(
        server.steps(),
        ["lists", "draft", "scenarios", "judge", "repair"]
    );
    for r in server.requests() {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.headers["x-api-key"], KEY);
        assert_eq!(r.headers["anthropic-version"], "2023-06-01");
        assert!(r.body["system"]
            .as_str()
            .unwrap()
            .starts_with("ironvmm policy compiler, step: "));
        assert_eq!(r.body["temperature"], 0.0);
        // The answer comes as a tool's input, constrained by the step's schema.
        assert_eq!(r.body["tool_choice"]["name"], "answer");
        assert_eq!(r.body["tools"][0]["input_schema"]["type"], "object");
    }
    let judge = &server.requests()[3];
    let u = judge.last_user();
    assert!(
        u.contains("s10 (for S3)") && u.contains("expects ask") && u.contains("decide allow"),
        "{u}"
    );
    let repair = server.requests()[4].last_user();
    assert!(
        repair.contains("bcc included"),
        "the judge's reason reaches the repair: {repair}"
    );
    assert!(read(&dir, "p.rules").contains("(not exists bcc or all bcc in @contacts)"));
    assert!(read(&dir, "p.report.md").contains("redrafted in verification round 1"));
    assert!(policy_test(dir.path()).is_empty());
    let verify: Value = serde_json::from_str(&read(&dir, "p.compile/verify.json")).unwrap();
    assert_eq!(verify["rounds"][0]["disagreements"][0]["id"], "s10");
    assert_eq!(verify["rounds"][0]["rules_repaired"], true);
}

#[test]
fn a_wrong_scenario_is_corrected_and_reported_for_review() {
    let dir = TempDir::new("scenfix");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &[&inbox::wrong_purge_scenarios()])
        .answers(
            "judge",
            &[&inbox::judge(&[(
                "s12",
                "scenario",
                Some("deny"),
                "S4 forbids permanent deletion, from Trash too",
            )])],
        );
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}");
    let scen = read(&dir, "p.scenarios.jsonl");
    assert!(
        scen.contains(
            r#"{"call":{"tool":"mail.purge","args":{"id":"Trash/m-1001"}},"expect":"deny"}"#
        ),
        "{scen}"
    );
    let report = read(&dir, "p.report.md");
    assert!(
        report.contains("scenario s12 (S4) was judged wrong and corrected: expect allow → deny"),
        "{report}"
    );
    // The scenarios as first written stay in the artifacts.
    assert!(read(&dir, "p.compile/scenarios.jsonl").contains("purging it only empties the Trash"));
    assert!(policy_test(dir.path()).is_empty());
}

#[test]
fn a_repair_loop_that_cannot_agree_gives_up_with_a_useful_report() {
    let dir = TempDir::new("giveup");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    let blame = inbox::judge(&[("s10", "rule", None, "bcc must be checked")]);
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::no_bcc_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()])
        .answers("judge", &[&blame, &blame])
        // Each "repair" changes something, but never the bug.
        .answers(
            "repair",
            &[
                &inbox::no_bcc_draft_reworded("v1"),
                &inbox::no_bcc_draft_reworded("v2"),
            ],
        );
    let (code, err) = compile(&dir, &server, "openai", |c| c.max_rounds = Some(2));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("NOT verified: 1 of 83 scenarios still disagree"),
        "{err}"
    );
    assert!(server.unused().is_empty());
    assert!(
        !dir.join("p.rules").exists(),
        "an unverified policy must not be written as p.rules"
    );
    assert!(read(&dir, "p.rules.unverified").contains("all cc in @contacts"));
    assert!(!dir.join("p.report.md").exists());
    let report = read(&dir, "p.report.unverified.md");
    assert!(report.contains("**NOT VERIFIED.**"), "{report}");
    assert!(
        report.contains("## Still disputed\n\n- s10 (S3)"),
        "{report}"
    );
    assert!(
        report.contains("the scenario expects **ask**, the rules decide **allow**"),
        "{report}"
    );
    assert!(
        report.contains("verify: 2 judge-and-repair round(s) of at most 2"),
        "{report}"
    );
    // The scenarios are still written, and they show the bug.
    assert_eq!(
        read(&dir, "p.scenarios.unverified.jsonl").lines().count(),
        15
    );
}

#[test]
fn a_redraft_that_changes_nothing_stops_the_rounds() {
    let dir = TempDir::new("stall");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::no_bcc_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()])
        .answers(
            "judge",
            &[&inbox::judge(&[(
                "s10",
                "rule",
                None,
                "bcc must be checked",
            )])],
        )
        .answers("repair", &[&inbox::no_bcc_draft()]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 1, "{err}");
    assert!(server.unused().is_empty());
    let report = read(&dir, "p.report.unverified.md");
    assert!(
        report.contains("stopped early: a redraft changed nothing"),
        "{report}"
    );
    assert!(report.contains("- s10 (S3)"), "{report}");
}

#[test]
fn a_draft_that_never_loads_gives_up_with_the_last_diagnostics() {
    let dir = TempDir::new("nodraft");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    let bad = inbox::syntax_error_draft();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&bad, &bad]);
    let (code, err) = compile(&dir, &server, "openai", |c| c.max_repairs = Some(1));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("compile failed at step 'draft': no acceptable answer after 2 tries"),
        "{err}"
    );
    let report = read(&dir, "p.report.unverified.md");
    assert!(report.contains("**FAILED** at step `draft`"), "{report}");
    assert!(!report.contains("nothing in particular"), "{report}");
    assert!(report.contains("The policy engine rejected"), "{report}");
    assert!(!dir.join("p.rules").exists());
}

#[test]
fn malformed_json_from_the_model_is_sent_back_and_repaired() {
    let dir = TempDir::new("badjson");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server
        .answers("lists", &["Sure! Here are the lists:\n```json\n{\"lists\": [{\"name\": \"contacts\", \"kind\": \"email\",]}\n```", &inbox::lists()])
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &["{\"scenarios\": \"none\"}", &inbox::good_scenarios_answer()]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}");
    let reqs = server.requests();
    assert!(
        reqs[1].last_user().contains("not valid JSON"),
        "{}",
        reqs[1].last_user()
    );
    assert!(
        reqs[1].last_user().contains("line 1 column"),
        "{}",
        reqs[1].last_user()
    );
    let shape = reqs
        .iter()
        .filter(|r| r.step == "scenarios")
        .nth(1)
        .unwrap()
        .last_user();
    assert!(
        shape.contains("does not have the asked-for shape"),
        "{shape}"
    );
}

#[test]
fn a_provider_body_that_is_not_an_api_response_fails_clearly() {
    let dir = TempDir::new("garbage");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server.script("lists", [Reply::RawBody("<html>gateway</html>".into())]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("not a usable answer: the response body is not JSON"),
        "{err}"
    );
    // A JSON body without `choices` (a proxy's own answer) is named as such.
    let server = ScriptedServer::start();
    server.script(
        "lists",
        [Reply::RawBody(
            r#"{"error":null,"object":"list","data":[]}"#.into(),
        )],
    );
    let (code, err) = compile(&dir, &server, "openai", |c| {
        c.cache_dir = Some(dir.join("other-cache"))
    });
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(
            "the chat-completions response has no `choices` (its keys: error, object, data)"
        ),
        "{err}"
    );
    assert!(!err.contains("error: null"), "{err}");
}

#[test]
fn rate_limited_then_success() {
    let dir = TempDir::new("429");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server.script(
        "lists",
        [
            Reply::Status(
                429,
                r#"{"error":{"message":"rate limited"}}"#.into(),
                Some(0),
            ),
            Reply::Status(503, "overloaded".into(), None),
            Reply::Answer(inbox::lists()),
        ],
    );
    server
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        server.steps(),
        ["lists", "lists", "lists", "draft", "scenarios"]
    );
    assert!(
        err.contains("3 exchange(s) over HTTP (5 attempt(s))"),
        "{err}"
    );
    let log = read(&dir, "p.compile/llm-exchanges.jsonl");
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let statuses: Vec<Value> = first["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, [429, 503, 200]);
}

#[test]
fn retries_are_bounded() {
    let dir = TempDir::new("5xx");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server.script(
        "lists",
        (0..10).map(|_| Reply::Status(500, "boom".into(), None)),
    );
    let (code, err) = compile(&dir, &server, "openai", |c| c.llm.max_retries = Some(2));
    assert_eq!(code, 3, "{err}");
    assert_eq!(server.count(), 3);
    assert!(
        err.contains("gave up after 3 attempt(s); last: HTTP 500: boom"),
        "{err}"
    );
    // A 4xx other than 429 is not retried.
    let server = ScriptedServer::start();
    server.script("lists", [Reply::Status(401, "bad key".into(), None)]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!((code, server.count()), (3, 1), "{err}");
    assert!(err.contains("HTTP 401: bad key"), "{err}");
}

#[test]
fn a_timeout_is_retried_and_bounded() {
    let dir = TempDir::new("timeout");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    // The stall is far longer than the timeout, and the timeout far longer than a
    // loopback answer takes on a loaded machine: only the stalled replies time out.
    const TIMEOUT_MS: u64 = 2_000;
    const STALL: Duration = Duration::from_secs(120);
    let stall = |r: Reply| Reply::Stall(STALL, Box::new(r));
    server.script(
        "lists",
        [
            stall(Reply::Answer(inbox::lists())),
            Reply::Answer(inbox::lists()),
        ],
    );
    server
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
    let t0 = std::time::Instant::now();
    let (code, err) = compile(&dir, &server, "openai", |c| {
        c.llm.timeout_ms = Some(TIMEOUT_MS)
    });
    assert_eq!(code, 0, "{err}");
    assert!(
        t0.elapsed() < STALL,
        "the timeout did not cut the stall short"
    );
    let log = read(&dir, "p.compile/llm-exchanges.jsonl");
    let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let e = first["attempts"][0]["error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(e.contains("timed out") || e.contains("timeout"), "{e}");

    // A server that never answers in time: a clear error after the bounded retries.
    let server = ScriptedServer::start();
    server.script(
        "lists",
        (0..3).map(|_| stall(Reply::Answer(inbox::lists()))),
    );
    let (code, err) = compile(&dir, &server, "openai", |c| {
        c.llm.timeout_ms = Some(TIMEOUT_MS);
        c.llm.max_retries = Some(1);
        c.cache_dir = Some(dir.join("other-cache"));
    });
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("gave up after 2 attempt(s)"), "{err}");
    // Said once, with the setting to raise.
    assert!(!err.contains("Network Error: Network Error"), "{err}");
    assert!(err.contains("raise [llm] timeout_secs"), "{err}");
}

#[test]
fn a_service_list_without_a_source_stops_with_advice() {
    let dir = TempDir::new("unbound");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    server.answers("lists", &[&inbox::lists()]);
    let (code, err) = compile(&dir, &server, "openai", |c| c.lists.clear());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no source is configured for it: pass --list contacts=FILE"),
        "{err}"
    );
    assert!(err.contains("never uses an empty list silently"), "{err}");
}

#[test]
fn check_against_the_constitution() {
    let dir = TempDir::new("against");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    clean_script(&server);
    assert_eq!(compile(&dir, &server, "openai", |_| {}).0, 0);
    let rules = read(&dir, "p.rules");
    let english = read(&dir, "constitution.md");
    assert!(ironvmm_policy_compiler::against::check(
        &rules,
        &english,
        Some(&read(&dir, "catalog.json"))
    )
    .is_empty());
    let p = ironvmm_policy_compiler::against::check(
        &rules,
        &english.replace("ask me first", "deny it"),
        None,
    );
    assert!(
        p[0].contains("another version of the constitution"),
        "{p:?}"
    );
}

#[test]
fn a_list_the_owner_must_review_is_proposed_written_and_never_empty() {
    let dir = TempDir::new("ownerlist");
    std::fs::write(
        dir.join("constitution.md"),
        "The agent may read news sites over HTTPS.\n",
    )
    .unwrap();
    std::fs::copy(
        support::inbox_dir().join("../catalog.json"),
        dir.join("catalog.json"),
    )
    .unwrap();
    let news = |entries: Value| {
        serde_json::json!({"lists": [{"name": "news", "kind": "host", "sentence": 1, "binding": "owner",
            "entries": entries, "note": "well-known news sites"}]})
        .to_string()
    };
    let draft = serde_json::json!({"rules": [{"sentence": 1, "rule": "allow net.connect when host in @news and port == 443"}],
        "default": "deny", "assumptions": []})
    .to_string();
    let connect = |host: &str, port: u16, expect: &str| serde_json::json!({"sentence": 1, "why": "", "expect": expect, "call": {"tool": "net.connect", "args": {"host": host, "port": port}}});
    let scenarios = inbox::scenarios_of(vec![
        connect("apnews.com", 443, "allow"),
        connect("WWW.BBC.CO.UK.", 443, "allow"),
        connect("bbc.co.uk", 443, "deny"),
        connect("evilbbc.co.uk", 443, "deny"),
        connect("apnews.com", 80, "deny"),
    ]);
    let server = ScriptedServer::start();
    server
        .answers(
            "lists",
            &[
                &news(serde_json::json!([])),
                &news(serde_json::json!(["apnews.com", "*.bbc.co.uk"])),
            ],
        )
        .answers("draft", &[&draft])
        .answers("scenarios", &[&scenarios]);
    let (code, err) = compile(&dir, &server, "openai", |c| c.lists.clear());
    assert_eq!(code, 0, "{err}\n{}", read(&dir, "p.report.md"));
    assert!(server.requests()[1]
        .last_user()
        .contains("bound to the owner but has no entries"));
    let list = read(&dir, "p.news.list");
    assert!(
        list.contains("for the owner to review") && list.contains("\napnews.com\n*.bbc.co.uk\n"),
        "{list}"
    );
    assert!(read(&dir, "p.rules").contains(
        "# S1: \"The agent may read news sites over HTTPS.\"\nlist news = file \"p.news.list\""
    ));
    let report = read(&dir, "p.report.md");
    assert!(
        report.contains("- the entries of `p.news.list`"),
        "{report}"
    );
    assert!(
        report.contains("proposed by the model: **review it**"),
        "{report}"
    );
}

#[test]
fn an_empty_constitution_is_refused_before_any_request() {
    let dir = TempDir::new("empty");
    inbox_inputs(dir.path());
    std::fs::write(
        dir.join("constitution.md"),
        "# Title only\n\n<!-- nothing -->\n",
    )
    .unwrap();
    let server = ScriptedServer::start();
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("constitution.md states nothing: no sentence found"),
        "{err}"
    );
    assert_eq!(server.connections(), 0);
}

#[test]
fn everything_can_come_from_ironvmm_toml() {
    let dir = TempDir::new("toml");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    clean_script(&server);
    std::fs::write(
        dir.join("ironvmm.toml"),
        format!(
            "[llm]\nprovider = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"from-toml\"\napi_key_env = \"MY_KEY\"\n\
             retry_base_ms = 10\n\n[lists]\ncontacts = \"contacts.txt\"\n\n\
             [compile]\ncatalog = \"catalog.json\"\ncache_dir = \"answers\"\n\n[services.mail]\nignored = true\n",
            server.anthropic_base()
        ),
    )
    .unwrap();
    let c = Common {
        constitution: dir.join("constitution.md"),
        out: dir.join("p.rules"),
        config: Some(dir.join("ironvmm.toml")),
        ..Default::default()
    };
    let env = support::env(&[("MY_KEY", KEY)]);
    let mut err = Vec::new();
    let code = driver::run_compile(&c, &env, &mut err);
    let err = String::from_utf8(err).unwrap();
    assert_eq!(code, 0, "{err}");
    let r = &server.requests()[0];
    assert_eq!(
        (r.path.as_str(), r.headers["x-api-key"].as_str()),
        ("/v1/messages", KEY)
    );
    assert_eq!(r.body["model"], "from-toml");
    assert!(read(&dir, "p.rules").contains("# model: anthropic:from-toml"));
    assert!(
        dir.join("answers").is_dir(),
        "the [compile] cache_dir is used"
    );
    // A key in the file itself is refused: files get committed.
    std::fs::write(
        dir.join("bad.toml"),
        "[llm]\nmodel = \"m\"\napi_key = \"sk-123\"\n",
    )
    .unwrap();
    let c = Common {
        config: Some(dir.join("bad.toml")),
        ..c
    };
    let mut err = Vec::new();
    assert_eq!(driver::run_compile(&c, &env, &mut err), 2);
    assert!(String::from_utf8(err)
        .unwrap()
        .contains("keys are not read from files"));
}

#[test]
fn an_offline_miss_says_which_input_changed_and_which_model_the_cache_holds() {
    let dir = TempDir::new("offline-why");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    clean_script(&server);
    assert_eq!(compile(&dir, &server, "openai", |_| {}).0, 0);
    let good_report = read(&dir, "p.report.md");
    // The English changes: the cache cannot answer, and says why.
    std::fs::write(
        dir.join("constitution.md"),
        read(&dir, "constitution.md").replace("ask me first", "deny it"),
    )
    .unwrap();
    let silent = ScriptedServer::start();
    let (code, err) = compile(&dir, &silent, "openai", |c| c.offline = true);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("since the compile that filled the cache, the constitution changed: run once without --offline"),
        "{err}"
    );
    assert!(!err.contains("catalog changed"), "{err}");
    // A failed run leaves the good report beside the good p.rules alone.
    assert_eq!(read(&dir, "p.report.md"), good_report);
    assert!(read(&dir, "p.report.unverified.md").contains("**FAILED** at step `lists`"));
    // No model configured: the error names the one the cache holds.
    let c = Common {
        constitution: dir.join("constitution.md"),
        out: dir.join("p.rules"),
        catalog: Some(dir.join("catalog.json")),
        offline: true,
        ..Default::default()
    };
    let mut err = Vec::new();
    let code = driver::run_compile(&c, &support::env(&[]), &mut err);
    let err = String::from_utf8(err).unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("holds answers of the model openai:test-model: pass --model test-model"),
        "{err}"
    );
}

#[test]
fn the_report_names_rules_no_scenario_exercised() {
    let dir = TempDir::new("unexercised");
    inbox_inputs(dir.path());
    let mut rules = inbox::good_rules();
    rules.insert(
        4,
        serde_json::json!({"sentence": 3, "rule": "ask mail.send when subject == \"wire the money\" \"ask about payments\""}),
    );
    let draft =
        serde_json::json!({"rules": rules, "default": "deny", "assumptions": []}).to_string();
    let server = ScriptedServer::start();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&draft])
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
    let (code, err) = compile(&dir, &server, "openai", |_| {});
    assert_eq!(code, 0, "{err}");
    let report = read(&dir, "p.report.md");
    assert!(
        report.contains("- no scenario exercised line 23: `ask mail.send when subject == \"wire the money\" \"ask about payments\"`"),
        "{report}"
    );
    assert!(report.contains("- S3: 5 written, "), "{report}");
}
