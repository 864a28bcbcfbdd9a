//! Network egress (vsock port 2) against real servers on loopback: the port-2
//! stream is driven as the vsock device drives it (never more than its input room,
//! output collected by polling), and every request must be decided and audited.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::TestGate;
use ironvmm_gate::services::net::pipe::CAP;
use ironvmm_gate::services::net::NetStream;
use serde_json::Value;

/// Line 2 denies any URL with `/denied` in it; the rest is allowed, so that the
/// SSRF guard is what stands in the way in those tests.
const POLICY: &str = r#"version 1
deny net.http when url matches "*/denied*" "no denied paths"
allow net.http "the web"
allow net.connect "tunnels"
default deny
"#;

const LOOPBACK: &str = "[net]\nallow_addresses = [\"127.0.0.1/32\"]\ntimeout_secs = 2\n";

/// Requests the server saw: (request line, lower-cased headers).
type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

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
                thread::spawn(move || serve(stream, s));
            }
        });
        Server { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn lines(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(l, _)| l.clone())
            .collect()
    }
}

/// One request per connection (the proxy sends `Connection: close`).
fn serve(stream: TcpStream, seen: Seen) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let line = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    seen.lock().unwrap().push((line.clone(), headers));
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut out = stream;
    let reply = |out: &mut TcpStream, body: &[u8]| {
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\r\n",
            body.len()
        );
        let _ = out.write_all(body);
    };
    match path.as_str() {
        "/echo" => reply(&mut out, &body),
        "/chunked" => {
            let _ = out.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            );
        }
        "/never" => {
            // Reads nothing more and answers nothing: hold the socket open.
            thread::sleep(Duration::from_secs(30));
        }
        p if p.starts_with("/big/") => {
            let n: u64 = p[5..].parse().unwrap();
            let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                if out.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k as u64;
            }
        }
        _ => reply(&mut out, format!("hello from {path}").as_bytes()),
    }
}

/// A TCP echo server, for tunnels.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// The guest end of one port-2 connection, driven as the vsock device does.
struct Guest {
    s: NetStream,
    out: Vec<u8>,
    /// Most bytes the stream held at once.
    peak: usize,
}

const DEADLINE: Duration = Duration::from_secs(120);

impl Guest {
    fn connect(tg: &TestGate) -> Guest {
        let s = tg
            .net
            .accept(format!("net:test#{}", tg.net.live()), Arc::new(|| {}))
            .unwrap();
        Guest {
            s,
            out: Vec::new(),
            peak: 0,
        }
    }

    fn pump(&mut self) {
        self.peak = self.peak.max(self.s.held());
        self.s.poll(&mut self.out);
    }

    /// Sends `data`, never more than the stream's input room at a time.
    fn send(&mut self, mut data: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        while !data.is_empty() {
            let room = self.s.input_room();
            if room == 0 {
                assert!(!self.s.finished(), "the stream ended while sending");
                assert!(Instant::now() < deadline, "no input room for too long");
                self.pump();
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            let n = room.min(data.len());
            self.s.on_data(&data[..n], &mut self.out).unwrap();
            data = &data[n..];
        }
    }

    /// Polls until `done` holds on the output, or the stream ends.
    fn wait(&mut self, done: impl Fn(&[u8]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.pump();
            if done(&self.out) || self.s.finished() {
                self.pump();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no answer: {:?}",
                String::from_utf8_lossy(&self.out)
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for one whole response with a Content-Length (or until the end) and
    /// takes it off the output: (status, head, body).
    fn response(&mut self) -> (u16, String, Vec<u8>) {
        self.wait(|o| complete(o).is_some());
        let n = complete(&self.out).unwrap_or(self.out.len());
        let resp: Vec<u8> = self.out.drain(..n).collect();
        let end = find(&resp, b"\r\n\r\n").expect("a response head") + 4;
        let head = String::from_utf8_lossy(&resp[..end]).into_owned();
        let status = head[9..12].parse().unwrap();
        (status, head, resp[end..].to_vec())
    }

    /// Waits until the stream has ended and all its output is collected.
    fn wait_end(&mut self) {
        self.wait(|_| false);
        assert!(self.s.finished());
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Length of the first complete response in `o` framed by Content-Length.
fn complete(o: &[u8]) -> Option<usize> {
    let end = find(o, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&o[..end]).to_ascii_lowercase();
    let cl: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    (o.len() >= end + cl).then_some(end + cl)
}

fn get(url: &str, host: &str) -> Vec<u8> {
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\nProxy-Connection: keep-alive\r\n\r\n").into_bytes()
}

fn decisions(tg: &TestGate) -> Vec<Value> {
    tg.records()
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect()
}

fn outcome_of(tg: &TestGate, seq: &Value) -> Option<Value> {
    tg.records()
        .into_iter()
        .find(|r| r["kind"] == "outcome" && &r["decision_seq"] == seq)
}

/// The outcome record of decision `seq`, once written (it trails the answer).
fn wait_outcome(tg: &TestGate, seq: &Value) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(o) = outcome_of(tg, seq) {
            return o;
        }
        assert!(Instant::now() < deadline, "no outcome for decision {seq}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn loopback_gate() -> TestGate {
    TestGate::new(POLICY, LOOPBACK)
}

#[test]
fn an_allowed_get_is_relayed_and_audited() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    let host = format!("127.0.0.1:{}", srv.port);
    g.send(&get(&srv.url("/hello?x=1"), &host));
    let (status, head, body) = g.response();
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"hello from /hello?x=1");
    // Hop-by-hop headers of the server's hop are not passed on.
    assert!(!head.to_ascii_lowercase().contains("keep-alive"), "{head}");
    let seen = srv.seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, "GET /hello?x=1 HTTP/1.1");
    let h: std::collections::HashMap<_, _> = seen[0].1.iter().cloned().collect();
    assert_eq!(h["host"], host);
    assert_eq!(h["connection"], "close");
    assert!(!h.contains_key("proxy-connection"));
    let d = decisions(&tg);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["tool"], "net.http");
    assert_eq!(d[0]["args"]["method"], "GET");
    assert_eq!(d[0]["args"]["url"], srv.url("/hello?x=1"));
    assert_eq!(d[0]["decision"], "allow");
    assert_eq!(d[0]["rule"], 3);
    assert!(d[0]["conn"].as_str().unwrap().starts_with("net:"));
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert_eq!(o["status"], "ok");
    assert!(o["sent"].as_u64().unwrap() > 0);
    assert!(o["received"].as_u64().unwrap() >= body.len() as u64);
}

#[test]
fn a_denied_get_is_answered_403_naming_the_rule_and_audited() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    g.send(&get(
        &srv.url("/denied/x"),
        &format!("127.0.0.1:{}", srv.port),
    ));
    let (status, _, body) = g.response();
    assert_eq!(status, 403);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("rule 2") && body.contains("no denied paths"),
        "{body}"
    );
    g.wait_end();
    assert!(srv.lines().is_empty(), "the server was reached");
    let d = decisions(&tg);
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0]["decision"].as_str(), d[0]["rule"].as_u64()),
        (Some("deny"), Some(2))
    );
    assert!(outcome_of(&tg, &d[0]["seq"]).is_none());
}

#[test]
fn a_host_header_that_disagrees_with_the_url_is_refused_and_audited() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    g.send(&get(&srv.url("/hello"), "evil.example"));
    let (status, _, body) = g.response();
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("Host header"));
    assert!(srv.lines().is_empty());
    let d = decisions(&tg);
    assert_eq!(d[0]["decision"], "deny");
    assert_eq!(d[0]["decided_by"], "invariant");
}

#[test]
fn each_request_on_a_kept_alive_connection_is_decided() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    let host = format!("127.0.0.1:{}", srv.port);
    g.send(&get(&srv.url("/one"), &host));
    let (s1, _, b1) = g.response();
    // A second request, then a third pipelined behind it: the third is denied.
    let mut two = get(&srv.url("/two"), &host);
    two.extend(get(&srv.url("/denied"), &host));
    g.send(&two);
    let (s2, _, b2) = g.response();
    let (s3, _, _) = g.response();
    assert_eq!((s1, s2, s3), (200, 200, 403));
    assert_eq!(
        (b1.as_slice(), b2.as_slice()),
        (&b"hello from /one"[..], &b"hello from /two"[..])
    );
    let d = decisions(&tg);
    let urls: Vec<_> = d
        .iter()
        .map(|r| r["args"]["url"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(urls, [srv.url("/one"), srv.url("/two"), srv.url("/denied")]);
    assert_eq!(d[2]["decision"], "deny");
    assert_eq!(srv.lines().len(), 2);
}

#[test]
fn bodies_are_reframed_both_ways() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    let host = format!("127.0.0.1:{}", srv.port);
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
        srv.url("/echo")
    );
    g.send(req.as_bytes());
    let (status, _, body) = g.response();
    assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
    g.send(&get(&srv.url("/chunked"), &host));
    g.wait(|o| o.ends_with(b"0\r\n\r\n"));
    let text = String::from_utf8_lossy(&g.out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("Transfer-Encoding: chunked\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{text}"
    );
    // Content-Length beside Transfer-Encoding is how smuggling starts: refused.
    let mut g = Guest::connect(&tg);
    g.send(
        format!(
            "POST {} HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            srv.url("/echo")
        )
        .as_bytes(),
    );
    assert_eq!(g.response().0, 400);
}

#[test]
fn a_connect_tunnel_is_decided_once_and_audited_with_its_bytes_at_close() {
    let port = echo_server();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    // The first tunnel bytes come in the same packet as the CONNECT head.
    let mut req =
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes();
    req.extend_from_slice(b"ping ");
    g.send(&req);
    g.wait(|o| o.ends_with(b"ping "));
    assert!(g
        .out
        .starts_with(b"HTTP/1.1 200 Connection Established\r\n\r\n"));
    let big = vec![b'z'; 300 * 1024];
    g.send(&big);
    let want = 39 + 5 + big.len();
    g.wait(|o| o.len() >= want);
    assert_eq!(g.out.len(), want);
    let d = decisions(&tg);
    assert_eq!(d.len(), 1, "decided once");
    assert_eq!(d[0]["tool"], "net.connect");
    assert_eq!(d[0]["args"]["host"], "127.0.0.1");
    assert_eq!(d[0]["args"]["port"], port);
    assert!(
        outcome_of(&tg, &d[0]["seq"]).is_none(),
        "audited at the close"
    );
    g.s.on_close();
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert_eq!(o["status"], "ok", "{o}");
    assert_eq!(o["sent"], 5 + big.len() as u64);
    assert_eq!(o["received"], 5 + big.len() as u64);
    assert!(o["total_us"].as_u64().unwrap() > 0);
    assert!(g.peak <= 2 * CAP, "held {} bytes", g.peak);
}

#[test]
fn ssrf_targets_are_refused_after_the_policy_allowed_them() {
    let srv = Server::start();
    let p = srv.port;
    // No allow_addresses: loopback is refused whatever the policy says.
    let tg = TestGate::new(POLICY, "[net]\ntimeout_secs = 5\n");
    let http = [
        format!("http://127.0.0.1:{p}/a"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://[::1]:{p}/a"),
        format!("http://0.0.0.0:{p}/a"),
        format!("http://2130706433:{p}/a"),
        format!("http://0177.0.0.1:{p}/a"),
        format!("http://0x7f.1:{p}/a"),
        format!("http://localhost:{p}/a"),
        format!("http://[::ffff:127.0.0.1]:{p}/a"),
    ];
    for url in &http {
        let mut g = Guest::connect(&tg);
        g.send(format!("GET {url} HTTP/1.1\r\n\r\n").as_bytes());
        let (status, _, body) = g.response();
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 403, "{url}: {body}");
        assert!(body.contains("ssrf guard"), "{url}: {body}");
    }
    for target in [
        format!("127.0.0.1:{p}"),
        format!("[::1]:{p}"),
        format!("2130706433:{p}"),
        format!("localhost:{p}"),
        "169.254.169.254:80".to_string(),
    ] {
        let mut g = Guest::connect(&tg);
        g.send(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes());
        let (status, _, body) = g.response();
        assert_eq!(status, 403, "{target}: {}", String::from_utf8_lossy(&body));
    }
    assert!(
        srv.lines().is_empty(),
        "the server was reached: {:?}",
        srv.lines()
    );
    // Each was allowed by the policy, then refused by the guard: audited so.
    let d = decisions(&tg);
    assert_eq!(d.len(), http.len() + 5);
    // The decided URL is the address the guest's spelling names.
    assert!(
        d.iter()
            .filter(|r| r["args"]["url"] == format!("http://127.0.0.1:{p}/a"))
            .count()
            >= 4
    );
    for r in &d {
        assert_eq!(r["decision"], "allow");
        let o = wait_outcome(&tg, &r["seq"]);
        assert_eq!(o["status"], "error");
        assert!(o["detail"].as_str().unwrap().contains("ssrf guard"), "{o}");
    }
}

#[test]
fn a_server_that_never_answers_times_out_and_is_audited() {
    let srv = Server::start();
    let tg = TestGate::new(
        POLICY,
        "[net]\nallow_addresses = [\"127.0.0.1/32\"]\ntimeout_secs = 1\n",
    );
    let mut g = Guest::connect(&tg);
    g.send(&get(&srv.url("/never"), &format!("127.0.0.1:{}", srv.port)));
    let (status, _, body) = g.response();
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    g.wait_end();
    let d = decisions(&tg);
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert_eq!(o["status"], "error");
    assert!(o["detail"].as_str().unwrap().contains("timeout"), "{o}");
}

#[test]
fn a_huge_answer_streams_through_bounded_buffers() {
    let srv = Server::start();
    let tg = loopback_gate();
    let mut g = Guest::connect(&tg);
    let n: u64 = 64 << 20;
    g.send(&get(
        &srv.url(&format!("/big/{n}")),
        &format!("127.0.0.1:{}", srv.port),
    ));
    let mut total = 0u64;
    let deadline = Instant::now() + DEADLINE;
    let mut head_seen = false;
    while total < n {
        g.pump();
        if !head_seen {
            if let Some(end) = find(&g.out, b"\r\n\r\n") {
                g.out.drain(..end + 4);
                head_seen = true;
            }
        }
        if head_seen {
            total += g.out.len() as u64;
            g.out.clear();
        }
        assert!(Instant::now() < deadline, "stalled at {total} bytes");
        if g.s.finished() {
            break;
        }
    }
    assert_eq!(total, n);
    assert!(g.peak <= 2 * CAP, "held {} bytes", g.peak);
    let d = decisions(&tg);
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert!(o["received"].as_u64().unwrap() > n);
}

#[test]
fn a_guest_that_stops_reading_holds_no_more_than_the_bound_and_is_cut() {
    let srv = Server::start();
    let tg = TestGate::new(
        POLICY,
        "[net]\nallow_addresses = [\"127.0.0.1/32\"]\ntimeout_secs = 1\n",
    );
    let mut g = Guest::connect(&tg);
    g.send(&get(
        &srv.url("/big/1000000000"),
        &format!("127.0.0.1:{}", srv.port),
    ));
    // Never polled: the relay fills its buffer, waits, and gives up.
    let deadline = Instant::now() + DEADLINE;
    while g.s.has_pending_output() && !tg.records().iter().any(|r| r["kind"] == "outcome") {
        assert!(g.s.held() <= 2 * CAP, "held {} bytes", g.s.held());
        assert!(Instant::now() < deadline, "never cut");
        thread::sleep(Duration::from_millis(20));
    }
    let d = decisions(&tg);
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert_eq!(o["status"], "error", "{o}");
    assert!(
        o["received"].as_u64().unwrap() <= 2 * CAP as u64 + 4096,
        "{o}"
    );
}

#[test]
fn garbage_and_oversized_heads_get_400_and_431_and_reach_no_policy() {
    let tg = loopback_gate();
    for (input, want) in [
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (b"GET /local/path HTTP/1.1\r\n\r\n".to_vec(), 400),
        (b"GET http://a.example/ HTTP/9.9\r\n\r\n".to_vec(), 400),
        (b"GET https://a.example/ HTTP/1.1\r\n\r\n".to_vec(), 400),
        (b"CONNECT nowhere HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            b"GET http://a.example/ HTTP/1.1\r\nX: \x01\r\n\r\n".to_vec(),
            400,
        ),
        (
            format!(
                "GET http://a.example/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(40 * 1024)
            )
            .into_bytes(),
            431,
        ),
    ] {
        let mut g = Guest::connect(&tg);
        g.send(&input);
        let (status, _, _) = g.response();
        assert_eq!(
            status,
            want,
            "{:?}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
        g.wait_end();
    }
    assert!(decisions(&tg).is_empty());
}

#[test]
fn the_connection_bound_refuses_more_connections() {
    let tg = TestGate::new(POLICY, "[net]\nmax_connections = 2\n");
    let a = Guest::connect(&tg);
    let b = Guest::connect(&tg);
    assert!(tg.net.accept("net:x#3".into(), Arc::new(|| {})).is_none());
    drop((a, b));
    let deadline = Instant::now() + DEADLINE;
    while tg.net.live() > 0 {
        assert!(Instant::now() < deadline, "the relays never ended");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(tg.net.accept("net:x#4".into(), Arc::new(|| {})).is_some());
}

/// Serves port 2 on a host TCP port, standing in for the vsock device and
/// `iron proxy` (a byte relay): each TCP connection becomes one `NetStream`.
fn tcp_front(tg: &TestGate) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let net = Arc::clone(&tg.net);
    thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let s = net.accept("net:tcp".into(), Arc::new(|| {})).unwrap();
            let s = Arc::new(Mutex::new(s));
            let (mut rd, s2) = (tcp.try_clone().unwrap(), Arc::clone(&s));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = rd.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut data = &buf[..n];
                    while !data.is_empty() {
                        let mut st = s2.lock().unwrap();
                        let k = st.input_room().min(data.len());
                        if st.finished() {
                            return;
                        }
                        if k > 0 {
                            st.on_data(&data[..k], &mut Vec::new()).unwrap();
                            data = &data[k..];
                        }
                        drop(st);
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            thread::spawn(move || {
                let mut tcp = tcp;
                loop {
                    let mut out = Vec::new();
                    let mut st = s.lock().unwrap();
                    st.poll(&mut out);
                    let done = st.finished();
                    drop(st);
                    if tcp.write_all(&out).is_err() || done {
                        let _ = tcp.shutdown(std::net::Shutdown::Both);
                        s.lock().unwrap().on_close();
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    port
}

/// The client the guest image has: busybox wget, through the proxy.
#[test]
fn busybox_wget_goes_through_the_proxy() {
    if !std::path::Path::new("/bin/busybox").exists() {
        eprintln!("SKIPPED: no /bin/busybox (apt-get install busybox-static)");
        return;
    }
    let srv = Server::start();
    let tg = loopback_gate();
    let proxy = tcp_front(&tg);
    let wget = |path: &str| {
        std::process::Command::new("/bin/busybox")
            .args(["wget", "-q", "-O", "-", &srv.url(path)])
            .env_clear()
            .env("http_proxy", format!("http://127.0.0.1:{proxy}"))
            .output()
            .unwrap()
    };
    let ok = wget("/hello");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(ok.stdout, b"hello from /hello");
    let denied = wget("/denied");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let d = decisions(&tg);
    assert_eq!(d.len(), 2);
    assert_eq!(
        (d[0]["decision"].as_str(), d[1]["decision"].as_str()),
        (Some("allow"), Some("deny"))
    );
}

/// The VM ending cuts open tunnels and waiting requests; each is audited first.
#[test]
fn shutdown_cuts_tunnels_and_waiting_requests_and_audits_them() {
    let srv = Server::start();
    let port = echo_server();
    let tg = TestGate::new(
        POLICY,
        "[net]\nallow_addresses = [\"127.0.0.1/32\"]\ntimeout_secs = 600\n",
    );
    let mut tunnel = Guest::connect(&tg);
    tunnel.send(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nhi").as_bytes());
    tunnel.wait(|o| o.ends_with(b"hi"));
    let mut waiting = Guest::connect(&tg);
    waiting.send(&get(&srv.url("/never"), &format!("127.0.0.1:{}", srv.port)));
    let deadline = Instant::now() + DEADLINE;
    while srv.lines().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the server"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(tg.net.shutdown(DEADLINE), 0);
    let d = decisions(&tg);
    assert_eq!(d.len(), 2);
    for r in &d {
        assert!(outcome_of(&tg, &r["seq"]).is_some(), "no outcome for {r}");
    }
    let t = outcome_of(&tg, &d[0]["seq"]).unwrap();
    assert_eq!(
        (t["sent"].as_u64(), t["received"].as_u64()),
        (Some(2), Some(2))
    );
}

/// Tunnel bytes from the guest are charged to `--max-egress-bytes`: past it the
/// tunnel is cut, and its outcome says why.
#[test]
fn tunnel_bytes_are_charged_to_the_egress_budget() {
    use ironvmm_gate::config::NetConfig;
    use ironvmm_gate::gate::budget::CallBudget;
    use ironvmm_gate::services::net::NetService;
    let port = echo_server();
    let tg = loopback_gate();
    let budget = CallBudget::new(None, Some(100_000));
    let cfg = NetConfig {
        allow_addresses: vec!["127.0.0.1/32".into()],
        ..NetConfig::default()
    };
    let net = NetService::new(Arc::clone(&tg.gate), &cfg, Some(Arc::clone(&budget))).unwrap();
    let s = net.accept("net:budget".into(), Arc::new(|| {})).unwrap();
    let mut g = Guest {
        s,
        out: Vec::new(),
        peak: 0,
    };
    g.send(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes());
    g.wait(|o| o.ends_with(b"\r\n\r\n"));
    // More than the budget, as long as the stream takes it: it ends once cut.
    let mut left = 300 * 1024;
    let deadline = Instant::now() + DEADLINE;
    while left > 0 && !g.s.finished() {
        let n = g.s.input_room().min(left).min(16 * 1024);
        if n > 0 {
            g.s.on_data(&vec![b'e'; n], &mut g.out).unwrap();
            left -= n;
        }
        g.pump();
        assert!(Instant::now() < deadline, "never cut");
        thread::sleep(Duration::from_millis(1));
    }
    g.wait_end();
    let d = decisions(&tg);
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert!(
        o["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("--max-egress-bytes"),
        "{o}"
    );
    assert!(o["sent"].as_u64().unwrap() <= 100_000, "{o}");
    assert!(budget.reached().is_some());
}

/// An `ask` rule holds the request until the approver answers, and both records
/// are written as for a tool call.
#[test]
fn an_asked_request_waits_for_the_approver() {
    use ironvmm_gate::gate::approver::{Answer, AnswerSink, Answerer, Approver, AskRequest};
    use ironvmm_gate::gate::DecidedBy;
    struct Yes;
    impl Approver for Yes {
        fn ask(&self, _req: AskRequest, done: AnswerSink) {
            // Answered from another thread, later, as a person would.
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                done(Answer {
                    allow: true,
                    answerer: Answerer {
                        by: DecidedBy::User,
                        channel: "test".into(),
                        who: None,
                    },
                    reason: "fine".into(),
                })
            });
        }
    }
    let srv = Server::start();
    let tg = TestGate::new("version 1\nask net.http \"ask me\"\n", LOOPBACK);
    let host = format!("127.0.0.1:{}", srv.port);
    let mut g = Guest::connect(&tg);
    g.send(&get(&srv.url("/first"), &host));
    // Nobody to answer yet (the default approver denies every ask).
    assert_eq!(g.response().0, 403);
    tg.gate.set_approver(Arc::new(Yes));
    let mut g = Guest::connect(&tg);
    g.send(&get(&srv.url("/second"), &host));
    let (status, _, body) = g.response();
    assert_eq!((status, body.as_slice()), (200, &b"hello from /second"[..]));
    let d = decisions(&tg);
    let kinds: Vec<_> = d
        .iter()
        .map(|r| (r["decision"].as_str().unwrap(), r["asked"] == true))
        .collect();
    assert_eq!(
        kinds,
        [
            ("ask", false),
            ("deny", true),
            ("ask", false),
            ("allow", true)
        ]
    );
    assert_eq!(d[3]["ask_seq"], d[2]["seq"]);
    assert_eq!(d[3]["channel"], "test");
}
