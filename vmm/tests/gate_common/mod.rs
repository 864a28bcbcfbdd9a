//! Shared set-up for the host-only gate tests: a real p.rules through the real
//! policy engine (loaded with the catalog of the tools the gate serves), a
//! workspace, an audit log, and helpers to drive a `Connection` and read the log back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ironvmm::audit::{AuditLog, SyncMode};
use ironvmm::gate::{Connection, ConnectionError, Gate, GateLimits};
use ironvmm::services::fs::FsService;
use ironvmm::services::{Services, ToolSpec};
use ironvmm_policy::{Catalog, Policy};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

/// The policy of these tests. Line 2 allows the fs tools inside /workspace (but
/// /workspace/ask), line 3 asks before a delete under /workspace/ask, line 4 allows
/// the rest there; anything else falls to the default, deny. Tests name these lines.
pub const POLICY: &str = r#"version 1
allow fs.* when path under "/workspace" and not path under "/workspace/ask" "workspace"
ask   fs.delete when path under "/workspace/ask" "ask me"
allow fs.* when path under "/workspace/ask" "workspace"
"#;

/// Every fs tool anywhere inside /workspace, for the tests of the fs service.
pub const FS_POLICY: &str = "version 1\nallow fs.* when path under \"/workspace\" \"workspace\"\n";

/// Appended when a test adds its own services: their `test.*` tools are allowed.
pub const TEST_TOOLS_RULE: &str = "allow test.* \"test service\"\n";

/// The engine's reason for the default.
pub const DEFAULT_DENY: &str = "no rule matched: default deny";

/// The catalog of exactly the tools `services` serve, as the engine reads it.
pub fn catalog_of(services: &Services) -> Catalog {
    let tools: Vec<Value> = services
        .specs()
        .iter()
        .map(ToolSpec::catalog_entry)
        .collect();
    Catalog::from_json(&json!({ "tools": tools }).to_string()).unwrap()
}

/// Loads `src` as `dir/p.rules` through the engine, with the catalog of `services`.
pub fn load_policy(dir: &Path, src: &str, services: &Services) -> Policy {
    let path = dir.join("p.rules");
    std::fs::write(&path, src).unwrap();
    match Policy::load(&path, Some(&catalog_of(services))) {
        Ok(l) => l.policy,
        Err(d) => panic!("the test policy does not load:\n{d}"),
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub workspace: PathBuf,
    pub audit_path: PathBuf,
    pub gate: Arc<Gate>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with(SyncMode::Always, GateLimits::default(), |_| {})
    }

    /// The gate under FS_POLICY.
    pub fn fs() -> Fixture {
        Self::with_policy(FS_POLICY, SyncMode::Always, GateLimits::default(), |_| {})
    }

    pub fn with(mode: SyncMode, limits: GateLimits, extra: impl FnOnce(&mut Services)) -> Fixture {
        Self::with_policy(POLICY, mode, limits, extra)
    }

    /// A gate deciding by `policy` (p.rules text) through the real engine.
    pub fn with_policy(
        policy: &str,
        mode: SyncMode,
        limits: GateLimits,
        extra: impl FnOnce(&mut Services),
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::write(workspace.join("hello.txt"), "hello, gate\n").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "host secret\n").unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let log = AuditLog::create(&audit_path, "test-vm", mode, Map::new()).unwrap();
        let mut services = Services::new();
        services.add(Box::new(FsService::open(&workspace).unwrap()));
        let fs_tools = services.specs().len();
        extra(&mut services);
        let mut src = policy.to_string();
        if services.specs().len() > fs_tools {
            src.push_str(TEST_TOOLS_RULE);
        }
        let policy = load_policy(dir.path(), &src, &services);
        let gate = Arc::new(Gate::new(Box::new(policy), services, Arc::new(log), limits));
        Fixture {
            dir,
            workspace,
            audit_path,
            gate,
        }
    }

    pub fn conn(&self, id: &str) -> Connection {
        Connection::unwoken(Arc::clone(&self.gate), id.to_string())
    }

    pub fn records(&self) -> Vec<Value> {
        read_records(&self.audit_path)
    }
}

pub fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sends one frame (a newline is added) and returns the reply lines parsed.
pub fn roundtrip(conn: &mut Connection, frame: &[u8]) -> Vec<Value> {
    let mut data = frame.to_vec();
    data.push(b'\n');
    let mut out = Vec::new();
    conn.on_data(&data, &mut out).unwrap();
    settle(conn, &mut out).unwrap();
    replies(&out)
}

/// Collects replies into `out` until nothing more will come without more room in
/// `out`: every call answered, or `out` past `max_output`. Calls run on the gate's
/// workers, so this waits for them (bounded: a call that never finishes fails).
pub fn settle(conn: &mut Connection, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let before = out.len();
        conn.poll(out)?;
        if !conn.has_pending_output() || out.len() > before {
            if !conn.has_pending_output() {
                return Ok(());
            }
            continue;
        }
        if conn.in_flight() == 0 {
            return Ok(()); // frames wait for room in `out`
        }
        if conn.wait_ready(Duration::from_secs(1)) {
            conn.poll(out)?;
            if out.len() == before {
                return Ok(()); // replies ready but `out` is full
            }
        }
        assert!(Instant::now() < deadline, "calls in flight never finished");
    }
}

pub fn replies(out: &[u8]) -> Vec<Value> {
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("reply is JSON"))
        .collect()
}

pub fn call_frame(id: u64, tool: &str, args: Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args}
    }))
    .unwrap()
}

/// The `structuredContent` of a denial, after checking that the reply is one: a
/// tool result with `isError`, whose text names the rule, who decided and why.
pub fn denial(reply: &Value) -> &Value {
    let res = &reply["result"];
    assert!(
        reply.get("error").is_none(),
        "a denial is not an error: {reply}"
    );
    assert_eq!(res["isError"], true, "{reply}");
    let d = &res["structuredContent"];
    assert_eq!(d["decision"], "deny", "{reply}");
    let text = res["content"][0]["text"].as_str().expect("a text content");
    let by = d["decided_by"].as_str().unwrap();
    let reason = d["reason"].as_str().unwrap();
    let head = match d["rule"].as_u64() {
        Some(r) => format!("denied by rule {r} (decided by {by}): "),
        None => format!("denied (decided by {by}): "),
    };
    assert_eq!(text, format!("{head}{reason}"));
    d
}
