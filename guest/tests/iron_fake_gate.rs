//! `iron` against a fake gate: a Unix socket speaking JSON lines with canned
//! replies chosen by tool name. Checks the exit codes and outputs of docs/image.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

fn reply(req: &Value) -> Option<String> {
    let id = req.get("id")?.clone();
    let method = req["method"].as_str().unwrap_or("");
    let ok =
        |result: Value| Some(json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string());
    let err = |code: i64, msg: &str, data: Value| {
        Some(
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": msg, "data": data}})
                .to_string(),
        )
    };
    match method {
        "initialize" => ok(json!({"protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}}, "serverInfo": {"name": "fake", "version": "0"}})),
        "ping" => ok(json!({})),
        "tools/list" => ok(
            json!({"tools": [{"name": "fs.read", "description": "read a file",
            "inputSchema": {"type": "object"}}]}),
        ),
        "tools/call" => {
            let args = &req["params"]["arguments"];
            match req["params"]["name"].as_str().unwrap_or("") {
                "echo" => ok(
                    json!({"content": [{"type": "text", "text": args.to_string()}],
                    "structuredContent": args, "isError": false}),
                ),
                "structured" => {
                    ok(json!({"content": [], "structuredContent": {"n": 1}, "isError": false}))
                }
                "denied" => ok(json!({"content": [{"type": "text",
                    "text": "denied by rule 7 (decided by rule): mail to strangers"}],
                    "structuredContent": {"decision": "deny", "rule": 7,
                    "decided_by": "rule", "reason": "mail to strangers"}, "isError": true})),
                "slow_human" => ok(json!({"content": [{"type": "text",
                    "text": "denied (decided by timeout): nobody answered"}],
                    "structuredContent": {"decision": "deny", "rule": null,
                    "decided_by": "timeout", "reason": "nobody answered"}, "isError": true})),
                // The codes gates used for denials before MCP's tool results: a
                // protocol error now, never a denial.
                "old_denial" => err(
                    -32001,
                    "denied",
                    json!({"decision": "deny", "rule": 7,
                    "decided_by": "rule", "reason": "old"}),
                ),
                "broken" => ok(
                    json!({"content": [{"type": "text", "text": "no such file"}], "isError": true}),
                ),
                "unknown_method" => err(-32601, "method not found", Value::Null),
                "garbage" => Some("this is not json".into()),
                "hangup" => None,
                _ => err(-32602, "bad params", Value::Null),
            }
        }
        _ => err(-32601, "method not found", Value::Null),
    }
}

fn serve(conn: UnixStream) {
    let mut w = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let req: Value = serde_json::from_str(&line).unwrap();
        if req.get("id").is_none() {
            continue; // a notification
        }
        // No reply means hang up (the "hangup" tool).
        let Some(r) = reply(&req) else { return };
        if w.write_all(format!("{r}\n").as_bytes()).is_err() {
            return;
        }
    }
}

struct Gate {
    path: PathBuf,
}

impl Gate {
    fn start(name: &str) -> Gate {
        let path =
            std::env::temp_dir().join(format!("iron_gate_{}_{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve(conn));
            }
        });
        Gate { path }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn iron(gate: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iron"))
        .args(args)
        .env("IRON_GATE", format!("unix:{}", gate.display()))
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

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn call_exit_codes() {
    let g = Gate::start("codes");
    let out = iron(&g.path, &["call", "echo", r#"{"path":"/workspace/a"}"#], "");
    assert_eq!(out.status.code(), Some(0), "{}", s(&out.stderr));
    assert_eq!(s(&out.stdout), "{\"path\":\"/workspace/a\"}\n");

    let out = iron(&g.path, &["call", "structured"], "");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(s(&out.stdout), "{\"n\":1}\n");

    let out = iron(&g.path, &["call", "denied", "{}"], "");
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let e = s(&out.stderr);
    assert_eq!(
        e,
        "iron: denied by rule 7 (decided by rule): mail to strangers\n"
    );
    // --json prints the result, and still exits 3 for a denial.
    let out = iron(&g.path, &["call", "--json", "denied"], "");
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["structuredContent"]["decision"], "deny");

    let out = iron(&g.path, &["call", "slow_human"], "");
    assert_eq!(out.status.code(), Some(3));
    assert!(s(&out.stderr).contains("nobody answered"));

    let out = iron(&g.path, &["call", "broken"], "");
    assert_eq!(out.status.code(), Some(4));
    assert!(s(&out.stderr).contains("no such file"));

    for tool in ["unknown_method", "garbage", "hangup", "other", "old_denial"] {
        let out = iron(&g.path, &["call", tool], "");
        assert_eq!(out.status.code(), Some(4), "{tool}: {}", s(&out.stderr));
    }
}

#[test]
fn arguments_from_stdin_and_raw_json() {
    let g = Gate::start("stdin");
    let out = iron(&g.path, &["call", "echo", "-"], r#"{"k": [1, 2]}"#);
    assert_eq!(out.status.code(), Some(0), "{}", s(&out.stderr));
    assert_eq!(s(&out.stdout), "{\"k\":[1,2]}\n");
    let out = iron(&g.path, &["call", "--json", "echo", r#"{"a":1}"#], "");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["structuredContent"]["a"], 1);
}

#[test]
fn usage_errors_exit_4_without_connecting() {
    let missing = Path::new("/nonexistent/gate.sock");
    for args in [
        &["call"][..],
        &["call", "t", "[1]"],
        &["call", "t", "{bad"],
        &["frob"],
    ] {
        let out = iron(missing, args, "");
        assert_eq!(out.status.code(), Some(4), "{args:?}");
    }
}

#[test]
fn unreachable_gate_exits_5() {
    let out = iron(Path::new("/nonexistent/gate.sock"), &["call", "echo"], "");
    assert_eq!(out.status.code(), Some(5));
    assert!(s(&out.stderr).contains("cannot reach the gate"));
    let out = Command::new(env!("CARGO_BIN_EXE_iron"))
        .args(["call", "echo"])
        .env("IRON_GATE", "tcp:1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "a bad IRON_GATE is a usage error"
    );
}

#[test]
fn list_prints_tools() {
    let g = Gate::start("list");
    let out = iron(&g.path, &["list"], "");
    assert_eq!(out.status.code(), Some(0));
    assert!(s(&out.stdout).starts_with("fs.read"));
}

#[test]
fn mcp_relays_both_ways() {
    let g = Gate::start("mcp");
    let input = concat!(
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
        "\n\n",
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        "\n",
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"x":1}}}"#,
        "\n",
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"denied","arguments":{}}}"#,
        "\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_iron"))
        .arg("mcp")
        .env("IRON_GATE", format!("unix:{}", g.path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["id"], 1);
    assert_eq!(first["result"]["serverInfo"]["name"], "fake");
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["id"], 2);
    assert_eq!(second["result"]["structuredContent"]["x"], 1);
    // A denial passes through untouched: the MCP client reads it as a tool result.
    let third: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(third["id"], 3);
    assert_eq!(third["result"]["isError"], true);
    assert_eq!(third["result"]["structuredContent"]["decision"], "deny");
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bench_reports_json_last() {
    let g = Gate::start("bench");
    let out = iron(&g.path, &["bench", "-n", "200", "-c", "4"], "");
    assert_eq!(out.status.code(), Some(0), "{}", s(&out.stderr));
    let text = s(&out.stdout);
    assert!(text.contains("latency histogram"));
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["calls"], 200);
    assert_eq!(last["connections"], 4);
    assert_eq!(last["ok"], 200);
    assert_eq!(last["count"], 200);
    assert_eq!(last["method"], "ping");
    assert!(last["p50_us"].as_f64().unwrap() > 0.0);
    assert!(last["p99_us"].as_f64().unwrap() >= last["p50_us"].as_f64().unwrap());
    let hist_total: u64 = last["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(hist_total, 200);

    let out = iron(&g.path, &["bench", "-n", "10", "--tool", "denied"], "");
    let last: Value = serde_json::from_str(s(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["denied"], 10);
    assert_eq!(last["tool"], "denied");

    let out = iron(Path::new("/nonexistent/g.sock"), &["bench", "-n", "5"], "");
    assert_eq!(out.status.code(), Some(5));
}
