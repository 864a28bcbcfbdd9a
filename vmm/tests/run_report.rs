//! The runner's outputs (run report, JUnit, Markdown summary) built from real audit
//! logs: one written by `ironvmm gate --stdio` host-only, one by a gate that hit
//! `--max-calls`, and `ironvmm run` itself where it stops before a guest runs.
//! The booted run is in vmm/tests/boot.rs.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ironvmm::audit::SyncMode;
use ironvmm::cli::boot::Launched;
use ironvmm::cli::run::{write_outputs, Outputs};
use ironvmm::gate::budget::CallBudget;
use ironvmm::gate::setup::{open_gate_with, GateConfig};
use ironvmm::gate::{Connection, GateLimits};
use ironvmm::report::{junit, summary, ExitInfo, ExitKind, RunReport};
use serde_json::{json, Value};

mod common;
mod gate_common;
use common::{call, ironvmm, stdio_session, GateEnv as Env, READ_ONLY_POLICY};
use gate_common::{replies as reply_lines, settle};

fn env() -> Env {
    Env::new(READ_ONLY_POLICY)
}

/// Runs `ironvmm gate --stdio` over `lines` to its end (stdin closed): a real,
/// closed audit log.
fn gate_session(e: &Env, lines: &[String]) {
    let mut input = lines.join("\n");
    input.push('\n');
    let out = stdio_session(e.gate(&["--stdio"]), input.as_bytes());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify_head(log: &Path, head: &str) -> (Option<i32>, String) {
    let out = ironvmm()
        .args(["audit", "verify"])
        .arg(log)
        .args(["--head", head])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn report_junit_and_summary_say_what_the_gate_audited() {
    let e = env();
    gate_session(
        &e,
        &[
            call(1, "fs.read", json!({"path": "/workspace/hello.txt"})),
            call(2, "fs.read", json!({"path": "/etc/passwd"})),
            call(
                3,
                "fs.write",
                json!({"path": "/workspace/x", "content": "x"}),
            ),
            call(4, "fs.delete", json!({"path": "/workspace/hello.txt"})),
            // A hostile tool name: it must stay text in XML, Markdown and stderr.
            call(5, "fs.read</failure>|\n![x](y)", json!({})),
            call(6, "fs.stat", json!({"path": "/workspace/hello.txt"})),
        ],
    );
    let exit = ExitInfo {
        kind: ExitKind::Agent,
        code: 0,
    };
    let r = RunReport::from_audit(&e.audit, exit, 1234).unwrap();

    // What the log holds, record for record.
    let recs: Vec<Value> = std::fs::read_to_string(&e.audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "decision").collect();
    let denied: Vec<&Value> = decisions
        .iter()
        .copied()
        .filter(|r| r["decision"] == "deny")
        .collect();
    // Six calls; the ask is parked as its own record, then answered.
    assert_eq!(decisions.len(), 7);
    assert_eq!(
        decisions.iter().filter(|r| r["decision"] == "ask").count(),
        1
    );
    assert_eq!(r.calls.allow, 2, "{r:?}");
    assert_eq!(r.calls.deny, 4, "{r:?}");
    assert_eq!(r.calls.ask, 1, "{r:?}");
    assert_eq!(r.denied.len(), denied.len());
    for (d, rec) in r.denied.iter().zip(&denied) {
        assert_eq!(Some(d.seq), rec["seq"].as_u64());
        assert_eq!(d.tool, rec["tool"].as_str().unwrap());
        assert_eq!(d.rule, rec["rule"].as_u64());
        assert_eq!(d.decided_by, rec["decided_by"].as_str().unwrap());
        assert_eq!(d.reason, rec["reason"].as_str().unwrap());
    }
    // Calls run concurrently: an answer may be logged after a later call.
    let mut by: Vec<&str> = r.denied.iter().map(|d| d.decided_by.as_str()).collect();
    by.sort_unstable();
    assert_eq!(by, ["default", "invariant", "non-interactive", "rule"]);
    let write = r.denied.iter().find(|d| d.tool == "fs.write").unwrap();
    assert_eq!(write.rule, Some(5));
    let head = r.audit.final_hash.clone().unwrap();
    assert_eq!(Some(head.as_str()), recs.last().unwrap()["hash"].as_str());
    assert_eq!(recs.last().unwrap()["kind"], "close");
    assert!(r.vm.starts_with("gate-"), "{}", r.vm);
    let (code, out) = verify_head(&e.audit, &head);
    assert_eq!(code, Some(0), "{out}");

    // The JSON report: exactly the documented members.
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["exit"], json!({"kind": "agent", "code": 0}));
    assert_eq!(v["duration_ms"], 1234);
    assert_eq!(v["calls"], json!({"allow": 2, "deny": 4, "ask": 1}));
    let denied_write = v["denied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["tool"] == "fs.write")
        .unwrap();
    assert_eq!(
        denied_write,
        &json!({"seq": write.seq, "tool": "fs.write", "rule": 5,
                "decided_by": "rule", "reason": "read-only here"})
    );
    assert_eq!(v["audit"]["final_hash"], head);

    // JUnit: one failing test case per denial, the hostile name escaped.
    let x = junit::render(&r);
    assert_eq!(x.matches("<testcase ").count(), 4, "{x}");
    assert_eq!(x.matches("<failure ").count(), 4, "{x}");
    assert_eq!(x.matches("</failure>").count(), 4, "{x}");
    assert!(x.contains("tests=\"4\" failures=\"4\""), "{x}");
    assert!(x.contains("read-only here"), "{x}");
    assert!(x.contains("fs.read&lt;/failure&gt;|&#10;![x](y)"), "{x}");

    // Markdown: the counts, a row per denial (no row forged by the name), the head.
    let m = summary::markdown(&r, None);
    assert!(m.contains("| allow | 2 |"), "{m}");
    assert!(m.contains("| deny | 4 |"), "{m}");
    let rows = m
        .lines()
        .filter(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit()))
        .count();
    assert_eq!(rows, 4, "{m}");
    assert!(m.contains(&head), "{m}");
    assert!(!m.contains("![x]"), "{m}");

    let s = summary::stderr_lines(&r);
    assert!(s.contains("2 allowed, 4 denied, 1 asked"), "{s}");
    assert!(!s.contains("\n![x]"), "{s}");
}

#[test]
fn max_calls_denies_the_next_call_stops_and_the_log_closes() {
    let e = env();
    let cfg = GateConfig {
        policy: e.policy.clone(),
        workspace: Some(e.workspace.clone()),
        config: ironvmm_gate::config::Config::default(),
        audit: Some(e.audit.clone()),
        audit_key: None,
        audit_budget: ironvmm::audit::DEFAULT_AUDIT_BUDGET,
        max_write_bytes: ironvmm::services::fs::DEFAULT_MAX_WRITE_BYTES,
        audit_sync: SyncMode::Always,
        limits: GateLimits::default(),
        vm: "vm-limit".into(),
        image_sha256: None,
        flags: json!({"mode": "run", "max_calls": 2}),
    };
    let budget = CallBudget::new(Some(2), None);
    let stops = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&stops);
    budget.on_reached(Box::new(move |_| {
        s.fetch_add(1, Ordering::SeqCst);
    }));
    let opened = open_gate_with(&cfg, Some(Arc::clone(&budget))).unwrap();
    let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "test".into());
    let mut out = Vec::new();
    for id in 1..=4 {
        let line = call(id, "fs.read", json!({"path": "/workspace/hello.txt"})) + "\n";
        conn.on_data(line.as_bytes(), &mut out).unwrap();
        settle(&mut conn, &mut out).unwrap();
    }
    conn.on_close();
    opened.gate.shutdown();
    let replies = reply_lines(&out);
    assert_eq!(replies[1]["result"]["isError"], false);
    assert_eq!(
        replies[2]["result"]["structuredContent"]["decided_by"],
        "limit"
    );
    assert_eq!(stops.load(Ordering::SeqCst), 1);
    // What the VMM does on the stop event: close the log with the exit status.
    opened.audit.close(Some(125)).unwrap();

    let launched = Launched {
        code: 125,
        kind: ExitKind::Error,
        why: budget.reached().map(str::to_string),
        vm: "vm-limit".into(),
        audit_path: Some(e.audit.clone()),
        audit_file: None,
        started: Instant::now(),
    };
    let outputs = Outputs::new(
        Some(e.dir.path().join("r.json")),
        Some(e.dir.path().join("r.xml")),
        Some(e.dir.path().join("summary.md")),
    );
    write_outputs(&launched, &outputs).unwrap();
    let v: Value =
        serde_json::from_slice(&std::fs::read(e.dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(v["exit"], json!({"kind": "error", "code": 125}));
    assert_eq!(v["calls"], json!({"allow": 2, "deny": 2, "ask": 0}));
    assert_eq!(v["denied"][0]["decided_by"], "limit");
    assert!(
        v["denied"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("--max-calls 2 reached"),
        "{v}"
    );
    let head = v["audit"]["final_hash"].as_str().unwrap();
    let (code, out) = verify_head(&e.audit, head);
    assert_eq!(code, Some(0), "{out}");
    let md = std::fs::read_to_string(e.dir.path().join("summary.md")).unwrap();
    assert!(md.contains("--max-calls 2 reached"), "{md}");
    // The summary appends (a step summary is shared by a job's steps).
    write_outputs(&launched, &outputs).unwrap();
    let md2 = std::fs::read_to_string(e.dir.path().join("summary.md")).unwrap();
    assert_eq!(md2.len(), 2 * md.len());

    // `--jail`: the outputs and the log are opened before the jail and written
    // through those descriptors; by the end their paths are gone.
    let jailed = e.dir.path().join("jailed");
    std::fs::create_dir(&jailed).unwrap();
    let mut outputs = Outputs::new(
        Some(jailed.join("r.json")),
        Some(jailed.join("r.xml")),
        Some(jailed.join("summary.md")),
    );
    outputs.open_now().unwrap();
    let launched = Launched {
        audit_file: Some(std::fs::File::open(&e.audit).unwrap()),
        ..launched
    };
    let moved = e.dir.path().join("seen-from-the-host");
    std::fs::rename(&jailed, &moved).unwrap();
    let gone_log = e.dir.path().join("audit-moved.jsonl");
    std::fs::rename(&e.audit, &gone_log).unwrap();
    write_outputs(&launched, &outputs).unwrap();
    let v2: Value = serde_json::from_slice(&std::fs::read(moved.join("r.json")).unwrap()).unwrap();
    assert_eq!(v2["calls"], v["calls"]);
    assert_eq!(v2["audit"]["final_hash"], v["audit"]["final_hash"]);
    assert!(std::fs::read_to_string(moved.join("r.xml"))
        .unwrap()
        .contains("testcase"));
    let md3 = std::fs::read_to_string(moved.join("summary.md")).unwrap();
    assert!(md3.contains("--max-calls 2 reached"), "{md3}");
    // Made again from the same descriptor: the same log, read from its start.
    write_outputs(&launched, &outputs).unwrap();
    let v3: Value = serde_json::from_slice(&std::fs::read(moved.join("r.json")).unwrap()).unwrap();
    assert_eq!(v3["calls"], v["calls"]);
}

/// `ironvmm run` where no guest can run (a kernel that is not one): it still
/// closes its audit log and writes every output, exit 125 or 126 per interfaces.
#[test]
fn run_without_a_bootable_guest_still_reports() {
    let e = env();
    let kernel = e.dir.path().join("not-a-kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let (report, junit, md) = (
        e.dir.path().join("r.json"),
        e.dir.path().join("r.xml"),
        e.dir.path().join("s.md"),
    );
    let out = ironvmm()
        .arg("run")
        .arg("--policy")
        .arg(&e.policy)
        .arg("--audit")
        .arg(&e.audit)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&kernel)
        .arg("--report")
        .arg(&report)
        .arg("--junit")
        .arg(&junit)
        .arg("--summary")
        .arg(&md)
        .args(["--console", "off", "--timeout", "30s"])
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap();
    assert!(code == 125 || code == 126, "{code}: {err}");
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(v["exit"], json!({"kind": "error", "code": code}));
    assert_eq!(v["calls"], json!({"allow": 0, "deny": 0, "ask": 0}));
    let head = v["audit"]["final_hash"].as_str().unwrap();
    let (vcode, vout) = verify_head(&e.audit, head);
    assert_eq!(vcode, Some(0), "{vout}");
    let open: Value = serde_json::from_str(
        std::fs::read_to_string(&e.audit)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(open["flags"]["mode"], "run");
    assert!(std::fs::read_to_string(&junit)
        .unwrap()
        .contains("no call denied"));
    assert!(std::fs::read_to_string(&md).unwrap().contains(head));
    assert!(err.contains("ironvmm run: ironvmm stopped the VM"), "{err}");
}

/// A bad policy stops `run` before any log exists (127); the report says so.
#[test]
fn run_with_a_bad_policy_reports_without_a_log() {
    let e = env();
    std::fs::write(&e.policy, "version 1\nallow fs.read when (\n").unwrap();
    let report = e.dir.path().join("r.json");
    let out = ironvmm()
        .arg("run")
        .arg("--policy")
        .arg(&e.policy)
        .arg("--audit")
        .arg(&e.audit)
        .arg("--kernel")
        .arg(&e.policy)
        .arg("--initrd")
        .arg(&e.policy)
        .arg("--report")
        .arg(&report)
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{err}");
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(v["exit"], json!({"kind": "error", "code": 127}));
    assert_eq!(v["audit"], json!({"path": null, "final_hash": null}));
    assert!(!e.audit.exists());
}
