//! Shared by the host-side tests that run the binaries as processes: the ironvmm
//! and iron binaries, a gate spawned over a scratch policy, workspace and audit log,
//! a child killed when a failing test unwinds, and readers of what they leave. The
//! tests that boot a guest share vm_common/ instead.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
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

/// Runs `cmd` (a `gate --stdio`) to its end with `input` on its stdin (written
/// from a thread, so a gate that answers before reading all of it cannot block
/// the test), stdout and stderr collected.
pub fn stdio_session(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Waits for `child` at most `limit` (then kills it) and collects its output.
pub fn output_within(mut child: Child, limit: Duration) -> Output {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The last line of a client's stdout as JSON (its summary), after checking that
/// the client (`what`) succeeded.
pub fn summary_line(o: &Output, what: &str) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what} failed:\n{out}\n{err}");
    serde_json::from_str(out.lines().last().expect("a summary line")).unwrap()
}

/// The JSON values of `out`, one a line (blank lines skipped).
pub fn json_lines(out: &[u8]) -> Vec<Value> {
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
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

/// Asserts that `ironvmm audit verify PATH extra…` passes, with what it said if not.
pub fn assert_verifies(path: &Path, extra: &[&str]) {
    let (code, out) = verify(path, extra);
    assert_eq!(code, Some(0), "audit verify {}: {out}", path.display());
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

/// Far longer than a gate or a relay takes to start on a loaded machine.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Waits until `path` exists (a socket the child makes), failing if the child
/// exits first or `START_PATIENCE` passes; `what` names the child.
pub fn wait_for(path: &Path, what: &str, child: &mut Child) {
    let t = Instant::now();
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "{what} exited");
        assert!(t.elapsed() < START_PATIENCE, "no {what} socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ironvmm gate` listening on `d/gate.sock` with the policy `d/p.rules` (and the
/// ironvmm.toml beside it, unless `--config` is added) and the audit log
/// `d/audit.jsonl`; its approvals socket under `d`, stdin and stderr null.
pub fn listening_gate(d: &Path) -> Command {
    let mut c = ironvmm();
    c.arg("gate")
        .arg("--policy")
        .arg(d.join("p.rules"))
        .arg("--audit")
        .arg(d.join("audit.jsonl"))
        .arg("--listen")
        .arg(d.join("gate.sock"))
        .env("XDG_RUNTIME_DIR", d)
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// `listening_gate(d)` serving `d/ironvmm.toml`, with the guest proxy's port 2 on
/// `d/net.sock` and `key_env=key` in its environment (a model provider's key),
/// once both its sockets exist.
pub fn net_gate(d: &Path, key_env: &str, key: &str) -> Killed {
    let mut gate = Killed(
        listening_gate(d)
            .arg("--config")
            .arg(d.join("ironvmm.toml"))
            .arg("--net-listen")
            .arg(d.join("net.sock"))
            .env(key_env, key)
            .spawn()
            .unwrap(),
    );
    wait_for(&d.join("gate.sock"), "the gate", &mut gate.0);
    wait_for(&d.join("net.sock"), "the gate's --net-listen", &mut gate.0);
    gate
}

/// `iron proxy` on a loopback port of its own, relaying to the gate's
/// `--net-listen` socket, once it listens; `env_remove` is kept from its
/// environment. Returns the process and its port.
pub fn iron_proxy(iron: &Path, net_sock: &Path, env_remove: &[&str]) -> (Killed, u16) {
    let port = free_port();
    let mut c = Command::new(iron);
    c.arg("proxy")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--to")
        .arg(format!("unix:{}", net_sock.display()));
    for k in env_remove {
        c.env_remove(k);
    }
    let proxy = Killed(c.spawn().unwrap());
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < START_PATIENCE, "iron proxy never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (proxy, port)
}

/// The example's scripted model (`dir/scripted-model.py`, examples/inbox) on a port
/// of its own choosing, expecting the key `key` in `key_env`, logging to
/// `dir/model.log`, with more arguments `args`. Returns the process and its port.
pub fn scripted_model(dir: &Path, key_env: &str, key: &str, args: &[&str]) -> (Killed, u16) {
    // /usr/bin/python3 where PATH has none (the KVM host); the model needs no packages.
    let python = if Command::new("python3").arg("-V").output().is_ok() {
        "python3"
    } else {
        "/usr/bin/python3"
    };
    let mut model = Killed(
        Command::new(python)
            .arg(dir.join("scripted-model.py"))
            .args(["--port", "0", "--key-env", key_env, "--log"])
            .arg(dir.join("model.log"))
            .args(args)
            .env(key_env, key)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(model.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the scripted model said {line:?}"));
    (model, port)
}

/// The Message-IDs of every message anywhere under a Maildir.
pub fn message_ids(maildir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![maildir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                if let Some(l) = text
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
                {
                    out.insert(l[11..].trim().to_string());
                }
            }
        }
    }
    out
}
