//! `ironvmm approvals list|allow|deny`, `ironvmm ps` and `ironvmm policy learned
//! --merge`, against a hub and control socket run in this process.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ironvmm_gate::approvals::socket::ControlSocket;
use ironvmm_gate::approvals::{ApprovalHub, HubConfig, Learner, LivePolicy, Mode};
use ironvmm_gate::gate::approver::{Answer, Approver, AskRequest};
use ironvmm_gate::services::builtin_catalog;
use serde_json::json;

fn ironvmm(runtime: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ask(hub: &ApprovalHub, seq: u64, path: &str) -> mpsc::Receiver<Answer> {
    let (tx, rx) = mpsc::channel();
    hub.ask(
        AskRequest {
            ask_seq: seq,
            conn: "c".into(),
            rpc_id: json!(seq),
            tool: "fs.write".into(),
            args: json!({"path": path, "content": "x"}),
            rule: Some(3),
            reason: "writes need a yes".into(),
        },
        Box::new(move |a| {
            let _ = tx.send(a);
        }),
    );
    rx
}

#[test]
fn list_allow_deny_and_ps_from_another_shell() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(run.join("ironvmm"))
        .unwrap();
    let policy = dir.path().join("p.rules");
    std::fs::write(
        &policy,
        "allow fs.read\nallow fs.write when path under \"/workspace/out\"\nask fs.write \"writes need a yes\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.scenarios.jsonl"),
        "{\"call\":{\"tool\":\"fs.write\",\"args\":{\"path\":\"/workspace/secret\",\"content\":\"k\"}},\"expect\":\"ask\",\"note\":\"secrets need a yes\"}\n",
    )
    .unwrap();
    let (live, _) = LivePolicy::load(&policy, Some(builtin_catalog().unwrap())).unwrap();
    let mut cfg = HubConfig::new("clivm", Mode::Socket);
    cfg.learner = Some(Learner::new(Arc::clone(&live), None));
    let hub = ApprovalHub::new(cfg);
    let _sock = ControlSocket::start(hub.clone(), &run.join("ironvmm").join("clivm.sock")).unwrap();

    let o = ironvmm(&run, &["ps"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("clivm") && text(&o).contains("clivm.sock"),
        "{}",
        text(&o)
    );

    // `watch` streams asks and answers as they happen
    let mut watch = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .args(["approvals", "watch", "--json"])
        .env("XDG_RUNTIME_DIR", &run)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut watched = std::io::BufReader::new(watch.stdout.take().unwrap());
    // the watcher is connected once it gets a first event: poll with a probe ask
    let probe = ask(&hub, 4, "/workspace/probe.txt");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut watched, &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["event"].as_str(), v["args"]["path"].as_str()),
        (Some("ask"), Some("/workspace/probe.txt")),
        "{line}"
    );
    let probe_id = v["id"].as_u64().unwrap();
    let r = ironvmm(&run, &["approvals", "allow", &probe_id.to_string()]);
    assert_eq!(r.status.code(), Some(0), "{}", text(&r));
    assert!(probe.recv_timeout(Duration::from_secs(20)).unwrap().allow);
    line.clear();
    std::io::BufRead::read_line(&mut watched, &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (
            v["event"].as_str(),
            v["id"].as_u64(),
            v["decision"].as_str()
        ),
        (Some("decided"), Some(probe_id), Some("allow")),
        "{line}"
    );
    let _ = watch.kill();
    let _ = watch.wait();

    let a = ask(&hub, 5, "/workspace/a.txt");
    let b = ask(&hub, 6, "/workspace/b.txt");
    let o = ironvmm(&run, &["approvals", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("fs.write")
            && out.contains("/workspace/a.txt")
            && out.contains("2 pending ask(s) in VM clivm"),
        "{out}"
    );
    let ids: Vec<u64> = hub.pending().iter().map(|q| q.id).collect();

    let o = ironvmm(&run, &["approvals", "deny", &ids[0].to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!a.recv_timeout(Duration::from_secs(20)).unwrap().allow);

    // a rule that changes a scenario: shown, not kept without --yes (no terminal here)
    let id = ids[1].to_string();
    let o = ironvmm(&run, &["approvals", "allow", &id, "--learn", "tool"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("secrets need a yes") && text(&o).contains("--yes"),
        "{}",
        text(&o)
    );
    assert!(!dir.path().join("p.rules.learned").exists());
    assert!(b.try_recv().is_err());
    let o = ironvmm(
        &run,
        &["approvals", "allow", &id, "--learn", "tool", "--yes"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("learned `allow fs.write`"),
        "{}",
        text(&o)
    );
    assert!(b.recv_timeout(Duration::from_secs(20)).unwrap().allow);

    // nothing left: answering again is an error naming the id
    let o = ironvmm(&run, &["approvals", "allow", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("no pending ask with id {id}")),
        "{}",
        text(&o)
    );

    // the learned file folds into the policy for review
    let o = ironvmm(
        &run,
        &["policy", "learned", policy.to_str().unwrap(), "--merge"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "allow fs.read\nallow fs.write when path under \"/workspace/out\"\n# learned (audit seq 6)\nallow fs.write\nask fs.write \"writes need a yes\"\n"
    );
    let o = ironvmm(
        &run,
        &[
            "policy",
            "learned",
            policy.to_str().unwrap(),
            "--merge",
            "--in-place",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read_to_string(&policy)
        .unwrap()
        .contains("# learned (audit seq 6)\nallow fs.write\nask"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("p.rules.learned")).unwrap(),
        ""
    );
}

#[test]
fn no_vm_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = ironvmm(dir.path(), &["approvals", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no VM is running"), "{}", text(&o));
}
