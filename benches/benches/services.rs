//! `cargo bench --bench services`: an allowed `http.fetch` through the gate (JSON-RPC
//! frame, policy decision, audit record, the http service's ureq request, reply)
//! against a direct `ureq` request to the same loopback server. The ratio is what
//! the gate adds to a host-side web request. Host-only: no VM is booted.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use ironvmm::audit::SyncMode;
use ironvmm::config::Config;
use ironvmm::gate::setup::{open_gate, GateConfig};
use ironvmm::gate::{Connection, GateLimits};
use ironvmm_benches::{median, percentile, ratio_line};
use serde_json::{json, Value};

const CALLS: usize = 2000;
const BODY: usize = 1024;

/// A keep-alive HTTP/1.1 server answering every request with BODY bytes.
fn server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                let body = vec![b'a'; BODY];
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {BODY}\r\n\r\n"
                    );
                    if w.write_all(head.as_bytes())
                        .and_then(|_| w.write_all(&body))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn report(label: &str, samples: &mut [f64]) -> f64 {
    let p50 = median(samples).unwrap();
    let p99 = percentile(samples, 99.0).unwrap();
    println!("{label}: p50 {p50:.1} µs, p99 {p99:.1} µs over {CALLS} calls");
    p50
}

fn through_gate(url: &str, mode: SyncMode) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.rules");
    std::fs::write(
        &policy,
        "version 1\nallow http.fetch when host(url) == \"127.0.0.1\"\ndefault deny\n",
    )
    .unwrap();
    let cfg_path = dir.path().join("ironvmm.toml");
    std::fs::write(&cfg_path, "[http]\nallow_addresses = [\"127.0.0.1/32\"]\n").unwrap();
    let cfg = GateConfig {
        policy,
        workspace: None,
        config: Config::load(&cfg_path).unwrap(),
        audit: Some(dir.path().join("audit.jsonl")),
        audit_key: None,
        audit_budget: ironvmm::audit::DEFAULT_AUDIT_BUDGET,
        max_write_bytes: ironvmm::services::fs::DEFAULT_MAX_WRITE_BYTES,
        audit_sync: mode,
        limits: GateLimits::default(),
        vm: "bench".into(),
        image_sha256: None,
        flags: Value::Null,
    };
    let opened = open_gate(&cfg).unwrap_or_else(|e| panic!("{}", e.message));
    let mut conn = Connection::unwoken(Arc::clone(&opened.gate), "bench".into());
    let mut frame = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "http.fetch", "arguments": {"url": url}}}))
    .unwrap();
    frame.push(b'\n');
    let mut out = Vec::with_capacity(8192);
    let mut samples = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 100 {
        out.clear();
        let t = Instant::now();
        conn.on_data(&frame, &mut out).unwrap();
        // The call runs on the gate's workers: wait for its reply line.
        while !out.ends_with(b"\n") {
            conn.poll(&mut out).unwrap();
            if !out.ends_with(b"\n") {
                conn.wait_ready(std::time::Duration::from_secs(5));
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 {
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["result"]["structuredContent"]["status"], 200, "{v}");
        }
        if i >= 100 {
            samples.push(us);
        }
    }
    let _ = opened.audit.close(Some(0));
    samples
}

fn direct(url: &str) -> Vec<f64> {
    let agent = ureq::AgentBuilder::new().build();
    let mut samples = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 100 {
        let t = Instant::now();
        let body = agent.get(url).call().unwrap().into_string().unwrap();
        let us = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(body.len(), BODY);
        if i >= 100 {
            samples.push(us);
        }
    }
    samples
}

fn main() {
    // `cargo test --benches` runs this too: a few calls are enough to check it works.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let port = server();
    let url = format!("http://127.0.0.1:{port}/page");
    let d = report("direct ureq GET (1 KiB)", &mut direct(&url));
    let b = report(
        "http.fetch through the gate, audit batch",
        &mut through_gate(&url, SyncMode::Batch),
    );
    let a = report(
        "http.fetch through the gate, audit always (fsync per decision)",
        &mut through_gate(&url, SyncMode::Always),
    );
    println!(
        "{}",
        ratio_line("http.fetch p50, audit batch", "µs", b, "direct ureq", d)
    );
    println!(
        "{}",
        ratio_line("http.fetch p50, audit always", "µs", a, "direct ureq", d)
    );
}
