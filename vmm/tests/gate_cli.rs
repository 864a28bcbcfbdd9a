//! `ironvmm gate` as a process, with a real p.rules policy: --stdio, --listen with
//! 100 concurrent clients, signals, limits, and the audit log failing under it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{
    call, ironvmm, json_lines, records, stdio_session, verify, GateEnv as Env, READ_ONLY_POLICY,
};

fn env() -> Env {
    Env::new(READ_ONLY_POLICY)
}

/// Runs `gate --stdio` over the given input lines; returns (exit, replies, stderr).
fn stdio(e: &Env, extra: &[&str], lines: &[String]) -> (Option<i32>, Vec<Value>, String) {
    let mut input = lines.join("\n");
    input.push('\n');
    stdio_raw(e.gate(&[&["--stdio"], extra].concat()), input.as_bytes())
}

fn stdio_raw(cmd: Command, input: &[u8]) -> (Option<i32>, Vec<Value>, String) {
    let out = stdio_session(cmd, input);
    let mut replies = json_lines(&out.stdout);
    // Calls run concurrently and replies come in any order: sorted by id (stable,
    // id-less error replies last) so tests can index them.
    replies.sort_by_key(|r: &Value| r["id"].as_u64().unwrap_or(u64::MAX));
    (
        out.status.code(),
        replies,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn stdio_session_with_real_policy() {
    let e = env();
    let (code, r, err) = stdio(
        &e,
        &[],
        &[
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#.into(),
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into(),
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.into(),
            call(2, "fs.read", json!({"path": "/workspace/hello.txt"})),
            call(3, "fs.read", json!({"path": "/etc/passwd"})),
            call(4, "fs.write", json!({"path": "/workspace/x", "content": "x"})),
            call(5, "fs.delete", json!({"path": "/workspace/hello.txt"})),
            call(6, "mail.send", json!({})),
            call(7, "fs.read", json!({"path": "/workspace/hello.txt", "bogus": 1})),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(r.len(), 8, "{r:?}");
    assert_eq!(r[0]["result"]["protocolVersion"], "2025-06-18");
    let mut names: Vec<&str> = r[1]["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fs.delete", "fs.read", "fs.stat"]);
    assert_eq!(r[2]["result"]["structuredContent"]["content"], "hello\n");
    let d = denial(&r[3]);
    assert_eq!(d["decided_by"], "default");
    assert_eq!(d["rule"], Value::Null);
    assert_eq!(denial(&r[4])["rule"], 5);
    assert_eq!(denial(&r[4])["reason"], "read-only here");
    assert_eq!(
        r[4]["result"]["content"][0]["text"],
        "denied by rule 5 (decided by rule): read-only here"
    );
    assert_eq!(denial(&r[5])["rule"], 4);
    assert!(denial(&r[5])["reason"]
        .as_str()
        .unwrap()
        .starts_with("no approver"));
    assert_eq!(denial(&r[5])["decided_by"], "non-interactive");
    assert!(e.workspace.join("hello.txt").exists());
    // An unknown tool is a protocol error; invalid arguments are a denial (invariant).
    assert_eq!(r[6]["error"]["code"], -32602);
    assert_eq!(r[6]["error"]["message"], "Unknown tool: mail.send");
    assert_eq!(denial(&r[7])["decided_by"], "invariant");
    assert!(!e.workspace.join("x").exists());

    let recs = records(&e.audit);
    assert_eq!(recs[0]["kind"], "open");
    assert_eq!(recs[0]["policy_sha256"].as_str().unwrap().len(), 64);
    let decisions: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "decision").collect();
    assert_eq!(decisions.len(), 7, "six calls, the ask with two records");
    let of = |id: u64| -> Vec<&Value> {
        decisions
            .iter()
            .copied()
            .filter(|d| d["rpc_id"] == id)
            .collect()
    };
    assert_eq!(of(2)[0]["decision"], "allow");
    assert_eq!(of(2)[0]["rule"], 2);
    assert_eq!(of(3)[0]["decision"], "deny");
    assert_eq!(of(3)[0]["args"]["path"], "/etc/passwd");
    let asked = of(5);
    assert_eq!(asked[0]["decision"], "ask");
    assert_eq!(asked[1]["decision"], "deny");
    assert_eq!(asked[1]["ask_seq"], asked[0]["seq"]);
    let close = recs.last().unwrap();
    assert_eq!(close["kind"], "close");
    assert_eq!(close["exit"], 0);
    let head = close["hash"].as_str().unwrap();
    assert!(err.contains(head), "the head is printed at exit: {err}");
    let (code, out) = verify(&e.audit, &["--head", head]);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn stdio_frame_over_the_limit_resets_and_exits_125() {
    let e = env();
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let (code, r, err) = stdio(
        &e,
        &["--max-frame", "1000"],
        &[r#"{"jsonrpc":"2.0","id":0,"method":"ping"}"#.into(), big],
    );
    assert_eq!(code, Some(125), "{err}");
    assert_eq!(r.len(), 2);
    assert_eq!(r[1]["error"]["code"], -32600);
    assert!(err.contains("over the limit"), "{err}");
    assert_eq!(verify(&e.audit, &[]).0, Some(0), "closed cleanly");
}

#[test]
fn invalid_policy_exits_127() {
    let e = env();
    std::fs::write(&e.policy, "allow fs.read when\n").unwrap();
    let (code, _, err) = stdio(&e, &[], &[]);
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("p.rules:1"), "{err}");
    assert!(!e.audit.exists(), "no log for a gate that never started");
}

#[test]
fn audit_write_failure_fails_closed_and_exits_125() {
    let e = env();
    let mut cmd = e.gate(&["--stdio"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // The log may grow to 4 KiB; the next write fails with EFBIG.
            let lim = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let lines: Vec<String> = (0..100)
        .map(|i| call(i, "fs.read", json!({"path": "hello.txt"})))
        .collect();
    let mut input = lines.join("\n");
    input.push('\n');
    let (code, r, err) = stdio_raw(cmd, input.as_bytes());
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("audit log"), "{err}");
    let served = r.iter().filter(|x| x["result"]["isError"] == false).count();
    let denied: Vec<&Value> = r
        .iter()
        .filter(|x| x["result"]["structuredContent"]["decision"] == "deny")
        .collect();
    assert!(
        served > 0 && !denied.is_empty(),
        "{served} served, {} denied",
        denied.len()
    );
    assert_eq!(denial(denied[0])["decided_by"], "invariant");
    // Calls run concurrently, so served and denied replies interleave; but every
    // served call has its allow record in the log, written before its service ran.
    let log = std::fs::read_to_string(&e.audit).unwrap();
    let allowed: std::collections::HashSet<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|d| d["kind"] == "decision" && d["decision"] == "allow")
        .filter_map(|d| d["rpc_id"].as_u64())
        .collect();
    for x in r.iter().filter(|x| x["result"]["isError"] == false) {
        let id = x["id"].as_u64().unwrap();
        assert!(allowed.contains(&id), "call {id} served without its record");
    }
    assert!(std::fs::metadata(&e.audit).unwrap().len() <= 4096);
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("gate exited early: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn listen_serves_100_concurrent_connections() {
    let e = env();
    let sock = e.dir.path().join("gate.sock");
    let mut child = e
        .gate(&["--audit-sync", "batch", "--listen"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut child);
    const CLIENTS: u64 = 100;
    const CALLS: u64 = 20;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS as usize));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sock = sock.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                barrier.wait(); // all 100 connected at once
                let mut w = s.try_clone().unwrap();
                let mut rd = BufReader::new(s);
                for i in 0..CALLS {
                    let id = c * 1000 + i;
                    let args = if i % 2 == 0 {
                        json!({"path": "hello.txt"})
                    } else {
                        json!({"path": "/etc/shadow"})
                    };
                    writeln!(w, "{}", call(id, "fs.read", args)).unwrap();
                    let mut line = String::new();
                    rd.read_line(&mut line).unwrap();
                    let v: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(v["id"], id);
                    if i % 2 == 0 {
                        assert_eq!(v["result"]["structuredContent"]["content"], "hello\n");
                    } else {
                        assert_eq!(denial(&v)["decision"], "deny");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // SIGTERM: the close record is written, exit 143.
    // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    let (code, out) = verify(&e.audit, &[]);
    assert_eq!(code, Some(0), "{out}");
    let recs = records(&e.audit);
    let decisions: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "decision").collect();
    assert_eq!(decisions.len() as u64, CLIENTS * CALLS);
    let conns: std::collections::HashSet<&str> = decisions
        .iter()
        .map(|d| d["conn"].as_str().unwrap())
        .collect();
    assert_eq!(conns.len() as u64, CLIENTS);
    assert_eq!(recs.last().unwrap()["exit"], 143);
}

#[test]
fn tools_json_is_a_catalog_the_policy_cli_reads() {
    let e = env();
    let out = ironvmm().args(["tools", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let cat: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = cat["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fs.read",
            "fs.write",
            "fs.list",
            "fs.stat",
            "fs.mkdir",
            "fs.move",
            "fs.delete",
            "mail.list",
            "mail.read",
            "mail.search",
            "mail.send",
            "mail.move",
            "mail.delete",
            "mail.purge",
            "http.fetch",
            "net.connect",
            "net.http",
            "llm.chat"
        ]
    );
    assert_eq!(
        cat["tools"][5]["roles"],
        json!({"from": "tree", "to": "tree"})
    );
    // Every tool shows its reply cap, in bytes.
    let cap = |name: &str| {
        cat["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["replyCap"]
            .as_u64()
    };
    assert_eq!(cap("fs.read"), Some(768 * 1024));
    assert_eq!(cap("http.fetch"), Some(900 * 1024));
    assert!(names.iter().all(|n| cap(n).is_some_and(|c| c > 0)));
    let text = ironvmm().arg("tools").output().unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    let fetch = text.lines().find(|l| l.starts_with("http.fetch ")).unwrap();
    assert!(fetch.contains(" 900 KiB "), "{text}");
    let file = e.dir.path().join("catalog.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = ironvmm()
        .args(["policy", "eval", "--catalog"])
        .arg(&file)
        .arg(&e.policy)
        .args([
            "--call",
            r#"{"tool":"fs.read","args":{"path":"/workspace/a","bogus":1}}"#,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("invariant"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_log_and_policy_inside_the_workspace_are_protected() {
    let mut e = env();
    // Both files live in the workspace, which is a bad idea the gate must survive.
    e.audit = e.workspace.join("audit.jsonl");
    let policy = e.workspace.join("p.rules");
    std::fs::write(&policy, "allow fs.*\ndefault deny\n").unwrap();
    e.policy = policy;
    // The log's key never goes in the workspace: refused unless it is put elsewhere.
    let (code, _, err) = stdio(&e, &[], &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("would lie inside the workspace") && err.contains("--audit-key"),
        "{err}"
    );
    let key = e.dir.path().join("audit.key");
    let (code, r, err) = stdio(
        &e,
        &["--audit-key", key.to_str().unwrap()],
        &[
            call(1, "fs.read", json!({"path": "/workspace/audit.jsonl"})),
            call(
                2,
                "fs.write",
                json!({"path": "p.rules", "content": "default allow"}),
            ),
            call(3, "fs.delete", json!({"path": "/workspace/./audit.jsonl"})),
            call(4, "fs.read", json!({"path": "hello.txt"})),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    for rep in &r[..3] {
        assert_eq!(denial(rep)["decided_by"], "invariant", "{rep}");
    }
    assert_eq!(r[3]["result"]["isError"], false);
    assert_eq!(
        std::fs::read_to_string(e.workspace.join("p.rules")).unwrap(),
        "allow fs.*\ndefault deny\n"
    );
    assert_eq!(
        verify(&e.audit, &["--key", key.to_str().unwrap()]).0,
        Some(0)
    );
    // Without its key the log cannot be checked, and says so.
    let (code, out) = verify(&e.audit, &[]);
    assert_eq!(code, Some(125), "{out}");
    assert!(
        out.contains("without the log's key") && out.contains("--key"),
        "{out}"
    );
}

#[test]
fn move_is_decided_on_both_ends() {
    let e = env();
    std::fs::write(
        &e.policy,
        "allow fs.move when path under \"/workspace/out\"\ndefault deny\n",
    )
    .unwrap();
    std::fs::create_dir(e.workspace.join("out")).unwrap();
    std::fs::write(e.workspace.join("out/a"), "a").unwrap();
    let (code, r, err) = stdio(
        &e,
        &[],
        &[
            call(
                1,
                "fs.move",
                json!({"from": "/workspace/hello.txt", "to": "/workspace/out/h"}),
            ),
            call(
                2,
                "fs.move",
                json!({"from": "/workspace/out/a", "to": "/workspace/a"}),
            ),
            call(
                3,
                "fs.move",
                json!({"from": "/workspace/out/a", "to": "/workspace/out/b"}),
            ),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(denial(&r[0])["decision"], "deny");
    assert_eq!(denial(&r[1])["decision"], "deny");
    assert_eq!(r[2]["result"]["isError"], false, "{}", r[2]);
    assert!(e.workspace.join("hello.txt").exists() && e.workspace.join("out/b").exists());
}

/// The `structuredContent` of a denial, after checking that the reply is one (a tool
/// result with `isError`, not a JSON-RPC error).
fn denial(reply: &Value) -> &Value {
    assert!(
        reply.get("error").is_none(),
        "a denial is not an error: {reply}"
    );
    assert_eq!(reply["result"]["isError"], true, "{reply}");
    let d = &reply["result"]["structuredContent"];
    assert_eq!(d["decision"], "deny", "{reply}");
    d
}

#[test]
fn config_file_configures_the_services_and_unknown_keys_are_named() {
    let e = env();
    let bad = e.dir.path().join("bad.toml");
    std::fs::write(&bad, "[htpp]\ntimeout_secs = 3\n").unwrap();
    let (code, r, err) = stdio(&e, &["--config", bad.to_str().unwrap()], &[]);
    assert_eq!(code, Some(125), "{err}");
    assert!(r.is_empty());
    assert!(
        err.contains("unknown key `htpp` (did you mean `http`?)"),
        "{err}"
    );

    // The example file, its secrets in the environment: mail is served from the
    // example Maildir, and only what the policy allows is listed.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ironvmm.toml");
    let policy = e.dir.path().join("mail.rules");
    std::fs::write(
        &policy,
        "version 1\nallow mail.list\nallow mail.read\ndefault deny\n",
    )
    .unwrap();
    let mut cmd = ironvmm();
    cmd.arg("gate")
        .arg("--policy")
        .arg(&policy)
        .arg("--config")
        .arg(&example)
        .arg("--audit")
        .arg(&e.audit)
        .arg("--stdio")
        .env("IRONVMM_SMTP_PASSWORD", "not-used-here")
        .env("GITHUB_TOKEN", "not-used-here");
    let input = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_string(),
        call(2, "mail.list", json!({})),
    ]
    .join("\n")
        + "\n";
    let (code, r, err) = stdio_raw(cmd, input.as_bytes());
    assert_eq!(code, Some(0), "{err}");
    let mut names: Vec<&str> = r[0]["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["mail.list", "mail.read"]);
    let list = &r[1]["result"]["structuredContent"];
    assert_eq!(list["total"], 4, "{}", r[1]);
    assert!(list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["from"]["email"].is_string()));
}

/// The library's `log` records reach stderr in the CLI's voice (an `[[mcp]]` server
/// whose tool names collide or cannot map is warned about), and `IRONVMM_LOG=off`
/// silences them; an unknown level is named.
#[test]
fn library_warnings_reach_stderr_and_ironvmm_log_sets_the_level() {
    let e = env();
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("gate/tests/mcp_fake_server.py");
    let config = e.dir.path().join("ironvmm.toml");
    std::fs::write(
        &config,
        format!(
            "[[mcp]]\nname = \"fake\"\ncommand = \"python3\"\nargs = [{:?}, \"basic\"]\n",
            fake.display().to_string()
        ),
    )
    .unwrap();
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_string();
    let run = |level: Option<&str>| {
        // A log is one hash chain: each run writes a new one.
        let _ = std::fs::remove_file(&e.audit);
        let mut cmd = e.gate(&["--stdio", "--config", config.to_str().unwrap()]);
        cmd.env_remove("IRONVMM_LOG");
        if let Some(l) = level {
            cmd.env("IRONVMM_LOG", l);
        }
        let (code, r, err) = stdio_raw(cmd, format!("{list}\n").as_bytes());
        assert_eq!(code, Some(0), "{err}");
        assert!(r[0]["result"]["tools"].is_array(), "{:?}", r);
        err
    };
    let err = run(None);
    assert!(
        err.contains("ironvmm: warning: mcp server fake: tool \"bad*name\" refused"),
        "{err}"
    );
    let quiet = run(Some("off"));
    assert!(!quiet.contains("mcp server fake"), "{quiet}");
    let odd = run(Some("loud"));
    assert!(
        odd.contains("ironvmm: warning: IRONVMM_LOG=\"loud\" is not a level"),
        "{odd}"
    );
    assert!(odd.contains("tool \"bad*name\" refused"), "{odd}");
}
