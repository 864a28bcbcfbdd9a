//! Splits a constitution (plain English, optionally Markdown) into numbered sentences.
//!
//! Every rule and scenario names the sentence it came from by number, and the emitted
//! p.rules quotes that sentence verbatim, so the numbering must be deterministic and
//! must not depend on the LLM.

/// One sentence of the constitution, numbered from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentence {
    pub n: usize,
    pub text: String,
}

/// Splits `text` into sentences. Markdown headings, HTML comments and fenced code
/// are dropped (they title or annotate the policy; they do not state it). Bullet
/// items and paragraphs end a sentence even without a full stop.
pub fn split(text: &str) -> Vec<Sentence> {
    let mut blocks: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_fence = false;
    let mut in_comment = false;
    for raw in text.lines() {
        let line = raw.trim();
        if in_comment {
            if line.contains("-->") {
                in_comment = false;
            }
            continue;
        }
        if line.starts_with("```") || line.starts_with("~~~") {
            in_fence = !in_fence;
            flush(&mut blocks, &mut current);
            continue;
        }
        if in_fence {
            continue;
        }
        if line.starts_with("<!--") {
            if !line.contains("-->") {
                in_comment = true;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            flush(&mut blocks, &mut current);
            continue;
        }
        if let Some(item) = strip_bullet(line) {
            flush(&mut blocks, &mut current);
            current.push_str(item);
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(line);
    }
    flush(&mut blocks, &mut current);

    let mut out = Vec::new();
    for block in &blocks {
        for s in split_block(block) {
            out.push(Sentence {
                n: out.len() + 1,
                text: s,
            });
        }
    }
    out
}

fn flush(blocks: &mut Vec<String>, current: &mut String) {
    let t = current.trim();
    if !t.is_empty() {
        blocks.push(t.to_string());
    }
    current.clear();
}

fn strip_bullet(line: &str) -> Option<&str> {
    for marker in ["- ", "* ", "+ "] {
        if let Some(rest) = line.strip_prefix(marker) {
            return Some(rest.trim());
        }
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 {
        let rest = &line[digits..];
        if let Some(r) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            return Some(r.trim());
        }
    }
    None
}

/// Splits one paragraph after `.`, `!` or `?` (and any closing quotes or brackets)
/// when whitespace and then an upper-case letter, digit or quote follow.
fn split_block(block: &str) -> Vec<String> {
    let chars: Vec<char> = block.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        if matches!(chars[i], '.' | '!' | '?') {
            let mut end = i + 1;
            while end < chars.len() && matches!(chars[end], '"' | '\'' | ')' | '”' | '’') {
                end += 1;
            }
            let mut next = end;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let boundary = next == chars.len()
                || (next > end
                    && (chars[next].is_uppercase()
                        || chars[next].is_ascii_digit()
                        || matches!(chars[next], '"' | '“' | '\'')));
            if boundary {
                push_trimmed(&mut out, &chars[start..end]);
                start = next;
                i = next;
                continue;
            }
        }
        i += 1;
    }
    if start < chars.len() {
        push_trimmed(&mut out, &chars[start..]);
    }
    out
}

fn push_trimmed(out: &mut Vec<String>, chars: &[char]) {
    let s: String = chars.iter().collect();
    let s = s.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
}

/// The sentences as the prompts show them: `S1: ...` one per line.
pub fn numbered(sentences: &[Sentence]) -> String {
    let mut s = String::new();
    for x in sentences {
        s.push_str(&format!("S{}: {}\n", x.n, x.text));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &str) -> Vec<String> {
        split(s).into_iter().map(|x| x.text).collect()
    }

    #[test]
    fn the_owners_four_sentences() {
        let t = "The agent may read all my email. It may send email to people in my contacts \
                 without asking. For anyone else, ask me first. Never delete anything permanently.";
        assert_eq!(
            texts(t),
            [
                "The agent may read all my email.",
                "It may send email to people in my contacts without asking.",
                "For anyone else, ask me first.",
                "Never delete anything permanently."
            ]
        );
    }

    #[test]
    fn markdown_headings_bullets_comments_and_fences() {
        let t = "# My policy\n\n<!-- a note\nover lines -->\nRead mail.\nSend it\nto Bob.\n\n\
                 - no purge\n* ask for\n  everything else!\n1. Keep logs\n```\nallow x\n```\n";
        assert_eq!(
            texts(t),
            [
                "Read mail.",
                "Send it to Bob.",
                "no purge",
                "ask for everything else!",
                "Keep logs"
            ]
        );
        let s = split(t);
        assert_eq!(s[4].n, 5);
    }

    #[test]
    fn no_split_inside_lowercase_continuations_or_numbers() {
        assert_eq!(
            texts("Use e.g. the news sites. Limit is 1.5 MB per file."),
            ["Use e.g. the news sites.", "Limit is 1.5 MB per file."]
        );
        assert_eq!(
            texts("He said \"stop.\" Then go."),
            ["He said \"stop.\"", "Then go."]
        );
    }

    #[test]
    fn empty_text_has_no_sentences() {
        assert!(split("").is_empty());
        assert!(split("# only a title\n\n").is_empty());
    }
}
