//! The official MCP Python SDK (`pip install mcp`, tests/mcp_sdk/client.py) as the
//! client: against `ironvmm gate --stdio`, and through `iron mcp` (the guest's
//! bridge, run on the host) to `ironvmm gate --listen`. The booted variant, `iron
//! mcp` inside a guest, is in gate_vm.rs.
//!
//! When python3 cannot import `mcp` these tests say so on stderr and pass, unless
//! `IRONVMM_REQUIRE_MCP_SDK` is set (CI sets it, after installing the SDK).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{
    iron, output_within, summary_line, wait_for, GateEnv as Env, Killed, READ_ONLY_POLICY,
};

fn env() -> Env {
    Env::new(READ_ONLY_POLICY)
}

fn python() -> String {
    std::env::var("IRONVMM_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether the SDK can run here; `false` after saying why (on the real stderr, which
/// the test harness does not capture, so a skip is never silent).
fn sdk_available(test: &str) -> bool {
    let probe = Command::new(python())
        .args(["-c", "import mcp, mcp.client.stdio"])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "python module `mcp` is not importable ({})",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => format!("{} cannot be run: {e}", python()),
    };
    if std::env::var_os("IRONVMM_REQUIRE_MCP_SDK").is_some() {
        panic!("{test}: {why}, and IRONVMM_REQUIRE_MCP_SDK is set");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}; `pip install mcp` to run it"
    );
    false
}

fn gate_args(e: &Env) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    vec![
        env!("CARGO_BIN_EXE_ironvmm").into(),
        "gate".into(),
        "--policy".into(),
        p(&e.policy),
        "--workspace".into(),
        p(&e.workspace),
        "--audit".into(),
        p(&e.audit),
    ]
}

/// Runs the SDK client against `server` (a command line, `--env` options first).
fn run_client(server: &[String]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_sdk/client.py");
    let child = Command::new(python())
        .arg(script)
        .args(server)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: a loaded 2-core machine starts Python slowly.
    output_within(child, Duration::from_secs(120))
}

/// What the client saw (its last stdout line), after checking it succeeded.
fn summary(o: &Output) -> Value {
    summary_line(o, "client")
}

fn check_summary(s: &Value) {
    assert_eq!(s["protocol_version"], "2025-11-25");
    assert_eq!(
        s["tools"],
        serde_json::json!(["fs.delete", "fs.read", "fs.stat"])
    );
    assert_eq!(s["allowed"]["content"], "hello\n");
    assert_eq!(s["denied"]["rule"], 5);
    assert_eq!(s["invalid_arguments"]["decided_by"], "invariant");
    assert_eq!(s["unknown_tool"], -32602);
}

/// Every call the client made is in the audit log, as decided.
fn check_audit(path: &Path) {
    let recs: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<(&str, &str, &str)> = recs
        .iter()
        .filter(|r| r["kind"] == "decision")
        .map(|r| {
            (
                r["tool"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
                r["decided_by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("fs.read", "allow", "rule"),
            ("fs.write", "deny", "rule"),
            ("fs.read", "deny", "invariant"),
            ("no.such_tool", "deny", "invariant"),
        ]
    );
}

#[test]
fn python_sdk_client_against_gate_stdio() {
    if !sdk_available("python_sdk_client_against_gate_stdio") {
        return;
    }
    let e = env();
    let mut server = gate_args(&e);
    server.push("--stdio".into());
    let o = run_client(&server);
    check_summary(&summary(&o));
    assert!(
        !e.workspace.join("x").exists(),
        "the denied write did not run"
    );
    check_audit(&e.audit);
    let v = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["audit", "verify"])
        .arg(&e.audit)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn python_sdk_client_through_iron_mcp() {
    if !sdk_available("python_sdk_client_through_iron_mcp") {
        return;
    }
    let iron = iron();
    let e = env();
    let sock = e.dir.path().join("gate.sock");
    let args = gate_args(&e);
    let mut gate = Killed(
        Command::new(&args[0])
            .args(&args[1..])
            .arg("--listen")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, "the gate", &mut gate.0);
    let o = run_client(&[
        "--env".into(),
        format!("IRON_GATE=unix:{}", sock.display()),
        iron.display().to_string(),
        "mcp".into(),
    ]);
    check_summary(&summary(&o));
    drop(gate);
    check_audit(&e.audit);
}
