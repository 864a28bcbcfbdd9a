//! A gate built the way `ironvmm gate` builds it (policy file, ironvmm.toml, audit
//! log), driven with JSON-RPC frames, for the service tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironvmm_gate::audit::SyncMode;
use ironvmm_gate::config::Config;
use ironvmm_gate::gate::setup::{open_gate, GateConfig};
use ironvmm_gate::gate::{Connection, Gate, GateLimits};
use serde_json::{json, Value};

pub struct TestGate {
    pub dir: tempfile::TempDir,
    pub gate: Arc<Gate>,
    /// Port 2 of this gate (network egress).
    pub net: Arc<ironvmm_gate::services::net::NetService>,
    pub audit_path: PathBuf,
    conn: Connection,
    next_id: u64,
}

impl TestGate {
    /// A gate under `policy` (p.rules text) configured by `config` (TOML text).
    pub fn new(policy: &str, config: &str) -> TestGate {
        let dir = tempfile::tempdir().unwrap();
        Self::in_dir(dir, policy, config)
    }

    pub fn in_dir(dir: tempfile::TempDir, policy: &str, config: &str) -> TestGate {
        let policy_path = dir.path().join("p.rules");
        std::fs::write(&policy_path, policy).unwrap();
        let config_path = dir.path().join("ironvmm.toml");
        std::fs::write(&config_path, config).unwrap();
        let config = Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
        let audit_path = dir.path().join("audit.jsonl");
        let cfg = GateConfig {
            policy: policy_path,
            workspace: None,
            config,
            audit: Some(audit_path.clone()),
            audit_key: None,
            audit_budget: ironvmm_gate::audit::DEFAULT_AUDIT_BUDGET,
            max_write_bytes: ironvmm_gate::services::fs::DEFAULT_MAX_WRITE_BYTES,
            audit_sync: SyncMode::Always,
            limits: GateLimits::default(),
            vm: "test-vm".into(),
            image_sha256: None,
            flags: Value::Null,
        };
        let opened = open_gate(&cfg).unwrap_or_else(|e| panic!("{}", e.message));
        let conn = Connection::unwoken(Arc::clone(&opened.gate), "c1".into());
        TestGate {
            dir,
            net: opened.net,
            gate: opened.gate,
            audit_path,
            conn,
            next_id: 1,
        }
    }

    /// One tools/call; `Ok(structuredContent)` when served, `Err(reply)` otherwise
    /// (a denial, or a tool error).
    pub fn call(&mut self, tool: &str, args: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = serde_json::to_vec(&json!({
            "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": args}
        }))
        .unwrap();
        frame.push(b'\n');
        let mut out = Vec::new();
        self.conn.on_data(&frame, &mut out).unwrap();
        self.settle(&mut out);
        let reply: Value = serde_json::from_slice(out.strip_suffix(b"\n").unwrap()).unwrap();
        match reply.get("result") {
            Some(r) if r["isError"] == false => Ok(r["structuredContent"].clone()),
            _ => Err(reply),
        }
    }

    pub fn tools_list(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let frame = b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"tools/list\"}\n";
        self.conn.on_data(frame, &mut out).unwrap();
        self.settle(&mut out);
        let reply: Value = serde_json::from_slice(out.strip_suffix(b"\n").unwrap()).unwrap();
        reply["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits for the one reply line of the last frame: calls run on the gate's
    /// workers (bounded: a call that never finishes fails the test).
    fn settle(&mut self, out: &mut Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !out.ends_with(b"\n") {
            self.conn.poll(out).unwrap();
            if out.ends_with(b"\n") {
                break;
            }
            self.conn.wait_ready(Duration::from_secs(1));
            assert!(Instant::now() < deadline, "the call never finished");
        }
    }

    pub fn records(&self) -> Vec<Value> {
        read_records(&self.audit_path)
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap()
    }
}

pub fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The tool error kind of a failed call's reply.
pub fn error_kind(reply: &Value) -> String {
    reply["result"]["structuredContent"]["error"]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("not a tool error: {reply}"))
        .to_string()
}

/// Whether a reply is a policy denial (a tool result with `decision: deny`).
pub fn is_denied(reply: &Value) -> bool {
    reply["result"]["isError"] == true && reply["result"]["structuredContent"]["decision"] == "deny"
}
