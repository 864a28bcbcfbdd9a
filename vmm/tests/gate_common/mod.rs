//! Shared set-up for the host-only gate tests: a small rule-based decider (so these
//! tests do not depend on p.rules), a workspace, an audit log, and helpers to drive a
//! `Connection` and read the log back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ironvmm::audit::{AuditLog, SyncMode};
use ironvmm::gate::{
    Connection, ConnectionError, DecidedBy, Decider, DecisionRef, Gate, GateLimits, Verdict,
};
use ironvmm::services::fs::FsService;
use ironvmm::services::Services;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// allow fs.* when path (or from/to) is under /workspace; ask fs.delete when under
/// /workspace/ask; deny everything else by default. Line numbers are made up but fixed.
pub struct TestRules;

fn under_workspace(v: Option<&Value>) -> bool {
    let Some(p) = v.and_then(Value::as_str) else {
        return false;
    };
    let abs = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/workspace/{p}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in abs.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return false;
                }
            }
            c => parts.push(c),
        }
    }
    parts.first() == Some(&"workspace")
}

impl Decider for TestRules {
    fn decide<'a>(&'a self, tool: &str, a: &Value) -> DecisionRef<'a> {
        let rule = |verdict, rule, by, reason: &'static str| DecisionRef {
            verdict,
            rule,
            by,
            reason: Cow::Borrowed(reason),
        };
        if tool == "fs.delete"
            && a["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/workspace/ask"))
        {
            return rule(Verdict::Ask, Some(3), DecidedBy::Rule, "ask me");
        }
        let paths_ok = match tool {
            "fs.move" => under_workspace(a.get("from")) && under_workspace(a.get("to")),
            t if t.starts_with("fs.") => under_workspace(a.get("path")),
            "test.probe" => true,
            _ => false,
        };
        if paths_ok {
            rule(Verdict::Allow, Some(2), DecidedBy::Rule, "workspace")
        } else {
            rule(Verdict::Deny, None, DecidedBy::Default, "default deny")
        }
    }
    fn could_allow_or_ask(&self, tool: &str) -> bool {
        tool.starts_with("fs.") && tool != "fs.mkdir" || tool == "test.probe"
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

    pub fn with(mode: SyncMode, limits: GateLimits, extra: impl FnOnce(&mut Services)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::write(workspace.join("hello.txt"), "hello, gate\n").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "host secret\n").unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let log = AuditLog::create(&audit_path, "test-vm", mode, Map::new()).unwrap();
        let mut services = Services::new();
        services.add(Box::new(FsService::open(&workspace).unwrap()));
        extra(&mut services);
        let gate = Arc::new(Gate::new(
            Box::new(TestRules),
            services,
            Arc::new(log),
            limits,
        ));
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
