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

/// How a derived scenario's decision is compared with its parent's expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// The same decision.
    Same,
    /// This decision or a less permissive one.
    AtMost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Derivation {
    /// The id of the scenario it was derived from.
    pub from: String,
    /// What was changed, for the repair prompt and the report.
    pub how: String,
    pub bound: Bound,
}

const MAX_SCENARIOS: usize = 300;
/// Scenarios each sentence that states policy needs: a plain case, an edge, and an
/// attempt to get around it.
pub const MIN_PER_SENTENCE: usize = 3;
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

/// A scenario with the id the judge and the report use (`s1`, `s2`, ...; derived
/// ones `s9.d1`, ...).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scenario {
    pub id: String,
    pub sentence: usize,
    pub why: String,
    pub call: Value,
    pub expect: Verdict,
    /// Set when the compiler derived it from another scenario (see `derive`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derivation>,
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
    check_each(&a.scenarios, sentences, catalog, &mut p);
    coverage(a, sentences, &mut p);
    let declared: BTreeSet<usize> = a.uncovered.iter().map(|u| u.sentence).collect();
    let thin: Vec<String> = sentences
        .iter()
        .filter(|s| !declared.contains(&s.n))
        .filter_map(|s| {
            let n = a.scenarios.iter().filter(|x| x.sentence == s.n).count();
            (n > 0 && n < MIN_PER_SENTENCE).then(|| format!("S{} has {n}", s.n))
        })
        .collect();
    if !thin.is_empty() {
        p.push(format!(
            "{}: write at least {MIN_PER_SENTENCE} scenarios for every sentence that states policy: \
             a plain case, an edge, and an attempt to get around it",
            thin.join(", ")
        ));
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(p.join("\n"))
    }
}

/// The checks every model-written scenario gets, wherever it was written.
fn check_each(
    scenarios: &[RawScenario],
    sentences: &[Sentence],
    catalog: &CatalogView,
    p: &mut Vec<String>,
) {
    if scenarios.len() > MAX_SCENARIOS {
        p.push(format!(
            "{} scenarios is over the limit of {MAX_SCENARIOS}",
            scenarios.len()
        ));
    }
    for (i, s) in scenarios.iter().enumerate() {
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
}

fn coverage(a: &ScenariosAnswer, sentences: &[Sentence], p: &mut Vec<String>) {
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
            derived: None,
        })
        .collect();
    Ok(Written {
        scenarios,
        uncovered: asked.value.uncovered,
        tries: asked.tries,
        rejected: asked.rejected,
    })
}

/// One sentence's second reading (the recheck step).
#[derive(Debug, Clone, Deserialize)]
pub struct Reread {
    pub sentence: usize,
    pub states_policy: bool,
    #[serde(default)]
    pub why: String,
    #[serde(default)]
    pub scenarios: Vec<RawScenario>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RecheckAnswer {
    pub sentences: Vec<Reread>,
}

/// A sentence that one reading said states no policy and the other said does.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CoverageDispute {
    pub sentence: usize,
    /// Why the scenarios step said it states no policy.
    pub first: String,
    /// Why the second reading said it does.
    pub second: String,
}

pub struct Rechecked {
    /// Scenarios the second reading wrote (for disputed sentences), with ids after
    /// the existing ones.
    pub scenarios: Vec<Scenario>,
    pub disputes: Vec<CoverageDispute>,
    pub tries: u32,
}

fn check_recheck(
    a: &RecheckAnswer,
    asked: &[Uncovered],
    sentences: &[Sentence],
    catalog: &CatalogView,
) -> Result<(), String> {
    let mut p = Vec::new();
    let want: BTreeSet<usize> = asked.iter().map(|u| u.sentence).collect();
    let got: Vec<usize> = a.sentences.iter().map(|r| r.sentence).collect();
    let got_set: BTreeSet<usize> = got.iter().copied().collect();
    if got.len() != got_set.len() || got_set != want {
        p.push(format!(
            "answer for exactly these sentences, once each: {}",
            want.iter()
                .map(|n| format!("S{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for r in &a.sentences {
        if r.states_policy && r.scenarios.len() < MIN_PER_SENTENCE {
            p.push(format!(
                "S{} states policy, so give at least {MIN_PER_SENTENCE} scenarios for it",
                r.sentence
            ));
        }
        if r.scenarios.iter().any(|s| s.sentence != r.sentence) {
            p.push(format!(
                "the scenarios under S{} must name sentence {}",
                r.sentence, r.sentence
            ));
        }
        check_each(&r.scenarios, sentences, catalog, &mut p);
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(p.join("\n"))
    }
}

/// A sentence declared to state no policy is asked about once more, framed
/// differently (could a tool call be decided differently because of it?). When the
/// two readings disagree, the compile does not count as verified.
pub fn recheck(
    llm: &mut dyn Completer,
    sentences: &[Sentence],
    catalog: &CatalogView,
    lists: &[ResolvedList],
    uncovered: &[Uncovered],
    first_id: usize,
    max_repairs: u32,
) -> Result<Rechecked, StepError> {
    let asked: Vec<String> = uncovered
        .iter()
        .map(|u| {
            let text = sentences
                .get(u.sentence.wrapping_sub(1))
                .map(|s| s.text.as_str())
                .unwrap_or("");
            format!("S{}: {text}", u.sentence)
        })
        .collect();
    let user = format!(
        "The owner's whole English, for context:\n\n{}\nThe lists:\n\n{}\nThe sentences to read again:\n\n{}\n",
        sentences::numbered(sentences),
        lists::prompt_text(lists),
        asked.join("\n")
    );
    let answer = ask_json(
        llm,
        "recheck",
        prompts::recheck_system(catalog),
        vec![Message::user(user)],
        max_repairs,
        |a: &RecheckAnswer| check_recheck(a, uncovered, sentences, catalog),
    )?;
    let mut out = Rechecked {
        scenarios: vec![],
        disputes: vec![],
        tries: answer.tries,
    };
    for r in answer.value.sentences {
        if !r.states_policy {
            continue;
        }
        let first = uncovered
            .iter()
            .find(|u| u.sentence == r.sentence)
            .map(|u| u.why.clone())
            .unwrap_or_default();
        out.disputes.push(CoverageDispute {
            sentence: r.sentence,
            first,
            second: r.why.clone(),
        });
        for raw in r.scenarios {
            out.scenarios.push(Scenario {
                id: format!("s{}", first_id + out.scenarios.len()),
                sentence: raw.sentence,
                why: raw.why,
                call: raw.call,
                expect: raw.expect,
                derived: None,
            });
        }
    }
    Ok(out)
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
        let thin: ScenariosAnswer = serde_json::from_value(json!({"scenarios": [
            {"sentence": 1, "call": {"tool": "mail.read", "args": {}}, "expect": "allow"},
            {"sentence": 0, "call": {"tool": "x.y", "args": {}}, "expect": "deny"}
        ], "uncovered": [{"sentence": 2, "why": "not a policy"}]}))
        .unwrap();
        let e = validate(&thin, &s, &cat).unwrap_err();
        assert!(e.contains("S1 has 1: write at least 3"), "{e}");
        let ok: ScenariosAnswer = serde_json::from_value(json!({"scenarios": [
            {"sentence": 1, "call": {"tool": "mail.read", "args": {}}, "expect": "allow"},
            {"sentence": 1, "call": {"tool": "mail.read", "args": {"id": "x"}}, "expect": "allow"},
            {"sentence": 1, "call": {"tool": "mail.nuke", "args": {}}, "expect": "deny"},
            {"sentence": 0, "call": {"tool": "x.y", "args": {}}, "expect": "deny"}
        ], "uncovered": [{"sentence": 2, "why": "not a policy"}]}))
        .unwrap();
        validate(&ok, &s, &cat).unwrap();
    }
}
