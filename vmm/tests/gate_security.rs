//! Issue 10: what a hostile review broke, each attack replayed end to end through
//! `ironvmm gate --stdio`, the fs service and the audit CLI.

use std::path::Path;
use std::process::{Output, Stdio};

use serde_json::{json, Value};

mod common;
use common::{call, ironvmm, json_lines, root, stdio_session};

/// `gate --stdio` with these arguments over these lines: (exit, replies, stderr).
fn gate(args: &[&std::ffi::OsStr], lines: &[String]) -> (Option<i32>, Vec<Value>, String) {
    let mut cmd = ironvmm();
    cmd.arg("gate").arg("--stdio").args(args);
    let mut input = lines.join("\n");
    input.push('\n');
    let out = stdio_session(cmd, input.as_bytes());
    (
        out.status.code(),
        json_lines(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn os(s: &Path) -> &std::ffi::OsStr {
    s.as_os_str()
}

fn denied(r: &Value) -> bool {
    r.get("error").is_some_and(|e| e["code"] == -32001)
        || r["result"]["structuredContent"]["decision"] == "deny"
}

/// Replies in the order of their ids (calls run concurrently; replies come as they
/// finish).
fn in_order(mut r: Vec<Value>) -> Vec<Value> {
    r.sort_by_key(|x| x["id"].as_u64().unwrap_or(u64::MAX));
    r
}

fn output_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Item 1: `.git` moved aside, a hook written into the moved folder, the folder moved
/// back; and `.git/config` written outright. Under the coding example policy.
#[test]
fn hooks_cannot_be_planted_by_moving_git_aside() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join(".git/hooks")).unwrap();
    std::fs::write(ws.join(".git/hooks/pre-commit.sample"), "#!/bin/sh\n").unwrap();
    std::fs::write(ws.join(".git/config"), "[core]\n").unwrap();
    let policy = root().join("examples/policies/coding.rules");
    let audit = dir.path().join("a.jsonl");
    let (code, r, err) = gate(
        &[
            os(Path::new("--policy")),
            os(&policy),
            os(Path::new("--workspace")),
            os(&ws),
            os(Path::new("--audit")),
            os(&audit),
        ],
        &[
            call(
                1,
                "fs.move",
                json!({"from": "/workspace/.git", "to": "/workspace/g"}),
            ),
            call(
                2,
                "fs.write",
                json!({"path": "/workspace/g/hooks/pre-commit", "content": "#!/bin/sh\nevil\n"}),
            ),
            call(
                3,
                "fs.move",
                json!({"from": "/workspace/g", "to": "/workspace/.git"}),
            ),
            call(
                4,
                "fs.write",
                json!({"path": "/workspace/.git/config", "content": "[core]\n\tfsmonitor = evil\n"}),
            ),
            call(5, "fs.delete", json!({"path": "/workspace/.git"})),
            call(
                6,
                "fs.write",
                json!({"path": "/workspace/src.rs", "content": "fn main() {}\n"}),
            ),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let r = in_order(r);
    for i in [0, 3, 4] {
        assert!(denied(&r[i]), "call {}: {}", i + 1, r[i]);
    }
    assert!(ws.join(".git/hooks/pre-commit.sample").exists());
    assert!(!ws.join(".git/hooks/pre-commit").exists());
    assert_eq!(
        std::fs::read_to_string(ws.join(".git/config")).unwrap(),
        "[core]\n"
    );
    assert_eq!(r[5]["result"]["isError"], false, "{}", r[5]);
}

/// Item 2: the folder holding the policy and the log moved aside and replaced by one
/// with a `default allow` policy and a forged log.
#[test]
fn the_folder_holding_the_policy_and_log_cannot_be_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let own = ws.join(".ironvmm");
    std::fs::create_dir_all(&own).unwrap();
    let policy = own.join("p.rules");
    // A permissive policy: only the gate's own protection stands in the way.
    std::fs::write(
        &policy,
        "list c = file \"contacts.txt\"\nallow fs.*\ndeny mail.send when any to in @c\ndefault deny\n",
    )
    .unwrap();
    std::fs::write(own.join("contacts.txt"), "a@example.com\n").unwrap();
    let audit = own.join("audit.jsonl");
    let key = dir.path().join("audit.key");
    let (code, r, err) = gate(
        &[
            os(Path::new("--policy")),
            os(&policy),
            os(Path::new("--workspace")),
            os(&ws),
            os(Path::new("--audit")),
            os(&audit),
            os(Path::new("--audit-key")),
            os(&key),
        ],
        &[
            call(
                1,
                "fs.move",
                json!({"from": "/workspace/.ironvmm", "to": "/workspace/old"}),
            ),
            call(2, "fs.delete", json!({"path": "/workspace/.ironvmm"})),
            call(
                3,
                "fs.write",
                json!({"path": "/workspace/.ironvmm/contacts.txt", "content": "x@evil\n"}),
            ),
            call(
                4,
                "fs.read",
                json!({"path": "/workspace/.ironvmm/contacts.txt"}),
            ),
            call(
                5,
                "fs.write",
                json!({"path": "/workspace/.ironvmm/p.rules.learned", "content": "allow fs.*\n"}),
            ),
            call(6, "fs.list", json!({"path": "/workspace/.ironvmm"})),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let r = in_order(r);
    for (i, rep) in r.iter().take(5).enumerate() {
        assert!(denied(rep), "call {}: {rep}", i + 1);
        let reason = rep.to_string();
        assert!(reason.contains("protected"), "{reason}");
    }
    assert_eq!(r[5]["result"]["isError"], false);
    assert!(own.join("p.rules").exists() && !ws.join("old").exists());

    // The forged log of the attack: the guest can rebuild a SHA-256 chain, not an
    // HMAC under a key it never saw.
    let forged = dir.path().join("forged.jsonl");
    let mut prev = "0".repeat(64);
    let mut text = String::new();
    for (seq, kind) in [(0, "open"), (1, "close")] {
        let body = format!(
            "{{\"seq\":{seq},\"time\":\"2026-01-01T00:00:00.000000000Z\",\"vm\":\"v\",\"kind\":\"{kind}\",\"prev\":\"{prev}\"}}"
        );
        use sha2::Digest;
        let h = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        text.push_str(&format!("{},\"hash\":\"{h}\"}}\n", &body[..body.len() - 1]));
        prev = h;
    }
    std::fs::write(&forged, text).unwrap();
    let o = ironvmm()
        .args(["audit", "verify"])
        .arg(&forged)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(output_text(&o).contains("hash does not match"));
    // The real log verifies with its key.
    let o = ironvmm()
        .args(["audit", "verify"])
        .arg(&audit)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
}

fn decision_line(tool: &str, reason: &str) -> String {
    json!({"seq": 1, "time": "2026-01-01T00:00:00.000000000Z", "vm": "v", "kind": "decision",
           "conn": "c", "rpc_id": 1, "tool": tool, "args": {}, "decision": "deny",
           "rule": null, "decided_by": "invariant", "reason": reason, "policy_ns": 1,
           "prev": "0", "hash": "0"})
    .to_string()
}

/// Item 4: guest strings reach `audit show` and `audit stats`.
#[test]
fn audit_show_and_stats_escape_and_bound_guest_strings() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.jsonl");
    let open = json!({"seq": 0, "time": "2026-01-01T00:00:00.000000000Z", "vm": "v",
                      "kind": "open", "prev": "0", "hash": "0"})
    .to_string();
    let forged_row = "x\n9  00:00:00.000  c  fs.write  allow  1  rule  ok 1us  fine";
    let lines = [
        open,
        decision_line(forged_row, "r"),
        decision_line("\x1b]0;pwned\x07\x1b[2J\rfs.read", "\x1b[31mred"),
        decision_line(&"n".repeat(65_536), &"r".repeat(70_000)),
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    for cmd in ["show", "stats"] {
        let o = ironvmm().args(["audit", cmd]).arg(&log).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", output_text(&o));
        let out = String::from_utf8(o.stdout).unwrap();
        assert!(
            !out.contains('\x1b') && !out.contains('\r') && !out.contains('\x07'),
            "{cmd}"
        );
        assert!(out.contains("\\x1b]0;pwned\\x07"), "{cmd}: {out}");
        // The forged row stays inside its cell: no line starts with "9 ".
        assert!(!out.lines().any(|l| l.starts_with("9 ")), "{cmd}: {out}");
        assert!(
            out.lines().all(|l| l.chars().count() < 2000),
            "{cmd}: a field was not cut"
        );
        assert!(out.contains("…[+"), "{cmd}: the cut is visible");
    }

    // A file that is not an audit log.
    let not = dir.path().join("notes.txt");
    std::fs::write(&not, "{\"hello\": 1}\n").unwrap();
    for cmd in ["show", "stats"] {
        let o = ironvmm().args(["audit", cmd]).arg(&not).output().unwrap();
        assert_eq!(o.status.code(), Some(125), "{cmd}");
        assert!(
            output_text(&o).contains("not an audit log"),
            "{}",
            output_text(&o)
        );
    }
}

/// Item 5: denied calls with huge keys and names, and a VM that runs out of budget.
#[test]
fn guest_strings_in_records_are_bounded_and_the_budget_stops_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let policy = dir.path().join("p.rules");
    std::fs::write(&policy, "allow fs.read\ndefault deny\n").unwrap();
    let audit = dir.path().join("a.jsonl");
    let big = "k".repeat(1_000_000);
    let mut args = serde_json::Map::new();
    args.insert(big.clone(), json!(1));
    let frame = |id: u64| {
        json!({"jsonrpc": "2.0", "id": big.clone() + &id.to_string(), "method": "tools/call",
               "params": {"name": format!("x{big}"), "arguments": args.clone()}})
        .to_string()
    };
    let (code, r, err) = gate(
        &[
            os(Path::new("--policy")),
            os(&policy),
            os(Path::new("--workspace")),
            os(&ws),
            os(Path::new("--audit")),
            os(&audit),
            os(Path::new("--max-frame")),
            os(Path::new("4000000")),
        ],
        &[frame(1), frame(2)],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(r.len(), 2);
    let size = std::fs::metadata(&audit).unwrap().len();
    assert!(
        size < 16_000,
        "two denied frames wrote {size} bytes to the log"
    );
    assert!(!r[0].to_string().contains(&audit.display().to_string()));

    // Budget: a few calls fit, then the gate stops, with its close record.
    let audit2 = dir.path().join("b.jsonl");
    std::fs::write(ws.join("f"), "x").unwrap();
    let calls: Vec<String> = (0..200)
        .map(|i| call(i, "fs.read", json!({"path": "/workspace/f"})))
        .collect();
    let (code, r, err) = gate(
        &[
            os(Path::new("--policy")),
            os(&policy),
            os(Path::new("--workspace")),
            os(&ws),
            os(Path::new("--audit")),
            os(&audit2),
            os(Path::new("--audit-budget")),
            os(Path::new("12000")),
        ],
        &calls,
    );
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("audit budget"), "{err}");
    let served = r.iter().filter(|x| x["result"]["isError"] == false).count();
    assert!(served > 0 && served < 200, "{served} served");
    // Calls run concurrently: the ones that meet the spent budget are denied, saying
    // why but not where the log is; the connection ends once they are answered.
    let refusals: Vec<String> = r
        .iter()
        .filter(|x| denied(x))
        .map(|x| x.to_string())
        .collect();
    assert!(
        refusals.iter().any(|t| t.contains("audit budget")),
        "{refusals:?}"
    );
    let host = audit2.display().to_string();
    assert!(r.iter().all(|x| !x.to_string().contains(&host)));
    assert!(std::fs::metadata(&audit2).unwrap().len() <= 12000);
    let o = ironvmm()
        .args(["audit", "verify"])
        .arg(&audit2)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "closed cleanly: {}",
        output_text(&o)
    );
    let text = std::fs::read_to_string(&audit2).unwrap();
    let close: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        (close["kind"].as_str(), close["exit"].as_i64()),
        (Some("close"), Some(125))
    );
}

/// Item 9: `image inspect /dev/zero` read without bound. A device is refused at once.
#[test]
fn image_inspect_refuses_a_device() {
    let mut child = ironvmm()
        .args(["image", "inspect", "/dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous for a loaded machine; the old code never returned at all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("image inspect /dev/zero did not return");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(126), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("not a regular file"),
        "{}",
        output_text(&o)
    );
}
