//! http.fetch through the gate against a real HTTP server on loopback: redirects
//! decided hop by hop, the SSRF guard, size and time caps, host-side secrets.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{error_kind, is_denied, TestGate};
use serde_json::json;

/// Request heads the server saw: (path, lower-cased headers).
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// A small HTTP/1.1 server: one thread per connection, one request each.
struct Server {
    port: u16,
    seen: Seen,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let s = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = Arc::clone(&s);
                thread::spawn(move || serve(stream, port, s));
            }
        });
        Server { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn headers_of(&self, path: &str) -> Vec<(String, String)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    }
}

fn serve(stream: TcpStream, port: u16, seen: Seen) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    seen.lock().unwrap().push((path.clone(), headers));
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: &str, extra: &str, ctype: &str, body: &str| {
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        );
    };
    match path.as_str() {
        "/hello" => reply(
            &mut out,
            "200 OK",
            "",
            "text/plain",
            "hello from the host\n",
        ),
        "/page" => reply(
            &mut out,
            "200 OK",
            "",
            "text/html; charset=utf-8",
            "<html><body><h1>Title</h1><script>evil()</script><p>Some &amp; text</p></body></html>",
        ),
        "/secret-echo" => reply(&mut out, "200 OK", "", "text/plain", "seen\n"),
        "/redirect-ok" => reply(
            &mut out,
            "302 Found",
            "Location: /hello\r\n",
            "text/plain",
            "",
        ),
        "/redirect-chain" => reply(
            &mut out,
            "301 Moved",
            "Location: /redirect-ok\r\n",
            "text/plain",
            "",
        ),
        "/redirect-elsewhere" => {
            let loc = format!("Location: http://localhost:{port}/hello\r\n");
            reply(&mut out, "302 Found", &loc, "text/plain", "")
        }
        "/loop" => reply(
            &mut out,
            "302 Found",
            "Location: /loop\r\n",
            "text/plain",
            "",
        ),
        "/gigabyte" => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                1u64 << 30
            );
            let chunk = vec![b'x'; 64 * 1024];
            // Until the client hangs up: it must stop reading at its cap.
            for _ in 0..(1 << 14) {
                if out.write_all(&chunk).is_err() {
                    return;
                }
            }
        }
        "/never" => thread::sleep(Duration::from_secs(30)),
        _ => reply(&mut out, "404 Not Found", "", "text/plain", "no\n"),
    }
}

const LOOPBACK_CONFIG: &str = r#"
[http]
timeout_secs = 2
max_response_bytes = 100000
max_redirects = 3
allow_addresses = ["127.0.0.1/32"]

[[http.secret]]
host = "127.0.0.1"
header = "Authorization"
prefix = "Bearer "
value_env = "IRONVMM_TEST_HTTP_TOKEN"
"#;

const SECRET: &str = "s3cr3t-token-value-never-in-the-guest";

fn loopback_gate() -> TestGate {
    std::env::set_var("IRONVMM_TEST_HTTP_TOKEN", SECRET);
    TestGate::new(
        "version 1\nallow http.fetch when host(url) == \"127.0.0.1\"\ndefault deny\n",
        LOOPBACK_CONFIG,
    )
}

#[test]
fn an_allowed_fetch_returns_the_page() {
    let srv = Server::start();
    let mut g = loopback_gate();
    assert!(g.tools_list().contains(&"http.fetch".to_string()));
    let r = g
        .call("http.fetch", json!({"url": srv.url("/hello")}))
        .unwrap();
    assert_eq!(r["status"], 200);
    assert_eq!(r["body"], "hello from the host\n");
    assert_eq!(r["truncated"], false);

    let r = g
        .call("http.fetch", json!({"url": srv.url("/page"), "text": true}))
        .unwrap();
    assert_eq!(r["body"], "Title\n\nSome & text");
    let r = g
        .call("http.fetch", json!({"url": srv.url("/nothing")}))
        .unwrap();
    assert_eq!(r["status"], 404);
}

#[test]
fn the_policy_still_decides_the_first_request() {
    let srv = Server::start();
    let mut g = loopback_gate();
    let url = format!("http://localhost:{}/hello", srv.port);
    let reply = g.call("http.fetch", json!({"url": url})).unwrap_err();
    assert!(is_denied(&reply), "{reply}");
    assert!(srv.headers_of("/hello").is_empty(), "the request went out");
}

#[test]
fn every_redirect_hop_is_decided_and_audited() {
    let srv = Server::start();
    let mut g = loopback_gate();
    let r = g
        .call("http.fetch", json!({"url": srv.url("/redirect-chain")}))
        .unwrap();
    assert_eq!(r["status"], 200);
    assert_eq!(r["body"], "hello from the host\n");
    assert_eq!(r["redirects"].as_array().unwrap().len(), 2);
    let hops: Vec<_> = g
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "decision" && r["conn"] == "followup")
        .collect();
    assert_eq!(hops.len(), 2, "{hops:?}");
    assert_eq!(hops[1]["args"]["url"], srv.url("/hello"));
    assert_eq!(hops[1]["decision"], "allow");

    // To a host the policy does not allow: refused before it is requested.
    let e = g
        .call("http.fetch", json!({"url": srv.url("/redirect-elsewhere")}))
        .unwrap_err();
    assert_eq!(error_kind(&e), "redirect_denied", "{e}");
    let denied = g
        .records()
        .into_iter()
        .rfind(|r| r["kind"] == "decision" && r["conn"] == "followup")
        .unwrap();
    assert_eq!(denied["decision"], "deny");
    assert!(denied["args"]["url"]
        .as_str()
        .unwrap()
        .contains("localhost"));
    assert!(srv.headers_of("/hello").iter().all(|(k, _)| k != "x-never"));

    let e = g
        .call("http.fetch", json!({"url": srv.url("/loop")}))
        .unwrap_err();
    assert_eq!(error_kind(&e), "too_many_redirects", "{e}");
    // Follow-up records are links of the same keyed chain.
    use ironvmm_gate::audit::{default_key_path, verify::verify, AuditKey};
    let key = AuditKey::load(&default_key_path(&g.audit_path)).unwrap();
    verify(g.audit_text().as_bytes(), &key, None, true).unwrap();
}

#[test]
fn secrets_reach_their_host_and_nothing_else() {
    let srv = Server::start();
    let mut g = loopback_gate();
    let r = g
        .call(
            "http.fetch",
            json!({"url": srv.url("/secret-echo"), "headers": {"Authorization": "guest-value", "X-Test": "1"}}),
        )
        .unwrap();
    let h = srv.headers_of("/secret-echo");
    let auth: Vec<_> = h.iter().filter(|(k, _)| k == "authorization").collect();
    assert_eq!(auth.len(), 1, "{h:?}");
    assert_eq!(auth[0].1, format!("Bearer {SECRET}"));
    assert!(h.contains(&("x-test".into(), "1".into())));
    assert!(!r.to_string().contains(SECRET));
    assert!(!g.audit_text().contains(SECRET));
}

#[test]
fn a_gigabyte_answer_is_cut_at_the_cap() {
    let srv = Server::start();
    let mut g = loopback_gate();
    let r = g
        .call("http.fetch", json!({"url": srv.url("/gigabyte")}))
        .unwrap();
    assert_eq!(r["truncated"], true);
    let body = r["body"]
        .as_str()
        .map(str::len)
        .or(r["body_base64"].as_str().map(|b| b.len() * 3 / 4));
    assert!(body.unwrap() <= 100_000, "{body:?}");
}

#[test]
fn a_server_that_never_answers_times_out() {
    let srv = Server::start();
    let mut g = loopback_gate();
    let e = g
        .call("http.fetch", json!({"url": srv.url("/never")}))
        .unwrap_err();
    assert_eq!(error_kind(&e), "timeout", "{e}");
}

#[test]
fn ssrf_targets_are_refused_after_resolution() {
    let srv = Server::start();
    // The policy allows everything: the guard alone stands in the way.
    let mut g = TestGate::new(
        "version 1\nallow http.fetch\ndefault deny\n",
        "[http]\ntimeout_secs = 2\n",
    );
    let p = srv.port;
    for url in [
        format!("http://127.0.0.1:{p}/hello"),
        format!("http://localhost:{p}/hello"),
        format!("http://[::1]:{p}/hello"),
        format!("http://0.0.0.0:{p}/hello"),
        format!("http://2130706433:{p}/hello"),
        format!("http://0177.0.0.1:{p}/hello"),
        format!("http://0x7f.1:{p}/hello"),
        format!("http://[::ffff:127.0.0.1]:{p}/hello"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1/".to_string(),
        "http://[fd00:ec2::254]/".to_string(),
    ] {
        let e = g.call("http.fetch", json!({"url": url})).unwrap_err();
        assert_eq!(error_kind(&e), "ssrf", "{url}: {e}");
    }
    assert!(
        srv.seen.lock().unwrap().is_empty(),
        "a request reached the server"
    );
    let e = g
        .call("http.fetch", json!({"url": "file:///etc/passwd"}))
        .unwrap_err();
    assert_eq!(error_kind(&e), "invalid_request", "{e}");
}
