//! Step 5, verification: the engine decides every scenario under the draft. For each
//! disagreement a judging step, reading the English alone, blames the rule or the
//! scenario. Blamed scenarios are corrected, blamed rules are redrafted (and checked
//! by the engine again), for at most `max_rounds` rounds. What still disagrees then
//! is reported as disputed, and the compile fails.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ask::{ask_json, StepError};
use crate::draft::{self, Checked, Context};
use crate::engine::{RuleEngine, Verdict};
use crate::llm::{Completer, Message};
use crate::scenarios::{check_call, Scenario};
use crate::{lists, prompts, sentences};

#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub id: String,
    pub sentence: usize,
    pub call: Value,
    pub expect: Verdict,
    pub got: Verdict,
    pub rule: Option<u32>,
    pub rule_text: Option<String>,
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    Rule,
    Scenario,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgement {
    pub scenario: String,
    pub fault: Fault,
    #[serde(default)]
    pub why: String,
    #[serde(default)]
    pub expect: Option<Verdict>,
    #[serde(default)]
    pub call: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct JudgeAnswer {
    judgements: Vec<Judgement>,
}

/// A scenario the judge corrected: the owner should confirm it.
#[derive(Debug, Clone, Serialize)]
pub struct Fix {
    pub id: String,
    pub sentence: usize,
    pub call_before: Value,
    pub expect_before: Verdict,
    pub call_after: Value,
    pub expect_after: Verdict,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: u32,
    pub disagreements: Vec<Disagreement>,
    pub judgements: Vec<Judgement>,
    pub scenario_fixes: Vec<Fix>,
    pub rules_repaired: bool,
    pub error: Option<String>,
}

pub struct Verified {
    pub checked: Checked,
    pub scenarios: Vec<Scenario>,
    pub rounds: Vec<Round>,
    /// Disagreements left after the last round: empty means verified.
    pub remaining: Vec<Disagreement>,
    /// Why verification stopped early, if it did.
    pub failure: Option<StepError>,
    /// The last redraft changed nothing, so the rounds stopped early.
    pub stalled: bool,
}

/// Decides every scenario under `text` and lists where the engine and the scenario differ.
pub fn evaluate(
    engine: &dyn RuleEngine,
    text: &str,
    path: &Path,
    scenarios: &[Scenario],
) -> Result<Vec<Disagreement>, String> {
    let calls: Vec<Value> = scenarios.iter().map(|s| s.call.clone()).collect();
    let outcomes = engine.decide_all(text, path, &calls)?;
    if outcomes.len() != scenarios.len() {
        return Err(format!(
            "the engine decided {} of {} scenarios",
            outcomes.len(),
            scenarios.len()
        ));
    }
    let lines: Vec<&str> = text.lines().collect();
    Ok(scenarios
        .iter()
        .zip(outcomes)
        .filter(|(s, o)| s.expect != o.verdict)
        .map(|(s, o)| Disagreement {
            id: s.id.clone(),
            sentence: s.sentence,
            call: s.call.clone(),
            expect: s.expect,
            got: o.verdict,
            rule: o.rule,
            rule_text: o
                .rule
                .and_then(|l| lines.get((l as usize).wrapping_sub(1)))
                .map(|l| l.to_string()),
            by: o.by,
            reason: o.reason,
        })
        .collect())
}

fn describe(d: &Disagreement) -> String {
    let by = match (&d.rule, &d.rule_text) {
        (Some(l), Some(t)) => format!("line {l} (`{t}`)"),
        _ => format!("the {}", d.by),
    };
    format!(
        "- {} (for S{}): call {}; the scenario expects {}; the rules decide {} by {}, reason {:?}",
        d.id, d.sentence, d.call, d.expect, d.got, by, d.reason
    )
}

fn check_judgements(js: &[Judgement], dis: &[Disagreement]) -> Result<(), String> {
    let mut p = Vec::new();
    let mut count: BTreeMap<&str, usize> = dis.iter().map(|d| (d.id.as_str(), 0)).collect();
    for j in js {
        match count.get_mut(j.scenario.as_str()) {
            Some(n) => *n += 1,
            None => p.push(format!("{:?} is not one of the disagreements", j.scenario)),
        }
        if j.fault == Fault::Scenario {
            let d = dis.iter().find(|d| d.id == j.scenario);
            if j.expect.is_none() && j.call.is_none() {
                p.push(format!(
                    "{} blames the scenario but gives no corrected \"expect\" or \"call\"",
                    j.scenario
                ));
            }
            if let (Some(d), Some(e), None) = (d, j.expect, &j.call) {
                if e == d.expect {
                    p.push(format!(
                        "{} blames the scenario but its corrected expect is the same ({e})",
                        j.scenario
                    ));
                }
            }
            if let Some(c) = &j.call {
                if let Err(why) = check_call(c) {
                    p.push(format!("{}: the corrected call {why}", j.scenario));
                }
            }
        }
    }
    for (id, n) in count {
        if n != 1 {
            p.push(format!(
                "{id} must be judged exactly once (judged {n} times)"
            ));
        }
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(p.join("\n"))
    }
}

pub fn verify(
    llm: &mut dyn Completer,
    ctx: &Context,
    mut checked: Checked,
    mut scenarios: Vec<Scenario>,
    max_rounds: u32,
    max_repairs: u32,
) -> Verified {
    let mut rounds = Vec::new();
    let mut failure = None;
    let mut round_no = 0;
    let mut stalled = false;
    let remaining = loop {
        let dis = match evaluate(
            ctx.engine,
            &checked.assembled.text,
            ctx.rules_path,
            &scenarios,
        ) {
            Ok(d) => d,
            Err(e) => {
                failure = Some(StepError::GaveUp {
                    step: "verify".into(),
                    tries: 1,
                    last: format!("the engine could not run the scenarios: {e}"),
                    rejected: vec![],
                });
                break Vec::new();
            }
        };
        if dis.is_empty() || round_no == max_rounds || failure.is_some() || stalled {
            break dis;
        }
        round_no += 1;
        let mut round = Round {
            round: round_no,
            disagreements: dis.clone(),
            judgements: vec![],
            scenario_fixes: vec![],
            rules_repaired: false,
            error: None,
        };
        let user = format!(
            "The owner's English, sentence by sentence:\n\n{}\nThe lists:\n\n{}\nThe rules (p.rules):\n\n{}\n\
             The disagreements:\n\n{}\n",
            sentences::numbered(ctx.sentences),
            lists::prompt_text(ctx.lists),
            checked.assembled.numbered(),
            dis.iter().map(describe).collect::<Vec<_>>().join("\n")
        );
        let judged = ask_json(
            llm,
            "judge",
            prompts::judge_system(),
            vec![Message::user(user)],
            max_repairs,
            |a: &JudgeAnswer| check_judgements(&a.judgements, &dis),
        );
        let judgements = match judged {
            Ok(a) => a.value.judgements,
            Err(e) => {
                round.error = Some(e.to_string());
                rounds.push(round);
                failure = Some(e);
                continue;
            }
        };
        let mut faults = Vec::new();
        for j in &judgements {
            let d = dis
                .iter()
                .find(|d| d.id == j.scenario)
                .expect("checked above");
            match j.fault {
                Fault::Scenario => {
                    let s = scenarios
                        .iter_mut()
                        .find(|s| s.id == j.scenario)
                        .expect("ids come from scenarios");
                    let fix = Fix {
                        id: s.id.clone(),
                        sentence: s.sentence,
                        call_before: s.call.clone(),
                        expect_before: s.expect,
                        call_after: j.call.clone().unwrap_or_else(|| s.call.clone()),
                        expect_after: j.expect.unwrap_or(s.expect),
                        why: j.why.clone(),
                    };
                    s.call = fix.call_after.clone();
                    s.expect = fix.expect_after;
                    round.scenario_fixes.push(fix);
                }
                Fault::Rule => faults.push(format!("{}\n  judge: {}", describe(d), j.why)),
            }
        }
        round.judgements = judgements;
        if !faults.is_empty() {
            match draft::repair(llm, ctx, &checked, &faults.join("\n"), max_repairs) {
                // Answers are cached, so asking again about the same rules would replay
                // the same answer: a redraft that changes nothing ends the loop.
                Ok(c)
                    if c.draft.rules == checked.draft.rules
                        && c.draft.default == checked.draft.default =>
                {
                    let why = "the redrafted rules are the same as before, so another round cannot make progress";
                    round.error = Some(why.to_string());
                    stalled = true;
                }
                Ok(c) => {
                    checked = c;
                    round.rules_repaired = true;
                }
                Err(e) => {
                    round.error = Some(e.to_string());
                    failure = Some(e);
                }
            }
        }
        rounds.push(round);
    };
    Verified {
        checked,
        scenarios,
        rounds,
        remaining,
        failure,
        stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dis(id: &str, expect: Verdict) -> Disagreement {
        Disagreement {
            id: id.into(),
            sentence: 1,
            call: serde_json::json!({"tool": "a.b", "args": {}}),
            expect,
            got: Verdict::Allow,
            rule: Some(3),
            rule_text: Some("allow a.b".into()),
            by: "rule".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn each_disagreement_judged_once_with_a_real_correction() {
        let d = vec![dis("s1", Verdict::Deny), dis("s2", Verdict::Ask)];
        let j: Vec<Judgement> = serde_json::from_value(serde_json::json!([
            {"scenario": "s1", "fault": "scenario", "expect": "deny"},
            {"scenario": "s1", "fault": "rule"},
            {"scenario": "s9", "fault": "rule"}
        ]))
        .unwrap();
        let e = check_judgements(&j, &d).unwrap_err();
        assert!(e.contains("same (deny)"), "{e}");
        assert!(e.contains("\"s9\" is not one"), "{e}");
        assert!(
            e.contains("s1 must be judged exactly once (judged 2"),
            "{e}"
        );
        assert!(
            e.contains("s2 must be judged exactly once (judged 0"),
            "{e}"
        );
        let ok: Vec<Judgement> = serde_json::from_value(serde_json::json!([
            {"scenario": "s1", "fault": "scenario", "expect": "allow"},
            {"scenario": "s2", "fault": "rule", "why": "x"}
        ]))
        .unwrap();
        check_judgements(&ok, &d).unwrap();
        assert!(describe(&d[0]).contains("line 3 (`allow a.b`)"));
    }
}
