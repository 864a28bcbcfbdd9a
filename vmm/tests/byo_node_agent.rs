//! The bring-your-own-agent example (examples/byo-node/agent.mjs, an MCP client on
//! the official TypeScript SDK) reaching the gate's tools through `iron mcp`, on the
//! host: the same bridge and gate as in a guest, without booting one (the vsock
//! becomes a unix socket through $IRON_GATE).
//!
//! Needs `node` and the SDK under `$IRONVMM_MCP_NPM/node_modules` (.ci/run installs
//! it); without them the test prints SKIPPED, and fails instead when
//! `IRONVMM_REQUIRE_MCP_SERVERS=1`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const POLICY: &str = r#"version 1
allow fs.read when path under "/workspace"
allow fs.stat
deny  fs.write "read-only here"
default deny
"#;

mod common;
use common::{iron, output_within, root, summary_line, wait_for, GateEnv, Killed};

/// The folder holding `@modelcontextprotocol/sdk`, or `None` after saying why.
fn sdk_modules() -> Option<PathBuf> {
    let modules = std::env::var_os("IRONVMM_MCP_NPM")
        .map(|d| PathBuf::from(d).join("node_modules"))
        .filter(|m| m.join("@modelcontextprotocol/sdk/package.json").exists());
    let node = Command::new("node").arg("--version").output();
    let why = match (&modules, node) {
        (Some(_), Ok(o)) if o.status.success() => return modules,
        (None, _) => "@modelcontextprotocol/sdk is not under $IRONVMM_MCP_NPM/node_modules",
        _ => "node cannot be run",
    };
    let why = format!("SKIPPED byo_node_agent: {why} (see .ci/run)");
    if std::env::var("IRONVMM_REQUIRE_MCP_SERVERS").as_deref() == Ok("1") {
        panic!("{why}, and IRONVMM_REQUIRE_MCP_SERVERS=1");
    }
    let _ = writeln!(std::io::stderr(), "{why}");
    None
}

/// Runs the agent with `args`, waiting generously (node starts slowly when loaded).
fn agent(dir: &Path, iron: &Path, sock: &Path, args: &[&str]) -> Output {
    let child = Command::new("node")
        .arg(dir.join("agent/agent.mjs"))
        .args(args)
        .env("IRON_MCP_COMMAND", iron)
        .env("IRON_GATE", format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    output_within(child, Duration::from_secs(120))
}

fn summary(o: &Output) -> Value {
    summary_line(o, "agent")
}

#[test]
fn node_agent_reaches_the_gate_through_iron_mcp() {
    let Some(modules) = sdk_modules() else {
        return;
    };
    let iron = iron();
    let e = GateEnv::new(POLICY);
    let d = e.dir.path();
    std::fs::create_dir_all(d.join("agent")).unwrap();
    let example = root().join("examples/byo-node/agent.mjs");
    std::fs::copy(example, d.join("agent/agent.mjs")).unwrap();
    // ES modules resolve packages from the script's folder upwards (not NODE_PATH).
    std::os::unix::fs::symlink(&modules, d.join("agent/node_modules")).unwrap();
    let sock = d.join("gate.sock");
    let audit = e.audit.clone();
    let mut gate = Killed(
        e.gate(&["--listen"])
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock, "the gate", &mut gate.0);

    let s = summary(&agent(d, &iron, &sock, &[]));
    assert_eq!(s["server"]["name"], "ironvmm");
    assert_eq!(s["tools"], serde_json::json!(["fs.read", "fs.stat"]));
    assert_eq!(s["is_error"], false);
    assert_eq!(s["structured"]["content"], "hello\n");

    let write = r#"{"path": "/workspace/x", "content": "x"}"#;
    let s = summary(&agent(d, &iron, &sock, &["fs.write", write]));
    assert_eq!(s["is_error"], true);
    assert_eq!(s["structured"]["decision"], "deny");
    assert_eq!(s["structured"]["reason"], "read-only here");
    assert!(!d.join("ws/x").exists());
    drop(gate);

    let log = std::fs::read_to_string(&audit).unwrap();
    let decisions: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "decision")
        .map(|r| {
            (
                r["tool"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("fs.read".to_string(), "allow".to_string()),
            ("fs.write".to_string(), "deny".to_string())
        ]
    );
}

/// The image scripts/byo-node-image.sh built (it needs the npm registry, so it is
/// built before the booting run): `$IRONVMM_BYO_NODE_IMAGE`, else its default path.
fn byo_node_image() -> PathBuf {
    let p = std::env::var_os("IRONVMM_BYO_NODE_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/byo-node/guest-node.img")
        });
    assert!(
        p.is_file(),
        "{} is missing: build it with scripts/byo-node-image.sh --kernel K -o {} \
         (or set IRONVMM_BYO_NODE_IMAGE)",
        p.display(),
        p.display()
    );
    p
}

#[test]
#[ignore = "boots a guest: run through scripts/kvm-host/cargo-test.sh after scripts/byo-node-image.sh"]
fn node_agent_in_a_guest_reaches_the_hosts_tools() {
    let img = byo_node_image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("p.rules"), POLICY).unwrap();
    std::fs::create_dir(d.join("ws")).unwrap();
    std::fs::write(d.join("ws/hello.txt"), "hello from the host\n").unwrap();
    let audit = d.join("audit.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_ironvmm"))
        .arg("boot")
        .arg("--policy")
        .arg(d.join("p.rules"))
        .arg("--workspace")
        .arg(d.join("ws"))
        .arg("--audit")
        .arg(&audit)
        .args(["--timeout", "600s"])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    // The agent's one JSON line, among the console's other lines.
    let line = out
        .lines()
        .find_map(|l| l.find("{\"node\":").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no agent summary in:\n{out}\n{err}"));
    let s: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(s["node"], "v26.10.0");
    assert_eq!(s["tools"], serde_json::json!(["fs.read", "fs.stat"]));
    assert_eq!(s["structured"]["content"], "hello from the host\n");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .any(|r| r["kind"] == "decision" && r["tool"] == "fs.read" && r["decision"] == "allow"),
        "{log}"
    );
}
