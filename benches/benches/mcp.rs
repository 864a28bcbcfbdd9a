//! `cargo bench --bench mcp`: a call forwarded to an `[[mcp]]` server through the
//! gate (frame parsed, decided by a p.rules policy, audited, forwarded, the reply
//! checked and wrapped) against the same call written straight to the same kind of
//! server process. The ratio is what the gate adds on top of the server.
//!
//! The server is the real `@modelcontextprotocol/server-filesystem` when
//! `$IRONVMM_MCP_NPM` holds it (`read_text_file` of a small file), else the scripted
//! fake of the gate's tests (`echo`). `--quick`: 200 calls instead of 2,000.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ironvmm::audit::{AuditLog, SyncMode};
use ironvmm::gate::{Connection, Gate, GateLimits};
use ironvmm::services::mcp_servers::{McpService, ServerSpec};
use ironvmm::services::{catalog_with, Services};
use serde_json::{json, Map, Value};

struct Target {
    command: String,
    args: Vec<String>,
    tool: &'static str,
    call_args: Value,
    label: &'static str,
}

fn target(dir: &Path) -> Target {
    let npm = std::env::var_os("IRONVMM_MCP_NPM")
        .map(|d| PathBuf::from(d).join("node_modules/.bin/mcp-server-filesystem"))
        .filter(|b| b.exists());
    match npm {
        Some(bin) => {
            std::fs::write(dir.join("a.txt"), "hello\n").unwrap();
            Target {
                command: "node".into(),
                args: vec![bin.display().to_string(), dir.display().to_string()],
                tool: "read_text_file",
                call_args: json!({"path": dir.join("a.txt")}),
                label: "server-filesystem read_text_file (6 bytes)",
            }
        }
        None => {
            let py =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/gate/tests/mcp_fake_server.py");
            Target {
                command: "python3".into(),
                args: vec![py.display().to_string(), "basic".into()],
                tool: "echo",
                call_args: json!({"text": "hello"}),
                label: "scripted fake echo (IRONVMM_MCP_NPM not set)",
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut t: Vec<Duration>) -> Duration {
    t.sort();
    let p50 = percentile(&t, 0.5);
    println!(
        "  {name:<8} p50 {:>8.1} µs  p99 {:>8.1} µs",
        p50.as_secs_f64() * 1e6,
        percentile(&t, 0.99).as_secs_f64() * 1e6
    );
    p50
}

/// The server spoken to directly: one request line, one reply line.
fn direct(t: &Target, n: usize) -> Vec<Duration> {
    let mut child = Command::new(&t.command)
        .args(&t.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut send = |v: Value, wait: bool| {
        writeln!(stdin, "{v}").unwrap();
        stdin.flush().unwrap();
        if wait {
            line.clear();
            out.read_line(&mut line).unwrap();
        }
    };
    send(
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"}}}),
        true,
    );
    send(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        false,
    );
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        send(
            json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                   "params": {"name": t.tool, "arguments": t.call_args}}),
            true,
        );
        times.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// The same call as a guest frame through the gate.
fn through_gate(t: &Target, dir: &Path, run: usize, n: usize) -> Vec<Duration> {
    let mut spec = ServerSpec::new(
        "srv",
        &t.command,
        &t.args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    spec.roles = BTreeMap::new();
    let svc = McpService::start(&spec).expect("start the server");
    let catalog = catalog_with(svc.catalog_entries()).unwrap();
    let rules = format!("allow srv.{}\n", t.tool);
    let policy = ironvmm_policy::Policy::from_source(&rules, "bench.rules", None, Some(&catalog))
        .unwrap()
        .policy;
    let mut services = Services::new();
    services.add(Box::new(svc));
    let audit = AuditLog::create(
        &dir.join(format!("audit-{run}.jsonl")),
        "bench",
        SyncMode::Batch,
        Map::new(),
    )
    .unwrap();
    let gate = Arc::new(Gate::new(
        Box::new(policy),
        services,
        Arc::new(audit),
        GateLimits::default(),
    ));
    let mut conn = Connection::unwoken(gate, "bench".into());
    let mut times = Vec::with_capacity(n);
    let mut out = Vec::new();
    for i in 0..n {
        let mut frame =
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": format!("srv.{}", t.tool), "arguments": t.call_args}}))
            .unwrap();
        frame.push(b'\n');
        out.clear();
        let t0 = Instant::now();
        conn.on_data(&frame, &mut out).unwrap();
        while !out.contains(&b'\n') {
            conn.wait_ready(Duration::from_millis(100));
            conn.poll(&mut out).unwrap();
        }
        times.push(t0.elapsed());
        let end = out.iter().position(|&b| b == b'\n').unwrap();
        let reply: Value = serde_json::from_slice(&out[..end]).unwrap();
        assert_eq!(
            reply["result"]["isError"], false,
            "the call failed: {reply}"
        );
    }
    times
}

fn main() {
    let n = if std::env::args().any(|a| a == "--quick") {
        200
    } else {
        2000
    };
    let dir = std::env::temp_dir().join(format!("ironvmm-bench-mcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    let t = target(&dir);
    println!("mcp: {n} sequential calls, {}", t.label);
    // Interleaved halves, so that a machine busy with something else weighs on both.
    let mut d = direct(&t, n / 2);
    let mut g = through_gate(&t, &dir, 0, n / 2);
    d.extend(direct(&t, n / 2));
    g.extend(through_gate(&t, &dir, 1, n / 2));
    let dp = report("direct", d);
    let gp = report("gate", g);
    println!(
        "  gate / direct (p50): {:.2}  (+{:.1} µs per call)",
        gp.as_secs_f64() / dp.as_secs_f64(),
        (gp.as_secs_f64() - dp.as_secs_f64()) * 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}
