//! What docs/gate.md promises about the gate and the fs service that no other test
//! checked: a panic in the policy engine denies by `invariant` (and one in a service
//! is a tool error), FIFOs and devices are refused without blocking, and `fs.list`
//! pages in name order and says `truncated` past its scan bound. The policy is a real
//! p.rules through the real engine.

mod gate_common;

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use ironvmm::audit::{AuditLog, SyncMode};
use ironvmm::gate::{Connection, Decider, DecisionRef, Gate, GateLimits};
use ironvmm::services::fs::{FsService, MAX_LIST, MAX_LIST_SCAN};
use ironvmm::services::{Service, Services, ToolError, ToolSpec};
use ironvmm_policy::Policy;
use serde_json::{json, Map, Value};

const POLICY: &str = r#"version 1
allow fs.read when path under "/workspace"
allow fs.write when path under "/workspace"
allow fs.list
allow test.crash
default deny
"#;

/// How long a call that must not block may take before the test calls it blocked:
/// far beyond any honest call on a loaded machine, far below "forever".
const NOT_BLOCKED: Duration = Duration::from_secs(60);

fn policy() -> Policy {
    let mut catalog = ironvmm::services::builtin_catalog_json();
    catalog["tools"]
        .as_array_mut()
        .unwrap()
        .push(Crash.tools()[0].catalog_entry());
    let catalog = ironvmm_policy::Catalog::from_json(&catalog.to_string()).unwrap();
    match Policy::from_source(POLICY, "p.rules", None, Some(&catalog)) {
        Ok(l) => l.policy,
        Err(d) => panic!("{d}"),
    }
}

/// The real engine, except that a call with `"boom": true` makes it panic, as a
/// bug in the engine would.
struct PanickyEngine(Policy);

impl Decider for PanickyEngine {
    fn decide<'a>(&'a self, tool: &str, args: &Value) -> DecisionRef<'a> {
        if args.get("boom") == Some(&Value::Bool(true)) {
            panic!("a bug in the policy engine");
        }
        Decider::decide(&self.0, tool, args)
    }
    fn could_allow_or_ask(&self, tool: &str) -> bool {
        Decider::could_allow_or_ask(&self.0, tool)
    }
}

/// A service whose one tool panics, as a bug in a service would.
struct Crash;

impl Service for Crash {
    fn tools(&self) -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "test.crash",
            description: "panics",
            input_schema: json!({"type": "object", "additionalProperties": false}),
            roles: &[],
            aliases: &[],
            reply_cap: ironvmm::services::DEFAULT_REPLY_CAP,
        }]
    }
    fn call(&self, _: &str, _: &Value) -> Result<Value, ToolError> {
        panic!("a bug in a service");
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    workspace: std::path::PathBuf,
    audit: std::path::PathBuf,
    gate: Arc<Gate>,
}

fn fixture() -> Fixture {
    fixture_in(&std::env::temp_dir())
}

/// The fixture with its folders under `base`.
fn fixture_in(base: &Path) -> Fixture {
    let dir = tempfile::tempdir_in(base).unwrap();
    let workspace = dir.path().join("ws");
    std::fs::create_dir(&workspace).unwrap();
    std::fs::write(workspace.join("hello.txt"), "hello\n").unwrap();
    let audit = dir.path().join("audit.jsonl");
    let log = AuditLog::create(&audit, "test-vm", SyncMode::Always, Map::new()).unwrap();
    let mut services = Services::new();
    services.add(Box::new(FsService::open(&workspace).unwrap()));
    services.add(Box::new(Crash));
    let gate = Gate::new(
        Box::new(PanickyEngine(policy())),
        services,
        Arc::new(log),
        GateLimits::default(),
    );
    Fixture {
        _dir: dir,
        workspace,
        audit,
        gate: Arc::new(gate),
    }
}

fn call(conn: &mut Connection, id: u64, tool: &str, args: Value) -> Value {
    let r = gate_common::roundtrip(conn, &gate_common::call_frame(id, tool, args));
    assert_eq!(r.len(), 1, "{r:?}");
    r[0].clone()
}

/// A denial's `(decided_by, reason)`, or None when the call was served. Reads the
/// denial where the reply carries it (a JSON-RPC error's `data`, or a tool result
/// marked `isError` that names a decision), so the tests do not depend on its shape.
fn denial(reply: &Value) -> Option<(String, String)> {
    let d = if reply.get("error").is_some() {
        &reply["error"]["data"]
    } else if reply["result"]["isError"] == true
        && reply["result"]["structuredContent"]
            .get("decided_by")
            .is_some()
    {
        &reply["result"]["structuredContent"]
    } else {
        return None;
    };
    Some((
        d["decided_by"].as_str().unwrap_or_default().to_string(),
        d["reason"].as_str().unwrap_or_default().to_string(),
    ))
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_panic_in_the_engine_denies_by_invariant_and_the_gate_goes_on() {
    let f = fixture();
    let mut conn = Connection::unwoken(Arc::clone(&f.gate), "test:1".into());
    // Allowed by line 2 when the engine works; the panic must not let it through.
    let r = call(
        &mut conn,
        1,
        "fs.read",
        json!({"path": "hello.txt", "boom": true}),
    );
    let (by, reason) = denial(&r).expect("denied");
    assert_eq!(by, "invariant", "{r}");
    assert_eq!(reason, "internal error in the policy engine", "{r}");
    assert!(!r.to_string().contains("hello\\n"), "served: {r}");
    // The same connection, the same gate: the next call is decided as usual.
    let r = call(&mut conn, 2, "fs.read", json!({"path": "hello.txt"}));
    assert_eq!(denial(&r), None, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["content"], "hello\n",
        "{r}"
    );
    let recs = records(&f.audit);
    let d: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "decision").collect();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["decision"], "deny");
    assert_eq!(d[0]["decided_by"], "invariant");
    assert_eq!(d[0]["reason"], "internal error in the policy engine");
    assert_eq!(
        (&d[1]["decision"], &d[1]["rule"]),
        (&json!("allow"), &json!(2))
    );
}

#[test]
fn a_panic_in_a_service_is_a_tool_error_with_outcome_error() {
    let f = fixture();
    let mut conn = Connection::unwoken(Arc::clone(&f.gate), "test:1".into());
    let r = call(&mut conn, 1, "test.crash", json!({}));
    assert_eq!(denial(&r), None, "allowed by line 5: {r}");
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["error"]["kind"], "internal",
        "{r}"
    );
    let r = call(&mut conn, 2, "fs.read", json!({"path": "hello.txt"}));
    assert_eq!(
        r["result"]["structuredContent"]["content"], "hello\n",
        "{r}"
    );
    let recs = records(&f.audit);
    let outcomes: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!(outcomes[0]["status"], "error", "{recs:?}");
    assert_eq!(outcomes[1]["status"], "ok", "{recs:?}");
}

/// Runs one fs call on its own thread; panics if it does not return in time.
fn call_without_blocking(f: &Fixture, tool: &'static str, args: Value) -> Value {
    let gate = Arc::clone(&f.gate);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut conn = Connection::unwoken(gate, "test:fifo".into());
        let _ = tx.send(call(&mut conn, 1, tool, args));
    });
    rx.recv_timeout(NOT_BLOCKED)
        .unwrap_or_else(|_| panic!("{tool} blocked on a FIFO or device"))
}

fn tool_error_kind(r: &Value) -> String {
    assert_eq!(denial(r), None, "allowed by the policy: {r}");
    assert_eq!(r["result"]["isError"], true, "refused: {r}");
    r["result"]["structuredContent"]["error"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn fifos_are_refused_without_blocking() {
    let f = fixture();
    let fifo = f.workspace.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);

    // Nobody writes to it: a blocking open or read would wait forever.
    let r = call_without_blocking(&f, "fs.read", json!({"path": "pipe"}));
    assert_eq!(tool_error_kind(&r), "not_regular", "{r}");
    // Nobody reads it: a blocking open for writing would wait forever.
    let r = call_without_blocking(&f, "fs.write", json!({"path": "pipe", "content": "x"}));
    tool_error_kind(&r);
    // With a reader holding it open, the open succeeds and the type check refuses.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let r = call_without_blocking(&f, "fs.write", json!({"path": "pipe", "content": "x"}));
    assert_eq!(tool_error_kind(&r), "not_regular", "{r}");
    let mut buf = [0u8; 8];
    use std::io::Read;
    let got = (&reader).read(&mut buf);
    assert!(
        matches!(got, Ok(0)) || got.is_err(),
        "nothing was written: {got:?}"
    );
}

use std::os::unix::fs::OpenOptionsExt;

#[test]
fn device_nodes_are_refused_without_blocking() {
    let f = fixture();
    let dev = f.workspace.join("null");
    let c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path. /dev/null's numbers (1, 3).
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made != 0 {
        // Creating device nodes needs CAP_MKNOD; say so where cargo shows it.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "promises: SKIPPED device_nodes_are_refused_without_blocking: mknod: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let r = call_without_blocking(&f, "fs.read", json!({"path": "null"}));
    // Refused by type, or by the mount (nodev) before that.
    let kind = tool_error_kind(&r);
    assert!(kind == "not_regular" || kind == "permission_denied", "{r}");
    let r = call_without_blocking(&f, "fs.write", json!({"path": "null", "content": "x"}));
    let kind = tool_error_kind(&r);
    assert!(kind == "not_regular" || kind == "permission_denied", "{r}");
}

/// Follows `next_offset` from the start; returns every page's structuredContent.
fn list_pages(conn: &mut Connection, path: &str, limit: Option<u64>) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut args = json!({"path": path, "offset": offset});
        if let Some(l) = limit {
            args["limit"] = l.into();
        }
        let r = call(conn, pages.len() as u64 + 1, "fs.list", args);
        let page = r["result"]["structuredContent"].clone();
        assert!(page["entries"].is_array(), "{r}");
        let next = page["next_offset"].as_u64();
        pages.push(page);
        match next {
            Some(n) => offset = n,
            None => return pages,
        }
    }
}

/// A fixture on tmpfs where there is one: thousands of files are created in
/// milliseconds there, seconds on a busy disk.
fn fixture_for_many_files() -> Option<Fixture> {
    let shm = Path::new("/dev/shm");
    (shm.is_dir() && tempfile::tempdir_in(shm).is_ok()).then(|| fixture_in(shm))
}

#[test]
fn list_pages_sorted_entries_and_says_truncated_past_the_scan_bound() {
    let f = fixture_for_many_files().unwrap_or_else(fixture);
    let dir = f.workspace.join("many");
    std::fs::create_dir(&dir).unwrap();
    let n = 2 * MAX_LIST + 1;
    for i in 0..n {
        std::fs::File::create(dir.join(format!("f{i:06}"))).unwrap();
    }
    let mut conn = Connection::unwoken(Arc::clone(&f.gate), "test:1".into());
    // Pages of at most MAX_LIST (1,000 by docs/gate.md), in name order, that
    // together hold every entry once.
    assert_eq!(MAX_LIST, 1_000, "docs/gate.md says 1,000");
    let pages = list_pages(&mut conn, "many", None);
    assert_eq!(pages.len(), 3);
    let mut names = Vec::new();
    for p in &pages {
        assert_eq!(p["total"], n, "{}", p["total"]);
        assert!(p["entries"].as_array().unwrap().len() <= MAX_LIST);
        assert_eq!(p.get("truncated"), None);
        names.extend(
            p["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string()),
        );
    }
    let want: Vec<String> = (0..n).map(|i| format!("f{i:06}")).collect();
    assert_eq!(names, want);
    // A smaller limit gives smaller pages of the same listing.
    let small = list_pages(&mut conn, "many", Some(700));
    assert_eq!(small.len(), n.div_ceil(700));
    assert_eq!(small[0]["entries"].as_array().unwrap().len(), 700);
    assert_eq!(small[0]["next_offset"], 700);

    // Past MAX_LIST_SCAN entries the directory is read that far, and says so.
    let Some(f) = fixture_for_many_files() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "promises: SKIPPED the {MAX_LIST_SCAN}-entry truncation: no tmpfs at /dev/shm"
        );
        return;
    };
    let dir = f.workspace.join("huge");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..=MAX_LIST_SCAN {
        std::fs::File::create(dir.join(format!("f{i:06}"))).unwrap();
    }
    let mut conn = Connection::unwoken(Arc::clone(&f.gate), "test:2".into());
    let r = call(&mut conn, 1, "fs.list", json!({"path": "huge"}));
    let page = &r["result"]["structuredContent"];
    assert_eq!(page["truncated"], true, "{}", page["total"]);
    assert_eq!(page["total"], MAX_LIST_SCAN);
    assert_eq!(page["entries"].as_array().unwrap().len(), MAX_LIST);
}
