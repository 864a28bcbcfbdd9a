//! Lists: loaded once, normalised by the kind of value they are compared with, and
//! compiled to hash sets plus a set of wildcard host suffixes.

use crate::catalog::Role;
use crate::norm;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

/// FxHash (rustc's hasher): a few cycles per word. The keys come from the policy
/// author, and lookups only ever ask membership, so hash flooding cannot slow a
/// decision more than a policy the author wrote could.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FxBuild = BuildHasherDefault<FxHasher>;
pub type FxHashSet<T> = HashSet<T, FxBuild>;
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, FxBuild>;

/// What a list's entries look like, decided from all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// Every entry is a host name, optionally `*.`-prefixed, and one has a dot.
    Host,
    /// Every entry contains `@`.
    Email,
    Plain,
}

/// How a value is compared with the entries of a set: the value's role where the
/// catalog gives one, else the list's own kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchKind {
    Exact,
    Path,
    Url,
    Host,
    Email,
}

impl MatchKind {
    pub fn from_role(r: Role) -> MatchKind {
        match r {
            Role::Path | Role::Tree => MatchKind::Path,
            Role::Url => MatchKind::Url,
            Role::Host => MatchKind::Host,
            Role::Email => MatchKind::Email,
        }
    }
    pub fn from_list(k: ListKind) -> MatchKind {
        match k {
            ListKind::Host => MatchKind::Host,
            ListKind::Email => MatchKind::Email,
            ListKind::Plain => MatchKind::Exact,
        }
    }
}

pub fn classify(entries: &[String]) -> ListKind {
    if entries.is_empty() {
        return ListKind::Plain;
    }
    if entries.iter().all(|e| e.contains('@')) {
        return ListKind::Email;
    }
    let host_like = |e: &str| {
        let h = e.strip_prefix("*.").unwrap_or(e);
        !h.is_empty()
            && !h.contains(['/', ':', '@', ' ', '*'])
            && !h.starts_with('.')
            && norm::host(h).is_some()
    };
    if entries.iter().all(|e| host_like(e)) && entries.iter().any(|e| e.contains('.')) {
        ListKind::Host
    } else {
        ListKind::Plain
    }
}

/// A set compiled for one match kind.
#[derive(Debug, Default)]
pub struct CSet {
    exact: FxHashSet<Box<str>>,
    /// For `*.example.com`, `example.com`: matches strict subdomains only.
    wild: FxHashSet<Box<str>>,
    /// Entries that do not normalise in this kind (they can match nothing).
    pub dropped: Vec<String>,
}

impl CSet {
    pub fn build(entries: &[String], kind: MatchKind) -> CSet {
        let mut s = CSet::default();
        for e in entries {
            let n = match kind {
                MatchKind::Exact => Some(e.clone()),
                MatchKind::Path => norm::path(e).map(|c| c.into_owned()),
                MatchKind::Url => norm::url(e).map(|c| c.into_owned()),
                MatchKind::Email => norm::email(e).map(|c| c.into_owned()),
                MatchKind::Host => {
                    if let Some(rest) = e.strip_prefix("*.") {
                        match norm::host(rest) {
                            Some(h) => {
                                s.wild.insert(h.into());
                            }
                            None => s.dropped.push(e.clone()),
                        }
                        continue;
                    }
                    norm::host(e).map(|c| c.into_owned())
                }
            };
            match n {
                Some(n) => {
                    s.exact.insert(n.into_boxed_str());
                }
                None => s.dropped.push(e.clone()),
            }
        }
        s
    }

    /// Membership of an already-normalised value.
    #[inline]
    pub fn contains(&self, v: &str) -> bool {
        if self.exact.contains(v) {
            return true;
        }
        if !self.wild.is_empty() {
            // Every proper suffix after a label boundary: `a.b.c` tries `b.c`, `c`.
            let mut rest = v;
            while let Some(i) = rest.find('.') {
                rest = &rest[i + 1..];
                if self.wild.contains(rest) {
                    return true;
                }
            }
        }
        false
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wild.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries of a list file: one per line, blank lines and `#` comments ignored; a
/// `.vcf` file yields the EMAIL values of its vCards.
pub fn parse_list_file(name: &str, text: &str) -> Vec<String> {
    if name.to_ascii_lowercase().ends_with(".vcf") {
        return parse_vcf(text);
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn parse_vcf(text: &str) -> Vec<String> {
    // Unfold continuation lines (RFC 6350 3.2) first.
    let mut lines: Vec<String> = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(cont) = raw.strip_prefix([' ', '\t']) {
            if let Some(last) = lines.last_mut() {
                last.push_str(cont);
                continue;
            }
        }
        lines.push(raw.to_string());
    }
    let mut out = Vec::new();
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let prop = name.split(';').next().unwrap_or("");
        let prop = prop.rsplit('.').next().unwrap_or(prop); // `item1.EMAIL`
        if prop.eq_ignore_ascii_case("EMAIL") {
            let v = value.trim();
            if !v.is_empty() {
                out.push(v.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kinds() {
        assert_eq!(classify(&v(&["apnews.com", "*.bbc.co.uk"])), ListKind::Host);
        assert_eq!(classify(&v(&["a@b.com", "Bob <c@d>"])), ListKind::Email);
        assert_eq!(classify(&v(&["alice", "bob"])), ListKind::Plain);
        assert_eq!(classify(&v(&["/etc", "x.com"])), ListKind::Plain);
    }

    #[test]
    fn wildcard_hosts() {
        let s = CSet::build(&v(&["apnews.com", "*.bbc.co.uk"]), MatchKind::Host);
        assert!(s.contains("apnews.com"));
        assert!(s.contains("www.bbc.co.uk"));
        assert!(s.contains("a.b.bbc.co.uk"));
        assert!(!s.contains("bbc.co.uk"));
        assert!(!s.contains("evilbbc.co.uk"));
        assert!(!s.contains("www.apnews.com"));
    }

    #[test]
    fn vcf() {
        let text = "BEGIN:VCARD\r\nFN:Bob\r\nEMAIL;TYPE=work:bob@example.com\r\nitem1.EMAIL:al\r\n ice@example.com\r\nEND:VCARD\r\n";
        assert_eq!(
            parse_list_file("c.vcf", text),
            v(&["bob@example.com", "alice@example.com"])
        );
        assert_eq!(parse_list_file("c.txt", "# c\n\n a@b \n"), v(&["a@b"]));
    }
}
