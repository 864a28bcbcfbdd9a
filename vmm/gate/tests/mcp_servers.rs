//! `[[mcp]]` servers: the client against a scripted fake that misbehaves on purpose
//! (tests/mcp_fake_server.py), and the gate end to end against the real
//! `@modelcontextprotocol/server-filesystem` from npm.
//!
//! The real server is looked for under `$IRONVMM_MCP_NPM` (an `npm install --prefix`
//! folder; .ci/run makes one). Without it those tests print SKIPPED, and fail
//! instead when `IRONVMM_REQUIRE_MCP_SERVERS=1`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ironvmm_gate::audit::{AuditLog, SyncMode};
use ironvmm_gate::gate::{Connection, Gate, GateLimits};
use ironvmm_gate::services::mcp_servers::{McpService, McpSetupError, ServerSpec, MAX_FAILURES};
use ironvmm_gate::services::{Reply, Service, Services, ToolError};
use ironvmm_policy::{Catalog, Policy};
use serde_json::{json, Map, Value};

fn fake(mode: &str, extra: &[&str]) -> ServerSpec {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_fake_server.py");
    let mut args = vec![script.to_str().unwrap(), mode];
    args.extend_from_slice(extra);
    ServerSpec::new("fake", python(), &args)
}

/// The interpreter itself, not a wrapper script (pyenv's shim adds variables of
/// its own to the environment the tests look at).
fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs the fake MCP server");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

fn start(spec: &ServerSpec) -> McpService {
    McpService::start(spec).unwrap_or_else(|e| panic!("{e}"))
}

fn ok(svc: &McpService, tool: &str, args: Value) -> Value {
    match svc.serve(tool, &args) {
        Ok(Reply::Forwarded {
            result,
            is_error: false,
        }) => result,
        other => panic!("{tool}: {other:?}"),
    }
}

fn err(svc: &McpService, tool: &str, args: Value) -> ToolError {
    match svc.serve(tool, &args) {
        Err(e) => e,
        other => panic!("{tool} should have failed: {other:?}"),
    }
}

fn names(svc: &McpService) -> Vec<&'static str> {
    let mut n: Vec<_> = svc.tools().iter().map(|t| t.name).collect();
    n.sort();
    n
}

#[test]
fn tools_are_mapped_to_policy_names_and_the_unmappable_refused() {
    let mut spec = fake("basic", &[]);
    spec.roles = BTreeMap::from([("read.path".into(), "path".into())]);
    let svc = start(&spec);
    // `getInfo` is lowercased; `Dup`/`dup` collide and `bad*name` cannot map: refused.
    // `anyof` has a schema the policy engine cannot check: refused.
    assert_eq!(
        names(&svc),
        [
            "fake.big",
            "fake.crash",
            "fake.echo",
            "fake.env",
            "fake.fail",
            "fake.getinfo",
            "fake.hang",
            "fake.read"
        ]
    );
    let entries = svc.catalog_entries();
    let read = entries.iter().find(|e| e["name"] == "fake.read").unwrap();
    assert_eq!(read["roles"], json!({"path": "path"}));
    assert!(read.get("rolesKnown").is_none());
    let echo = entries.iter().find(|e| e["name"] == "fake.echo").unwrap();
    assert_eq!(echo["rolesKnown"], false);
    let cat = Catalog::from_json(&json!({ "tools": entries }).to_string()).unwrap();
    assert!(!cat.tool("fake.echo").unwrap().roles_known);
    // The server tool behind a mapped name is called by its own name.
    let r = ok(&svc, "fake.getinfo", json!({"path": "/x"}));
    assert_eq!(r["structuredContent"]["tool"], "getInfo");
}

#[test]
fn roles_naming_what_the_server_does_not_offer_are_errors() {
    for (key, needle) in [
        ("nosuch.path", "lists no tool `nosuch`"),
        ("read.nosuch", "has no argument `nosuch`"),
        ("readpath", "expected \"tool.argument\""),
    ] {
        let mut spec = fake("basic", &[]);
        spec.roles = BTreeMap::from([(key.into(), "path".into())]);
        let e = McpService::start(&spec).err().expect("refused").to_string();
        assert!(e.contains(needle) && e.contains(key), "{e}");
    }
    let mut spec = fake("basic", &[]);
    spec.roles = BTreeMap::from([("read.path".into(), "file".into())]);
    let e = McpService::start(&spec).err().unwrap().to_string();
    assert!(e.contains("unknown role \"file\""), "{e}");
}

#[test]
fn replies_pass_through_as_tool_results_and_errors_as_errors() {
    let svc = start(&fake("basic", &[]));
    let r = ok(&svc, "fake.echo", json!({"text": "hi"}));
    assert_eq!(r["structuredContent"]["args"], json!({"text": "hi"}));
    assert_eq!(r["content"][0]["type"], "text");
    match svc.serve("fake.fail", &json!({})).unwrap() {
        Reply::Forwarded {
            result,
            is_error: true,
        } => assert_eq!(result["content"][0]["text"], "it failed on purpose"),
        other => panic!("{other:?}"),
    }
    // Arguments outside the listed schema never reach the server.
    let e = err(&svc, "fake.echo", json!({"text": "hi", "extra": 1}));
    assert_eq!(e.kind, "invalid_arguments");
    assert!(e.message.contains("extra"), "{}", e.message);
}

#[test]
fn the_server_gets_a_clean_environment_plus_its_configured_one() {
    let mut spec = fake("basic", &[]);
    spec.env = BTreeMap::from([("FAKE_SETTING".into(), "1".into())]);
    let svc = start(&spec);
    let r = ok(&svc, "fake.env", json!({}));
    let keys: Vec<&str> = r["structuredContent"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(keys.contains(&"FAKE_SETTING"), "{keys:?}");
    // cargo's own variables (like any key or token of the owner's) stay behind.
    assert!(
        std::env::var_os("CARGO_PKG_NAME").is_some() && !keys.contains(&"CARGO_PKG_NAME"),
        "{keys:?}"
    );
    for k in &keys {
        assert!(
            ["PATH", "HOME", "FAKE_SETTING", "LC_CTYPE"].contains(k),
            "{k} leaked: {keys:?}"
        );
    }
}

/// A server that changes its story after the first call: a wider schema for `read`,
/// a new tool `exec`. The policy was loaded against the first listing.
#[test]
fn a_server_lying_about_its_schema_cannot_widen_what_the_policy_allows() {
    let mut spec = fake("lie", &[]);
    spec.roles = BTreeMap::from([("read.path".into(), "path".into())]);
    let svc = start(&spec);
    let catalog = catalog_with(&svc);
    let policy = Policy::from_source(
        "allow fake.read when path under \"/srv\"\nallow fake.* when cmd == \"ls\"\n",
        "t.rules",
        None,
        Some(&catalog),
    )
    .unwrap()
    .policy;
    let decide = |tool: &str, args: Value| {
        let d = policy.decide_parts(tool, &args);
        (d.verdict.as_str().to_string(), d.reason.to_string())
    };
    ok(&svc, "fake.read", json!({"path": "/srv/a"}));
    // The server has now announced tools/list_changed and lists the lie.
    let e = err(
        &svc,
        "fake.read",
        json!({"path": "/srv/a", "cmd": "rm -rf /"}),
    );
    assert_eq!(e.kind, "invalid_arguments", "{e:?}");
    let (v, why) = decide("fake.read", json!({"path": "/srv/a", "cmd": "ls"}));
    assert_eq!(v, "deny", "{why}");
    // The new tool is unknown to the gate and to the policy, whatever a rule says.
    assert!(!names(&svc).contains(&"fake.exec"));
    let (v, why) = decide("fake.exec", json!({"cmd": "ls"}));
    assert_eq!(
        (v.as_str(), why.contains("unknown tool")),
        ("deny", true),
        "{why}"
    );
    // The notification follows the reply that announced it, so the reader thread may
    // count it a moment after the call returned: wait for it, boundedly.
    let t0 = std::time::Instant::now();
    while svc.stats().list_changed == 0 && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(svc.stats().list_changed, 1);
    // `read` as first listed still works.
    ok(&svc, "fake.read", json!({"path": "/srv/b"}));
}

#[test]
fn a_flood_of_notifications_is_counted_and_dropped() {
    let svc = start(&fake("flood", &["100000"]));
    let r = ok(&svc, "fake.echo", json!({"text": "after the flood"}));
    assert_eq!(r["structuredContent"]["args"]["text"], "after the flood");
    let s = svc.stats();
    assert_eq!(s.notifications, 100_000, "{s:?}");
    assert_eq!(s.list_changed, 50_000, "{s:?}");
    // Fifty thousand list_changed made one re-listing, at the next call.
    ok(&svc, "fake.echo", json!({"text": "again"}));
    assert_eq!(svc.stats().notifications, 200_000);
}

#[test]
fn a_server_crashing_mid_call_fails_that_call_and_is_restarted_after_a_backoff() {
    let svc = start(&fake("basic", &[]));
    let pid = svc.stats().pid.unwrap();
    let e = err(&svc, "fake.crash", json!({}));
    assert_eq!(e.kind, "unavailable", "{e:?}");
    // At once: the backoff has not passed.
    let e = err(&svc, "fake.echo", json!({"text": "x"}));
    assert!(e.message.contains("restart 1 in"), "{}", e.message);
    let r = eventually(|| svc.serve("fake.echo", &json!({"text": "back"})).ok());
    let Reply::Forwarded { result, .. } = r else {
        panic!()
    };
    assert_eq!(result["structuredContent"]["args"]["text"], "back");
    assert_ne!(svc.stats().pid, Some(pid));
    assert_eq!(svc.stats().restarts, 1);
}

#[test]
fn a_server_that_keeps_crashing_is_given_up() {
    let svc = start(&fake("basic", &[]));
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(120) {
        last = err(&svc, "fake.crash", json!({})).message;
        if last.contains("given up") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last.contains("given up after"), "{last}");
    assert_eq!(svc.stats().restarts, MAX_FAILURES - 1);
    let e = err(&svc, "fake.echo", json!({"text": "x"}));
    assert!(e.message.contains("given up"), "{}", e.message);
}

#[test]
fn a_server_that_never_answers_times_out_and_stays_usable() {
    let mut spec = fake("basic", &[]);
    spec.timeout = Duration::from_secs(1);
    let svc = start(&spec);
    let e = err(&svc, "fake.hang", json!({}));
    assert_eq!(e.kind, "timeout", "{e:?}");
    ok(&svc, "fake.echo", json!({"text": "still here"}));
}

#[test]
fn an_oversized_reply_line_ends_the_process_not_the_memory() {
    let svc = start(&fake("basic", &[]));
    let e = err(&svc, "fake.big", json!({}));
    assert!(e.message.contains("line over"), "{e:?}");
    eventually(|| svc.serve("fake.echo", &json!({"text": "x"})).ok());
}

#[test]
fn listings_are_read_over_every_page() {
    let svc = start(&fake("paginate", &[]));
    assert_eq!(names(&svc).len(), 8);
}

#[test]
fn a_server_speaking_an_unknown_protocol_version_is_refused() {
    let e = McpService::start(&fake("oldproto", &[])).err().unwrap();
    assert!(matches!(e, McpSetupError::Start { .. }), "{e}");
    assert!(e.to_string().contains("2024-10-07"), "{e}");
    let e = McpService::start(&ServerSpec::new("fs", "/nonexistent/server", &[]))
        .err()
        .unwrap();
    assert!(e.to_string().contains("builtin service"), "{e}");
    let e = McpService::start(&ServerSpec::new("nope", "/nonexistent/server", &[]))
        .err()
        .unwrap();
    assert!(e.to_string().contains("could not start"), "{e}");
}

fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn catalog_with(svc: &McpService) -> Catalog {
    ironvmm_gate::services::catalog_with(svc.catalog_entries()).unwrap()
}

// ---- the real server, through the gate ----

/// The installed `mcp-server-filesystem`, or None (after saying SKIPPED) when it
/// may be missing.
fn real_filesystem_server() -> Option<PathBuf> {
    let bin = std::env::var_os("IRONVMM_MCP_NPM")
        .map(|d| PathBuf::from(d).join("node_modules/.bin/mcp-server-filesystem"))
        .filter(|b| b.exists());
    if bin.is_none() {
        let why = "SKIPPED: @modelcontextprotocol/server-filesystem not installed \
                   (npm install --prefix DIR @modelcontextprotocol/server-filesystem; \
                   IRONVMM_MCP_NPM=DIR)";
        if std::env::var("IRONVMM_REQUIRE_MCP_SERVERS").as_deref() == Ok("1") {
            panic!("{why}, and IRONVMM_REQUIRE_MCP_SERVERS=1");
        }
        // Past the test harness's capture, so that a skip is seen.
        let _ = writeln!(std::io::stderr(), "{why}");
    }
    bin
}

fn files_spec(bin: &Path, root: &Path) -> ServerSpec {
    let mut spec = ServerSpec::new(
        "files",
        "node",
        &[bin.to_str().unwrap(), root.to_str().unwrap()],
    );
    spec.roles = BTreeMap::from([
        ("read_text_file.path".into(), "path".into()),
        ("list_directory.path".into(), "path".into()),
    ]);
    spec
}

fn roundtrip(conn: &mut Connection, frame: Value) -> Value {
    let mut data = serde_json::to_vec(&frame).unwrap();
    data.push(b'\n');
    let mut out = Vec::new();
    conn.on_data(&data, &mut out).unwrap();
    let t0 = Instant::now();
    while !out.contains(&b'\n') {
        assert!(t0.elapsed() < Duration::from_secs(120), "no reply");
        conn.wait_ready(Duration::from_millis(200));
        conn.poll(&mut out).unwrap();
    }
    serde_json::from_slice(&out[..out.iter().position(|&b| b == b'\n').unwrap()]).unwrap()
}

fn call(conn: &mut Connection, id: u64, tool: &str, args: Value) -> Value {
    roundtrip(
        conn,
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": args}}),
    )
}

#[test]
fn the_real_filesystem_server_behind_the_gate_reads_only_what_the_policy_allows() {
    let Some(bin) = real_filesystem_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let ws = root.join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("a.txt"), "hello from the workspace\n").unwrap();
    std::fs::write(root.join("secret.txt"), "host secret\n").unwrap();
    // The server may read all of `root`; the policy allows only `ws`.
    let svc = start(&files_spec(&bin, &root));
    assert!(
        names(&svc).contains(&"files.read_text_file"),
        "{:?}",
        names(&svc)
    );
    let catalog = catalog_with(&svc);
    let rules = format!(
        "allow files.read_text_file when path under \"{0}\"\nallow files.list_directory when path under \"{0}\"\n",
        ws.display()
    );
    let loaded = Policy::from_source(&rules, "t.rules", None, Some(&catalog)).unwrap();
    let mut services = Services::new();
    services.add(Box::new(svc));
    let audit =
        AuditLog::create(&root.join("audit.jsonl"), "vm", SyncMode::Batch, Map::new()).unwrap();
    let gate = Arc::new(Gate::new(
        Box::new(loaded.policy),
        services,
        Arc::new(audit),
        GateLimits::default(),
    ));
    let mut conn = Connection::unwoken(Arc::clone(&gate), "c".into());

    let list = roundtrip(
        &mut conn,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    );
    let listed: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ["files.read_text_file", "files.list_directory"],
        "{list}"
    );

    let a = ws.join("a.txt");
    let r = call(&mut conn, 2, "files.read_text_file", json!({"path": a}));
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(
        r["result"]["content"][0]["text"], "hello from the workspace\n",
        "{r}"
    );
    // Outside the workspace, and climbing out of it: denied before the server runs.
    for p in [root.join("secret.txt"), ws.join("../secret.txt")] {
        let r = call(&mut conn, 3, "files.read_text_file", json!({"path": p}));
        assert_eq!(r["result"]["isError"], true, "{r}");
        assert_eq!(r["result"]["structuredContent"]["decision"], "deny", "{r}");
    }
    // A tool no rule allows, and arguments outside the server's schema.
    let r = call(
        &mut conn,
        4,
        "files.write_file",
        json!({"path": a, "content": "x"}),
    );
    assert_eq!(r["result"]["structuredContent"]["decision"], "deny", "{r}");
    let r = call(
        &mut conn,
        5,
        "files.read_text_file",
        json!({"path": a, "x": 1}),
    );
    assert_eq!(
        r["result"]["structuredContent"]["decided_by"], "invariant",
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        "hello from the workspace\n"
    );
    // An allowed call the server refuses is its tool error, passed on.
    let r = call(
        &mut conn,
        6,
        "files.read_text_file",
        json!({"path": ws.join("none.txt")}),
    );
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(r["result"].get("structuredContent").is_none(), "{r}");
}

/// Through the gate with the fake: a server's own failure is its tool result with
/// `isError` (audited as `tool_error`), its success as `ok`, and a tool that only
/// appeared later is an unknown tool to the gate.
#[test]
fn through_the_gate_server_results_are_audited_by_their_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(&fake("lie", &[]));
    let catalog = catalog_with(&svc);
    let loaded = Policy::from_source("allow fake.*\n", "t.rules", None, Some(&catalog)).unwrap();
    let mut services = Services::new();
    services.add(Box::new(svc));
    let audit_path = dir.path().join("audit.jsonl");
    let audit = AuditLog::create(&audit_path, "vm", SyncMode::Always, Map::new()).unwrap();
    let gate = Arc::new(Gate::new(
        Box::new(loaded.policy),
        services,
        Arc::new(audit),
        GateLimits::default(),
    ));
    let mut conn = Connection::unwoken(Arc::clone(&gate), "c".into());
    let r = call(&mut conn, 1, "fake.read", json!({"path": "/a"}));
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["args"],
        json!({"path": "/a"})
    );
    let r = call(&mut conn, 2, "fake.fail", json!({}));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(r["result"]["content"][0]["text"], "it failed on purpose");
    // `exec` is listed now, after tools/list_changed: still unknown here.
    let r = call(&mut conn, 3, "fake.exec", json!({"cmd": "id"}));
    assert_eq!(r["error"]["message"], "Unknown tool: fake.exec", "{r}");
    let statuses: Vec<String> = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "outcome")
        .map(|r| r["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["ok", "tool_error"]);
}
