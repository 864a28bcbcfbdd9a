//! Step 4, the scenarios: labelled test calls written from the English alone (the
//! prompt holds the sentences, the catalog and the lists, never the draft), so that
//! they check the rules instead of repeating them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ask::{ask_json, StepError};
use crate::catalog_view::CatalogView;
use crate::engine::Verdict;
use crate::lists::{self, ResolvedList};
use crate::llm::{Completer, Message};
use crate::prompts;
use crate::sentences::{self, Sentence};

const MAX_SCENARIOS: usize = 300;
const MAX_CALL_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct RawScenario {
    pub sentence: usize,
    #[serde(default)]
    pub why: String,
    pub call: Value,
    pub expect: Verdict,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Uncovered {
    pub sentence: usize,
    pub why: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScenariosAnswer {
    pub scenarios: Vec<RawScenario>,
    #[serde(default)]
    pub uncovered: Vec<Uncovered>,
}

/// A scenario with the id the judge and the report use (`s1`, `s2`, ...).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scenario {
    pub id: String,
    pub sentence: usize,
    pub why: String,
    pub call: Value,
    pub expect: Verdict,
}

impl Scenario {
    /// The line `policy test` reads: `{"call": {...}, "expect": "..."}`.
    pub fn test_line(&self) -> String {
        json!({"call": self.call, "expect": self.expect}).to_string()
    }
}

/// A call must be `{"tool": "...", "args": {...}}` and not huge.
pub fn check_call(call: &Value) -> Result<&str, String> {
    let tool = call
        .get("tool")
        .and_then(Value::as_str)
        .ok_or("has no \"tool\" string")?;
    if !call.get("args").is_some_and(Value::is_object) {
        return Err("has no \"args\" object".into());
    }
    if call.as_object().is_some_and(|o| o.len() != 2) {
        return Err("has keys other than \"tool\" and \"args\"".into());
    }
    if call.to_string().len() > MAX_CALL_BYTES {
        return Err(format!("is over {MAX_CALL_BYTES} bytes"));
    }
    Ok(tool)
}

/// The compiler's checks; the error text goes back to the model.
pub fn validate(
    a: &ScenariosAnswer,
    sentences: &[Sentence],
    catalog: &CatalogView,
) -> Result<(), String> {
    let mut p = Vec::new();
    if a.scenarios.is_empty() {
        p.push("\"scenarios\" is empty".to_string());
    }
    if a.scenarios.len() > MAX_SCENARIOS {
        p.push(format!(
            "{} scenarios is over the limit of {MAX_SCENARIOS}",
            a.scenarios.len()
        ));
    }
    for (i, s) in a.scenarios.iter().enumerate() {
        match check_call(&s.call) {
            Err(why) => p.push(format!("scenarios[{i}].call {why}")),
            Ok(tool) => {
                if catalog.tool(tool).is_none() && s.expect != Verdict::Deny {
                    p.push(format!(
                        "scenarios[{i}] calls {tool:?}, which is not in the catalog; such a call is always denied, so expect \"deny\" or use a catalog tool"
                    ));
                }
            }
        }
        if s.sentence > sentences.len() {
            p.push(format!(
                "scenarios[{i}] names sentence {} but the sentences are S1..S{}",
                s.sentence,
                sentences.len()
            ));
        }
    }
    let covered: BTreeSet<usize> = a
        .scenarios
        .iter()
        .map(|s| s.sentence)
        .chain(a.uncovered.iter().map(|u| u.sentence))
        .collect();
    let missing: Vec<String> = sentences
        .iter()
        .filter(|s| !covered.contains(&s.n))
        .map(|s| format!("S{}", s.n))
        .collect();
    if !missing.is_empty() {
        p.push(format!(
            "no scenario covers {}: write scenarios for each, or list it under \"uncovered\" with the reason",
            missing.join(", ")
        ));
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(p.join("\n"))
    }
}

pub struct Written {
    pub scenarios: Vec<Scenario>,
    pub uncovered: Vec<Uncovered>,
    pub tries: u32,
    pub rejected: Vec<String>,
}

pub fn write(
    llm: &mut dyn Completer,
    sentences: &[Sentence],
    catalog: &CatalogView,
    lists: &[ResolvedList],
    max_repairs: u32,
) -> Result<Written, StepError> {
    let user = format!(
        "The owner's English, sentence by sentence:\n\n{}\nThe lists the English refers to:\n\n{}\nWrite the scenarios.",
        sentences::numbered(sentences),
        lists::prompt_text(lists)
    );
    let asked = ask_json(
        llm,
        "scenarios",
        prompts::scenarios_system(catalog),
        vec![Message::user(user)],
        max_repairs,
        |a: &ScenariosAnswer| validate(a, sentences, catalog),
    )?;
    let scenarios = asked
        .value
        .scenarios
        .into_iter()
        .enumerate()
        .map(|(i, r)| Scenario {
            id: format!("s{}", i + 1),
            sentence: r.sentence,
            why: r.why,
            call: r.call,
            expect: r.expect,
        })
        .collect();
    Ok(Written {
        scenarios,
        uncovered: asked.value.uncovered,
        tries: asked.tries,
        rejected: asked.rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentences::split;

    #[test]
    fn coverage_unknown_tools_and_malformed_calls() {
        let cat = CatalogView::parse(r#"{"tools":[{"name":"mail.read"}]}"#).unwrap();
        let s = split("Read mail. Be nice.");
        let a: ScenariosAnswer = serde_json::from_value(json!({"scenarios": [
            {"sentence": 1, "call": {"tool": "mail.read", "args": {}}, "expect": "allow"},
            {"sentence": 1, "call": {"tool": "mail.nuke", "args": {}}, "expect": "allow"},
            {"sentence": 1, "call": {"tool": "mail.read"}, "expect": "deny"},
            {"sentence": 4, "call": {"tool": "mail.read", "args": {}, "x": 1}, "expect": "deny"}
        ]}))
        .unwrap();
        let e = validate(&a, &s, &cat).unwrap_err();
        assert!(e.contains("\"mail.nuke\""), "{e}");
        assert!(e.contains("scenarios[2].call has no \"args\""), "{e}");
        assert!(e.contains("scenarios[3].call has keys other"), "{e}");
        assert!(e.contains("sentence 4"), "{e}");
        assert!(e.contains("no scenario covers S2"), "{e}");
        let ok: ScenariosAnswer = serde_json::from_value(json!({"scenarios": [
            {"sentence": 1, "call": {"tool": "mail.read", "args": {}}, "expect": "allow"},
            {"sentence": 0, "call": {"tool": "x.y", "args": {}}, "expect": "deny"}
        ], "uncovered": [{"sentence": 2, "why": "not a policy"}]}))
        .unwrap();
        validate(&ok, &s, &cat).unwrap();
    }
}
