//! HTTP/1.1 message heads (RFC 9112): read with a bound, parsed strictly, and
//! written back out by the host. The guest's head is never forwarded as sent: the
//! host builds the upstream head from what it parsed and decided, so a byte the
//! parser did not understand cannot reach a server.

use std::io::{self, BufRead, Read};

/// Most bytes of one request head from the guest.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Most bytes of one response head from a server (long `Set-Cookie`s).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Most header lines in one head.
pub const MAX_HEADERS: usize = 128;

/// Why a head was refused. The guest is answered 400 (431 for `TooLarge`).
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the head is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    #[error("the connection ended inside a head")]
    Truncated,
    #[error("bad start line {line:?}: {why}")]
    StartLine { line: String, why: &'static str },
    #[error("header line {n}: {why}")]
    Header { n: usize, why: &'static str },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One header as received: the name as sent, the value without surrounding blanks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// The header lines of a head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    /// Every value of `name` (case-insensitive), in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.all(name).next()
    }

    /// Whether a comma-separated list header (`Connection`) holds `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn parse(s: &str) -> Option<Version> {
        match s {
            "HTTP/1.1" => Some(Version::Http11),
            "HTTP/1.0" => Some(Version::Http10),
            _ => None,
        }
    }
}

/// A request head from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target exactly as sent (absolute URL, `host:port`, or `/path`).
    pub target: String,
    pub version: Version,
    pub headers: Headers,
}

/// A response head from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

/// Reads one head (through the empty line) of at most `max` bytes. `Ok(None)`: the
/// stream ended cleanly before its first byte (a kept-alive connection closed).
/// Leading empty lines are skipped (RFC 9112 2.2).
pub fn read_head<R: BufRead>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, HeadError> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let room = (max + 1).saturating_sub(before) as u64;
        let n = <&mut R as Read>::take(r, room).read_until(b'\n', &mut head)?;
        if head.len() > max {
            return Err(HeadError::TooLarge { limit: max });
        }
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Truncated)
            };
        }
        if !head.ends_with(b"\n") {
            return Err(HeadError::Truncated);
        }
        let line = &head[before..];
        let blank = line == b"\r\n" || line == b"\n";
        if blank && before == 0 {
            head.clear();
            continue;
        }
        if blank {
            return Ok(Some(head));
        }
    }
}

/// The lines of a head, without their line ends; a bare CR anywhere is refused.
fn lines(head: &[u8]) -> Result<Vec<&str>, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::StartLine {
        line: String::from_utf8_lossy(&head[..head.len().min(80)]).into_owned(),
        why: "not UTF-8",
    })?;
    let mut out = Vec::new();
    for l in text.split('\n') {
        let l = l.strip_suffix('\r').unwrap_or(l);
        if l.contains('\r') {
            return Err(HeadError::Header {
                n: out.len(),
                why: "a bare CR",
            });
        }
        out.push(l);
    }
    // The head ends with an empty line, and split leaves one more after it.
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    Ok(out)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn parse_headers(lines: &[&str]) -> Result<Headers, HeadError> {
    if lines.len() > MAX_HEADERS {
        return Err(HeadError::TooManyHeaders { limit: MAX_HEADERS });
    }
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let n = i + 1;
        if l.starts_with([' ', '\t']) {
            return Err(HeadError::Header {
                n,
                why: "a folded line (obsolete line folding is refused)",
            });
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(HeadError::Header { n, why: "no colon" });
        };
        // "Name :" is how request smuggling starts (RFC 9112 5.1).
        if !is_token(name) {
            return Err(HeadError::Header {
                n,
                why: "the name is not a token",
            });
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HeadError::Header {
                n,
                why: "a control character in the value",
            });
        }
        out.push(Header {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    Ok(Headers(out))
}

/// Parses a request head read by `read_head`.
pub fn parse_request(head: &[u8]) -> Result<RequestHead, HeadError> {
    let lines = lines(head)?;
    let start = lines.first().copied().unwrap_or_default();
    let bad = |why| HeadError::StartLine {
        line: start.chars().take(200).collect(),
        why,
    };
    let mut parts = start.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected METHOD TARGET HTTP/1.1"));
    };
    if !is_token(method) {
        return Err(bad("the method is not a token"));
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("the target has a character URLs may not carry"));
    }
    let version = Version::parse(version).ok_or_else(|| bad("only HTTP/1.1 and HTTP/1.0"))?;
    Ok(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version,
        headers: parse_headers(&lines[1..])?,
    })
}

/// Parses a response head read by `read_head`.
pub fn parse_response(head: &[u8]) -> Result<ResponseHead, HeadError> {
    let lines = lines(head)?;
    let start = lines.first().copied().unwrap_or_default();
    let bad = |why| HeadError::StartLine {
        line: start.chars().take(200).collect(),
        why,
    };
    let mut parts = start.splitn(3, ' ');
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err(bad("expected HTTP/1.1 STATUS REASON"));
    };
    Version::parse(version).ok_or_else(|| bad("only HTTP/1.1 and HTTP/1.0"))?;
    let status: u16 = status
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s) && status.len() == 3)
        .ok_or_else(|| bad("the status is not three digits"))?;
    let reason = parts.next().unwrap_or_default();
    if reason
        .bytes()
        .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(bad("a control character in the reason"));
    }
    Ok(ResponseHead {
        status,
        reason: reason.to_string(),
        headers: parse_headers(&lines[1..])?,
    })
}

/// Headers that describe one hop, not the message: never passed on (RFC 9110 7.6.1),
/// nor are the headers a `Connection` header names. Framing headers are rebuilt by
/// the host.
pub fn is_hop_by_hop(name: &str, headers: &Headers) -> bool {
    const HOP: [&str; 11] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
        "content-length",
        "expect",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) || headers.has_token("connection", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &[u8], max: usize) -> Result<Option<Vec<u8>>, HeadError> {
        read_head(&mut &s[..], max)
    }

    #[test]
    fn a_request_head_parses() {
        let raw =
            b"\r\nGET http://a.example/x?y HTTP/1.1\r\nHost: a.example\r\nX-A:  b \r\n\r\nbody";
        let head = read(raw, 1024).unwrap().unwrap();
        let r = parse_request(&head).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "http://a.example/x?y");
        assert_eq!(r.version, Version::Http11);
        assert_eq!(r.headers.get("host"), Some("a.example"));
        assert_eq!(r.headers.get("x-a"), Some("b"));
    }

    #[test]
    fn bad_heads_are_refused_with_a_reason() {
        assert!(matches!(
            read(&[b'a'; 100], 50),
            Err(HeadError::TooLarge { limit: 50 })
        ));
        assert!(read(b"", 50).unwrap().is_none());
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n", 50),
            Err(HeadError::Truncated)
        ));
        for bad in [
            &b"GET  / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00\r\n\r\n",
            b"GET / HTTP/1.1\r\nnocolon\r\n\r\n",
            b"\xff\xfe / HTTP/1.1\r\n\r\n",
        ] {
            let head = read(bad, 1024).unwrap().unwrap();
            assert!(
                parse_request(&head).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_request(head.as_bytes()),
            Err(HeadError::TooManyHeaders { .. })
        ));
    }

    #[test]
    fn responses_and_hop_by_hop_headers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\r\n")
            .unwrap();
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert!(is_hop_by_hop("X-Hop", &r.headers));
        assert!(is_hop_by_hop("Keep-Alive", &r.headers));
        assert!(!is_hop_by_hop("Content-Type", &r.headers));
        assert!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 204\r\n\r\n").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Ok(Some(h)) = read_head(&mut &s[..], 256) {
                let _ = parse_request(&h);
                let _ = parse_response(&h);
            }
        }
    }
}
