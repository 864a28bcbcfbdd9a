//! Learned rules (`p.rules.learned`): answers to asks, kept as rules.
//!
//! The file is p.rules syntax holding only `allow` and `deny` rules. Each rule is
//! preceded by a header comment naming the audit record it came from and the line
//! of the `ask` rule it refines:
//! ```text
//! # seq 42, refines line 12
//! allow mail.send when all to in ["carol@example.com"] "learned: carol"
//! ```
//! The rule is evaluated just before the ask rule it refines, so earlier rules
//! still win. These functions are pure text operations: the caller does the I/O.

/// A learned rule's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The audit `seq` of the decision that was answered.
    pub seq: u64,
    /// The line of the `ask` rule in the policy that this rule refines.
    pub refines: u32,
}

/// Parses the text of a header comment (after `#`): `seq N, refines line L`.
pub fn parse_header(comment: &str) -> Option<Header> {
    let mut w = comment
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty());
    if w.next()? != "seq" {
        return None;
    }
    let seq = w.next()?.parse().ok()?;
    if w.next()? != "refines" || w.next()? != "line" {
        return None;
    }
    let refines = w.next()?.parse().ok()?;
    if w.next().is_some() {
        return None;
    }
    Some(Header { seq, refines })
}

/// The text of one entry, to append to the learned file. `rule` is one p.rules
/// rule on one line (for example `allow mail.send when to in ["a@b"]`).
pub fn render_entry(h: Header, rule: &str) -> String {
    format!(
        "# seq {}, refines line {}\n{}\n",
        h.seq,
        h.refines,
        rule.trim_end()
    )
}

/// One entry found in a learned file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub header: Header,
    /// 1-based line of the header comment.
    pub line: u32,
    /// The rule's text (continuation lines included).
    pub rule: String,
}

/// The entries of a learned file, in order (a header without a rule is skipped).
pub fn entries(text: &str) -> Vec<Entry> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let h = lines[i]
            .trim_start()
            .strip_prefix('#')
            .and_then(parse_header);
        if let Some(header) = h {
            let (rule, next) = rule_after(&lines, i + 1);
            if !rule.is_empty() {
                out.push(Entry {
                    header,
                    line: i as u32 + 1,
                    rule,
                });
            }
            i = next;
        } else {
            i += 1;
        }
    }
    out
}

/// The rule lines following a header: the next non-blank, non-comment line and its
/// `\` continuations. Returns the text and the index after it.
fn rule_after(lines: &[&str], mut i: usize) -> (String, usize) {
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    if i >= lines.len() || lines[i].trim_start().starts_with('#') {
        return (String::new(), i);
    }
    let mut rule = String::new();
    while i < lines.len() {
        rule.push_str(lines[i]);
        rule.push('\n');
        let cont = lines[i].trim_end().ends_with('\\');
        i += 1;
        if !cont {
            break;
        }
    }
    (rule.trim_end().to_string(), i)
}

/// The file without the entry of audit `seq`: `None` if there is no such entry.
pub fn remove_entry(text: &str, seq: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let h = lines[i]
            .trim_start()
            .strip_prefix('#')
            .and_then(parse_header);
        if let Some(h) = h {
            let (_, next) = rule_after(&lines, i + 1);
            if h.seq == seq {
                let mut kept: Vec<&str> = lines[..i].to_vec();
                kept.extend_from_slice(&lines[next..]);
                let mut out = kept.join("\n");
                if !out.is_empty() {
                    out.push('\n');
                }
                return Some(out);
            }
            i = next;
        } else {
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(
            parse_header(" seq 42, refines line 12"),
            Some(Header {
                seq: 42,
                refines: 12
            })
        );
        assert_eq!(
            parse_header(" seq 42 refines line 12"),
            Some(Header {
                seq: 42,
                refines: 12
            })
        );
        assert_eq!(parse_header(" seq x, refines line 12"), None);
        assert_eq!(parse_header(" a comment"), None);
    }

    #[test]
    fn entries_and_removal() {
        let text = format!(
            "# learned\n{}{}",
            render_entry(Header { seq: 1, refines: 5 }, "allow a.b"),
            render_entry(
                Header { seq: 2, refines: 5 },
                "deny a.b when x == \\\n  \"y\""
            )
        );
        let e = entries(&text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].rule, "deny a.b when x == \\\n  \"y\"");
        let removed = remove_entry(&text, 2).unwrap();
        assert_eq!(entries(&removed).len(), 1);
        assert!(!removed.contains("deny"));
        assert!(remove_entry(&text, 3).is_none());
    }
}
