//! The audit log: chain, verification of tampered logs, the CLI, and fail-closed
//! behaviour when the log cannot be written.

mod gate_common;

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

use gate_common::*;
use ironvmm::audit::verify::verify;
use ironvmm::audit::{AuditKey, AuditLog, DecisionRecord, OutcomeStatus, SyncMode};
use ironvmm::gate::{DecidedBy, Verdict};
use serde_json::{json, Map, Value};

fn ironvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
}

/// A closed log with a few decisions and outcomes; returns (path, final hash).
fn sample_log(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("a.jsonl");
    let mut open = Map::new();
    open.insert("policy_sha256".into(), "ab".repeat(32).into());
    let log = AuditLog::create(&path, "vm-1", SyncMode::Always, open).unwrap();
    for i in 0..3u64 {
        let allowed = i != 1;
        let seq = log
            .decision(&DecisionRecord {
                conn: "c1",
                rpc_id: &json!(i),
                tool: if allowed { "fs.read" } else { "fs.write" },
                args: &json!({"path": format!("/workspace/{i}"), "token": "t0p"}),
                decision: if allowed {
                    Verdict::Allow
                } else {
                    Verdict::Deny
                },
                asked: false,
                answer: None,
                rule: Some(4),
                decided_by: DecidedBy::Rule,
                reason: "because",
                policy_ns: 300,
            })
            .unwrap();
        if allowed {
            log.outcome(seq, OutcomeStatus::Ok, 100, 50).unwrap();
        }
    }
    let head = log.close(Some(0)).unwrap();
    (path, head)
}

fn check(path: &Path, head: Option<&str>, open_ok: bool) -> Result<u64, String> {
    let f = std::fs::File::open(path).unwrap();
    let key = AuditKey::load(&ironvmm::audit::default_key_path(path)).unwrap();
    verify(BufReader::new(f), &key, head, open_ok)
        .map(|v| v.records)
        .map_err(|e| e.to_string())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

#[test]
fn records_have_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = sample_log(dir.path());
    let recs = read_records(&path);
    assert_eq!(recs.len(), 7);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64);
        assert_eq!(r["vm"], "vm-1");
        let t = r["time"].as_str().unwrap();
        assert_eq!(t.len(), "2026-01-01T00:00:00.000000000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.');
        assert_eq!(r["hash"].as_str().unwrap().len(), 64);
    }
    assert_eq!(recs[0]["prev"], "0".repeat(64));
    assert_eq!(recs[0]["kind"], "open");
    assert_eq!(recs[1]["args"]["token"], "[redacted]");
    assert_eq!(recs[6]["kind"], "close");
    assert_eq!(recs[6]["exit"], 0);
    assert_eq!(
        recs[6]["counts"],
        json!({"allow": 2, "deny": 1, "ask": 0, "ok": 2, "tool_error": 0, "error": 0})
    );
    assert_eq!(recs[6]["hash"], head.as_str());
    assert_eq!(check(&path, Some(&head), false), Ok(7));
}

#[test]
fn verify_detects_an_edited_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_log(dir.path());
    let mut l = lines(&path);
    let edited = l[3].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    assert_ne!(edited, l[3]);
    l[3] = edited;
    write_lines(&path, &l);
    let e = check(&path, None, false).unwrap_err();
    assert!(
        e.starts_with("line 4 (seq 3):") && e.contains("edited"),
        "{e}"
    );
}

#[test]
fn verify_detects_reordered_and_removed_records() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_log(dir.path());
    let orig = lines(&path);
    let mut l = orig.clone();
    l.swap(2, 3);
    write_lines(&path, &l);
    let e = check(&path, None, false).unwrap_err();
    assert!(
        e.starts_with("line 3 (seq 3):") && e.contains("reordered"),
        "{e}"
    );

    let mut l = orig.clone();
    l.remove(3);
    write_lines(&path, &l);
    let e = check(&path, None, false).unwrap_err();
    assert!(
        e.starts_with("line 4 (seq 4):") && e.contains("removed"),
        "{e}"
    );

    // Renumbering the seqs to hide the removal breaks the hashes instead.
    let mut l = orig;
    l.remove(3);
    for (i, line) in l.iter_mut().enumerate().skip(3) {
        *line = line.replacen(
            &format!("{{\"seq\":{}", i + 1),
            &format!("{{\"seq\":{i}"),
            1,
        );
    }
    write_lines(&path, &l);
    assert!(check(&path, None, false).unwrap_err().contains("edited"));
}

#[test]
fn verify_detects_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = sample_log(dir.path());
    let l = lines(&path);
    write_lines(&path, &l[..5]);
    let e = check(&path, None, false).unwrap_err();
    assert!(e.contains("truncated") && e.contains("line 5"), "{e}");
    // A log still being written is fine with --open-ok, but not against the head.
    assert_eq!(check(&path, None, true), Ok(5));
    assert!(check(&path, Some(&head), true)
        .unwrap_err()
        .contains("expected head"));
    // Cut in the middle of a line.
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 10]).unwrap();
    let e = check(&path, None, true).unwrap_err();
    assert!(e.starts_with("line 5:") && e.contains("incomplete"), "{e}");
    // Empty.
    std::fs::write(&path, b"").unwrap();
    assert!(check(&path, None, true).unwrap_err().contains("empty"));
}

#[test]
fn cli_verify_show_stats() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = sample_log(dir.path());
    let out = ironvmm()
        .args(["audit", "verify"])
        .arg(&path)
        .args(["--head", &head])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 7 records, closed"));

    let out = ironvmm()
        .args(["audit", "show"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert!(rows[0].starts_with("SEQ") && rows[0].contains("REASON"));
    assert_eq!(rows.len(), 4);
    assert!(
        rows[1].contains("fs.read") && rows[1].contains("allow") && rows[1].contains("ok 50us")
    );
    let out = ironvmm()
        .args(["audit", "show", "--denied"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.contains("fs.write") && text.contains("deny"));
    let out = ironvmm()
        .args(["audit", "show", "--tool", "fs.read"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 3);

    let out = ironvmm()
        .args(["audit", "stats"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("decisions:  allow 2, deny 1"), "{text}");
    assert!(text.contains("outcomes:   ok 2"), "{text}");

    // Tampered: exit 1 and a message naming the line.
    let mut l = lines(&path);
    let edited = l[5].replace("\"bytes\":100", "\"bytes\":101");
    assert_ne!(edited, l[5]);
    l[5] = edited;
    write_lines(&path, &l);
    let out = ironvmm()
        .args(["audit", "verify"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 6 (seq 5)") && err.contains("edited"),
        "{err}"
    );
}

#[test]
fn batch_mode_syncs_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.jsonl");
    let log = AuditLog::create(&path, "vm", SyncMode::Batch, Map::new()).unwrap();
    let d = DecisionRecord {
        conn: "c",
        rpc_id: &Value::Null,
        tool: "fs.read",
        args: &json!({}),
        decision: Verdict::Allow,
        asked: false,
        answer: None,
        rule: None,
        decided_by: DecidedBy::Default,
        reason: "",
        policy_ns: 1,
    };
    for _ in 0..100 {
        let seq = log.decision(&d).unwrap();
        log.outcome(seq, OutcomeStatus::ToolError, 1, 1).unwrap();
    }
    // Written before the call returns, even unsynced.
    assert_eq!(lines(&path).len(), 201);
    let head = log.close(None).unwrap();
    assert_eq!(check(&path, Some(&head), false), Ok(202));
    let e = AuditLog::create(&path, "vm", SyncMode::Batch, Map::new())
        .err()
        .unwrap();
    assert!(
        matches!(&e, ironvmm::audit::AuditError::Create { source, .. }
            if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e:?}"
    );
    assert!(e.to_string().contains("give a new file"), "{e}");
}

/// Makes the log's own descriptor read-only behind its back, so the next write fails
/// (EBADF) exactly as a full or vanished disk would make it fail.
fn break_log_fd(audit_path: &Path) {
    use std::os::fd::AsRawFd;
    // Every descriptor on the log (the writer's and the fsync handle): which of the
    // two has the lower number depends on what other tests opened in between.
    let targets: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            (link == audit_path).then_some(fd)
        })
        .collect();
    assert!(!targets.is_empty(), "the log's descriptors");
    let ro = std::fs::File::open(audit_path).unwrap();
    for target in targets.into_iter().filter(|&t| t != ro.as_raw_fd()) {
        // SAFETY: replaces one descriptor number with another open file; the log keeps
        // using the number and now gets EBADF on write.
        assert!(unsafe { libc::dup2(ro.as_raw_fd(), target) } >= 0);
    }
}

#[test]
fn write_failure_fails_closed() {
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "fs.read", json!({"path": "hello.txt"})),
    );
    assert_eq!(r[0]["result"]["isError"], false);
    break_log_fd(&fx.audit_path);

    // The call that hits the failure is denied and its service does not run.
    let frame = call_frame(2, "fs.write", json!({"path": "new.txt", "content": "x"}));
    let mut data = frame.clone();
    data.push(b'\n');
    let mut out = Vec::new();
    c.on_data(&data, &mut out).unwrap();
    let err = settle(&mut c, &mut out).unwrap_err();
    assert!(
        matches!(err, ironvmm::gate::ConnectionError::AuditFailed(ref m) if m.contains("audit log")),
        "{err:?}"
    );
    let r = replies(&out);
    let d = denial(&r[0]);
    assert_eq!(d["decided_by"], "invariant");
    assert!(d["reason"].as_str().unwrap().contains("audit log"));
    assert!(!fx.workspace.join("new.txt").exists());
    assert!(fx.gate.fatal().is_some());

    // Every later call, on any connection, is denied too.
    let mut c2 = fx.conn("c2");
    let mut out = Vec::new();
    let mut data = call_frame(3, "fs.read", json!({"path": "hello.txt"}));
    data.push(b'\n');
    c2.on_data(&data, &mut out).unwrap();
    assert!(settle(&mut c2, &mut out).is_err());
    assert_eq!(denial(&replies(&out)[0])["decided_by"], "invariant");
    assert!(fx.gate.audit().close(Some(0)).is_err());
}

/// Issue 10, item 10: in `always` mode a failed fsync left an `allow` record for a call
/// that was then denied. The outcome record right after it now says so, and
/// `audit show` does not present the call as served.
#[test]
fn a_failed_fsync_is_recorded_as_not_served() {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    let fx = Fixture::new();
    let mut c = fx.conn("c1");
    let r = roundtrip(
        &mut c,
        &call_frame(1, "fs.read", json!({"path": "hello.txt"})),
    );
    assert_eq!(r[0]["result"]["isError"], false);
    // Both descriptors of the log become the write end of a pipe: writes succeed,
    // fsync fails (EINVAL), and what is written can be read back from the pipe.
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a writable array of two descriptors that pipe2 fills.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(made, 0);
    // SAFETY: both descriptors are new and owned here.
    let (mut rd, wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let targets: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            (link == fx.audit_path).then_some(fd)
        })
        .collect();
    assert!(!targets.is_empty());
    for t in targets {
        // SAFETY: replaces the log's descriptor numbers with the pipe's write end.
        assert!(unsafe { libc::dup2(wr.as_raw_fd(), t) } >= 0);
    }
    let frame = call_frame(2, "fs.write", json!({"path": "new.txt", "content": "x"}));
    let mut data = frame.clone();
    data.push(b'\n');
    let mut out = Vec::new();
    let _ = c.on_data(&data, &mut out);
    let _ = settle(&mut c, &mut out);
    assert!(!fx.workspace.join("new.txt").exists(), "never served");
    let mut tail = String::new();
    let _ = rd.read_to_string(&mut tail);
    let recs: Vec<Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2, "{tail}");
    assert_eq!(
        (recs[0]["kind"].as_str(), recs[0]["decision"].as_str()),
        (Some("decision"), Some("allow"))
    );
    assert_eq!(recs[1]["kind"], "outcome");
    assert_eq!(recs[1]["decision_seq"], recs[0]["seq"]);
    assert_eq!(recs[1]["status"], "error");
    assert!(recs[1]["detail"].as_str().unwrap().contains("not served"));

    // `audit show` over the log as a reader would find it on disk after a crash.
    let mut whole = std::fs::read_to_string(&fx.audit_path).unwrap();
    whole.push_str(&tail);
    let shown = fx.dir.path().join("shown.jsonl");
    std::fs::write(&shown, whole).unwrap();
    let o = ironvmm()
        .args(["audit", "show"])
        .arg(&shown)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let row = text
        .lines()
        .find(|l| l.contains("fs.write"))
        .unwrap_or_default();
    assert!(row.contains("error (not served"), "{text}");
    assert!(!row.contains(" ok "), "{row}");
}
