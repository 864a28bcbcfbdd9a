//! Normalisation: one spelling of a value, so that another spelling cannot dodge a
//! rule. Each function returns `None` when the value cannot be normalised (the test
//! is then false) and borrows its input when it is already canonical, so the common
//! case allocates nothing.

use std::borrow::Cow;

/// Where relative paths are resolved (the guest's view of the workspace).
pub const WORKSPACE: &str = "/workspace";

/// Lexical path normalisation: absolute, `.` and `..` resolved, duplicate `/`
/// removed, no trailing `/`. `None` for a NUL byte or a path that climbs above `/`.
pub fn path(p: &str) -> Option<Cow<'_, str>> {
    if p.as_bytes().contains(&0) {
        return None;
    }
    if is_canonical_path(p) {
        return Some(Cow::Borrowed(p));
    }
    let mut parts: Vec<&str> = Vec::new();
    let rel = !p.starts_with('/');
    let base = if rel {
        WORKSPACE.split('/').filter(|s| !s.is_empty()).collect()
    } else {
        Vec::new()
    };
    parts.extend(base);
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            s => parts.push(s),
        }
    }
    let mut out = String::with_capacity(p.len() + WORKSPACE.len() + 1);
    for s in &parts {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(Cow::Owned(out))
}

fn is_canonical_path(p: &str) -> bool {
    if p == "/" {
        return true;
    }
    if !p.starts_with('/') || p.ends_with('/') {
        return false;
    }
    p[1..]
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// `p under d` for two canonical paths: `p` is `d` or lies below it.
pub fn path_under(p: &str, d: &str) -> bool {
    if d == "/" {
        return p.starts_with('/');
    }
    p.starts_with(d) && (p.len() == d.len() || p.as_bytes()[d.len()] == b'/')
}

/// Host normalisation, as WHATWG URL parsing does it: lowercase, IDNA to ASCII,
/// one trailing dot removed. IP addresses are accepted in their canonical form.
pub fn host(h: &str) -> Option<Cow<'_, str>> {
    if h.is_empty() || h.len() > 1024 {
        return None;
    }
    if is_canonical_ascii_host(h) {
        return Some(Cow::Borrowed(h));
    }
    let trimmed = h.strip_suffix('.').unwrap_or(h);
    if trimmed.is_empty() || trimmed.ends_with('.') {
        return None;
    }
    match url::Host::parse(trimmed).ok()? {
        url::Host::Domain(d) => {
            let d = d.strip_suffix('.').map(str::to_string).unwrap_or(d);
            if d.is_empty() || d.split('.').any(str::is_empty) {
                return None;
            }
            Some(Cow::Owned(d))
        }
        url::Host::Ipv4(a) => Some(Cow::Owned(a.to_string())),
        url::Host::Ipv6(a) => Some(Cow::Owned(format!("[{a}]"))),
    }
}

/// Lowercase ASCII letters, digits, `-` and `.`, no empty label, no punycode label
/// (those go through IDNA validation), not all-numeric (IPv4 forms get canonicalised).
fn is_canonical_ascii_host(h: &str) -> bool {
    let b = h.as_bytes();
    if !b
        .iter()
        .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    {
        return false;
    }
    let mut any_alpha = false;
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with("xn--") {
            return false;
        }
        any_alpha |= label.bytes().any(|c| !c.is_ascii_digit());
    }
    // The last label must not be numeric: `1.2.3.4`, `0x7f.1` and `1.2.3.04` are IPv4.
    any_alpha
        && h.rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().any(|c| c.is_ascii_lowercase()))
}

/// Email normalisation: `Display Name <a@b>` reduced to `a@b`, the domain
/// normalised like a host (case-insensitive), the local part kept exactly.
/// `None` for anything that is not one plain address (lists, control characters,
/// stray `<`, `>`, `,`, `;`, whitespace inside the address).
pub fn email(s: &str) -> Option<Cow<'_, str>> {
    let control = if s.is_ascii() {
        s.bytes().any(|b| b < b' ' || b == 0x7f)
    } else {
        s.chars().any(char::is_control)
    };
    if control {
        return None;
    }
    let s = s.trim_matches(' ');
    let addr = match s.rfind('<') {
        Some(open) => {
            let rest = &s[open + 1..];
            let close = rest.find('>')?;
            if close + 1 != rest.len() {
                return None;
            }
            &rest[..close]
        }
        None => s,
    };
    if addr.is_empty() || addr.len() > 1024 {
        return None;
    }
    // ASCII addresses (nearly all) are checked byte by byte.
    let bad_ascii = |b: u8| b <= b' ' || b == 0x7f || b"<>,;()[]\\\"".contains(&b);
    let bad = if addr.is_ascii() {
        addr.bytes().any(bad_ascii)
    } else {
        addr.chars()
            .any(|c| c.is_control() || c.is_whitespace() || (c.is_ascii() && bad_ascii(c as u8)))
    };
    if bad {
        return None;
    }
    let at = addr.rfind('@')?;
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.is_empty() || local.contains('@') {
        return None;
    }
    let d = host(domain)?;
    if matches!(d, Cow::Borrowed(_)) && addr.len() == s.len() {
        return Some(Cow::Borrowed(s));
    }
    Some(Cow::Owned(format!("{local}@{d}")))
}

/// A URL parsed by WHATWG rules.
pub fn parse_url(s: &str) -> Option<url::Url> {
    if s.len() > 1 << 20 {
        return None;
    }
    url::Url::parse(s).ok()
}

/// URL normalisation: the WHATWG serialisation.
pub fn url(s: &str) -> Option<Cow<'_, str>> {
    let mut u = parse_url(s)?;
    // One spelling per host: the trailing dot goes, as in `host()`.
    if let Some(url::Host::Domain(d)) = u.host() {
        if let Some(stripped) = d.strip_suffix('.') {
            let stripped = host(stripped)?.into_owned();
            u.set_host(Some(&stripped)).ok()?;
        }
    }
    let ser: String = u.into();
    if ser == s {
        Some(Cow::Borrowed(s))
    } else {
        Some(Cow::Owned(ser))
    }
}

/// The normalised host of a URL: userinfo is not part of it; lowercase, IDNA to
/// ASCII, trailing dot removed.
pub fn url_host(s: &str) -> Option<String> {
    let u = parse_url(s)?;
    match u.host()? {
        url::Host::Domain(d) => host(d).map(Cow::into_owned),
        url::Host::Ipv4(a) => Some(a.to_string()),
        url::Host::Ipv6(a) => Some(format!("[{a}]")),
    }
}

/// The port of a URL, or its scheme's default port.
pub fn url_port(s: &str) -> Option<u16> {
    parse_url(s)?.port_or_known_default()
}

pub fn url_scheme(s: &str) -> Option<String> {
    Some(parse_url(s)?.scheme().to_string())
}

/// `domain(x)`: for an email address the part after `@`, lowercased; for a URL or a
/// host, the normalised host.
pub fn domain(s: &str) -> Option<String> {
    if s.contains("://") {
        return url_host(s);
    }
    if s.contains('@') {
        let e = email(s)?;
        let at = e.rfind('@')?;
        return Some(e[at + 1..].to_string());
    }
    host(s).map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for (p, want) in [
            ("/workspace/a", Some("/workspace/a")),
            ("/workspace//a/./b/../c/", Some("/workspace/a/c")),
            ("a/b", Some("/workspace/a/b")),
            ("../etc/passwd", Some("/etc/passwd")),
            ("/", Some("/")),
            ("/..", None),
            ("/a/../../b", None),
            ("../x", Some("/x")),
            ("../../x", None),
            ("/workspace/a\0b", None),
            ("", Some("/workspace")),
        ] {
            assert_eq!(path(p).as_deref(), want, "{p:?}");
        }
        assert!(matches!(path("/a/b"), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn under() {
        assert!(path_under("/workspace", "/workspace"));
        assert!(path_under("/workspace/x", "/workspace"));
        assert!(!path_under("/workspace2", "/workspace"));
        assert!(path_under("/etc", "/"));
    }

    #[test]
    fn hosts() {
        for (h, want) in [
            ("example.com", Some("example.com")),
            ("EXAMPLE.com.", Some("example.com")),
            ("example.com..", None),
            ("bücher.de", Some("xn--bcher-kva.de")),
            ("xn--bcher-kva.de", Some("xn--bcher-kva.de")),
            ("xn--zz.de", None),
            ("ＥＸＡＭＰＬＥ.com", Some("example.com")),
            ("127.1", Some("127.0.0.1")),
            ("0x7f.0.0.1", Some("127.0.0.1")),
            ("a b.com", None),
            ("", None),
        ] {
            assert_eq!(host(h).as_deref(), want, "{h:?}");
        }
    }

    #[test]
    fn emails() {
        for (e, want) in [
            ("bob@example.com", Some("bob@example.com")),
            ("Bob <bob@Example.COM>", Some("bob@example.com")),
            ("\"alice@ok.com\" <eve@evil.com>", Some("eve@evil.com")),
            ("Bob@example.com", Some("Bob@example.com")),
            ("alice@ok.com, eve@evil.com", None),
            ("alice@ok.com <eve@evil.com> x", None),
            ("eve@evil.com\n", None),
            ("Eve\r\nBcc: x <eve@evil.com>", None),
            ("a@b@c.com", None),
            ("nobody", None),
        ] {
            assert_eq!(email(e).as_deref(), want, "{e:?}");
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host("https://allowed.com@evil.com/").as_deref(),
            Some("evil.com")
        );
        assert_eq!(url_host("https://EVIL.com./x").as_deref(), Some("evil.com"));
        assert_eq!(
            url_host("https://bücher.de/").as_deref(),
            Some("xn--bcher-kva.de")
        );
        assert_eq!(url_port("https://a.com/"), Some(443));
        assert_eq!(url_port("http://a.com:8080/"), Some(8080));
        assert_eq!(url_scheme("HTTPS://a.com").as_deref(), Some("https"));
        assert_eq!(url_host("not a url"), None);
        assert_eq!(
            domain("Bob <bob@Example.com>").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            domain("https://x.Example.com/").as_deref(),
            Some("x.example.com")
        );
    }
}
