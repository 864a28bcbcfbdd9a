//! The gate, its fs service, the audit log (with its batch flusher) and the run's
//! outputs, each under the seccomp filter of the thread that runs them in the VMM:
//! a syscall missing from an allow-list kills the child with SIGSYS here instead of
//! a VM in CI. Each case runs in a child process (filters cannot be removed).

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use ironvmm::audit::SyncMode;
use ironvmm::cli::boot::Launched;
use ironvmm::cli::run::{write_outputs, Outputs};
use ironvmm::gate::setup::{open_gate, GateConfig};
use ironvmm::gate::{Connection, GateLimits};
use ironvmm::report::ExitKind;
use ironvmm_seccomp::{configure, install_with, Setting, ThreadRole};
use serde_json::{json, Value};

mod gate_common;
use gate_common::{replies, settle};

const CHILD: &str = "IRONVMM_SECCOMP_CHILD";
const DIR: &str = "IRONVMM_SECCOMP_DIR";

const POLICY: &str = "version 1\nallow fs.*\nallow http.fetch\ndefault deny\n";

fn in_child(case: &str, dir: &std::path::Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .env(DIR, dir)
        .output()
        .unwrap()
}

fn call(id: u64, tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": args}})
    .to_string()
        + "\n"
}

fn gate_config(dir: &std::path::Path, sync: SyncMode) -> GateConfig {
    GateConfig {
        policy: dir.join("p.rules"),
        workspace: Some(dir.join("ws")),
        config: ironvmm_gate::config::Config::default(),
        audit: Some(dir.join("audit.jsonl")),
        audit_key: None,
        audit_budget: ironvmm::audit::DEFAULT_AUDIT_BUDGET,
        max_write_bytes: ironvmm::services::fs::DEFAULT_MAX_WRITE_BYTES,
        audit_sync: sync,
        limits: GateLimits::default(),
        vm: "vm-seccomp".into(),
        image_sha256: None,
        flags: json!({}),
    }
}

/// Every fs tool, successes and failures, through one connection.
fn session(conn: &mut Connection) -> Vec<Value> {
    let calls = [
        call(1, "fs.read", json!({"path": "/workspace/a.txt"})),
        call(2, "fs.list", json!({"path": "/workspace"})),
        call(3, "fs.stat", json!({"path": "/workspace/a.txt"})),
        call(4, "fs.mkdir", json!({"path": "/workspace/d"})),
        call(
            5,
            "fs.write",
            json!({"path": "/workspace/d/b.txt", "content": "x", "create_dirs": true}),
        ),
        call(
            6,
            "fs.write",
            json!({"path": "/workspace/d/b.txt", "content": "y", "append": true}),
        ),
        call(
            7,
            "fs.write",
            json!({"path": "/workspace/c.bin", "content": "eQ==", "encoding": "base64", "offset": 3}),
        ),
        call(
            8,
            "fs.move",
            json!({"from": "/workspace/d/b.txt", "to": "/workspace/e.txt"}),
        ),
        call(9, "fs.delete", json!({"path": "/workspace/e.txt"})),
        call(10, "fs.delete", json!({"path": "/workspace/d"})),
        call(11, "fs.read", json!({"path": "/workspace/missing"})),
        call(
            12,
            "fs.read",
            json!({"path": "/workspace/a.txt", "offset": 1, "length": 1, "encoding": "base64"}),
        ),
        call(
            13,
            "fs.read",
            json!({"path": "/workspace/../../etc/passwd"}),
        ),
    ];
    let mut out = Vec::new();
    for c in calls {
        conn.on_data(c.as_bytes(), &mut out).unwrap();
        settle(conn, &mut out).unwrap();
    }
    conn.on_close();
    replies(&out)
}

/// The child side; without the env var (a normal run) it does nothing.
#[test]
fn child() {
    let Ok(case) = std::env::var(CHILD) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var(DIR).unwrap());
    configure(Setting::On);
    let code = match case.as_str() {
        // The gate as the device thread runs it today, the flusher as a worker.
        "device-gate" => {
            let opened = open_gate(&gate_config(&dir, SyncMode::Batch)).unwrap();
            install_with(ThreadRole::Device, Setting::On).unwrap();
            let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "c".into());
            let replies = session(&mut conn);
            opened.gate.shutdown();
            opened.audit.close(Some(0)).unwrap();
            let errors = replies
                .iter()
                .filter(|r| r["result"]["isError"] == true)
                .count();
            // Missing file, and the climb out of the workspace: the rest succeed.
            if replies.len() == 13 && errors == 2 {
                0
            } else {
                eprintln!("{replies:?}");
                1
            }
        }
        // The same calls on a worker thread, audit synced on every call.
        "worker-gate" => {
            let opened = open_gate(&gate_config(&dir, SyncMode::Always)).unwrap();
            install_with(ThreadRole::Worker, Setting::On).unwrap();
            let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "c".into());
            let n = session(&mut conn).len();
            opened.gate.shutdown();
            opened.audit.close(Some(0)).unwrap();
            i32::from(n != 13)
        }
        // http.fetch on a worker: name resolution and a TCP connection, to a web
        // server on loopback (let through the SSRF guard by the config).
        "worker-http" => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let mut s = s;
                    let mut req = [0u8; 4096];
                    let _ = std::io::Read::read(&mut s, &mut req);
                    let _ = std::io::Write::write_all(
                        &mut s,
                        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nconfined-ok",
                    );
                }
            });
            let mut cfg = gate_config(&dir, SyncMode::Always);
            cfg.config.http.allow_addresses = vec!["127.0.0.0/8".into(), "::1/128".into()];
            let opened = open_gate(&cfg).unwrap();
            install_with(ThreadRole::Worker, Setting::On).unwrap();
            let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "c".into());
            let mut out = Vec::new();
            let url = format!("http://localhost:{port}/");
            let c = call(1, "http.fetch", json!({"url": url}));
            conn.on_data(c.as_bytes(), &mut out).unwrap();
            settle(&mut conn, &mut out).unwrap();
            conn.on_close();
            opened.gate.shutdown();
            opened.audit.close(Some(0)).unwrap();
            let r = replies(&out);
            let ok = r.len() == 1
                && r[0]["result"]["structuredContent"]["status"] == 200
                && r[0]["result"]["structuredContent"]["body"] == "confined-ok";
            if !ok {
                eprintln!("{r:?}");
            }
            i32::from(!ok)
        }
        // What the main thread does after the VM: close the log, write the outputs.
        "main-outputs" => {
            let opened = open_gate(&gate_config(&dir, SyncMode::Batch)).unwrap();
            let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "c".into());
            session(&mut conn);
            install_with(ThreadRole::Main, Setting::On).unwrap();
            opened.gate.shutdown();
            opened.audit.close(Some(3)).unwrap();
            let launched = Launched {
                code: 3,
                kind: ExitKind::Agent,
                why: None,
                vm: "vm-seccomp".into(),
                audit_path: Some(dir.join("audit.jsonl")),
                audit_file: None,
                started: Instant::now(),
            };
            let outputs = Outputs::new(
                Some(dir.join("r.json")),
                Some(dir.join("r.xml")),
                Some(dir.join("s.md")),
            );
            i32::from(write_outputs(&launched, &outputs).is_err())
        }
        other => panic!("unknown case {other}"),
    };
    // SAFETY: ends the child at once; nothing is left to unwind.
    unsafe { libc::_exit(code) };
}

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.rules"), POLICY).unwrap();
    std::fs::create_dir(dir.path().join("ws")).unwrap();
    std::fs::write(dir.path().join("ws/a.txt"), "hello\n").unwrap();
    dir
}

fn assert_ran(case: &str) -> tempfile::TempDir {
    let dir = scratch();
    let o = in_child(case, dir.path());
    assert_ne!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "{case}: a syscall is missing from the allow-list (strace -f the child to find it)\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{case}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    dir
}

#[test]
fn the_gate_runs_under_the_device_filter() {
    assert_ran("device-gate");
}

#[test]
fn the_gate_runs_under_the_worker_filter() {
    assert_ran("worker-gate");
}

#[test]
fn http_fetch_runs_under_the_worker_filter() {
    assert_ran("worker-http");
}

#[test]
fn the_run_outputs_are_written_under_the_main_filter() {
    let dir = assert_ran("main-outputs");
    let r: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(r["exit"], json!({"kind": "agent", "code": 3}));
    assert_eq!(r["calls"], json!({"allow": 12, "deny": 1, "ask": 0}));
}
