//! The recorded, real-world-style transcript of examples/inbox (answers wrapped in
//! prose and code fences, a draft the engine rejects, a rule and a scenario that
//! disagree) replayed through the scripted server: the pipeline must turn it into
//! exactly the committed examples/inbox/p.rules, p.scenarios.jsonl and p.report.md.
//! `IRONVMM_BLESS=1` rewrites them (and the committed answer cache) instead.

mod support;

use ironvmm_policy_compiler::config::LlmSettings;
use ironvmm_policy_compiler::driver::{self, Common};
use serde_json::Value;
use support::{inbox_inputs, ScriptedServer, TempDir};

/// The model name the transcript is filed under (it was not produced by a real model).
const MODEL: &str = "recorded-transcript";

fn run(dir: &TempDir, server: &ScriptedServer, offline: bool) -> (u8, String) {
    let c = Common {
        constitution: dir.join("constitution.md"),
        out: dir.join("p.rules"),
        catalog: Some(dir.join("catalog.json")),
        lists: vec![("contacts".into(), dir.join("contacts.txt"))],
        offline,
        llm: LlmSettings {
            retry_base_ms: Some(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let base = server.openai_base();
    let env = support::env(&[
        ("IRONVMM_LLM_BASE_URL", &base),
        ("IRONVMM_LLM_MODEL", MODEL),
    ]);
    let mut err = Vec::new();
    let code = driver::run_compile(&c, &env, &mut err);
    (code, String::from_utf8(err).unwrap())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn the_recorded_transcript_compiles_to_the_committed_inbox_policy() {
    let dir = TempDir::new("transcript");
    inbox_inputs(dir.path());
    let server = ScriptedServer::start();
    let transcript =
        std::fs::read_to_string(support::inbox_dir().join("transcript.jsonl")).unwrap();
    for line in transcript.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        server.answers(
            v["step"].as_str().unwrap(),
            &[v["answer"].as_str().unwrap()],
        );
    }
    let (code, err) = run(&dir, &server, false);
    let report = std::fs::read_to_string(dir.join("p.report.md")).unwrap();
    assert_eq!(code, 0, "{err}\n{report}");
    assert_eq!(
        server.steps(),
        ["lists", "draft", "draft", "scenarios", "judge", "repair"]
    );
    assert!(server.unused().is_empty(), "{:?}", server.unused());
    // The engine's own words reached the model in the draft repair.
    let fb = server.requests()[2].last_user();
    assert!(
        fb.contains("is an array for mail.send: write `all to in ...`"),
        "{fb}"
    );

    let files = ["p.rules", "p.scenarios.jsonl", "p.report.md"];
    if std::env::var_os("IRONVMM_BLESS").is_some() {
        for f in files {
            std::fs::copy(dir.join(f), support::inbox_dir().join(f)).unwrap();
        }
        let cache = support::inbox_dir().join("p.compile/cache");
        let _ = std::fs::remove_dir_all(&cache);
        copy_dir(&dir.join("p.compile/cache"), &cache);
    }
    for f in files {
        let got = std::fs::read_to_string(dir.join(f)).unwrap();
        let want = std::fs::read_to_string(support::inbox_dir().join(f)).unwrap_or_else(|e| {
            panic!("examples/inbox/{f}: {e} (run with IRONVMM_BLESS=1 to create it)")
        });
        assert_eq!(
            got, want,
            "examples/inbox/{f} differs from what the pipeline makes of the transcript"
        );
    }
    assert!(
        report.contains("scenario s14 (S4) was judged wrong and corrected: expect allow → deny"),
        "{report}"
    );
    assert!(
        report.contains("redrafted in verification round 1"),
        "{report}"
    );

    // The committed cache replays the whole compile offline, byte for byte.
    let again = TempDir::new("transcript-offline");
    inbox_inputs(again.path());
    copy_dir(
        &support::inbox_dir().join("p.compile/cache"),
        &again.join("p.compile/cache"),
    );
    let silent = ScriptedServer::start();
    let (code, err) = run(&again, &silent, true);
    assert_eq!(code, 0, "{err}");
    assert_eq!(silent.connections(), 0);
    for f in files {
        assert_eq!(
            std::fs::read_to_string(again.join(f)).unwrap(),
            std::fs::read_to_string(support::inbox_dir().join(f)).unwrap()
        );
    }
}
