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
    let net = NetService::new(Arc::clone(&tg.gate), &cfg, Some(Arc::clone(&budget)), None).unwrap();
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

// The model route: `/llm/<provider>/…` decided as `llm.chat` and sent on with the
// host's key, against a scripted provider on loopback.

const ROUTE_KEY_ENV: &str = "IRONVMM_TEST_ROUTE_KEY";
const ROUTE_KEY: &str = "sk-real-host-key-5b1e90c4";
const DUMMY_KEY: &str = "dummy-guest-key";

const LLM_POLICY: &str = r#"version 1
deny llm.chat when model matches "forbidden*" "no forbidden models"
allow llm.chat "the model"
default deny
"#;

/// A scripted provider: `/v1/chat/completions` answers JSON with usage and echoes
/// the Authorization it got (so the test sees the key is redacted on the way
/// back); with `"stream": true` it sends one SSE event, waits for `release`, then
/// the last event with usage. Records what it saw.
struct Provider {
    port: u16,
    seen: Seen,
    release: std::sync::mpsc::SyncSender<()>,
}

impl Provider {
    fn start() -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let (release, wait) = std::sync::mpsc::sync_channel::<()>(4);
        let wait = Arc::new(Mutex::new(wait));
        let s = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, wait) = (Arc::clone(&s), Arc::clone(&wait));
                thread::spawn(move || answer_model(stream, &s, &wait));
            }
        });
        Provider {
            port,
            seen,
            release,
        }
    }

    fn config(&self, budget: &str) -> String {
        format!(
            "[[llm.providers]]\nname = \"local\"\nbase_url = \"http://127.0.0.1:{}/v1\"\napi_key_env = \"{ROUTE_KEY_ENV}\"\nallow_loopback = true\ntimeout_secs = 120\n\n[llm.budget]\n{budget}\n",
            self.port
        )
    }

    fn headers(&self, i: usize) -> std::collections::HashMap<String, String> {
        self.seen.lock().unwrap()[i].1.iter().cloned().collect()
    }
}

fn answer_model(stream: TcpStream, seen: &Seen, wait: &Mutex<std::sync::mpsc::Receiver<()>>) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
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
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let auth = headers
        .iter()
        .find(|(k, _)| k == "authorization" || k == "x-api-key")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    seen.lock()
        .unwrap()
        .push((line.trim_end().to_string(), headers));
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut out = stream;
    if req["stream"] == true {
        let chunk = |out: &mut TcpStream, s: &str| {
            let _ = write!(out, "{:x}\r\n{s}\r\n", s.len());
            let _ = out.flush();
        };
        let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        chunk(
            &mut out,
            "data: {\"choices\":[{\"delta\":{\"content\":\"first\"}}]}\n\n",
        );
        // The rest only once the guest has the first event: it arrived alone.
        let _ = wait.lock().unwrap().recv_timeout(DEADLINE);
        chunk(&mut out, "data: {\"choices\":[{\"delta\":{\"content\":\"second\"}}],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        let _ = out.write_all(b"0\r\n\r\n");
        return;
    }
    let reply = serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5},
        "echo": auth,
    })
    .to_string();
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Echo: {auth}\r\n\r\n{reply}",
        reply.len()
    );
}

fn model_gate(p: &Provider, budget: &str) -> TestGate {
    static KEY: std::sync::Once = std::sync::Once::new();
    KEY.call_once(|| std::env::set_var(ROUTE_KEY_ENV, ROUTE_KEY));
    TestGate::new(LLM_POLICY, &p.config(budget))
}

fn model_post(target: &str, auth: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n{auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The data of a chunked body.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let eol = find(b, b"\r\n").expect("a chunk size line");
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap(), 16).unwrap();
        if n == 0 {
            return data;
        }
        data.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

fn llm_records(tg: &TestGate) -> Vec<Value> {
    tg.records()
        .into_iter()
        .filter(|r| r["kind"] == "llm")
        .collect()
}

#[test]
fn the_model_route_sends_the_hosts_key_and_never_hands_it_back() {
    let p = Provider::start();
    let tg = model_gate(&p, "tokens = 100000");
    let mut g = Guest::connect(&tg);
    g.send(&model_post(
        "/llm/local/chat/completions",
        &format!("Authorization: Bearer {DUMMY_KEY}"),
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#,
    ));
    g.wait_end();
    let text = String::from_utf8_lossy(&g.out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let end = find(&g.out, b"\r\n\r\n").unwrap() + 4;
    let body: Value = serde_json::from_slice(&dechunk(&g.out[end..])).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hi");
    // The provider got the real key, not the dummy; the guest sees neither key.
    assert_eq!(
        p.seen.lock().unwrap()[0].0,
        "POST /v1/chat/completions HTTP/1.1"
    );
    let h = p.headers(0);
    assert_eq!(h["authorization"], format!("Bearer {ROUTE_KEY}"));
    assert!(!format!("{h:?}").contains(DUMMY_KEY), "{h:?}");
    assert_eq!(body["echo"], "Bearer [redacted]");
    assert!(!text.contains(ROUTE_KEY), "{text}");
    // Decided as llm.chat, its usage spent and audited; the key in no record.
    let d = decisions(&tg);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["tool"], "llm.chat");
    assert_eq!(
        d[0]["args"],
        serde_json::json!({"provider": "local", "model": "gpt-test", "path": "/chat/completions"})
    );
    assert_eq!(d[0]["decision"], "allow");
    let o = wait_outcome(&tg, &d[0]["seq"]);
    assert_eq!(o["status"], "ok", "{o}");
    let l = llm_records(&tg);
    assert_eq!(l[0]["usage"]["total_tokens"], 12, "{}", l[0]);
    assert_eq!(l[0]["usage"]["estimated"], false);
    assert_eq!(l[0]["budget"]["spent"]["steps"], 1);
    assert!(!tg.audit_text().contains(ROUTE_KEY));

    // Absolute form (a client's proxy settings) with Anthropic's header: the key
    // goes in x-api-key, and no Authorization is made up.
    let mut g = Guest::connect(&tg);
    g.send(&model_post(
        "http://127.0.0.1:3128/llm/local/messages?beta=true",
        &format!("x-api-key: {DUMMY_KEY}"),
        r#"{"model":"claude-test","messages":[]}"#,
    ));
    g.wait_end();
    let text = String::from_utf8_lossy(&g.out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("X-Echo: [redacted]\r\n") || text.contains("x-echo: [redacted]\r\n"),
        "{text}"
    );
    assert!(!text.contains(ROUTE_KEY), "{text}");
    assert_eq!(
        p.seen.lock().unwrap()[1].0,
        "POST /v1/messages?beta=true HTTP/1.1"
    );
    let h = p.headers(1);
    assert_eq!(h["x-api-key"], ROUTE_KEY);
    assert!(!h.contains_key("authorization"), "{h:?}");
    assert_eq!(decisions(&tg)[1]["args"]["path"], "/messages?beta=true");
    assert!(!tg.audit_text().contains(ROUTE_KEY));
}

#[test]
fn a_streamed_model_answer_passes_through_as_it_comes() {
    let p = Provider::start();
    let tg = model_gate(&p, "tokens = 100000");
    let mut g = Guest::connect(&tg);
    g.send(&model_post(
        "/llm/local/chat/completions",
        &format!("Authorization: Bearer {DUMMY_KEY}"),
        r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    ));
    // The first event reaches the guest while the provider still holds the rest.
    g.wait(|o| find(o, b"first").is_some());
    assert!(!g.s.finished());
    assert!(find(&g.out, b"second").is_none());
    let text = String::from_utf8_lossy(&g.out).into_owned();
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{text}"
    );
    p.release.send(()).unwrap();
    g.wait_end();
    let end = find(&g.out, b"\r\n\r\n").unwrap() + 4;
    let events = String::from_utf8(dechunk(&g.out[end..])).unwrap();
    assert!(
        events.contains("\"second\"") && events.ends_with("data: [DONE]\n\n"),
        "{events}"
    );
    let d = decisions(&tg);
    wait_outcome(&tg, &d[0]["seq"]);
    // The usage the stream reported is what was spent.
    let l = llm_records(&tg);
    assert_eq!(l[0]["usage"]["total_tokens"], 13, "{}", l[0]);
    assert_eq!(l[0]["usage"]["estimated"], false);
}

#[test]
fn a_denied_model_is_403_naming_the_rule_and_audited() {
    let p = Provider::start();
    let tg = model_gate(&p, "tokens = 100000");
    let mut g = Guest::connect(&tg);
    g.send(&model_post(
        "/llm/local/chat/completions",
        &format!("Authorization: Bearer {DUMMY_KEY}"),
        r#"{"model":"forbidden-9","messages":[]}"#,
    ));
    let (status, _, body) = g.response();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("rule 2") && body.contains("no forbidden models"),
        "{body}"
    );
    assert!(
        p.seen.lock().unwrap().is_empty(),
        "the provider was reached"
    );
    let d = decisions(&tg);
    assert_eq!(
        (d[0]["tool"].as_str(), d[0]["decision"].as_str()),
        (Some("llm.chat"), Some("deny"))
    );
    assert_eq!(d[0]["args"]["model"], "forbidden-9");
    // An unknown provider is refused by name, after its decision.
    let mut g = Guest::connect(&tg);
    g.send(&model_post(
        "/llm/nosuch/chat/completions",
        "X: 1",
        r#"{"model":"m"}"#,
    ));
    let (status, _, body) = g.response();
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("\"nosuch\""));
    assert!(!tg.audit_text().contains(ROUTE_KEY));
}

#[test]
fn a_spent_model_budget_is_a_clean_denial() {
    let p = Provider::start();
    let tg = model_gate(&p, "steps = 1");
    let req = model_post(
        "/llm/local/chat/completions",
        &format!("Authorization: Bearer {DUMMY_KEY}"),
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#,
    );
    // A client that waits for leave to send its body is given it at once.
    let mut g = Guest::connect(&tg);
    let body = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;
    g.send(&model_post("/llm/local/chat/completions", "Expect: 100-continue", body)[..]);
    g.wait_end();
    let text = String::from_utf8_lossy(&g.out).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{text}"
    );
    let mut g = Guest::connect(&tg);
    g.send(&req);
    let (status, _, body) = g.response();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("steps 1 of 1"), "{body}");
    assert_eq!(p.seen.lock().unwrap().len(), 1);
    let d = decisions(&tg);
    assert_eq!(d[1]["decision"], "deny");
    assert_eq!(d[1]["decided_by"], "limit");
}

// A provider's `timeout_secs` bounds each wait (connecting, the response head, each
// gap in the body), not the whole exchange: a stream runs as long as it moves, and
// `max_secs` bounds it in all.

/// A provider that answers every request with an SSE stream of `pieces` events,
/// `gap` apart, then a usage event and `[DONE]`.
fn drip_provider(pieces: usize, gap: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || drip(stream, pieces, gap));
        }
    });
    port
}

fn drip(stream: TcpStream, pieces: usize, gap: Duration) {
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let mut out = stream;
    let chunk = |out: &mut TcpStream, s: &str| {
        write!(out, "{:x}\r\n{s}\r\n", s.len()).and_then(|_| out.flush())
    };
    let _ = out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for i in 0..pieces {
        let event =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"piece-{i}\"}}}}]}}\n\n");
        if chunk(&mut out, &event).is_err() {
            return;
        }
        thread::sleep(gap);
    }
    let _ = chunk(&mut out, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n");
    let _ = out.write_all(b"0\r\n\r\n");
}

fn drip_gate(port: u16, bounds: &str) -> TestGate {
    TestGate::new(
        LLM_POLICY,
        &format!(
            "[[llm.providers]]\nname = \"local\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nallow_loopback = true\n{bounds}\n"
        ),
    )
}

/// Sends one streamed model request through the route and collects all the guest
/// got, once the stream has ended: (output, the decision's outcome, the llm record).
fn drip_exchange(tg: &TestGate) -> (String, Value, Value) {
    let mut g = Guest::connect(tg);
    g.send(&model_post(
        "/llm/local/chat/completions",
        "X-Test: drip",
        r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    ));
    g.wait_end();
    let d = decisions(tg);
    assert_eq!(d[0]["decision"], "allow", "{}", d[0]);
    let o = wait_outcome(tg, &d[0]["seq"]);
    let l = llm_records(tg);
    (
        String::from_utf8_lossy(&g.out).into_owned(),
        o,
        l[0].clone(),
    )
}

#[test]
fn a_stream_longer_than_the_timeout_arrives_whole() {
    // 15 events 100 ms apart: 1.5 s in all against a 1 s timeout.
    let tg = drip_gate(
        drip_provider(15, Duration::from_millis(100)),
        "timeout_secs = 1",
    );
    let (out, o, l) = drip_exchange(&tg);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    let end = out.find("\r\n\r\n").unwrap() + 4;
    let events = String::from_utf8(dechunk(&out.as_bytes()[end..])).unwrap();
    for i in 0..15 {
        assert!(events.contains(&format!("\"piece-{i}\"")), "{events}");
    }
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    assert_eq!(o["status"], "ok", "{o}");
    assert_eq!(l["error"], Value::Null, "{l}");
    assert_eq!(l["usage"]["total_tokens"], 7, "{l}");
}

#[test]
fn a_stream_that_stalls_past_the_timeout_is_cut_and_audited() {
    // One event, then nothing for far longer than the 1 s timeout.
    let tg = drip_gate(
        drip_provider(1, Duration::from_secs(60)),
        "timeout_secs = 1",
    );
    let (out, o, l) = drip_exchange(&tg);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("\"piece-0\""), "{out}");
    // No last chunk: the guest's client sees a body cut short, not a whole answer.
    assert!(!out.ends_with("0\r\n\r\n"), "{out}");
    assert_eq!(o["status"], "error", "{o}");
    let detail = o["detail"].as_str().unwrap();
    assert!(
        detail.contains("no data from the provider for 1 s") && detail.contains("timeout_secs"),
        "{o}"
    );
    assert!(l["error"].as_str().unwrap().contains("timeout_secs"), "{l}");
}

#[test]
fn max_secs_bounds_a_stream_that_keeps_moving() {
    // Events 100 ms apart for 60 s: each gap is well within the timeout, the whole
    // is cut at max_secs.
    let tg = drip_gate(
        drip_provider(600, Duration::from_millis(100)),
        "timeout_secs = 30\nmax_secs = 1",
    );
    let (out, o, l) = drip_exchange(&tg);
    assert!(out.contains("\"piece-0\""), "{out}");
    assert!(!out.contains("[DONE]"), "{out}");
    assert_eq!(o["status"], "error", "{o}");
    assert!(o["detail"].as_str().unwrap().contains("max_secs"), "{o}");
    assert!(l["error"].as_str().unwrap().contains("max_secs"), "{l}");
}
