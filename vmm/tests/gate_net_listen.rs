//! `ironvmm gate --net-listen`: a VM's port 2 on a Unix socket, reached through a
//! host-built `iron proxy --to unix:PATH`, as an agent on the host would. The model
//! route against a loopback provider: the dummy key is replaced by the host's, a
//! denied model is a 403, a client that half-closes after its request still gets
//! the answer, and each request is decided and audited on a `net:unix#N` connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{iron, iron_proxy, net_gate};

const KEY: &str = "sk-net-listen-0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A provider on loopback: answers every request with a small chat completion and
/// records each request's head.
fn provider(seen: Arc<Mutex<Vec<String>>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            seen.lock().unwrap().push(head);
            let body = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// One request through the proxy: sent whole, then the write side closed; the
/// answer read to its end.
fn post(proxy: u16, model: &str) -> String {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /llm/p/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\
         Authorization: Bearer dummy\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_model_route_on_the_host_through_iron_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let port = provider(Arc::clone(&seen));
    std::fs::write(
        d.join("p.rules"),
        "version 1\nallow llm.chat when model in [\"m1\"] \"the agent's model\"\ndefault deny\n",
    )
    .unwrap();
    std::fs::write(
        d.join("ironvmm.toml"),
        format!(
            "[[llm.providers]]\nname = \"p\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\
             api_key_env = \"NET_LISTEN_KEY\"\nallow_loopback = true\n"
        ),
    )
    .unwrap();
    let (net_sock, audit) = (d.join("net.sock"), d.join("audit.jsonl"));
    let mut gate = net_gate(d, "NET_LISTEN_KEY", KEY);
    let (_proxy, proxy_port) = iron_proxy(&iron(), &net_sock, &[]);

    // Allowed: the provider got the host's key, the client its answer.
    let ok = post(proxy_port, "m1");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"content\":\"hello\""), "{ok}");
    assert!(!ok.contains(KEY));
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("POST /v1/chat/completions "),
        "{}",
        heads[0]
    );
    assert!(heads[0].contains(&format!("Bearer {KEY}")), "{}", heads[0]);
    assert!(!heads[0].contains("dummy"));

    // Denied: a 403 naming the rule, and the provider never asked.
    let denied = post(proxy_port, "m2");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    // SIGTERM: the gate writes its close record.
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    unsafe { libc::kill(gate.0.id() as i32, libc::SIGTERM) };
    let _ = gate.0.wait();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains(KEY));
    let decisions: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "decision")
        .collect();
    // (The readiness probe above was a connection too: it sent nothing.)
    let seen: Vec<(&str, &str)> = decisions
        .iter()
        .map(|r| {
            assert!(r["conn"].as_str().unwrap().starts_with("net:unix#"), "{r}");
            (
                r["args"]["model"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("m1", "allow"), ("m2", "deny")]);
    assert!(decisions.iter().all(|r| r["tool"] == "llm.chat"));
}
