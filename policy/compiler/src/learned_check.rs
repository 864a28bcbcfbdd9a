//! Before a learned rule is kept (an owner's answer to an ask, turned into a rule),
//! what would it change? Given p.rules, its scenarios and the candidate rule, this
//! decides every scenario with and without the candidate and returns those whose
//! decision would change. A rule that flips a scenario the owner's English settled
//! should be shown to the owner, not learned silently.
//!
//! The candidate is placed as `p.rules.learned` places it: just before the `ask`
//! rule it refines (after any learned rules already there). Scenarios are decided in
//! order from a fresh load, as `ironvmm policy test` decides them.

use std::path::Path;

use ironvmm_policy::learned::{render_entry, Header};
use ironvmm_policy::{Call, Catalog, Policy, Sources, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One line of p.scenarios.jsonl: `{"call": {...}, "expect": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    pub call: Value,
    pub expect: Verdict,
}

/// A scenario whose decision the candidate would change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// 0-based index in the scenarios given.
    pub index: usize,
    pub call: Value,
    /// What the scenario expects (the owner's English, as compiled).
    pub expect: Verdict,
    pub before: Verdict,
    pub after: Verdict,
    /// The scenario passed before and fails with the candidate.
    pub breaks: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LearnedCheckError {
    #[error("p.scenarios.jsonl line {line}: {message}")]
    Scenario { line: usize, message: String },
    #[error("the policy does not load{}:\n{diagnostics}", if *.with_candidate { " with the candidate rule" } else { "" })]
    Load {
        with_candidate: bool,
        diagnostics: String,
    },
    #[error("scenario {index}: {message}")]
    Call { index: usize, message: String },
}

/// Reads p.scenarios.jsonl (blank lines skipped).
pub fn parse_scenarios(text: &str) -> Result<Vec<TestCase>, LearnedCheckError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| LearnedCheckError::Scenario {
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// The policy a learned check runs against.
pub struct Base<'a> {
    /// The text of p.rules.
    pub rules: &'a str,
    /// Where p.rules lives: its lists are read from this file's folder, and
    /// diagnostics name it.
    pub rules_path: &'a Path,
    /// The current p.rules.learned, if any.
    pub learned: Option<&'a str>,
    pub catalog: Option<&'a Catalog>,
}

fn decide_all(
    base: &Base,
    learned: Option<&str>,
    scenarios: &[TestCase],
    with_candidate: bool,
) -> Result<Vec<Verdict>, LearnedCheckError> {
    let name = base.rules_path.display().to_string();
    let dir = match base.rules_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let loaded = Policy::from_sources(
        &Sources {
            policy: base.rules,
            name: &name,
            base_dir: Some(dir),
            learned: learned.map(|t| (t, "p.rules.learned")),
        },
        base.catalog,
    )
    .map_err(|d| LearnedCheckError::Load {
        with_candidate,
        diagnostics: d.to_string(),
    })?;
    let mut policy = loaded.policy;
    policy.add_protected_path(base.rules_path);
    scenarios
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let call = Call::from_json(&s.call).map_err(|e| LearnedCheckError::Call {
                index,
                message: e.to_string(),
            })?;
            Ok(policy.decide(&call).verdict)
        })
        .collect()
}

/// The scenarios whose decision `candidate` (one `allow` or `deny` rule, refining the
/// `ask` rule on line `refines` of p.rules) would change, in order.
pub fn changed_scenarios(
    base: &Base,
    scenarios: &[TestCase],
    candidate: &str,
    refines: u32,
) -> Result<Vec<Change>, LearnedCheckError> {
    let before = decide_all(base, base.learned, scenarios, false)?;
    let mut learned = base.learned.unwrap_or("").to_string();
    if !learned.is_empty() && !learned.ends_with('\n') {
        learned.push('\n');
    }
    // seq 0: the candidate has no audit record yet.
    learned.push_str(&render_entry(Header { seq: 0, refines }, candidate));
    let after = decide_all(base, Some(&learned), scenarios, true)?;
    Ok(scenarios
        .iter()
        .zip(before.into_iter().zip(after))
        .enumerate()
        .filter(|(_, (_, (b, a)))| b != a)
        .map(|(index, (s, (before, after)))| Change {
            index,
            call: s.call.clone(),
            expect: s.expect,
            before,
            after,
            breaks: before == s.expect && after != s.expect,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "version 1\nlist contacts = [\"alice@example.com\"]\nallow mail.send when all to in @contacts\nask mail.send\ndefault deny\n";

    fn catalog() -> Catalog {
        Catalog::from_json(
            r#"{"tools":[{"name":"mail.send","inputSchema":{"type":"object","properties":{"to":{"type":"array","items":{"type":"string"}}},"required":["to"]},"roles":{"to":"email"}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_candidate_that_flips_a_settled_scenario_is_reported() {
        let cat = catalog();
        let base = Base {
            rules: RULES,
            rules_path: Path::new("p.rules"),
            learned: None,
            catalog: Some(&cat),
        };
        let s = parse_scenarios(
            "{\"call\":{\"tool\":\"mail.send\",\"args\":{\"to\":[\"alice@example.com\"]}},\"expect\":\"allow\"}\n\n\
             {\"call\":{\"tool\":\"mail.send\",\"args\":{\"to\":[\"mallory@evil.example\"]}},\"expect\":\"ask\"}\n\
             {\"call\":{\"tool\":\"mail.send\",\"args\":{\"to\":[\"carol@example.net\"]}},\"expect\":\"ask\"}\n",
        )
        .unwrap();
        // Learning "carol is fine" changes only carol's scenario.
        let c = changed_scenarios(
            &base,
            &s,
            "allow mail.send when all to in [\"carol@example.net\"]",
            4,
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].index, c[0].before, c[0].after, c[0].breaks),
            (2, Verdict::Ask, Verdict::Allow, true)
        );
        // Learning "allow anything" flips both asks.
        let c = changed_scenarios(&base, &s, "allow mail.send", 4).unwrap();
        assert_eq!(c.iter().map(|x| x.index).collect::<Vec<_>>(), [1, 2]);
        // A rule that changes nothing.
        let c = changed_scenarios(
            &base,
            &s,
            "deny mail.send when all to in [\"nobody@x.y\"]",
            4,
        )
        .unwrap();
        assert!(c.is_empty());
        // A candidate that refines no ask rule does not load.
        let e = changed_scenarios(&base, &s, "allow mail.send", 3).unwrap_err();
        assert!(e.to_string().contains("with the candidate rule"), "{e}");
        assert!(parse_scenarios("{\"call\":1}\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }
}
