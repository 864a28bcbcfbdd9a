//! The `http` service: `http.fetch`, one HTTP request made by the host with `ureq`.
//!
//! - Every redirect hop is a call of its own: it is decided by the policy (through
//!   the [`Decide`] handle the gate passes in) and audited before it is followed.
//! - The SSRF guard judges the addresses a name resolves to, inside ureq's resolver,
//!   so the address checked is the address connected to (DNS rebinding cannot slip
//!   between the two).
//! - Responses are capped in size (read as a stream, never whole) and in time.
//! - Secrets (`[[http.secret]]`) are added to requests for their host only, over
//!   HTTPS (or to a loopback host); they are not in the guest's arguments, so the
//!   audit log never sees them, and the response carries only what the server sent.

use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::ssrf::AddressGuard;
use super::{Decide, Service, ToolError, ToolSpec};
use crate::config::HttpConfig;

/// Most bytes of request body the guest may send.
pub const MAX_REQUEST_BODY: usize = 512 * 1024;
/// The reply cap: the largest response body (512 KiB by default, at most this),
/// base64-encoded, plus headers.
pub const REPLY_CAP: usize = 900 * 1024;
/// The largest `max_response_bytes` honoured: its base64 form must fit the reply cap.
pub const MAX_RESPONSE_CAP: usize = 640 * 1024;
/// Most response headers returned.
const MAX_HEADERS: usize = 100;

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

pub fn tool_specs() -> Vec<ToolSpec> {
    vec![ToolSpec {
        name: "http.fetch",
        description: "Fetch a URL from the host (redirects are decided hop by hop); text: true reduces HTML to text",
        input_schema: json!({"type": "object",
            "properties": {
                "url": {"type": "string", "maxLength": 8192},
                "method": {"type": "string", "enum": METHODS},
                "headers": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 8192}},
                "body": {"type": "string", "maxLength": MAX_REQUEST_BODY},
                "text": {"type": "boolean"}},
            "required": ["url"], "additionalProperties": false}),
        roles: &[("url", "url")],
        aliases: &[],
        reply_cap: REPLY_CAP,
    }]
}

/// A header added by the host for one host.
#[derive(Clone)]
struct Secret {
    host: String,
    header: String,
    value: String,
}

/// ureq's resolver, with the SSRF guard: refuses a name if any of its addresses is
/// refused (a mixed answer is how rebinding attacks look).
pub(crate) struct GuardedResolver(pub(crate) AddressGuard);

impl ureq::Resolver for GuardedResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        for a in &addrs {
            if let Err(why) = self.0.check(a.ip()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("ssrf guard: {why}"),
                ));
            }
        }
        Ok(addrs)
    }
}

pub struct HttpService {
    agent: ureq::Agent,
    guard: AddressGuard,
    secrets: Vec<Secret>,
    timeout: Duration,
    max_bytes: usize,
    max_redirects: u32,
    decide: Option<Arc<dyn Decide>>,
}

impl HttpService {
    /// Reads the secrets from the environment now: a missing one is an error at
    /// start, not a silent unauthenticated request later. Without `decide`,
    /// redirects are returned to the guest, not followed.
    pub fn new(c: &HttpConfig, decide: Option<Arc<dyn Decide>>) -> Result<HttpService, String> {
        let mut secrets = Vec::new();
        for (i, s) in c.secret.iter().enumerate() {
            let value = std::env::var(&s.value_env).map_err(|_| {
                format!(
                    "http.secret[{i}]: the environment variable {} is not set",
                    s.value_env
                )
            })?;
            let value = format!("{}{value}", s.prefix);
            if value.contains(['\r', '\n', '\0']) {
                return Err(format!("http.secret[{i}]: the value has a line break"));
            }
            secrets.push(Secret {
                host: s.host.to_ascii_lowercase(),
                header: s.header.clone(),
                value,
            });
        }
        let mut allowed = Vec::new();
        for a in &c.allow_addresses {
            allowed.push(
                a.parse()
                    .map_err(|e| format!("http.allow_addresses: {e}"))?,
            );
        }
        let guard = AddressGuard::new(allowed);
        let timeout = Duration::from_secs(c.timeout_secs.max(1));
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(timeout)
            .resolver(GuardedResolver(guard.clone()))
            .user_agent(concat!("ironvmm/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpService {
            agent,
            guard,
            secrets,
            timeout,
            max_bytes: c.max_response_bytes.min(MAX_RESPONSE_CAP),
            max_redirects: c.max_redirects,
            decide,
        })
    }

    /// The SSRF guard this service applies (for tests and `net`).
    pub fn guard(&self) -> &AddressGuard {
        &self.guard
    }

    fn fetch(&self, args: &Value) -> Result<Value, ToolError> {
        let deadline = Instant::now() + self.timeout;
        let mut url = parse_url(args["url"].as_str().unwrap_or_default())?;
        let mut method = args["method"].as_str().unwrap_or("GET").to_string();
        if !METHODS.contains(&method.as_str()) {
            return Err(bad(
                "method",
                format!("{method:?} is not one of {METHODS:?}"),
            ));
        }
        let mut body = args["body"].as_str().map(str::to_string);
        let guest_headers = guest_headers(args)?;
        let as_text = args["text"].as_bool().unwrap_or(false);
        let first_host = url.host_str().unwrap_or_default().to_string();
        let mut hops = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ToolError::new("timeout", "the time limit ran out"));
            }
            let mut req = self.agent.request_url(&method, &url).timeout(remaining);
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            let same_host = host == first_host.to_ascii_lowercase();
            for (k, v) in &guest_headers {
                // Credentials the guest set for one host are not carried to another.
                if !same_host && is_credential_header(k) {
                    continue;
                }
                if self
                    .secret_for(&url)
                    .is_some_and(|s| s.header.eq_ignore_ascii_case(k))
                {
                    continue;
                }
                req = req.set(k, v);
            }
            if let Some(s) = self.secret_for(&url) {
                req = req.set(&s.header, &s.value);
            }
            let res = match &body {
                Some(b) => req.send_bytes(b.as_bytes()),
                None => req.call(),
            };
            let resp = match res {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => return Err(transport_error(&url, &t)),
            };
            let status = resp.status();
            let location = resp.header("location").map(str::to_string);
            if (300..400).contains(&status) && status != 304 && self.decide.is_some() {
                if let Some(loc) = location {
                    if hops.len() as u32 >= self.max_redirects {
                        return Err(ToolError::new(
                            "too_many_redirects",
                            format!("more than {} redirects", self.max_redirects),
                        ));
                    }
                    let next = url
                        .join(&loc)
                        .map_err(|e| bad("redirect", format!("Location {loc:?}: {e}")))?;
                    let next = parse_url(next.as_str())?;
                    // 303, and 301/302 after a POST, continue as GET without a body.
                    if status == 303 || ((status == 301 || status == 302) && method == "POST") {
                        method = "GET".into();
                        body = None;
                    }
                    let mut hop_args = args.clone();
                    hop_args["url"] = next.as_str().into();
                    hop_args["method"] = method.as_str().into();
                    if body.is_none() {
                        if let Some(m) = hop_args.as_object_mut() {
                            m.remove("body");
                        }
                    }
                    if let Some(d) = &self.decide {
                        d.decide("http.fetch", &hop_args).map_err(|why| {
                            ToolError::new(
                                "redirect_denied",
                                format!("redirect to {next} denied: {why}"),
                            )
                        })?;
                    }
                    hops.push(json!({"status": status, "url": next.as_str()}));
                    url = next;
                    continue;
                }
            }
            return self.answer(resp, &url, hops, as_text);
        }
    }

    fn secret_for(&self, url: &url::Url) -> Option<&Secret> {
        let host = url.host_str()?.to_ascii_lowercase();
        let loopback = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]");
        if url.scheme() != "https" && !loopback {
            return None;
        }
        self.secrets.iter().find(|s| s.host == host)
    }

    fn answer(
        &self,
        resp: ureq::Response,
        url: &url::Url,
        hops: Vec<Value>,
        as_text: bool,
    ) -> Result<Value, ToolError> {
        let status = resp.status();
        let mut headers = Map::new();
        for name in resp.headers_names().into_iter().take(MAX_HEADERS) {
            if let Some(v) = resp.header(&name) {
                headers.insert(name, v.into());
            }
        }
        let ctype = resp.content_type().to_ascii_lowercase();
        let mut buf = Vec::new();
        let mut reader = resp.into_reader().take(self.max_bytes as u64 + 1);
        if let Err(e) = reader.read_to_end(&mut buf) {
            let kind =
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock {
                    "timeout"
                } else {
                    "io"
                };
            return Err(ToolError::new(
                kind,
                format!("{url}: reading the body: {e}"),
            ));
        }
        // Over the cap: the rest is never read; dropping the reader closes the socket.
        let truncated = buf.len() > self.max_bytes;
        buf.truncate(self.max_bytes);
        let textual = ctype.starts_with("text/")
            || ctype.contains("json")
            || ctype.contains("xml")
            || ctype.contains("javascript");
        let mut out = json!({"status": status, "url": url.as_str(), "headers": headers,
                             "truncated": truncated, "redirects": hops});
        match String::from_utf8(buf) {
            Ok(s) if textual || !s.contains('\0') => {
                let html = ctype.contains("html");
                out["body"] = if as_text && html { html_to_text(&s) } else { s }.into();
            }
            Ok(s) => {
                out["body_base64"] = base64::engine::general_purpose::STANDARD.encode(s).into();
            }
            Err(e) => {
                let b = e.into_bytes();
                out["body_base64"] = base64::engine::general_purpose::STANDARD.encode(b).into();
            }
        }
        Ok(out)
    }
}

impl Service for HttpService {
    fn tools(&self) -> Vec<ToolSpec> {
        tool_specs()
    }

    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        match tool {
            "http.fetch" => self.fetch(args),
            _ => Err(ToolError::new("unknown_tool", tool.to_string())),
        }
    }
}

fn bad(what: &str, msg: String) -> ToolError {
    ToolError::new("invalid_request", format!("{what}: {msg}"))
}

fn parse_url(s: &str) -> Result<url::Url, ToolError> {
    let u = url::Url::parse(s).map_err(|e| bad("url", format!("{s:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad(
            "url",
            format!("scheme {:?}: only http and https", u.scheme()),
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("url", format!("{s:?} has no host")));
    }
    // `user:pass@` in a URL is a way to hide the real host from a reader.
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("url", "credentials in the URL are not allowed".into()));
    }
    Ok(u)
}

fn is_credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization" || n == "cookie" || n == "proxy-authorization"
}

/// The guest's headers, minus those that would let it confuse the framing.
fn guest_headers(args: &Value) -> Result<Vec<(String, String)>, ToolError> {
    let Some(h) = args.get("headers") else {
        return Ok(Vec::new());
    };
    let h = h
        .as_object()
        .ok_or_else(|| bad("headers", "expected an object".into()))?;
    let mut out = Vec::new();
    for (k, v) in h {
        let v = v
            .as_str()
            .ok_or_else(|| bad("headers", format!("{k}: expected a string")))?;
        let token = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(bad("headers", format!("{k:?} is not a header name")));
        }
        if v.contains(['\r', '\n', '\0']) {
            return Err(bad("headers", format!("{k}: line breaks are not allowed")));
        }
        let lower = k.to_ascii_lowercase();
        if [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "upgrade",
            "te",
            "trailer",
        ]
        .contains(&lower.as_str())
        {
            return Err(bad("headers", format!("{k} is set by the host")));
        }
        out.push((k.clone(), v.to_string()));
    }
    Ok(out)
}

fn transport_error(url: &url::Url, t: &ureq::Transport) -> ToolError {
    let msg = t.to_string();
    let kind = if msg.contains("ssrf guard") {
        "ssrf"
    } else if msg.contains("timed out") || msg.contains("WouldBlock") || msg.contains("deadline") {
        "timeout"
    } else {
        "connection"
    };
    ToolError::new(kind, format!("{url}: {msg}"))
}

/// HTML reduced to readable text: tags dropped, script and style content dropped,
/// block elements on lines of their own, common entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut skip_until: Option<&str> = None;
    while !rest.is_empty() {
        if let Some(end) = skip_until {
            match find_ci(rest, end) {
                Some(i) => {
                    rest = &rest[i..];
                    skip_until = None;
                }
                None => break,
            }
        }
        match rest.find('<') {
            None => {
                out.push_str(&decode_entities(rest));
                break;
            }
            Some(i) => {
                out.push_str(&decode_entities(&rest[..i]));
                rest = &rest[i..];
                if rest.starts_with("<!--") {
                    rest = rest.find("-->").map_or("", |j| &rest[j + 3..]);
                    continue;
                }
                let Some(close) = rest.find('>') else { break };
                let tag = rest[1..close].trim().to_ascii_lowercase();
                rest = &rest[close + 1..];
                let name: String = tag
                    .trim_start_matches('/')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                match name.as_str() {
                    "script" if !tag.starts_with('/') => skip_until = Some("</script"),
                    "style" if !tag.starts_with('/') => skip_until = Some("</style"),
                    "br" | "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
                    | "title" | "section" | "article" | "header" | "footer" | "ul" | "ol"
                    | "table" | "blockquote" | "pre" => out.push('\n'),
                    "td" | "th" => out.push('\t'),
                    _ => {}
                }
            }
        }
    }
    // Collapse runs of blank space the markup left behind.
    let mut text = String::with_capacity(out.len());
    let mut blank = 0;
    for line in out.lines() {
        let l = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if l.is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        text.push_str(&l);
        text.push('\n');
    }
    text.trim().to_string()
}

/// The first ASCII-case-insensitive occurrence of `needle` (lowercase ASCII), without
/// copying `hay`: a page of many `<script>` tags stays linear.
fn find_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // Bytes, not a str slice: byte 12 may fall inside a character.
        let end = rest.as_bytes()[..rest.len().min(12)]
            .iter()
            .position(|&b| b == b';');
        let decoded = end.and_then(|e| {
            let ent = &rest[1..e];
            let c = match ent {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                    u32::from_str_radix(&ent[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_becomes_text() {
        let t = html_to_text(
            "<html><head><title>T</title><style>p{x:1}</style><script>alert('<b>')</script></head>\
             <body><h1>Hello &amp; welcome</h1><p>One<br>two &#x41;&#66;</p><!-- c --></body></html>",
        );
        assert_eq!(t, "T\n\nHello & welcome\n\nOne\ntwo AB");
    }

    proptest::proptest! {
        #[test]
        fn html_to_text_never_panics(s in "(<[a-z/!-]{0,8}>?|&[#xa-z0-9]{0,6};?|[a-zé€ ;<>&-]{0,6}){0,40}") {
            let _ = html_to_text(&s);
        }
    }

    #[test]
    fn entities_next_to_multibyte_text_do_not_panic() {
        assert_eq!(decode_entities("&éééééééé"), "&éééééééé");
        assert_eq!(html_to_text("<SCRIPT>x</ScRiPt>ok"), "ok");
    }

    #[test]
    fn urls_and_headers_are_checked() {
        assert_eq!(
            parse_url("file:///etc/passwd").unwrap_err().kind,
            "invalid_request"
        );
        assert!(parse_url("http://user:pw@example.com/").is_err());
        assert!(parse_url("https://example.com/").is_ok());
        let h = |v: Value| guest_headers(&json!({ "headers": v }));
        assert!(h(json!({"X-A": "b"})).is_ok());
        assert!(h(json!({"X-A": "b\r\nX-B: c"})).is_err());
        assert!(h(json!({"Host": "evil"})).is_err());
        assert!(h(json!({"Bad Name": "x"})).is_err());
    }
}
