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

/// One line of p.scenarios.jsonl: `{"call": {...}, "expect": "...", "note": "..."}`.
/// The call may say `"at"` (an RFC 3339 time): the moment `limit` windows see it,
/// as `ironvmm policy test` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestCase {
    pub call: Value,
    pub expect: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Its line in the file (1-based); 0 when it was not read from one.
    #[serde(skip)]
    pub line: usize,
}

impl TestCase {
    /// The call, and the time it is decided at (ms since 1970) when it says one.
    pub fn timed_call(&self) -> Result<(Call, Option<i64>), String> {
        let mut v = self.call.clone();
        let at = match v.as_object_mut().and_then(|o| o.remove("at")) {
            None => None,
            Some(Value::String(s)) => Some(parse_time(&s)?),
            Some(_) => return Err("`at` must be an RFC 3339 time string".into()),
        };
        let call = Call::from_json(&v).map_err(|e| e.to_string())?;
        Ok((call, at))
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`at`: {s:?} is not an RFC 3339 time: {e}"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// A scenario whose decision the candidate would change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// 0-based index in the scenarios given.
    pub index: usize,
    /// Its line in the scenarios file (0 when not read from one).
    pub line: usize,
    pub call: Value,
    /// What the scenario expects (the owner's English, as compiled).
    pub expect: Verdict,
    pub before: Verdict,
    pub after: Verdict,
    /// The scenario passed before and fails with the candidate.
    pub breaks: bool,
    pub note: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scenario line {}: {} would be {} instead of {} (expected {})",
            self.line, self.call, self.after, self.before, self.expect
        )?;
        if let Some(n) = &self.note {
            write!(f, " — {n}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LearnedCheckError {
    /// A caller names the file: `{path}:{this}`.
    #[error("{line}: {message}")]
    Scenario { line: usize, message: String },
    #[error("the policy does not load{}:\n{diagnostics}", if *.with_candidate { " with the candidate rule" } else { "" })]
    Load {
        with_candidate: bool,
        diagnostics: String,
    },
}

/// Reads p.scenarios.jsonl: blank lines and `#` comments skipped, every call
/// (and its `at`) checked here, so that a bad line is named before any rule is.
pub fn parse_scenarios(text: &str) -> Result<Vec<TestCase>, LearnedCheckError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| {
            let bad = |message: String| LearnedCheckError::Scenario {
                line: i + 1,
                message,
            };
            let mut t: TestCase = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
            t.timed_call().map_err(bad)?;
            t.line = i + 1;
            Ok(t)
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
    /// More paths invariant 3 protects besides p.rules (a running VM's own files),
    /// so that the check decides as the running policy does.
    pub protected: &'a [&'a str],
}

impl Base<'_> {
    /// The policy with `learned` as its learned rules, loaded afresh: its own
    /// `limit` counters, so checking never touches a running VM's.
    pub fn load(&self, learned: Option<&str>) -> Result<Policy, LearnedCheckError> {
        let name = self.rules_path.display().to_string();
        let learned_name = format!("{name}.learned");
        let dir = match self.rules_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let loaded = Policy::from_sources(
            &Sources {
                policy: self.rules,
                name: &name,
                base_dir: Some(dir),
                learned: learned
                    .filter(|t| !t.trim().is_empty())
                    .map(|t| (t, learned_name.as_str())),
            },
            self.catalog,
        )
        .map_err(|d| LearnedCheckError::Load {
            with_candidate: learned != self.learned,
            diagnostics: d.to_string(),
        })?;
        let mut policy = loaded.policy;
        policy.add_protected_path(self.rules_path);
        for p in self.protected {
            policy.add_protected_path(p);
        }
        Ok(policy)
    }
}

/// Every scenario decided in order by `policy`, each at its `at` when it has one.
fn decide_all(policy: &Policy, scenarios: &[TestCase]) -> Result<Vec<Verdict>, LearnedCheckError> {
    scenarios
        .iter()
        .map(|s| {
            let (call, at) = s
                .timed_call()
                .map_err(|message| LearnedCheckError::Scenario {
                    line: s.line,
                    message,
                })?;
            Ok(match at {
                Some(ms) => policy.decide_at(&call, ms),
                None => policy.decide(&call),
            }
            .verdict)
        })
        .collect()
}

/// `learned` with one more entry: `rule`, refining the `ask` rule on line `refines`,
/// headed by the audit `seq` of the answer it came from.
pub fn with_entry(learned: Option<&str>, seq: u64, refines: u32, rule: &str) -> String {
    let mut text = learned.unwrap_or("").to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&render_entry(Header { seq, refines }, rule));
    text
}

/// The scenarios whose decision `candidate` (one `allow` or `deny` rule, refining the
/// `ask` rule on line `refines` of p.rules) would change, in order.
pub fn changed_scenarios(
    base: &Base,
    scenarios: &[TestCase],
    candidate: &str,
    refines: u32,
) -> Result<Vec<Change>, LearnedCheckError> {
    let before = decide_all(&base.load(base.learned)?, scenarios)?;
    // seq 0: the candidate has no audit record yet.
    let learned = with_entry(base.learned, 0, refines, candidate);
    let after = decide_all(&base.load(Some(&learned))?, scenarios)?;
    Ok(scenarios
        .iter()
        .zip(before.into_iter().zip(after))
        .enumerate()
        .filter(|(_, (_, (b, a)))| b != a)
        .map(|(index, (s, (before, after)))| Change {
            index,
            line: s.line,
            call: s.call.clone(),
            expect: s.expect,
            before,
            after,
            breaks: before == s.expect && after != s.expect,
            note: s.note.clone(),
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
            protected: &[],
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

    /// The scenarios approvals checks a learned rule against say `at` (limit
    /// windows), carry notes and comments: the check reads them as `policy test` does.
    #[test]
    fn scenarios_with_at_notes_and_comments_are_decided_at_their_time() {
        let cat = catalog();
        let rules = "version 1\nallow mail.send when all to in [\"alice@example.com\"] limit 1 per hour\nask mail.send\n";
        let base = Base {
            rules,
            rules_path: Path::new("p.rules"),
            learned: None,
            catalog: Some(&cat),
            protected: &[],
        };
        let alice = |at: &str| {
            format!("{{\"call\":{{\"tool\":\"mail.send\",\"args\":{{\"to\":[\"alice@example.com\"]}},\"at\":\"{at}\"}},\"expect\":\"allow\"}}")
        };
        let text = format!(
            "# the limit: one an hour\n{}\n{}\n{{\"call\":{{\"tool\":\"mail.send\",\"args\":{{\"to\":[\"carol@example.net\"]}}}},\"expect\":\"ask\",\"note\":\"a stranger\"}}\n",
            alice("2026-01-01T10:00:00Z"),
            alice("2026-01-01T12:00:00Z"),
        );
        let s = parse_scenarios(&text).unwrap();
        assert_eq!(s.iter().map(|t| t.line).collect::<Vec<_>>(), [2, 3, 4]);
        // Two hours apart, both sends to alice fit the limit: nothing changes for
        // them; the stranger's scenario flips and its note and line come along.
        let c = changed_scenarios(&base, &s, "allow mail.send", 3).unwrap();
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(
            (c[0].line, c[0].note.as_deref(), c[0].after),
            (4, Some("a stranger"), Verdict::Allow)
        );
        assert!(
            c[0].to_string().starts_with("scenario line 4: "),
            "{}",
            c[0]
        );
        // A bad `at` is named with its line before any rule is checked.
        let e = parse_scenarios(&alice("yesterday")).unwrap_err();
        assert!(e.to_string().starts_with("1: `at`"), "{e}");
    }
}
