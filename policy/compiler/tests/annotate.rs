//! `ironvmm policy annotate` against a real HTTP server on loopback playing the
//! model: roles proposed for an MCP server's tools from their schemas, a wrong
//! answer sent back for repair, the checked proposal rendered for review, and the
//! answer cached so that the same catalog replays offline with no request.

mod support;

use ironvmm_policy_compiler::annotate::{run, AnnotateArgs};
use ironvmm_policy_compiler::config::LlmSettings;
use support::ScriptedServer;

const CATALOG: &str = r#"{"tools":[
  {"name":"fs.read","roles":{"path":"path"},"inputSchema":{"type":"object","properties":{"path":{"type":"string"}}}},
  {"name":"files.read_text_file","description":"Read a file as text","rolesKnown":false,
   "inputSchema":{"type":"object","properties":{"path":{"type":"string"},"head":{"type":"number"}},"required":["path"]}},
  {"name":"files.move_file","description":"Move a file or directory","rolesKnown":false,
   "inputSchema":{"type":"object","properties":{"source":{"type":"string"},"destination":{"type":"string"}},"required":["source","destination"]}}
]}"#;

const WRONG: &str =
    r#"{"tools":[{"tool":"files.read_text_file","roles":{"head":{"role":"path"}}}]}"#;
const GOOD: &str = r#"{"tools":[
  {"tool":"files.move_file","roles":{"source":{"role":"tree","why":"moved as a whole"},"destination":{"role":"tree","why":"where it goes"}}},
  {"tool":"files.read_text_file","roles":{"path":{"role":"path","why":"the file read"}}}]}"#;

fn annotate(
    server: &ScriptedServer,
    dir: &std::path::Path,
    offline: bool,
    output: Option<std::path::PathBuf>,
) -> (u8, String, String) {
    let a = AnnotateArgs {
        catalog_name: "catalog.json".into(),
        catalog_text: CATALOG.into(),
        cache_dir: Some(dir.join("cache")),
        offline,
        llm: LlmSettings {
            retry_base_ms: Some(10),
            retry_max_ms: Some(50),
            timeout_secs: Some(5),
            ..Default::default()
        },
        output,
        ..Default::default()
    };
    let base = server.openai_base();
    let env = support::env(&[
        ("IRONVMM_LLM_PROVIDER", "openai"),
        ("IRONVMM_LLM_BASE_URL", &base),
        ("IRONVMM_LLM_MODEL", "test-model"),
        ("OPENAI_API_KEY", "sk-annotate-test"),
    ]);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run(&a, &env, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn roles_are_proposed_checked_cached_and_left_for_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let server = ScriptedServer::start();
    server.answers("annotate", &[WRONG, GOOD]);
    let (code, out, err) = annotate(&server, dir.path(), false, None);
    assert_eq!(code, 0, "{err}");
    // Only the tools without roles were asked about, with their schemas.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "one answer, one repair");
    let asked = reqs[0].last_user();
    assert!(
        asked.contains("files.read_text_file") && asked.contains("\"head\""),
        "{asked}"
    );
    assert!(!asked.contains("fs.read\""), "{asked}");
    // The wrong answer went back with the reasons.
    let repair = reqs[1].last_user();
    assert!(repair.contains("`head` does not hold a string"), "{repair}");
    assert!(
        repair.contains("`files.move_file` is not answered"),
        "{repair}"
    );
    // The proposal, for review: [[mcp]] roles with the model's reasons.
    assert!(out.contains("Nothing has been applied"), "{out}");
    assert!(
        out.contains("[[mcp]]\nname = \"files\"\n[mcp.roles]\n"),
        "{out}"
    );
    assert!(
        out.contains("\"move_file.source\" = \"tree\"  # moved as a whole\n"),
        "{out}"
    );
    assert!(
        out.contains("\"read_text_file.path\" = \"path\"  # the file read\n"),
        "{out}"
    );
    assert!(out.contains("openai:test-model"), "{out}");
    assert!(server.unused().is_empty(), "{:?}", server.unused());

    // The same catalog again, offline, into a file: from the cache, no request.
    let file = dir.path().join("roles.toml");
    let (code, out2, err) = annotate(&server, dir.path(), true, Some(file.clone()));
    assert_eq!(code, 0, "{err}");
    assert!(out2.is_empty());
    assert_eq!(server.count(), 2, "no new request");
    // Both exchanges replay: the first answer and its repair.
    assert!(
        err.contains("2 answer(s) from the cache, 0 exchange(s)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), out);
}

#[test]
fn offline_without_a_cached_answer_and_a_catalog_with_every_role_known() {
    let dir = tempfile::tempdir().unwrap();
    let server = ScriptedServer::start();
    let (code, _, err) = annotate(&server, dir.path(), true, None);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--offline: no cached answer for step 'annotate'"),
        "{err}"
    );
    assert_eq!(server.count(), 0);

    let a = AnnotateArgs {
        catalog_name: "builtin".into(),
        catalog_text: r#"{"tools":[{"name":"fs.read","roles":{"path":"path"}}]}"#.into(),
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(run(&a, &|_| None, &mut out, &mut err), 0);
    assert!(String::from_utf8(err)
        .unwrap()
        .contains("nothing to propose"));
    assert!(out.is_empty());
}
