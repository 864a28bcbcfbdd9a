//! One guest connection to the proxy port, served on a thread of its own: request
//! heads read and decided one by one, each allowed request sent to its server, the
//! response relayed back; a `CONNECT` becomes a byte tunnel.
//!
//! Every upstream connection is opened for one decided request (or one tunnel),
//! to the addresses the SSRF guard checked. The guest's head is never forwarded
//! as sent: the host writes the upstream head from what it parsed and decided.

use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::body::{self, copy_body, Encode, Framing};
use super::head::{self, is_hop_by_hop, HeadError, RequestHead, Version};
use super::pipe::{Pipe, PipeReader, PipeWriter};
use super::route::{route, Route};
use super::NetService;
use crate::audit::OutcomeStatus;
use crate::gate::direct::{DirectOutcome, Ruling};
use crate::gate::Call;

/// What comes after one exchange.
enum Next {
    /// The connection is kept alive: read the next request head.
    Another,
    Close,
}

/// Why an upstream connection was not opened.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("ssrf guard: {0}")]
    Ssrf(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {host}: {source}")]
    Connect { host: String, source: io::Error },
}

pub(super) struct Relay {
    pub svc: Arc<NetService>,
    pub conn: String,
    pub pipe: Arc<Pipe>,
    /// Its entry in the service's table of running relays.
    pub id: u64,
}

impl Relay {
    /// Serves requests until the connection ends, then lets the device end it.
    pub fn run(self) {
        let mut guest = BufReader::with_capacity(
            16 * 1024,
            PipeReader {
                pipe: Arc::clone(&self.pipe),
                timeout: self.svc.idle,
            },
        );
        while let Next::Another = self.one(&mut guest) {}
        self.pipe.finish();
        self.svc.unregister(self.id);
    }

    fn writer(&self) -> PipeWriter {
        PipeWriter {
            pipe: Arc::clone(&self.pipe),
            timeout: self.svc.idle,
        }
    }

    /// An answer made by the host (an error, a denial); the connection closes after it.
    fn answer(&self, status: u16, reason: &str, text: &str) -> Next {
        let body = format!("ironvmm: {text}\n");
        let msg = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = self.writer().write_all(msg.as_bytes());
        Next::Close
    }

    fn one(&self, guest: &mut BufReader<PipeReader>) -> Next {
        let raw = match head::read_head(guest, head::MAX_REQUEST_HEAD) {
            Ok(Some(raw)) => raw,
            // Closed, gone, or idle past the timeout between requests.
            Ok(None) | Err(HeadError::Io(_)) => return Next::Close,
            Err(e @ HeadError::TooLarge { .. }) => {
                return self.answer(431, "Request Header Fields Too Large", &e.to_string())
            }
            Err(e) => return self.answer(400, "Bad Request", &e.to_string()),
        };
        let head = match head::parse_request(&raw) {
            Ok(h) => h,
            Err(e) => return self.answer(400, "Bad Request", &e.to_string()),
        };
        match route(&head) {
            Ok(Route::Connect { host, port }) => self.tunnel(guest, &host, port),
            Ok(Route::Http(url)) => self.http(guest, &head, url),
            Err(e) => self.answer(400, "Bad Request", &e.to_string()),
        }
    }

    /// Decides `call`; a denial is answered 403 naming the rule.
    fn decide(&self, call: &Call, what: &str) -> Result<u64, Next> {
        match self.svc.gate.decide_direct(&self.conn, call) {
            Ruling::Allowed { seq } => Ok(seq),
            Ruling::Denied { rule, by, reason } => {
                Err(self.denied(what, rule, by.as_str(), &reason))
            }
        }
    }

    fn denied(&self, what: &str, rule: Option<u32>, by: &str, reason: &str) -> Next {
        let who = match rule {
            Some(r) => format!("rule {r}"),
            None => format!("decided by {by}"),
        };
        self.answer(
            403,
            "Forbidden",
            &format!("{what} denied ({who}): {reason}"),
        )
    }

    /// Resolves `host`, checks every address with the SSRF guard, and connects to
    /// the first that answers. Only checked addresses are connected to.
    fn connect(&self, host: &url::Host<String>, port: u16) -> Result<TcpStream, ConnectError> {
        let name = host.to_string();
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(a) => vec![SocketAddr::from((*a, port))],
            url::Host::Ipv6(a) => vec![SocketAddr::from((*a, port))],
            url::Host::Domain(d) => (d.as_str(), port)
                .to_socket_addrs()
                .map_err(|source| ConnectError::Resolve {
                    host: name.clone(),
                    source,
                })?
                .collect(),
        };
        // A name with any refused address is refused: a mixed answer is how
        // rebinding attacks look.
        for a in &addrs {
            self.svc.guard.check(a.ip()).map_err(ConnectError::Ssrf)?;
        }
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in &addrs {
            match TcpStream::connect_timeout(a, self.svc.connect_timeout) {
                Ok(s) => {
                    self.svc.set_upstream(self.id, Some(&s));
                    if self.pipe.is_guest_gone() {
                        // Cut while connecting (the VM is ending).
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    let _ = s.set_read_timeout(Some(self.svc.idle));
                    let _ = s.set_write_timeout(Some(self.svc.idle));
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(ConnectError::Connect {
            host: name,
            source: last,
        })
    }

    /// The answer and the outcome detail for a failed connect.
    fn connect_failed(&self, seq: u64, t0: Instant, e: &ConnectError) -> Next {
        self.outcome(seq, t0, 0, 0, Some(e.to_string()));
        match e {
            ConnectError::Ssrf(_) => self.answer(403, "Forbidden", &e.to_string()),
            ConnectError::Connect { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                self.answer(504, "Gateway Timeout", &e.to_string())
            }
            _ => self.answer(502, "Bad Gateway", &e.to_string()),
        }
    }

    fn outcome(&self, seq: u64, t0: Instant, sent: u64, received: u64, detail: Option<String>) {
        let status = if detail.is_none() {
            OutcomeStatus::Ok
        } else {
            OutcomeStatus::Error
        };
        self.svc.gate.outcome_direct(
            seq,
            &DirectOutcome {
                status,
                sent,
                received,
                total_us: t0.elapsed().as_micros() as u64,
                detail,
            },
        );
    }

    /// One plain-HTTP request: decided, sent, its response relayed.
    fn http(&self, guest: &mut BufReader<PipeReader>, head: &RequestHead, url: url::Url) -> Next {
        let what = format!("net.http {} {}", head.method, url.as_str());
        let call = Call {
            tool: "net.http".into(),
            args: json!({"method": head.method, "url": url.as_str()}),
        };
        if let Err(why) = host_matches(head, &url) {
            self.svc.gate.deny_direct(&self.conn, &call, &why);
            return self.denied(&what, None, "invariant", &why);
        }
        let framing = match body::request_framing(&head.headers) {
            Ok(f) => f,
            Err(e) => return self.answer(400, "Bad Request", &e.to_string()),
        };
        let seq = match self.decide(&call, &what) {
            Ok(seq) => seq,
            Err(next) => return next,
        };
        let t0 = Instant::now();
        let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
            self.outcome(seq, t0, 0, 0, Some("the URL has no host".into()));
            return self.answer(400, "Bad Request", "the URL has no host");
        };
        let upstream = match self.connect(&host.to_owned(), port) {
            Ok(s) => s,
            Err(e) => return self.connect_failed(seq, t0, &e),
        };
        let mut sent = 0u64;
        let mut received = 0u64;
        let result = self.exchange(
            guest,
            head,
            &url,
            framing,
            &upstream,
            &mut sent,
            &mut received,
        );
        let _ = upstream.shutdown(Shutdown::Both);
        match result {
            Ok(next) => {
                self.outcome(seq, t0, sent, received, None);
                next
            }
            Err(Failure { detail, answer }) => {
                self.outcome(seq, t0, sent, received, Some(detail.clone()));
                match answer {
                    // Nothing reached the guest yet: it is told why.
                    Some((status, reason)) if received == 0 => self.answer(status, reason, &detail),
                    _ => Next::Close,
                }
            }
        }
    }

    /// Sends the request (head written by the host, body re-framed) and relays the
    /// response. `sent` and `received` count the bytes each way.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        guest: &mut BufReader<PipeReader>,
        head: &RequestHead,
        url: &url::Url,
        framing: Framing,
        upstream: &TcpStream,
        sent: &mut u64,
        received: &mut u64,
    ) -> Result<Next, Failure> {
        let mut out = self.writer();
        if head.headers.has_token("expect", "100-continue") && framing != Framing::Empty {
            let _ = out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let up_head = upstream_head(head, url, framing);
        self.charge(up_head.len()).map_err(Failure::quiet)?;
        let mut up = upstream;
        up.write_all(up_head.as_bytes())
            .map_err(|e| Failure::bad_gateway(format!("sending the request: {e}")))?;
        *sent += up_head.len() as u64;
        let encode = if framing == Framing::Chunked {
            Encode::Chunked
        } else {
            Encode::Raw
        };
        let n = copy_body(framing, encode, guest, &mut up, |n| self.charge(n)).map_err(
            |e| match e {
                body::BodyError::Write(e) => Failure::bad_gateway(format!("sending the body: {e}")),
                e => Failure::quiet(format!("the request body: {e}")),
            },
        )?;
        *sent += n;
        let mut reader = BufReader::with_capacity(16 * 1024, upstream);
        let resp = loop {
            let raw = match head::read_head(&mut reader, head::MAX_RESPONSE_HEAD) {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    return Err(Failure::bad_gateway(
                        "the server closed without answering".into(),
                    ))
                }
                Err(HeadError::Io(e)) if is_timeout(&e) => {
                    return Err(Failure {
                        detail: format!(
                            "timeout: no answer from the server within {} s",
                            self.svc.idle.as_secs()
                        ),
                        answer: Some((504, "Gateway Timeout")),
                    })
                }
                Err(e) => return Err(Failure::bad_gateway(format!("the response head: {e}"))),
            };
            let resp = head::parse_response(&raw)
                .map_err(|e| Failure::bad_gateway(format!("the response head: {e}")))?;
            match resp.status {
                101 => {
                    return Err(Failure::bad_gateway(
                        "the server switched protocols unasked".into(),
                    ))
                }
                100..=199 => {
                    // Interim answers go on to HTTP/1.1 clients only.
                    if head.version == Version::Http11 {
                        let h = response_head(&resp, None, false);
                        out.write_all(h.as_bytes()).map_err(Failure::guest)?;
                        *received += h.len() as u64;
                    }
                }
                _ => break resp,
            }
        };
        let rframing = body::response_framing(&head.method, resp.status, &resp.headers)
            .map_err(|e| Failure::bad_gateway(format!("the response: {e}")))?;
        let guest11 = head.version == Version::Http11;
        let keep_alive = guest11
            && !head.headers.has_token("connection", "close")
            && rframing != Framing::UntilClose;
        let (framing_header, encode) = match rframing {
            Framing::Chunked if guest11 => (
                Some("Transfer-Encoding: chunked".to_string()),
                Encode::Chunked,
            ),
            Framing::Chunked | Framing::UntilClose => (None, Encode::Raw),
            Framing::Length(n) => (Some(format!("Content-Length: {n}")), Encode::Raw),
            Framing::Empty => {
                // A HEAD or 304 answer describes the body it did not send.
                let cl = resp
                    .headers
                    .get("content-length")
                    .filter(|v| v.bytes().all(|b| b.is_ascii_digit()));
                let status_bodyless = resp.status < 200 || resp.status == 204;
                match cl {
                    Some(v) if !status_bodyless => {
                        (Some(format!("Content-Length: {v}")), Encode::Raw)
                    }
                    _ if status_bodyless
                        || resp.status == 304
                        || head.method.eq_ignore_ascii_case("HEAD") =>
                    {
                        (None, Encode::Raw)
                    }
                    _ => (Some("Content-Length: 0".to_string()), Encode::Raw),
                }
            }
        };
        let h = response_head(&resp, framing_header.as_deref(), !keep_alive);
        out.write_all(h.as_bytes()).map_err(Failure::guest)?;
        *received += h.len() as u64;
        let mut counted = CountingWriter {
            inner: &mut out,
            n: 0,
        };
        let r = copy_body(rframing, encode, &mut reader, &mut counted, |_| Ok(()));
        *received += counted.n;
        r.map_err(|e| Failure::quiet(format!("relaying the response: {e}")))?;
        Ok(if keep_alive {
            Next::Another
        } else {
            Next::Close
        })
    }

    /// Charges guest bytes that leave the host to `--max-egress-bytes`.
    fn charge(&self, n: usize) -> Result<(), String> {
        match &self.svc.budget {
            Some(b) => b.charge_egress(n as u64).map_err(str::to_string),
            None => Ok(()),
        }
    }

    /// `CONNECT host:port`: decided once, then a byte tunnel until either side
    /// closes or nothing moves for the idle timeout. Bytes and duration are
    /// audited at the close.
    fn tunnel(
        &self,
        guest: &mut BufReader<PipeReader>,
        host: &url::Host<String>,
        port: u16,
    ) -> Next {
        let host_text = match host {
            url::Host::Ipv6(a) => a.to_string(),
            h => h.to_string(),
        };
        let what = format!("net.connect {host}:{port}");
        let call = Call {
            tool: "net.connect".into(),
            args: json!({"host": host_text, "port": port}),
        };
        let seq = match self.decide(&call, &what) {
            Ok(seq) => seq,
            Err(next) => return next,
        };
        let t0 = Instant::now();
        let upstream = match self.connect(host, port) {
            Ok(s) => s,
            Err(e) => return self.connect_failed(seq, t0, &e),
        };
        let mut out = self.writer();
        if out
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .is_err()
        {
            let _ = upstream.shutdown(Shutdown::Both);
            self.outcome(seq, t0, 0, 0, Some("the guest went away".into()));
            return Next::Close;
        }
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let idle = self.svc.idle;
        let down = {
            let (last, pipe) = (Arc::clone(&last), Arc::clone(&self.pipe));
            let mut from = match upstream.try_clone() {
                Ok(s) => s,
                Err(e) => {
                    self.outcome(seq, t0, 0, 0, Some(format!("tunnel: {e}")));
                    return Next::Close;
                }
            };
            let mut to = self.writer();
            std::thread::Builder::new()
                .name("ironvmm-net-down".into())
                .spawn(move || {
                    let r = pump(&mut from, &mut to, &last, start, idle, |_| Ok(()));
                    // The server is done (or failed): the tunnel ends.
                    pipe.finish();
                    r
                })
        };
        let down = match down {
            Ok(h) => h,
            Err(e) => {
                let _ = upstream.shutdown(Shutdown::Both);
                self.outcome(seq, t0, 0, 0, Some(format!("tunnel: no thread: {e}")));
                return Next::Close;
            }
        };
        let mut to = &upstream;
        let up = pump(guest, &mut to, &last, start, idle, |n| self.charge(n));
        let _ = upstream.shutdown(Shutdown::Both);
        self.pipe.finish();
        let down = down.join().unwrap_or(Pumped {
            bytes: 0,
            end: Some("the relay thread panicked".into()),
        });
        // The first side to end says why the tunnel ended.
        let detail = up
            .end
            .filter(|d| !d.is_empty())
            .or(down.end.filter(|d| !d.is_empty()));
        self.outcome(seq, t0, up.bytes, down.bytes, detail);
        Next::Close
    }
}

/// A failed exchange: what the outcome says, and what the guest is answered
/// if it has not been answered yet.
struct Failure {
    detail: String,
    answer: Option<(u16, &'static str)>,
}

impl Failure {
    fn bad_gateway(detail: String) -> Failure {
        Failure {
            detail,
            answer: Some((502, "Bad Gateway")),
        }
    }
    fn quiet(detail: String) -> Failure {
        Failure {
            detail,
            answer: None,
        }
    }
    fn guest(e: io::Error) -> Failure {
        Failure::quiet(format!("writing to the guest: {e}"))
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

struct CountingWriter<'a, W> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What one direction of a tunnel moved, and why it stopped (`None`: a normal
/// close; empty: stopped because the other side ended).
struct Pumped {
    bytes: u64,
    end: Option<String>,
}

/// Copies `from` to `to` until an end of stream, an error, or `idle` without a
/// byte either way (`last`: ms since `start` of the last byte in any direction).
fn pump<R: io::Read, W: Write>(
    from: &mut R,
    to: &mut W,
    last: &AtomicU64,
    start: Instant,
    idle: Duration,
    mut charge: impl FnMut(usize) -> Result<(), String>,
) -> Pumped {
    let mut buf = vec![0u8; 16 * 1024];
    let mut bytes = 0u64;
    let end = loop {
        match from.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                if let Err(why) = charge(n) {
                    break Some(why);
                }
                if let Err(e) = to.write_all(&buf[..n]) {
                    break Some(stop_reason(&e));
                }
                bytes += n as u64;
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) => {
                let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                if quiet >= idle.as_millis() as u64 {
                    break Some(format!("idle for {} s", idle.as_secs()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(stop_reason(&e)),
        }
    };
    Pumped { bytes, end }
}

/// An error that only says one side closed is a normal end, not a reason.
fn stop_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::ConnectionAborted => String::new(),
        _ => e.to_string(),
    }
}

/// A `Host` header, when there is one, must name the URL's host and port.
fn host_matches(head: &RequestHead, url: &url::Url) -> Result<(), String> {
    let hosts: Vec<&str> = head.headers.all("host").collect();
    match hosts.as_slice() {
        [] => Ok(()),
        [h] => {
            let parsed = url::Url::parse(&format!("http://{h}/"))
                .ok()
                .filter(|p| p.path() == "/" && p.username().is_empty() && p.query().is_none());
            let same = parsed.is_some_and(|p| {
                p.host() == url.host() && p.port_or_known_default() == url.port_or_known_default()
            });
            if same {
                Ok(())
            } else {
                Err(format!(
                    "the Host header {h:?} disagrees with the URL's host {:?}",
                    url.host_str().unwrap_or_default()
                ))
            }
        }
        _ => Err("more than one Host header".into()),
    }
}

/// The request head the server gets: origin-form target, `Host` from the decided
/// URL, the guest's end-to-end headers, framing the host writes, and
/// `Connection: close` (one request per upstream connection).
fn upstream_head(head: &RequestHead, url: &url::Url, framing: Framing) -> String {
    let mut target = url.path().to_string();
    if let Some(q) = url.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut host = url.host_str().unwrap_or_default().to_string();
    if let Some(p) = url.port() {
        host.push_str(&format!(":{p}"));
    }
    let mut h = format!("{} {target} HTTP/1.1\r\nHost: {host}\r\n", head.method);
    for x in &head.headers.0 {
        if x.name.eq_ignore_ascii_case("host") || is_hop_by_hop(&x.name, &head.headers) {
            continue;
        }
        h.push_str(&format!("{}: {}\r\n", x.name, x.value));
    }
    match framing {
        Framing::Length(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
        Framing::Chunked => h.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
    h.push_str("Connection: close\r\n\r\n");
    h
}

/// The response head the guest gets: the server's status and end-to-end headers,
/// with framing and `Connection` written by the host.
fn response_head(resp: &head::ResponseHead, framing: Option<&str>, close: bool) -> String {
    let mut h = format!("HTTP/1.1 {} {}\r\n", resp.status, resp.reason);
    for x in &resp.headers.0 {
        if is_hop_by_hop(&x.name, &resp.headers) {
            continue;
        }
        h.push_str(&format!("{}: {}\r\n", x.name, x.value));
    }
    if let Some(f) = framing {
        h.push_str(f);
        h.push_str("\r\n");
    }
    if close {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> RequestHead {
        head::parse_request(raw.as_bytes()).unwrap()
    }

    #[test]
    fn the_upstream_head_is_rebuilt() {
        let h = req("POST http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nProxy-Authorization: x\r\nContent-Length: 3\r\nX-Ok: 1\r\n\r\n");
        let url = url::Url::parse(&h.target).unwrap();
        let up = upstream_head(&h, &url, Framing::Length(3));
        assert_eq!(
            up,
            "POST /p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nX-Ok: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn host_headers_must_agree_with_the_url() {
        let url = url::Url::parse("http://a.example/x").unwrap();
        let ok = |h: &str| {
            host_matches(
                &req(&format!("GET http://a.example/x HTTP/1.1\r\n{h}\r\n")),
                &url,
            )
        };
        assert!(ok("").is_ok());
        assert!(ok("Host: a.example\r\n").is_ok());
        assert!(ok("Host: A.EXAMPLE:80\r\n").is_ok());
        assert!(ok("Host: b.example\r\n").is_err());
        assert!(ok("Host: a.example:81\r\n").is_err());
        assert!(ok("Host: a.example@b.example\r\n").is_err());
        assert!(ok("Host: a.example\r\nHost: a.example\r\n").is_err());
    }
}
