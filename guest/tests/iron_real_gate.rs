//! `iron` against the real gate, `ironvmm gate --listen`, with a real p.rules
//! through the real engine and the real fs service: every exit code, `list`, `mcp`
//! and `bench` (iron_fake_gate.rs checks the same against a canned fake).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const POLICY: &str = r#"version 1
allow fs.read when path under "/workspace"
allow fs.stat
ask   fs.delete "ask me first"
deny  fs.write "read-only here"
default deny
"#;

/// The `ironvmm` binary of this workspace, in the target folder `iron` was built in.
/// `cargo test --workspace` (scripts/test.sh) builds it with everything else before
/// any test runs; alone, this test has cargo build it when it is missing.
fn ironvmm() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_iron")).with_file_name("ironvmm");
    if !bin.exists() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "ironvmm", "--bin", "ironvmm"])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p ironvmm failed");
    }
    bin
}

/// `ironvmm gate --listen` on a fresh workspace; killed when dropped.
struct RealGate {
    child: Child,
    sock: PathBuf,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl RealGate {
    fn start() -> RealGate {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("p.rules");
        std::fs::write(&policy, POLICY).unwrap();
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(ws.join("hello.txt"), "hello from the host\n").unwrap();
        let (sock, audit) = (dir.path().join("gate.sock"), dir.path().join("audit.jsonl"));
        let mut child = Command::new(ironvmm())
            .arg("gate")
            .arg("--policy")
            .arg(&policy)
            .arg("--workspace")
            .arg(&ws)
            .arg("--audit")
            .arg(&audit)
            .arg("--listen")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(child.try_wait().unwrap().is_none(), "the gate exited");
            assert!(t.elapsed() < Duration::from_secs(120), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        RealGate {
            child,
            sock,
            audit,
            _dir: dir,
        }
    }

    fn iron(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_iron"))
            .args(args)
            .env("IRON_GATE", format!("unix:{}", self.sock.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for RealGate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn call_exit_codes_against_the_real_gate() {
    let g = RealGate::start();
    // Allowed and served: the file's text on stdout, 0.
    let o = g.iron(&["call", "fs.read", r#"{"path":"hello.txt"}"#], "");
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    assert!(
        s(&o.stdout).contains("hello from the host"),
        "{}",
        s(&o.stdout)
    );
    // Denied by a rule: 3, with the rule's reason.
    let o = g.iron(&["call", "fs.write", r#"{"path":"x","content":"y"}"#], "");
    assert_eq!(o.status.code(), Some(3), "{}", s(&o.stderr));
    assert!(s(&o.stderr).contains("read-only here"), "{}", s(&o.stderr));
    // An ask, with no approver: denied, 3.
    let o = g.iron(&["call", "fs.delete", r#"{"path":"hello.txt"}"#], "");
    assert_eq!(o.status.code(), Some(3), "{}", s(&o.stderr));
    // Allowed, but the service fails: a tool error, 4.
    let o = g.iron(&["call", "fs.read", r#"{"path":"missing.txt"}"#], "");
    assert_eq!(o.status.code(), Some(4), "{}", s(&o.stderr));
    // Refused by the engine's schema before any service: 3.
    let o = g.iron(&["call", "fs.read", r#"{"path":"hello.txt","x":1}"#], "");
    assert_eq!(o.status.code(), Some(3), "{}", s(&o.stderr));
    // Arguments from stdin.
    let o = g.iron(&["call", "fs.stat", "-"], r#"{"path":"hello.txt"}"#);
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));

    // Every call above is in the log, decided as iron reported it.
    let decisions: Vec<(String, String)> = g
        .records()
        .iter()
        .filter(|r| r["kind"] == "decision")
        .map(|r| {
            (
                r["tool"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("fs.read", "allow"),
        ("fs.write", "deny"),
        // An ask is recorded, then its answer: no approver, deny.
        ("fs.delete", "ask"),
        ("fs.delete", "deny"),
        ("fs.read", "allow"),
        ("fs.read", "deny"),
        ("fs.stat", "allow"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(t, d)| (t.to_string(), d.to_string()))
        .collect();
    assert_eq!(decisions, want);
    assert!(std::fs::read_to_string(g._dir.path().join("ws/hello.txt")).is_ok());
}

#[test]
fn list_shows_what_the_policy_could_allow() {
    let g = RealGate::start();
    let o = g.iron(&["list"], "");
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    let out = s(&o.stdout);
    for t in ["fs.read", "fs.stat", "fs.delete"] {
        assert!(out.contains(t), "{t} missing: {out}");
    }
    for t in ["fs.write", "fs.mkdir", "fs.move"] {
        assert!(!out.contains(t), "{t} listed: {out}");
    }
}

#[test]
fn mcp_relays_a_session_with_the_real_gate() {
    let g = RealGate::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_iron"))
        .arg("mcp")
        .env("IRON_GATE", format!("unix:{}", g.sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ask = |msg: Value| -> Value {
        writeln!(stdin, "{msg}").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line:?}"))
    };
    let r = ask(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}}));
    assert_eq!(r["result"]["serverInfo"]["name"], "ironvmm", "{r}");
    let r = ask(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "fs.read", "arguments": {"path": "hello.txt"}}}));
    assert_eq!(
        r["result"]["structuredContent"]["content"], "hello from the host\n",
        "{r}"
    );
    let r = ask(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "fs.write", "arguments": {"path": "x", "content": "y"}}}));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(r["result"]["structuredContent"]["decision"], "deny", "{r}");
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn bench_counts_what_the_real_gate_served() {
    let g = RealGate::start();
    let o = g.iron(
        &[
            "bench",
            "-n",
            "200",
            "-c",
            "4",
            "--tool",
            "fs.stat",
            "--args",
            r#"{"path":"hello.txt"}"#,
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", s(&o.stderr));
    let out = s(&o.stdout);
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["ok"], 200, "{v}");
    let served = g
        .records()
        .iter()
        .filter(|r| r["kind"] == "outcome" && r["status"] == "ok")
        .count();
    assert_eq!(served, 200);
}
