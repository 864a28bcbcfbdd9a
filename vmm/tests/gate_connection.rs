//! The gate through `Connection`, host-only: protocol, decisions, audit records and
//! hostile input. The decider is the real policy engine on the p.rules of
//! tests/gate_common, so the gate and the engine are tested together.

mod gate_common;

use gate_common::*;
use ironvmm::gate::{ConnectionError, GateLimits};
use serde_json::{json, Value};

#[test]
fn allowed_read_is_served_and_audited() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(7, "fs.read", json!({"path": "/workspace/hello.txt"})),
    );
    assert_eq!(r.len(), 1);
    let res = &r[0]["result"];
    assert_eq!(r[0]["id"], 7);
    assert_eq!(res["isError"], false);
    assert_eq!(res["structuredContent"]["content"], "hello, gate\n");
    assert_eq!(res["structuredContent"]["eof"], true);
    assert_eq!(res["structuredContent"]["size"], 12);
    let text: Value = serde_json::from_str(res["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, res["structuredContent"]);

    let recs = fx.records();
    assert_eq!(recs[0]["kind"], "open");
    let d = &recs[1];
    assert_eq!(d["kind"], "decision");
    assert_eq!(d["seq"], 1);
    assert_eq!(d["vm"], "test-vm");
    assert_eq!(d["conn"], "c1");
    assert_eq!(d["rpc_id"], 7);
    assert_eq!(d["tool"], "fs.read");
    assert_eq!(d["args"], json!({"path": "/workspace/hello.txt"}));
    assert_eq!(d["decision"], "allow");
    assert_eq!(d["rule"], 2);
    assert_eq!(d["decided_by"], "rule");
    assert_eq!(d["reason"], "workspace");
    assert!(d["policy_ns"].is_u64());
    assert_eq!(d["prev"], recs[0]["hash"]);
    let o = &recs[2];
    assert_eq!(o["kind"], "outcome");
    assert_eq!(o["decision_seq"], 1);
    assert_eq!(o["status"], "ok");
    assert!(o["bytes"].as_u64().unwrap() > 20);
    assert!(o["total_us"].is_u64());
}

#[test]
fn denied_read_outside_workspace_names_rule_and_reason() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "fs.read", json!({"path": "/workspace/../secret.txt"})),
    );
    assert_eq!(
        *denial(&r[0]),
        json!({"decision": "deny", "rule": null, "decided_by": "default", "reason": DEFAULT_DENY})
    );
    assert_eq!(
        r[0]["result"]["content"][0]["text"],
        format!("denied (decided by default): {DEFAULT_DENY}")
    );
    let recs = fx.records();
    assert_eq!(
        recs.len(),
        2,
        "a denied call has a decision record and no outcome"
    );
    assert_eq!(recs[1]["decision"], "deny");
    assert_eq!(recs[1]["decided_by"], "default");
    assert_eq!(recs[1]["args"]["path"], "/workspace/../secret.txt");
}

#[test]
fn ask_resolves_as_deny_without_an_approver() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.workspace.join("ask")).unwrap();
    std::fs::write(fx.workspace.join("ask/me"), "x").unwrap();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "fs.delete", json!({"path": "/workspace/ask/me"})),
    );
    let d = denial(&r[0]);
    assert_eq!(d["rule"], 3);
    assert_eq!(d["decided_by"], "non-interactive");
    assert!(d["reason"].as_str().unwrap().starts_with("no approver"));
    assert!(r[0]["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("denied by rule 3 (decided by non-interactive): no approver"));
    assert!(
        fx.workspace.join("ask/me").exists(),
        "the denied delete did not run"
    );
    // The ask, parked, then the answer pointing back to it.
    let recs = fx.records();
    let (ask, answer) = (&recs[1], &recs[2]);
    assert_eq!(ask["decision"], "ask");
    assert_eq!(ask["rule"], 3);
    assert_eq!(ask.get("asked"), None);
    assert_eq!(answer["decision"], "deny");
    assert_eq!(answer["asked"], true);
    assert_eq!(answer["ask_seq"], ask["seq"]);
    assert_eq!(answer["decided_by"], "non-interactive");
    assert_eq!(answer["channel"], "none");
}

#[test]
fn protocol_methods() {
    // A policy under which fs.mkdir can never be allowed nor asked.
    let fx = Fixture::with_policy(
        "version 1\nallow fs.read when path under \"/workspace\"\nask fs.delete\n",
        ironvmm::audit::SyncMode::Always,
        GateLimits::default(),
        |_| {},
    );
    let mut c = fx.conn("c1");
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#);
    assert_eq!(r[0]["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(r[0]["result"]["capabilities"], json!({"tools": {}}));
    assert_eq!(r[0]["result"]["serverInfo"]["name"], "ironvmm");
    // Notifications get no reply.
    let r = roundtrip(
        &mut c,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    assert!(r.is_empty());
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":"p","method":"ping"}"#);
    assert_eq!(r[0], json!({"jsonrpc": "2.0", "id": "p", "result": {}}));
    // tools/list: only tools some rule could allow or ask (not fs.mkdir here).
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#);
    let names: Vec<&str> = r[0]["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"fs.read") && names.contains(&"fs.delete"));
    assert!(!names.contains(&"fs.mkdir"));
    let read = &r[0]["result"]["tools"][0];
    assert!(read["inputSchema"]["properties"]["path"].is_object());
    assert!(
        read.get("roles").is_none(),
        "roles are for the policy catalog, not MCP"
    );

    let r = roundtrip(
        &mut c,
        br#"{"jsonrpc":"2.0","id":3,"method":"resources/list"}"#,
    );
    assert_eq!(r[0]["error"]["code"], -32601);
    for bad in [
        &br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":[1]}"#[..],
        br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":5}}"#,
        br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"fs.read","arguments":"x"}}"#,
        br#"{"jsonrpc":"2.0","id":4,"method":"tools/call"}"#,
        br#"{"jsonrpc":"2.0","id":4,"method":"ping","params":"x"}"#,
    ] {
        let r = roundtrip(&mut c, bad);
        assert_eq!(r[0]["error"]["code"], -32602, "{}", String::from_utf8_lossy(bad));
        assert_eq!(r[0]["id"], 4);
    }
    // Nothing above reached the policy or the log.
    assert_eq!(fx.records().len(), 1);
}

#[test]
fn malformed_input_gets_the_right_error_and_the_connection_goes_on() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let deep = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{{\"x\":{}{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let cases: Vec<(Vec<u8>, i64)> = vec![
        (b"{not json".to_vec(), -32700),
        (br#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#.to_vec(), -32700),
        (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"a","path":"/etc/passwd"}}}"#.to_vec(), -32700),
        (b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xffing\"}".to_vec(), -32700),
        (deep.into_bytes(), -32600),
        (br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.to_vec(), -32600),
        (br#""just a string""#.to_vec(), -32600),
        (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#.to_vec(), -32600),
        (br#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#.to_vec(), -32600),
        (br#"{"jsonrpc":"2.0","id":1,"method":7}"#.to_vec(), -32600),
    ];
    for (frame, code) in cases {
        let r = roundtrip(&mut c, &frame);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0]["error"]["code"],
            code,
            "{}",
            String::from_utf8_lossy(&frame[..frame.len().min(80)])
        );
        assert!(r[0]["error"]["message"].as_str().unwrap().len() > 5);
    }
    // Still serving.
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":9,"method":"ping"}"#);
    assert_eq!(r[0]["result"], json!({}));
    assert_eq!(
        fx.records().len(),
        1,
        "no malformed frame reached the policy"
    );
}

#[test]
fn depth_64_is_accepted_and_65_refused() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    // The request object itself is depth 1, params 2; the rest nests below.
    let nest = |n: usize| {
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{{\"x\":{}{}}}}}",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    assert_eq!(
        roundtrip(&mut c, nest(62).as_bytes())[0]["result"],
        json!({})
    );
    assert_eq!(
        roundtrip(&mut c, nest(63).as_bytes())[0]["error"]["code"],
        -32600
    );
}

#[test]
fn frame_over_the_limit_is_refused_and_resets() {
    let fx = Fixture::with(
        ironvmm::audit::SyncMode::Always,
        GateLimits::with_max_frame(1024),
        |_| {},
    );
    let mut c = fx.conn("c1");
    let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let mut data = ping.to_vec();
    data.push(b'\n');
    data.extend(std::iter::repeat_n(b' ', 2000));
    data.push(b'\n');
    let mut out = Vec::new();
    // The ping went to a worker: the reset waits until its reply is collected.
    c.on_data(&data, &mut out).unwrap();
    assert!(out.is_empty());
    let err = settle(&mut c, &mut out).unwrap_err();
    assert_eq!(err, ConnectionError::FrameTooLong { limit: 1024 });
    let r = replies(&out);
    assert_eq!(r.len(), 2, "the ping before it is answered, then the error");
    assert_eq!(r[0]["result"], json!({}));
    assert_eq!(r[1]["error"]["code"], -32600);
    assert!(r[1]["error"]["message"].as_str().unwrap().contains("1024"));
    out.clear();
    assert_eq!(c.on_data(ping, &mut out), Err(ConnectionError::Closed));
    assert!(out.is_empty());
}

#[test]
fn unterminated_frame_is_bounded() {
    let fx = Fixture::with(
        ironvmm::audit::SyncMode::Always,
        GateLimits::with_max_frame(4096),
        |_| {},
    );
    let mut c = fx.conn("c1");
    let mut out = Vec::new();
    let chunk = [b'a'; 1000];
    let mut result = Ok(());
    for _ in 0..10 {
        result = c.on_data(&chunk, &mut out);
        assert!(c.pending_bytes() <= 2 * 4096);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(ConnectionError::FrameTooLong { limit: 4096 }));
    assert_eq!(replies(&out)[0]["error"]["code"], -32600);
}

#[test]
fn frames_split_anywhere_are_reassembled() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let mut all = Vec::new();
    for i in 0..5 {
        all.extend(call_frame(i, "fs.stat", json!({"path": "hello.txt"})));
        all.push(b'\n');
    }
    let mut out = Vec::new();
    for b in all.chunks(3) {
        c.on_data(b, &mut out).unwrap();
    }
    settle(&mut c, &mut out).unwrap();
    let r = replies(&out);
    assert_eq!(r.len(), 5);
    let mut ids: Vec<u64> = r.iter().map(|rep| rep["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    for rep in &r {
        assert_eq!(rep["result"]["structuredContent"]["kind"], "file");
    }
}

#[test]
fn close_mid_frame_decides_nothing() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let frame = call_frame(1, "fs.write", json!({"path": "out.txt", "content": "x"}));
    let mut out = Vec::new();
    c.on_data(&frame[..frame.len() - 5], &mut out).unwrap();
    assert!(out.is_empty());
    c.on_close();
    assert_eq!(c.on_data(b"\n", &mut out), Err(ConnectionError::Closed));
    assert!(!fx.workspace.join("out.txt").exists());
    assert_eq!(fx.records().len(), 1, "only the open record");
}

#[test]
fn ten_thousand_calls_in_a_row_lose_nothing() {
    let fx = Fixture::with(
        ironvmm::audit::SyncMode::Batch,
        GateLimits::default(),
        |_| {},
    );
    let mut c = fx.conn("c1");
    let mut out = Vec::new();
    let mut pending = Vec::new();
    let n = 10_000u64;
    for i in 0..n {
        pending.extend(call_frame(
            i,
            "fs.stat",
            json!({"path": "/workspace/hello.txt"}),
        ));
        pending.push(b'\n');
        if pending.len() > 16 * 1024 || i + 1 == n {
            // As a transport does: take the replies, then let the waiting frames go on.
            let mut chunk = Vec::new();
            c.on_data(&pending, &mut chunk).unwrap();
            out.extend_from_slice(&chunk);
            while c.has_pending_output() {
                chunk.clear();
                settle(&mut c, &mut chunk).unwrap();
                out.extend_from_slice(&chunk);
            }
            pending.clear();
        }
    }
    let r = replies(&out);
    assert_eq!(r.len() as u64, n);
    // Replies may come in any order: each id exactly once, none lost.
    let mut ids: Vec<u64> = r.iter().map(|rep| rep["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..n).collect::<Vec<_>>());
    assert!(r.iter().all(|rep| rep["result"]["isError"] == false));
    let head = fx.gate.audit().close(Some(0)).unwrap();
    let f = std::fs::File::open(&fx.audit_path).unwrap();
    let key =
        ironvmm::audit::AuditKey::load(&ironvmm::audit::default_key_path(&fx.audit_path)).unwrap();
    let v = ironvmm::audit::verify::verify(std::io::BufReader::new(f), &key, Some(&head), false)
        .unwrap();
    assert_eq!(v.records, 1 + 2 * n + 1);
}

#[test]
fn symlink_out_of_the_workspace_is_refused_by_the_service() {
    let fx = Fixture::new();
    let ws = &fx.workspace;
    std::os::unix::fs::symlink(fx.dir.path().join("secret.txt"), ws.join("leak")).unwrap();
    std::os::unix::fs::symlink("..", ws.join("up")).unwrap();
    std::os::unix::fs::symlink("hello.txt", ws.join("inside")).unwrap();
    std::os::unix::fs::symlink("/proc/self/root/etc/passwd", ws.join("magic")).unwrap();
    let mut c = fx.conn("c1");
    // The policy allows these (their path strings are under /workspace); the kernel
    // refuses to resolve them outside the root.
    for (i, args) in [
        json!({"path": "/workspace/leak"}),
        json!({"path": "/workspace/up/secret.txt"}),
        json!({"path": "/workspace/magic"}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = roundtrip(&mut c, &call_frame(i as u64, "fs.read", args.clone()));
        let res = &r[0]["result"];
        assert_eq!(res["isError"], true, "{args}");
        assert_eq!(
            res["structuredContent"]["error"]["kind"], "outside_root",
            "{args}"
        );
        assert!(!res.to_string().contains("host secret"));
    }
    // Writing through the link is refused too, and the target is untouched.
    let r = roundtrip(
        &mut c,
        &call_frame(9, "fs.write", json!({"path": "leak", "content": "pwned"})),
    );
    assert_eq!(r[0]["result"]["isError"], true);
    assert_eq!(
        std::fs::read_to_string(fx.dir.path().join("secret.txt")).unwrap(),
        "host secret\n"
    );
    // A link that stays inside works.
    let r = roundtrip(
        &mut c,
        &call_frame(10, "fs.read", json!({"path": "inside"})),
    );
    assert_eq!(
        r[0]["result"]["structuredContent"]["content"],
        "hello, gate\n"
    );
    // The audit log shows allow + tool_error for the refused ones.
    let recs = fx.records();
    assert_eq!(recs[1]["decision"], "allow");
    assert_eq!(recs[2]["status"], "tool_error");
}

#[test]
fn decision_is_durable_before_the_service_runs() {
    use ironvmm::services::{Service, ToolError, ToolSpec};
    struct Probe(std::path::PathBuf);
    impl Service for Probe {
        fn tools(&self) -> Vec<ToolSpec> {
            vec![ToolSpec {
                name: "test.probe",
                description: "reads the audit log while it is being served",
                input_schema: json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
                roles: &[],
                aliases: &[],
                reply_cap: ironvmm::services::DEFAULT_REPLY_CAP,
            }]
        }
        fn call(&self, _: &str, args: &Value) -> Result<Value, ToolError> {
            let text = std::fs::read_to_string(&self.0).unwrap();
            let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            Ok(json!({"last_kind": last["kind"], "last_args": last["args"], "echo": args}))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("a.jsonl");
    let log = std::sync::Arc::new(
        ironvmm::audit::AuditLog::create(
            &log_path,
            "vm",
            ironvmm::audit::SyncMode::Always,
            Default::default(),
        )
        .unwrap(),
    );
    let mut services = ironvmm::services::Services::new();
    services.add(Box::new(Probe(log_path.clone())));
    let policy = load_policy(
        dir.path(),
        &format!("version 1\n{TEST_TOOLS_RULE}"),
        &services,
    );
    let gate = std::sync::Arc::new(ironvmm::gate::Gate::new(
        Box::new(policy),
        services,
        log,
        GateLimits::default(),
    ));
    let mut c = ironvmm::gate::Connection::unwoken(gate, "c".into());
    let r = roundtrip(&mut c, &call_frame(1, "test.probe", json!({"n": 42})));
    let s = &r[0]["result"]["structuredContent"];
    assert_eq!(s["last_kind"], "decision", "{}", r[0]);
    assert_eq!(s["last_args"], json!({"n": 42}));
    assert_eq!(
        s["echo"],
        json!({"n": 42}),
        "the service sees the value the policy decided"
    );
}

#[test]
fn secrets_are_redacted_in_the_log_but_reach_the_service() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    // fs.write has no secret arguments: the engine's schema invariant refuses the
    // unknown key before any service runs, and the log still keeps its value out.
    let r = roundtrip(
        &mut c,
        &call_frame(
            1,
            "fs.write",
            json!({"path": "t.txt", "content": "v", "api_key": "sk-123"}),
        ),
    );
    let d = denial(&r[0]);
    assert_eq!(d["decided_by"], "invariant", "{d}");
    assert!(d["reason"].as_str().unwrap().contains("api_key"), "{d}");
    assert!(!fx.workspace.join("t.txt").exists(), "the service ran");
    let d = &fx.records()[1];
    assert_eq!(d["args"]["api_key"], "[redacted]");
    assert!(!std::fs::read_to_string(&fx.audit_path)
        .unwrap()
        .contains("sk-123"));
}

#[test]
fn replies_are_bounded_per_call_and_the_rest_waits() {
    let limits = GateLimits {
        max_output: 10_000,
        ..GateLimits::with_max_frame(4096)
    };
    let fx = Fixture::with(ironvmm::audit::SyncMode::Batch, limits, |_| {});
    std::fs::write(fx.workspace.join("4k"), "x".repeat(4000)).unwrap();
    let mut c = fx.conn("c1");
    let mut data = Vec::new();
    for i in 0..20 {
        data.extend(call_frame(i, "fs.read", json!({"path": "4k"})));
        data.push(b'\n');
    }
    let mut out = Vec::new();
    c.on_data(&data, &mut out).unwrap();
    settle(&mut c, &mut out).unwrap();
    let mut got = replies(&out).len();
    assert!(
        got < 20 && out.len() < 10_000 + 9_000,
        "{got} replies, {} bytes",
        out.len()
    );
    assert!(c.has_pending_output());
    let mut rounds = 0;
    while c.has_pending_output() {
        out.clear();
        settle(&mut c, &mut out).unwrap();
        assert!(out.len() < 10_000 + 9_000, "one round, {} bytes", out.len());
        got += replies(&out).len();
        rounds += 1;
        assert!(rounds < 20);
    }
    assert_eq!(got, 20);
    // A peer that keeps sending while its replies wait is cut off at max_buffered.
    let mut out = vec![0u8; 10_000]; // replies not yet sent
    let mut err = Ok(());
    for _ in 0..100 {
        err = c.on_data(&data[..1000], &mut out);
        if err.is_err() {
            break;
        }
    }
    assert_eq!(err, Err(ConnectionError::Backlog { limit: 8192 }));
    assert!(c.pending_bytes() <= 8192);
}

#[test]
fn a_panicking_service_is_an_error_outcome_not_a_crash() {
    use ironvmm::services::{Service, ToolError, ToolSpec};
    struct Boom;
    impl Service for Boom {
        fn tools(&self) -> Vec<ToolSpec> {
            vec![ToolSpec {
                name: "test.probe",
                description: "panics",
                input_schema: json!({"type": "object"}),
                roles: &[],
                aliases: &[],
                reply_cap: ironvmm::services::DEFAULT_REPLY_CAP,
            }]
        }
        fn call(&self, _: &str, _: &Value) -> Result<Value, ToolError> {
            panic!("service bug")
        }
    }
    let fx = Fixture::with(
        ironvmm::audit::SyncMode::Always,
        GateLimits::default(),
        |s| s.add(Box::new(Boom)),
    );
    let mut c = fx.conn("c1");
    let r = roundtrip(&mut c, &call_frame(1, "test.probe", json!({})));
    assert_eq!(r[0]["result"]["isError"], true);
    assert_eq!(
        r[0]["result"]["structuredContent"]["error"]["kind"],
        "internal"
    );
    assert_eq!(fx.records()[2]["status"], "error");
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#);
    assert_eq!(r[0]["result"], json!({}));
}

#[test]
fn a_tool_no_service_here_offers_is_denied_as_unknown() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "mail.send", json!({"to": "x@example.com"})),
    );
    // MCP: an unknown tool is a protocol error, not a tool result; audited all the same.
    assert_eq!(r[0]["id"], 1);
    assert_eq!(r[0]["error"]["code"], -32602);
    assert_eq!(r[0]["error"]["message"], "Unknown tool: mail.send");
    let d = &fx.records()[1];
    assert_eq!(d["tool"], "mail.send");
    assert_eq!(
        (&d["decision"], &d["decided_by"], &d["reason"]),
        (&json!("deny"), &json!("invariant"), &json!("unknown tool"))
    );
}

#[test]
fn ids_are_strings_or_integers() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    for ok in [
        &br#"{"jsonrpc":"2.0","id":"abc","method":"ping"}"#[..],
        br#"{"jsonrpc":"2.0","id":-5,"method":"ping"}"#,
        br#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"ping"}"#,
    ] {
        let r = roundtrip(&mut c, ok);
        assert_eq!(r[0]["result"], json!({}), "{}", String::from_utf8_lossy(ok));
    }
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":-5,"method":"ping"}"#);
    assert_eq!(r[0]["id"], -5);
    for bad in [
        &br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#[..],
        br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
        br#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#,
        br#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
        br#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"fs.read","arguments":{"path":"/workspace/hello.txt"}}}"#,
    ] {
        let r = roundtrip(&mut c, bad);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["error"]["code"], -32600, "{}", String::from_utf8_lossy(bad));
        assert_eq!(r[0]["id"], Value::Null);
    }
    assert_eq!(fx.records().len(), 1, "no call with a bad id was decided");
}

#[test]
fn responses_from_the_client_are_ignored() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    for resp in [
        &br#"{"jsonrpc":"2.0","id":1,"result":{}}"#[..],
        br#"{"jsonrpc":"2.0","id":"x","error":{"code":-32601,"message":"no"}}"#,
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}"#,
        br#"{"jsonrpc":"2.0","id":{"bad":1},"result":7}"#,
    ] {
        let r = roundtrip(&mut c, resp);
        assert!(r.is_empty(), "{}: {r:?}", String::from_utf8_lossy(resp));
    }
    // Not a response (neither result nor error) and no method: still an invalid request.
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":3}"#);
    assert_eq!(r[0]["error"]["code"], -32600);
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#);
    assert_eq!(r[0]["result"], json!({}));
}

#[test]
fn initialize_needs_its_params_and_negotiates_the_version() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let init = |c: &mut ironvmm::gate::Connection, params: Value| {
        let f = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params});
        roundtrip(c, &serde_json::to_vec(&f).unwrap()).remove(0)
    };
    let full = |v: &str| json!({"protocolVersion": v, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}});
    for (asked, answered) in [
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("2024-11-05", "2025-11-25"),
        ("1999-01-01", "2025-11-25"),
    ] {
        let r = init(&mut c, full(asked));
        assert_eq!(r["result"]["protocolVersion"], answered, "asked {asked}");
    }
    for missing in ["protocolVersion", "capabilities", "clientInfo"] {
        let mut p = full("2025-06-18");
        p.as_object_mut().unwrap().remove(missing);
        let r = init(&mut c, p);
        assert_eq!(r["error"]["code"], -32602, "without {missing}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(missing),
            "{r}"
        );
    }
    let mut p = full("2025-06-18");
    p["protocolVersion"] = json!(20250618);
    assert_eq!(init(&mut c, p)["error"]["code"], -32602);
    let r = roundtrip(&mut c, br#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#);
    assert_eq!(r[0]["error"]["code"], -32602);
}

#[test]
fn tools_list_refuses_a_cursor_it_never_gave() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"page2"}}"#,
    );
    assert_eq!(r[0]["error"]["code"], -32602);
    assert!(r[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cursor"));
    let r = roundtrip(
        &mut c,
        br#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#,
    );
    assert!(r[0]["result"]["tools"].is_array());
}
