//! Step 5, verification: the engine decides every scenario under the draft, those
//! the model wrote and those the compiler derived from them. For each disagreement
//! on a written scenario a judging step, reading the English alone, blames the rule
//! or the scenario; a derived scenario's disagreement is a fault of the rules by
//! construction. Blamed rules are redrafted (and checked by the engine again), for
//! at most `max_rounds` rounds. What still disagrees then is reported as disputed,
//! and the compile fails.
//!
//! **Monotone safety.** No single answer of the model may widen what the agent may
//! do. A judge's correction that makes a scenario more permissive (deny or ask →
//! allow, deny → ask), or that rewrites its call, is never applied: the rules are
//! repaired toward the scenario instead, and if that does not settle it the
//! correction is held for the owner (`--accept SCENARIO` applies it). Corrections
//! toward less permission are applied and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ask::{ask_json, StepError};
use crate::derive::{self, Bound, Derivation};
use crate::draft::{self, Checked, Context};
use crate::engine::{DecidedBy, Outcome, RuleEngine, Verdict};
use crate::llm::{Completer, Message};
use crate::scenarios::{check_call, Scenario};
use crate::{lists, prompts, sentences};

/// How much a verdict lets the agent do: deny < ask < allow.
pub fn permission(v: Verdict) -> u8 {
    match v {
        Verdict::Deny => 0,
        Verdict::Ask => 1,
        Verdict::Allow => 2,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub id: String,
    pub sentence: usize,
    pub call: Value,
    pub expect: Verdict,
    pub got: Verdict,
    pub rule: Option<u32>,
    pub rule_text: Option<String>,
    pub by: DecidedBy,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derivation>,
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
    /// Applied because the owner passed `--accept` for it (it widens).
    pub accepted: bool,
}

/// A judge's correction that would widen what the agent may do, or rewrite the
/// call: not applied. The rules were asked to follow the scenario instead.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub id: String,
    pub sentence: usize,
    pub call: Value,
    /// The scenario's reading (kept).
    pub expect: Verdict,
    /// The judge's reading.
    pub proposed_expect: Verdict,
    /// The judge's rewritten call, if it rewrote it.
    pub proposed_call: Option<Value>,
    pub why: String,
}

impl Held {
    fn of(s: &Scenario, j: &Judgement) -> Option<Held> {
        let proposed_expect = j.expect.unwrap_or(s.expect);
        let call_changed = j.call.as_ref().is_some_and(|c| *c != s.call);
        let widens = permission(proposed_expect) > permission(s.expect);
        (widens || call_changed).then(|| Held {
            id: s.id.clone(),
            sentence: s.sentence,
            call: s.call.clone(),
            expect: s.expect,
            proposed_expect,
            proposed_call: j.call.clone().filter(|_| call_changed),
            why: j.why.clone(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: u32,
    pub disagreements: Vec<Disagreement>,
    pub judgements: Vec<Judgement>,
    pub scenario_fixes: Vec<Fix>,
    /// Corrections refused this round (they widen or rewrite the call).
    pub held: Vec<Held>,
    pub rules_repaired: bool,
    pub error: Option<String>,
}

pub struct Verified {
    pub checked: Checked,
    /// The scenarios the model wrote, as corrected.
    pub scenarios: Vec<Scenario>,
    /// The scenarios derived from them in the last evaluation.
    pub derived: Vec<Scenario>,
    pub rounds: Vec<Round>,
    /// Disagreements left after the last round: empty means verified.
    pub remaining: Vec<Disagreement>,
    /// Every correction that was held, whether or not the rules then followed the
    /// scenario (the first time each scenario's was held).
    pub held: Vec<Held>,
    /// `--accept` ids that matched no held correction.
    pub unused_accepts: Vec<String>,
    /// Lines of the rules that decided at least one scenario in the last evaluation.
    pub exercised: BTreeSet<u32>,
    /// Why verification stopped early, if it did.
    pub failure: Option<StepError>,
    /// The last redraft changed nothing, so the rounds stopped early.
    pub stalled: bool,
}

impl Verified {
    /// Every remaining disagreement is a held correction: the owner's word settles it.
    pub fn only_held(&self) -> bool {
        !self.remaining.is_empty()
            && self
                .remaining
                .iter()
                .all(|d| d.derived.is_none() && self.held.iter().any(|h| h.id == d.id))
    }
}

/// What the engine made of a set of scenarios.
pub struct Evaluation {
    pub disagreements: Vec<Disagreement>,
    /// Rule lines that decided at least one scenario.
    pub exercised: BTreeSet<u32>,
}

fn disagrees(s: &Scenario, got: Verdict) -> bool {
    match s.derived.as_ref().map(|d| d.bound) {
        Some(Bound::AtMost) => permission(got) > permission(s.expect),
        _ => got != s.expect,
    }
}

/// Decides the written scenarios in order (as `policy test` does) and each derived
/// one on its own, and lists where the engine and the scenario differ. A derived
/// scenario whose parent already disagrees is left out: it says nothing more.
pub fn evaluate(
    engine: &dyn RuleEngine,
    text: &str,
    path: &Path,
    scenarios: &[Scenario],
) -> Result<Evaluation, String> {
    let (written, derived): (Vec<&Scenario>, Vec<&Scenario>) =
        scenarios.iter().partition(|s| s.derived.is_none());
    let calls = |v: &[&Scenario]| v.iter().map(|s| s.call.clone()).collect::<Vec<Value>>();
    let mut outcomes: Vec<Outcome> = engine.decide_all(text, path, &calls(&written))?;
    outcomes.extend(engine.decide_each(text, path, &calls(&derived))?);
    let ordered: Vec<&Scenario> = written.into_iter().chain(derived).collect();
    if outcomes.len() != ordered.len() {
        return Err(format!(
            "the engine decided {} of {} scenarios",
            outcomes.len(),
            ordered.len()
        ));
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut exercised = BTreeSet::new();
    let mut out: Vec<Disagreement> = Vec::new();
    for (s, o) in ordered.into_iter().zip(outcomes) {
        if let Some(l) = o.rule {
            exercised.insert(l);
        }
        if !disagrees(s, o.verdict) {
            continue;
        }
        if let Some(d) = &s.derived {
            if out.iter().any(|x| x.id == d.from) {
                continue;
            }
        }
        out.push(Disagreement {
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
            derived: s.derived.clone(),
        });
    }
    Ok(Evaluation {
        disagreements: out,
        exercised,
    })
}

pub fn describe(d: &Disagreement) -> String {
    let by = match (&d.rule, &d.rule_text) {
        (Some(l), Some(t)) => format!("line {l} (`{t}`)"),
        _ => format!("the {}", d.by),
    };
    match &d.derived {
        None => format!(
            "- {} (for S{}): call {}; the scenario expects {}; the rules decide {} by {}, reason {:?}",
            d.id, d.sentence, d.call, d.expect, d.got, by, d.reason
        ),
        Some(x) => format!(
            "- {} (for S{}, derived by the compiler from {}: {}; {}): call {}; the rules decide {} by {}, reason {:?}",
            d.id,
            d.sentence,
            x.from,
            x.how,
            match x.bound {
                Bound::Same => format!("the English cannot tell the two calls apart, so it must decide as {} expects: {}", x.from, d.expect),
                Bound::AtMost => format!("one more outsider may never get more than {} expects: {}", x.from, d.expect),
            },
            d.call,
            d.got,
            by,
            d.reason
        ),
    }
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

/// What the verification loop needs besides the draft and the scenarios.
pub struct Settings<'a> {
    pub max_rounds: u32,
    pub max_repairs: u32,
    /// Scenario ids whose held corrections the owner accepts (`--accept`).
    pub accept: &'a [String],
}

pub fn verify(
    llm: &mut dyn Completer,
    ctx: &Context,
    mut checked: Checked,
    mut scenarios: Vec<Scenario>,
    set: &Settings,
) -> Verified {
    let mut rounds = Vec::new();
    let mut failure = None;
    let mut round_no = 0;
    let mut stalled = false;
    let mut held_all: Vec<Held> = Vec::new();
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let mut exercised = BTreeSet::new();
    let mut derived;
    let remaining = loop {
        derived = derive::derive(&scenarios, ctx.catalog, ctx.sentences);
        let all: Vec<Scenario> = scenarios.iter().chain(&derived).cloned().collect();
        let dis = match evaluate(ctx.engine, &checked.assembled.text, ctx.rules_path, &all) {
            Ok(e) => {
                exercised = e.exercised;
                e.disagreements
            }
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
        if dis.is_empty() || round_no == set.max_rounds || failure.is_some() || stalled {
            break dis;
        }
        round_no += 1;
        let mut round = Round {
            round: round_no,
            disagreements: dis.clone(),
            judgements: vec![],
            scenario_fixes: vec![],
            held: vec![],
            rules_repaired: false,
            error: None,
        };
        let (written, by_construction): (Vec<&Disagreement>, Vec<&Disagreement>) =
            dis.iter().partition(|d| d.derived.is_none());
        let mut faults: Vec<String> = by_construction.iter().map(|d| describe(d)).collect();
        if !written.is_empty() {
            let written: Vec<Disagreement> = written.into_iter().cloned().collect();
            let user = format!(
                "The owner's English, sentence by sentence:\n\n{}\nThe lists:\n\n{}\nThe rules (p.rules):\n\n{}\n\
                 The disagreements:\n\n{}\n",
                sentences::numbered(ctx.sentences),
                lists::prompt_text(ctx.lists),
                checked.assembled.numbered(),
                written.iter().map(describe).collect::<Vec<_>>().join("\n")
            );
            let judged = ask_json(
                llm,
                "judge",
                prompts::judge_system(),
                vec![Message::user(user)],
                set.max_repairs,
                |a: &JudgeAnswer| check_judgements(&a.judgements, &written),
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
            for j in &judgements {
                let d = written
                    .iter()
                    .find(|d| d.id == j.scenario)
                    .expect("checked above");
                match j.fault {
                    Fault::Scenario => {
                        let s = scenarios
                            .iter_mut()
                            .find(|s| s.id == j.scenario)
                            .expect("ids come from scenarios");
                        let held = Held::of(s, j);
                        let owner_says = set.accept.contains(&s.id);
                        if let (Some(h), false) = (&held, owner_says) {
                            // Repair toward the scenario: its reading is the safer one.
                            faults.push(format!(
                                "{}\n  judge: {}\n  The judge would read it as {}{}, which gives the agent more (or \
                                 changes the call); the compiler keeps the scenario's reading: the rules must decide \
                                 this call {}.",
                                describe(d),
                                j.why,
                                h.proposed_expect,
                                h.proposed_call
                                    .as_ref()
                                    .map(|c| format!(" with the call {c}"))
                                    .unwrap_or_default(),
                                d.expect
                            ));
                            if !held_all.iter().any(|x| x.id == h.id) {
                                held_all.push(h.clone());
                            }
                            round.held.push(h.clone());
                            continue;
                        }
                        if held.is_some() {
                            accepted.insert(s.id.clone());
                        }
                        let fix = Fix {
                            id: s.id.clone(),
                            sentence: s.sentence,
                            call_before: s.call.clone(),
                            expect_before: s.expect,
                            call_after: j.call.clone().unwrap_or_else(|| s.call.clone()),
                            expect_after: j.expect.unwrap_or(s.expect),
                            why: j.why.clone(),
                            accepted: held.is_some(),
                        };
                        s.call = fix.call_after.clone();
                        s.expect = fix.expect_after;
                        round.scenario_fixes.push(fix);
                    }
                    Fault::Rule => faults.push(format!("{}\n  judge: {}", describe(d), j.why)),
                }
            }
            round.judgements = judgements;
        }
        if !faults.is_empty() {
            match draft::repair(llm, ctx, &checked, &faults.join("\n"), set.max_repairs) {
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
    let unused_accepts = set
        .accept
        .iter()
        .filter(|a| !accepted.contains(*a))
        .cloned()
        .collect();
    Verified {
        checked,
        scenarios,
        derived,
        rounds,
        remaining,
        held: held_all,
        unused_accepts,
        exercised,
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
            by: DecidedBy::Rule,
            reason: String::new(),
            derived: None,
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

    #[test]
    fn a_correction_is_held_when_it_widens_or_rewrites_the_call() {
        let s = Scenario {
            id: "s9".into(),
            sentence: 3,
            why: String::new(),
            call: serde_json::json!({"tool": "mail.send", "args": {"to": ["a@b.c"], "cc": ["m@e.x"]}}),
            expect: Verdict::Ask,
            derived: None,
        };
        let j = |expect: Option<Verdict>, call: Option<Value>| Judgement {
            scenario: "s9".into(),
            fault: Fault::Scenario,
            why: "w".into(),
            expect,
            call,
        };
        assert!(Held::of(&s, &j(Some(Verdict::Allow), None)).is_some());
        assert!(Held::of(&s, &j(Some(Verdict::Deny), None)).is_none());
        let other = serde_json::json!({"tool": "mail.send", "args": {"to": ["a@b.c"]}});
        let h = Held::of(&s, &j(None, Some(other.clone()))).unwrap();
        assert_eq!(
            (h.proposed_expect, h.proposed_call),
            (Verdict::Ask, Some(other))
        );
        assert!(Held::of(&s, &j(Some(Verdict::Deny), Some(s.call.clone()))).is_none());
        let deny = Scenario {
            expect: Verdict::Deny,
            ..s.clone()
        };
        assert!(Held::of(&deny, &j(Some(Verdict::Ask), None)).is_some());
        assert!(permission(Verdict::Allow) > permission(Verdict::Ask));
    }
}
