//! The compiler's commands through the `ironvmm` binary, against the scripted
//! loopback model server of the compiler's own tests: `policy compile`, `policy
//! refine` and `policy check --against`, with their exit codes (0 verified or
//! matching, 1 not, 2 bad input, 3 no usable model).

#[path = "../../policy/compiler/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::json;
use support::{inbox, Reply, ScriptedServer};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The inbox example's inputs, and a config that keeps retries short.
fn inputs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["constitution.md", "contacts.txt", "catalog.json"] {
        std::fs::copy(root().join("examples/inbox").join(f), dir.path().join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    std::fs::write(
        dir.path().join("ironvmm.toml"),
        "[llm]\nmax_retries = 1\nretry_base_ms = 10\nretry_max_ms = 50\ntimeout_secs = 60\n",
    )
    .unwrap();
    dir
}

/// `ironvmm ARGS` with the model settings of `server` (None: no model configured)
/// and nothing else of this process's environment that the compiler reads.
fn ironvmm(dir: &Path, server: Option<&ScriptedServer>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ironvmm"));
    c.current_dir(dir).args(args).stdin(Stdio::null());
    for v in [
        "IRONVMM_LLM_PROVIDER",
        "IRONVMM_LLM_BASE_URL",
        "IRONVMM_LLM_MODEL",
        "IRONVMM_LLM_API_KEY",
        "IRONVMM_LLM_TIMEOUT_SECS",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
    ] {
        c.env_remove(v);
    }
    if let Some(s) = server {
        c.env("IRONVMM_LLM_PROVIDER", "openai")
            .env("IRONVMM_LLM_BASE_URL", s.openai_base())
            .env("IRONVMM_LLM_MODEL", "test-model");
    }
    c.output().unwrap()
}

const COMPILE: &[&str] = &[
    "policy",
    "compile",
    "constitution.md",
    "--catalog",
    "catalog.json",
    "--config",
    "ironvmm.toml",
    "--list",
    "contacts=contacts.txt",
    "-o",
    "p.rules",
];

fn compile(dir: &Path, server: Option<&ScriptedServer>, extra: &[&str]) -> (Option<i32>, String) {
    let o = ironvmm(dir, server, &[COMPILE, extra].concat());
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn check_against(dir: &Path, constitution: &str) -> (Option<i32>, String) {
    let o = ironvmm(
        dir,
        None,
        &["policy", "check", "p.rules", "--against", constitution],
    );
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code(), text)
}

fn clean_script(server: &ScriptedServer) {
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&inbox::good_draft()])
        .answers("scenarios", &[&inbox::good_scenarios_answer()]);
}

#[test]
fn compile_0_then_check_against_0_1_2_and_an_offline_replay() {
    let d = inputs();
    let dir = d.path();
    let server = ScriptedServer::start();
    clean_script(&server);
    let (code, err) = compile(dir, Some(&server), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(server.steps(), ["lists", "draft", "scenarios"]);
    let rules = std::fs::read_to_string(dir.join("p.rules")).unwrap();

    // The rules match their English...
    let (code, text) = check_against(dir, "constitution.md");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("matches constitution.md"), "{text}");
    // ...the same compile again, offline, asks no model and writes the same bytes...
    let asked = server.count();
    std::fs::remove_file(dir.join("p.rules")).unwrap();
    let (code, err) = compile(dir, None, &["--offline", "--model", "test-model"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(server.count(), asked, "offline asked the model");
    assert_eq!(std::fs::read_to_string(dir.join("p.rules")).unwrap(), rules);
    // ...and an edited English no longer matches them.
    let mut english = std::fs::read_to_string(dir.join("constitution.md")).unwrap();
    english.push_str("It may also email dave@partner.example without asking.\n");
    std::fs::write(dir.join("edited.md"), english).unwrap();
    let (code, text) = check_against(dir, "edited.md");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("does not match edited.md"), "{text}");
    // An English that cannot be read is bad input.
    let (code, text) = check_against(dir, "missing.md");
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("missing.md"), "{text}");
}

#[test]
fn compile_1_when_the_draft_never_loads() {
    let d = inputs();
    let server = ScriptedServer::start();
    let bad = inbox::syntax_error_draft();
    server
        .answers("lists", &[&inbox::lists()])
        .answers("draft", &[&bad, &bad]);
    let (code, err) = compile(d.path(), Some(&server), &["--max-repairs", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("compile failed at step 'draft': no acceptable answer after 2 tries"),
        "{err}"
    );
    assert!(
        !d.path().join("p.rules").exists(),
        "an unverified p.rules was written"
    );
}

#[test]
fn compile_2_on_bad_input() {
    let d = inputs();
    let dir = d.path();
    // No model configured at all.
    let (code, err) = compile(dir, None, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.to_lowercase().contains("model"), "{err}");
    // A list bound to a service with no source for its values.
    let server = ScriptedServer::start();
    server.answers("lists", &[&inbox::lists()]);
    let o = ironvmm(
        dir,
        Some(&server),
        &[
            "policy",
            "compile",
            "constitution.md",
            "--catalog",
            "catalog.json",
            "--config",
            "ironvmm.toml",
            "-o",
            "p.rules",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no source is configured for it: pass --list contacts=FILE"),
        "{err}"
    );
}

#[test]
fn compile_3_when_no_usable_model_answers() {
    let d = inputs();
    let dir = d.path();
    let server = ScriptedServer::start();
    server.script(
        "lists",
        (0..4).map(|_| Reply::Status(500, "boom".into(), None)),
    );
    let (code, err) = compile(dir, Some(&server), &[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("gave up after 2 attempt(s)"), "{err}");
    assert_eq!(server.count(), 2, "max_retries = 1 in the config");
    // Offline with nothing cached.
    let (code, err) = compile(
        dir,
        None,
        &[
            "--offline",
            "--model",
            "test-model",
            "--cache-dir",
            "empty-cache",
        ],
    );
    assert!(err.contains("offline"), "{err}");
    assert_eq!(code, Some(3), "{err}");
}

fn audit_with_asks() -> String {
    let mut lines = vec![json!({"seq": 0, "kind": "open", "policy": "x"})];
    for i in 0..3 {
        lines.push(
            json!({"seq": 1 + i, "kind": "decision", "tool": "mail.send",
            "args": {"to": ["dave@partner.example"], "subject": "Re: contract", "body": "hi"},
            "decision": "ask", "rule": 25, "decided_by": "rule", "reason": "ask me first"}),
        );
    }
    lines.iter().map(|l| l.to_string() + "\n").collect()
}

const REFINE: &[&str] = &[
    "policy",
    "refine",
    "constitution.md",
    "--audit",
    "audit.jsonl",
    "--catalog",
    "catalog.json",
    "--config",
    "ironvmm.toml",
    "--list",
    "contacts=contacts.txt",
    "-o",
    "p.rules",
];

#[test]
fn refine_0_without_a_yes_and_3_without_a_model_answer() {
    let d = inputs();
    let dir = d.path();
    std::fs::write(dir.join("audit.jsonl"), audit_with_asks()).unwrap();
    let before = std::fs::read_to_string(dir.join("constitution.md")).unwrap();
    let proposed = format!("{before}It may also email dave@partner.example without asking.\n");
    let server = ScriptedServer::start();
    server.answers(
        "refine",
        &[&json!({"constitution": proposed, "changes": [{"why": "approved 3 times", "evidence": "3 asks"}]})
            .to_string()],
    );
    // No terminal and no --accept: the diff is shown, nothing is applied, exit 0.
    let o = ironvmm(dir, Some(&server), REFINE);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.contains("+It may also email dave@partner.example"),
        "{out}"
    );
    assert!(err.contains("rerun with --accept"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("constitution.md")).unwrap(),
        before
    );

    // A model that never answers usably (and no cached answer): exit 3, the
    // English untouched.
    let server = ScriptedServer::start();
    server.script(
        "refine",
        (0..4).map(|_| Reply::Status(500, "boom".into(), None)),
    );
    let o = ironvmm(
        dir,
        Some(&server),
        &[REFINE, &["--cache-dir", "fresh"]].concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("constitution.md")).unwrap(),
        before
    );
}

/// `policy annotate --config`: the [[mcp]] server is started to list its tools, the
/// model is asked about those without roles only (here all but `read`, which the
/// configuration gives), and the checked proposal is printed for review under the
/// mapped names the configuration uses; ironvmm.toml is left as it was.
#[test]
fn annotate_proposes_roles_for_an_mcp_servers_tools_and_changes_nothing() {
    let dir = inputs();
    let fake = root().join("vmm/gate/tests/mcp_fake_server.py");
    let config = format!(
        "[llm]\nmax_retries = 1\nretry_base_ms = 10\nretry_max_ms = 50\ntimeout_secs = 60\n\n\
         [[mcp]]\nname = \"fake\"\ncommand = \"python3\"\nargs = [{:?}, \"paginate\"]\n\
         [mcp.roles]\n\"read.path\" = \"path\"\n",
        fake.display().to_string()
    );
    std::fs::write(dir.path().join("ironvmm.toml"), &config).unwrap();
    let server = ScriptedServer::start();
    let mut tools: Vec<serde_json::Value> = [
        "fake.echo",
        "fake.crash",
        "fake.hang",
        "fake.big",
        "fake.fail",
        "fake.env",
    ]
    .iter()
    .map(|t| json!({"tool": t, "roles": {}}))
    .collect();
    tools.push(json!({"tool": "fake.getinfo", "roles": {"path": {"role": "path", "why": "the file described"}}}));
    let answer = json!({ "tools": tools });
    server.answers("annotate", &[&answer.to_string()]);
    let out = ironvmm(
        dir.path(),
        Some(&server),
        &[
            "policy",
            "annotate",
            "--config",
            "ironvmm.toml",
            "--cache-dir",
            "cache",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let asked = server.requests()[0].last_user();
    assert!(asked.contains("fake.getinfo"), "{asked}");
    assert!(
        !asked.contains("fake.read"),
        "`read` has its roles: {asked}"
    );
    assert!(
        stdout.contains("[[mcp]]\nname = \"fake\"\n[mcp.roles]\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"getinfo.path\" = \"path\"  # the file described\n"),
        "{stdout}"
    );
    assert!(stdout.contains("# echo: no argument holds"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ironvmm.toml")).unwrap(),
        config
    );
    // Neither a catalog nor a configuration: exit 2, saying what to give.
    let out = ironvmm(dir.path(), Some(&server), &["policy", "annotate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}
