//! Writing p.rules text: the header that records what it was compiled from, the list
//! declarations, and each rule under a comment quoting the sentence it came from.
//! The same function builds the text the engine checks during the pipeline and the
//! file that is finally written, so rule line numbers mean the same thing throughout.

use serde::{Deserialize, Serialize};

use crate::cache::sha256_hex;
use crate::engine::Verdict;
use crate::lists::ResolvedList;
use crate::sentences::Sentence;

/// One rule of a draft: the p.rules line and the sentence it implements (0: none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftRule {
    pub sentence: usize,
    pub rule: String,
}

fn default_deny() -> Verdict {
    Verdict::Deny
}

/// The model's draft, as it answers the draft and repair steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    pub rules: Vec<DraftRule>,
    #[serde(default = "default_deny")]
    pub default: Verdict,
    #[serde(default)]
    pub assumptions: Vec<String>,
    /// The sentence that grants `default allow` (required for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_sentence: Option<usize>,
}

/// What the p.rules header records. `--against` reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub source_name: String,
    pub constitution_sha256: String,
    pub catalog_sha256: String,
    pub lists_sha256: String,
    pub model: String,
    pub prompt_version: String,
}

pub const KEY_CONSTITUTION: &str = "constitution-sha256";
pub const KEY_CATALOG: &str = "catalog-sha256";
pub const KEY_LISTS: &str = "lists-sha256";
pub const KEY_MODEL: &str = "model";
pub const KEY_PROMPT: &str = "prompt-version";
/// The hash of everything below the header: a hand edit of the rules shows.
pub const KEY_RULES: &str = "rules-sha256";

/// The text and where each draft rule landed.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub text: String,
    /// `rule_lines[i]` is the 1-based line of `draft.rules[i]`.
    pub rule_lines: Vec<u32>,
}

impl Assembled {
    /// The rule written on `line`, if that line holds a draft rule.
    pub fn rule_at(&self, line: u32) -> Option<usize> {
        self.rule_lines.iter().position(|&l| l == line)
    }

    /// The text with line numbers, as the repair prompts show it.
    pub fn numbered(&self) -> String {
        self.text
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{:>4} | {l}\n", i + 1))
            .collect()
    }
}

/// Comment text that cannot end the comment early or continue onto the next line.
fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn quote_sentence(sentences: &[Sentence], n: usize) -> String {
    match sentences.get(n.wrapping_sub(1)) {
        Some(s) => format!("# S{}: \"{}\"", s.n, comment_safe(&s.text)),
        None => "# (no sentence states this rule: see the compile report's assumptions)".into(),
    }
}

/// A p.rules string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn assemble(
    h: &Header,
    sentences: &[Sentence],
    lists: &[ResolvedList],
    draft: &Draft,
) -> Assembled {
    // The header's line count is fixed, so rule lines are known before it is written.
    const HEADER_LINES: usize = 8;
    let mut lines: Vec<String> = vec!["version 1".into()];
    if !lists.is_empty() {
        lines.push(String::new());
    }
    for l in lists {
        lines.push(quote_sentence(sentences, l.spec.sentence));
        lines.push(format!(
            "list {} = file {}",
            l.spec.name,
            quote(&l.decl_path)
        ));
    }
    lines.push(String::new());
    let mut rule_lines = Vec::with_capacity(draft.rules.len());
    for r in &draft.rules {
        lines.push(quote_sentence(sentences, r.sentence));
        lines.push(r.rule.trim().to_string());
        rule_lines.push((HEADER_LINES + lines.len()) as u32);
    }
    lines.push(String::new());
    lines.push("# Whatever no rule above decides.".into());
    lines.push(format!("default {}", draft.default));
    let mut body = lines.join("\n");
    body.push('\n');
    let header = [
        format!(
            "# Compiled from {} by `ironvmm policy compile`: edit the English and recompile.",
            comment_safe(&h.source_name)
        ),
        format!(
            "# `ironvmm policy check --against {}` tells whether this file still matches it.",
            comment_safe(&h.source_name)
        ),
        format!("# {KEY_CONSTITUTION}: {}", h.constitution_sha256),
        format!("# {KEY_CATALOG}: {}", h.catalog_sha256),
        format!("# {KEY_LISTS}: {}", h.lists_sha256),
        format!("# {KEY_MODEL}: {}", comment_safe(&h.model)),
        format!("# {KEY_PROMPT}: {}", h.prompt_version),
        format!("# {KEY_RULES}: {}", sha256_hex(body.as_bytes())),
    ];
    debug_assert_eq!(header.len(), HEADER_LINES);
    let text = header.join("\n") + "\n" + &body;
    Assembled { text, rule_lines }
}

/// Everything below the leading comment block: what `rules-sha256` covers.
pub fn body(text: &str) -> &str {
    let mut off = 0;
    for line in text.split_inclusive('\n') {
        if !line.starts_with('#') {
            break;
        }
        off += line.len();
    }
    &text[off..]
}

/// Reads the header fields back from a p.rules (only its leading comment block).
pub fn read_header(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(c) = line.strip_prefix('#') else {
            break;
        };
        if let Some((k, v)) = c.trim().split_once(": ") {
            if [
                KEY_CONSTITUTION,
                KEY_CATALOG,
                KEY_LISTS,
                KEY_MODEL,
                KEY_PROMPT,
                KEY_RULES,
            ]
            .contains(&k)
            {
                m.insert(k.to_string(), v.trim().to_string());
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentences::split;

    fn header() -> Header {
        Header {
            source_name: "constitution.md".into(),
            constitution_sha256: "aa".into(),
            catalog_sha256: "bb".into(),
            lists_sha256: "cc".into(),
            model: "openai:m".into(),
            prompt_version: "v".into(),
        }
    }

    #[test]
    fn each_rule_sits_under_its_sentence_and_lines_are_tracked() {
        let s = split("Read mail. Never purge.\u{7}");
        let d = Draft {
            rules: vec![
                DraftRule {
                    sentence: 2,
                    rule: "deny mail.purge".into(),
                },
                DraftRule {
                    sentence: 1,
                    rule: " allow mail.read ".into(),
                },
                DraftRule {
                    sentence: 0,
                    rule: "allow mail.list".into(),
                },
            ],
            default: Verdict::Deny,
            assumptions: vec![],
            default_sentence: None,
        };
        let a = assemble(&header(), &s, &[], &d);
        let lines: Vec<&str> = a.text.lines().collect();
        for (i, &l) in a.rule_lines.iter().enumerate() {
            assert_eq!(lines[l as usize - 1], d.rules[i].rule.trim());
            assert!(lines[l as usize - 2].starts_with("# "));
        }
        assert_eq!(
            lines[a.rule_lines[0] as usize - 2],
            "# S2: \"Never purge. \""
        );
        assert!(lines[a.rule_lines[2] as usize - 2].contains("no sentence"));
        assert_eq!(a.rule_at(a.rule_lines[1]), Some(1));
        assert!(a.text.ends_with("default deny\n"));
        let h = read_header(&a.text);
        assert_eq!(h[KEY_CONSTITUTION], "aa");
        assert_eq!(h[KEY_MODEL], "openai:m");
        assert_eq!(h[KEY_RULES], sha256_hex(body(&a.text).as_bytes()));
        assert!(body(&a.text).starts_with("version 1\n"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(quote("\u{1}"), "\"\\u{1}\"");
    }
}
