//! Step 3, the draft: the model writes the rules; the real engine parses and checks
//! them; its diagnostics go back to the model in a bounded repair loop. The repair
//! step of verification reuses the same loop with the judged disagreements.

use std::path::Path;

use crate::ask::{ask_json, Asked, StepError};
use crate::catalog_view::CatalogView;
use crate::emit::{assemble, Assembled, Draft, Header};
use crate::engine::{RuleEngine, Verdict};
use crate::lists::{self, ResolvedList};
use crate::llm::{Completer, Message};
use crate::prompts;
use crate::sentences::{self, Sentence};

const MAX_RULES: usize = 500;
const MAX_RULE_LEN: usize = 4000;

/// Everything a draft is checked against.
pub struct Context<'a> {
    pub sentences: &'a [Sentence],
    pub catalog: &'a CatalogView,
    pub lists: &'a [ResolvedList],
    pub header: &'a Header,
    /// Where the p.rules will live: lists are found relative to it.
    pub rules_path: &'a Path,
    pub engine: &'a dyn RuleEngine,
}

/// A draft that the engine loads.
#[derive(Debug, Clone)]
pub struct Checked {
    pub draft: Draft,
    pub assembled: Assembled,
    pub warnings: Vec<String>,
    pub tries: u32,
    pub rejected: Vec<String>,
}

/// The compiler's own checks, before the engine sees the text: one rule per line,
/// each a rule (declarations are the compiler's), each naming a real sentence.
pub fn check_shape(d: &Draft, n_sentences: usize) -> Result<(), String> {
    let mut p = Vec::new();
    if d.rules.is_empty() {
        p.push("\"rules\" is empty: the English must give at least one rule".to_string());
    }
    if d.rules.len() > MAX_RULES {
        p.push(format!(
            "{} rules is over the limit of {MAX_RULES}",
            d.rules.len()
        ));
    }
    for (i, r) in d.rules.iter().enumerate() {
        let t = r.rule.trim();
        let first = t.split_whitespace().next().unwrap_or("");
        if t.contains(['\n', '\r']) {
            p.push(format!(
                "rules[{i}] spans several lines: write one rule per entry, on one line"
            ));
        } else if t.ends_with('\\') {
            p.push(format!(
                "rules[{i}] ends in '\\', which would join it to the next line"
            ));
        }
        if t.len() > MAX_RULE_LEN {
            p.push(format!("rules[{i}] is over {MAX_RULE_LEN} characters"));
        }
        if !matches!(first, "allow" | "deny" | "ask") {
            p.push(format!(
                "rules[{i}] {t:?} does not start with allow, deny or ask (version, list and default lines are written by the compiler)"
            ));
        }
        if r.sentence > n_sentences {
            p.push(format!(
                "rules[{i}] names sentence {} but the sentences are S1..S{n_sentences}",
                r.sentence
            ));
        }
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(p.join("\n"))
    }
}

/// Phrases with which English grants everything, not one thing.
const BROAD_PHRASES: &[&str] = &[
    "anything",
    "everything",
    "any tool",
    "all tools",
    "any action",
    "all actions",
    "whatever",
    "unrestricted",
    "without restriction",
    "no restriction",
    "no limits",
    "free rein",
];

/// The phrase of `text` that grants everything, if it has one.
pub fn broad_phrase(text: &str) -> Option<&'static str> {
    let t = text.to_lowercase();
    BROAD_PHRASES.iter().copied().find(|p| t.contains(p))
}

/// A broad permission and the sentence that grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broad {
    /// `default allow` or the rule's text.
    pub what: String,
    pub sentence: usize,
    pub phrase: &'static str,
}

/// Is `rule` an unconditional allow of a whole service (`allow mail.*`, `allow *`)?
fn whole_service_allow(rule: &str) -> bool {
    let mut w = rule.split_whitespace();
    w.next() == Some("allow")
        && w.next().is_some_and(|p| p.ends_with('*'))
        && !rule.split_whitespace().any(|x| x == "when")
}

/// `default allow` and whole-service allows need a sentence that grants that much;
/// the model's own claim is not enough. Returns what each was granted by, or what
/// the model must repair.
pub fn check_broad(d: &Draft, sentences: &[Sentence]) -> Result<Vec<Broad>, String> {
    let mut p = Vec::new();
    let mut ok = Vec::new();
    let text = |n: usize| sentences.get(n.wrapping_sub(1)).map(|s| s.text.as_str());
    if d.default == Verdict::Allow {
        match d.default_sentence.and_then(|n| text(n).map(|t| (n, t))) {
            Some((n, t)) => match broad_phrase(t) {
                Some(phrase) => ok.push(Broad {
                    what: "default allow".into(),
                    sentence: n,
                    phrase,
                }),
                None => p.push(format!(
                    "\"default\": \"allow\" lets through every call no rule names, but S{n} (\"{t}\") does not grant \
                     everything: use \"deny\" (or \"ask\" where the English says to ask)"
                )),
            },
            None => p.push(
                "\"default\": \"allow\" lets through every call no rule names; no sentence grants that: use \"deny\" \
                 (or \"ask\" where the English says to ask), or name the sentence that grants everything in \
                 \"default_sentence\""
                    .to_string(),
            ),
        }
    }
    for (i, r) in d.rules.iter().enumerate() {
        let rule = r.rule.trim();
        if !whole_service_allow(rule) {
            continue;
        }
        match text(r.sentence).and_then(|t| broad_phrase(t).map(|ph| (t, ph))) {
            Some((_, phrase)) => ok.push(Broad {
                what: rule.to_string(),
                sentence: r.sentence,
                phrase,
            }),
            None => p.push(format!(
                "rules[{i}] `{rule}` allows every tool it matches without a condition, but {} does not grant \
                 that much: allow the tools the English names, one by one",
                match text(r.sentence) {
                    Some(t) => format!("S{} (\"{t}\")", r.sentence),
                    None => "no sentence".to_string(),
                }
            )),
        }
    }
    if p.is_empty() {
        Ok(ok)
    } else {
        Err(p.join("\n"))
    }
}

/// Shape, then the engine. The error is the feedback the model gets.
pub fn check(ctx: &Context, d: &Draft) -> Result<(Assembled, Vec<String>), String> {
    check_shape(d, ctx.sentences.len())?;
    check_broad(d, ctx.sentences)?;
    let a = assemble(ctx.header, ctx.sentences, ctx.lists, d);
    match ctx.engine.check(&a.text, ctx.rules_path) {
        Ok(w) => Ok((a, w)),
        Err(diag) => Err(format!(
            "The policy engine rejected the p.rules built from your draft:\n\n{diag}\n\n\
             The p.rules it checked (your rules are the lines that follow a `# S..` comment):\n\n{}",
            a.numbered()
        )),
    }
}

fn facts(ctx: &Context) -> String {
    format!(
        "The owner's English, sentence by sentence:\n\n{}\nThe lists declared for you (refer to them as @name):\n\n{}",
        sentences::numbered(ctx.sentences),
        lists::prompt_text(ctx.lists)
    )
}

fn finish(ctx: &Context, asked: Asked<Draft>) -> Result<Checked, StepError> {
    let (assembled, warnings) = check(ctx, &asked.value).map_err(|last| StepError::GaveUp {
        step: "draft".into(),
        tries: asked.tries,
        last,
        rejected: asked.rejected.clone(),
    })?;
    Ok(Checked {
        draft: asked.value,
        assembled,
        warnings,
        tries: asked.tries,
        rejected: asked.rejected,
    })
}

pub fn draft(
    llm: &mut dyn Completer,
    ctx: &Context,
    max_repairs: u32,
) -> Result<Checked, StepError> {
    let user = format!("{}\nWrite the draft.", facts(ctx));
    let asked = ask_json(
        llm,
        "draft",
        prompts::draft_system("draft", ctx.catalog),
        vec![Message::user(user)],
        max_repairs,
        |d: &Draft| check(ctx, d).map(|_| ()),
    )?;
    finish(ctx, asked)
}

/// Rewrites the rules for the disagreements a judge blamed on them.
pub fn repair(
    llm: &mut dyn Completer,
    ctx: &Context,
    current: &Checked,
    faults: &str,
    max_repairs: u32,
) -> Result<Checked, StepError> {
    let user = format!(
        "{}\nThe current draft:\n\n{}\n\nThe p.rules built from it:\n\n{}\n\
         Test scenarios written independently from the English were run on these rules. A judge \
         found the rules at fault for these:\n\n{faults}\n\
         Answer the whole corrected draft. Keep the rules that are right.",
        facts(ctx),
        serde_json::to_string_pretty(&current.draft).unwrap_or_default(),
        current.assembled.numbered()
    );
    let asked = ask_json(
        llm,
        "repair",
        prompts::draft_system("repair", ctx.catalog),
        vec![Message::user(user)],
        max_repairs,
        |d: &Draft| check(ctx, d).map(|_| ()),
    )?;
    finish(ctx, asked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::DraftRule;
    use crate::sentences::split;

    #[test]
    fn broad_permissions_need_a_sentence_that_grants_them() {
        let s = split("The agent may read my email. It may do anything with files.");
        let mut d = Draft {
            rules: vec![DraftRule {
                sentence: 1,
                rule: "allow mail.*".into(),
            }],
            default: Verdict::Allow,
            assumptions: vec![],
            default_sentence: None,
        };
        let e = check_broad(&d, &s).unwrap_err();
        assert!(e.contains("no sentence grants that"), "{e}");
        assert!(e.contains("rules[0] `allow mail.*`"), "{e}");
        d.default_sentence = Some(1);
        assert!(check_broad(&d, &s)
            .unwrap_err()
            .contains("S1 (\"The agent may read my email.\") does not grant"));
        d.default_sentence = Some(2);
        d.rules[0] = DraftRule {
            sentence: 2,
            rule: "allow fs.*".into(),
        };
        let ok = check_broad(&d, &s).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].phrase, "anything");
        // A condition makes it no longer a whole-service allow.
        d.default = Verdict::Deny;
        d.rules[0] = DraftRule {
            sentence: 1,
            rule: "allow mail.* when folder == \"INBOX\"".into(),
        };
        assert!(check_broad(&d, &s).unwrap().is_empty());
    }

    #[test]
    fn shape_problems_are_all_named() {
        let d = Draft {
            rules: vec![
                DraftRule {
                    sentence: 1,
                    rule: "allow a.b\ndeny c.d".into(),
                },
                DraftRule {
                    sentence: 9,
                    rule: "list x = [\"a\"]".into(),
                },
                DraftRule {
                    sentence: 1,
                    rule: "allow a.b when x == \"y\" \\".into(),
                },
            ],
            default: Verdict::Deny,
            assumptions: vec![],
            default_sentence: None,
        };
        let e = check_shape(&d, 2).unwrap_err();
        assert!(e.contains("rules[0] spans"), "{e}");
        assert!(e.contains("rules[1] \"list"), "{e}");
        assert!(e.contains("sentence 9"), "{e}");
        assert!(e.contains("rules[2] ends in"), "{e}");
        let empty = Draft {
            rules: vec![],
            default: Verdict::Deny,
            assumptions: vec![],
            default_sentence: None,
        };
        assert!(check_shape(&empty, 1).unwrap_err().contains("empty"));
    }
}
