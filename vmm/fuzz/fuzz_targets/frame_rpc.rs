//! Fuzz target: guest bytes on vsock port 1 as the gate takes them: newline
//! framing with the size limit, the strict JSON parser, JSON-RPC/MCP dispatch, the
//! policy decision, the audit record and the fs service (a scratch workspace),
//! with replies collected from the worker pool. Input: a first byte choosing the
//! chunk size the bytes are fed in (as vsock packets cut them), then the bytes.
//! Every reply must be one JSON object per line.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironvmm_gate::audit::SyncMode;
use ironvmm_gate::gate::setup::{open_gate, GateConfig, OpenedGate};
use ironvmm_gate::gate::{Connection, GateLimits};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = r#"version 1
allow fs.read  when path under "/workspace"
allow fs.list  when path under "/workspace"
allow fs.stat
allow fs.write when path under "/workspace/out" and len(content) <= 4096
ask   fs.delete "ask"
deny  fs.move "no moves"
default deny
"#;

/// The log is rotated past this size so a long run does not fill the disk.
const MAX_LOG: u64 = 32 << 20;

struct Scratch {
    dir: std::path::PathBuf,
    n: u64,
    gate: Option<OpenedGate>,
}

fn scratch_dir() -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("ironvmm-fuzz-frame-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ws/out")).unwrap();
    std::fs::write(dir.join("ws/hello.txt"), "hello\n").unwrap();
    std::fs::write(dir.join("p.rules"), POLICY).unwrap();
    dir
}

impl Scratch {
    fn gate(&mut self) -> &OpenedGate {
        let full = self
            .gate
            .as_ref()
            .is_some_and(|g| g.audit.bytes() > MAX_LOG);
        if full || self.gate.is_none() {
            if let Some(old) = self.gate.take() {
                old.gate.shutdown();
                let _ = std::fs::remove_file(&old.audit_path);
                let _ = std::fs::remove_file(old.audit_path.with_extension("jsonl.key"));
            }
            self.n += 1;
            let cfg = GateConfig {
                policy: self.dir.join("p.rules"),
                workspace: Some(self.dir.join("ws")),
                config: ironvmm_gate::config::Config::default(),
                audit: Some(self.dir.join(format!("audit-{}.jsonl", self.n))),
                audit_key: Some(self.dir.join(format!("audit-{}.key", self.n))),
                audit_budget: u64::MAX,
                max_write_bytes: 1 << 20,
                audit_sync: SyncMode::Batch,
                limits: GateLimits::with_max_frame(4096),
                vm: "fuzz".into(),
                image_sha256: None,
                flags: serde_json::Value::Null,
            };
            self.gate = Some(open_gate(&cfg).expect("the fuzz gate opens"));
        }
        self.gate.as_ref().unwrap()
    }
}

static SCRATCH: Mutex<Option<Scratch>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1) * 17;
    let mut guard = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = guard.get_or_insert_with(|| Scratch {
        dir: scratch_dir(),
        n: 0,
        gate: None,
    });
    let gate = Arc::clone(&s.gate().gate);
    let mut conn = Connection::unwoken(gate, "fuzz".into());
    let mut out = Vec::new();
    let mut rest = bytes;
    'feed: while !rest.is_empty() {
        // Feed only what the connection takes now; wait for calls to make room.
        let mut spins = 0;
        while conn.input_room() == 0 {
            if conn.poll(&mut out).is_err() {
                break 'feed;
            }
            if conn.in_flight() > 0 {
                conn.wait_ready(Duration::from_secs(5));
            }
            out.clear(); // the peer reads everything
            spins += 1;
            assert!(spins < 10_000, "the connection never takes input again");
        }
        let n = rest.len().min(chunk).min(conn.input_room());
        let r = conn.on_data(&rest[..n], &mut out);
        check_lines(&out);
        out.clear();
        if r.is_err() {
            break;
        }
        rest = &rest[n..];
    }
    // Collect every reply still coming.
    for _ in 0..1000 {
        if conn.poll(&mut out).is_err() {
            break;
        }
        check_lines(&out);
        out.clear();
        if conn.in_flight() == 0 && !conn.has_pending_output() {
            break;
        }
        conn.wait_ready(Duration::from_secs(5));
    }
    conn.on_close();
});

/// Each reply is one complete JSON object on its own line.
fn check_lines(out: &[u8]) {
    let mut lines = out.split(|&b| b == b'\n');
    let last = lines.next_back();
    assert!(
        last.is_none_or(<[u8]>::is_empty),
        "a reply line is not terminated"
    );
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("replies are JSON");
        assert!(v.is_object(), "a reply is not an object");
    }
}
