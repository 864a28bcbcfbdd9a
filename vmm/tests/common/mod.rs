//! Shared by the host-side tests that run the binaries as processes: the ironvmm
//! and iron binaries, a gate spawned over a scratch policy, workspace and audit log,
//! a child killed when a failing test unwinds, and readers of what they leave. The
//! tests that boot a guest share vm_common/ instead.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use serde_json::{json, Value};

/// The policy of the gate-as-a-process tests. Line 2 allows reads in the
/// workspace, line 3 any stat, line 4 asks before a delete, line 5 denies writes;
/// tests name these lines.
pub const READ_ONLY_POLICY: &str = r#"version 1
allow fs.read when path under "/workspace"
allow fs.stat
ask   fs.delete "ask me first"
deny  fs.write "read-only here"
default deny
"#;

/// The repository's root (the workspace's Cargo.toml).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ironvmm binary cargo built for these tests.
pub fn ironvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
}

/// `iron` built for the host, as the guest crate's own tests use it (cargo builds
/// no binary of another package for an integration test).
pub fn iron() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["build", "-q", "-p", "ironvmm-guest", "--bin", "iron"])
        .status()
        .unwrap();
    assert!(status.success(), "building iron");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug/iron")
}

/// Kills the child (when it is still running) and reaps it on drop, so no process
/// outlives a test that fails.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Copies the folder `from` into `to`, recursively (files and folders only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// Gives `path` and everything under it to `uid:gid` (needs root).
pub fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

/// A scratch folder for one gate: `p.rules`, a workspace `ws/` holding
/// `hello.txt`, and the path of an audit log not yet written.
pub struct GateEnv {
    pub dir: tempfile::TempDir,
    pub policy: PathBuf,
    pub workspace: PathBuf,
    pub audit: PathBuf,
}

impl GateEnv {
    /// `policy` as p.rules; `hello.txt` holds "hello\n".
    pub fn new(policy: &str) -> GateEnv {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.rules");
        std::fs::write(&p, policy).unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::write(workspace.join("hello.txt"), "hello\n").unwrap();
        GateEnv {
            policy: p,
            workspace,
            audit: dir.path().join("audit.jsonl"),
            dir,
        }
    }

    /// `ironvmm gate` over this policy, workspace and audit log, then `extra`.
    pub fn gate(&self, extra: &[&str]) -> Command {
        let mut c = ironvmm();
        c.arg("gate")
            .arg("--policy")
            .arg(&self.policy)
            .arg("--workspace")
            .arg(&self.workspace)
            .arg("--audit")
            .arg(&self.audit)
            .args(extra);
        c
    }
}

/// A `tools/call` request line (no newline).
pub fn call(id: u64, tool: &str, args: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": args}})
    .to_string()
}

/// An audit log, one JSON value a record.
pub fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `ironvmm audit verify PATH extra…`: its exit code and its stdout and stderr.
pub fn verify(path: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = ironvmm()
        .args(["audit", "verify"])
        .arg(path)
        .args(extra)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// What the child wrote to stderr, to its end (the child's stderr is piped).
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}
