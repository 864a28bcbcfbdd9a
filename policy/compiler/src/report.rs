//! The short report a compile leaves for the owner: what was assumed, what is still
//! disputed, what to review. It holds nothing that changes from run to run (no times,
//! no cache counts), so a replayed compile writes the same bytes.

use std::fmt::Write as _;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::draft::Broad;
use crate::lists::{Binding, ResolvedList};
use crate::scenarios::{CoverageDispute, Uncovered};
use crate::sentences::Sentence;
use crate::verify::{Disagreement, Fix, Held};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every scenario passes; p.rules was written.
    Verified,
    /// The pipeline ran but the rules are not verified; p.rules was not written.
    Unverified,
    /// The input or the configuration is wrong (nothing the model can fix).
    BadInput,
    /// The model could not be reached, or --offline found no cached answer.
    LlmUnavailable,
    /// Only judge corrections that would widen what the agent may do stand between
    /// the rules and verification: the owner decides (`--accept SCENARIO`).
    Held,
}

impl Status {
    /// The exit code of `ironvmm policy compile` (docs/policy-compiler.md).
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Verified => 0,
            Status::Unverified => 1,
            Status::BadInput => 2,
            Status::LlmUnavailable => 3,
            Status::Held => 4,
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub source_name: String,
    pub rules_name: String,
    pub constitution_sha256: String,
    pub catalog_sha256: String,
    pub model: String,
    pub prompt_version: String,
    pub sentences: Vec<Sentence>,
    pub lists: Vec<ResolvedList>,
    pub list_notes: Vec<String>,
    pub assumptions: Vec<String>,
    pub unsourced_rules: Vec<String>,
    pub uncovered: Vec<Uncovered>,
    pub warnings: Vec<String>,
    pub steps: Vec<String>,
    pub scenario_count: usize,
    pub fixes: Vec<Fix>,
    pub repaired_rounds: Vec<u32>,
    pub disputed: Vec<Disagreement>,
    /// The owner's list files, by list name.
    pub list_sources: BTreeMap<String, PathBuf>,
    pub derived_count: usize,
    /// Per sentence: (number, written scenarios, derived scenarios).
    pub per_sentence: Vec<(usize, usize, usize)>,
    pub held: Vec<Held>,
    pub unused_accepts: Vec<String>,
    pub coverage_disputes: Vec<CoverageDispute>,
    /// Rules no scenario exercised: (line, rule).
    pub unexercised: Vec<(u32, String)>,
    pub broad: Vec<Broad>,
    /// The one-line reason for a failure, and the step it happened in.
    pub failure: Option<(String, String)>,
}

impl Report {
    /// Ids of held corrections still disputed.
    pub fn held_open(&self) -> Vec<String> {
        self.held
            .iter()
            .filter(|h| self.disputed.iter().any(|d| d.id == h.id))
            .map(|h| h.id.clone())
            .collect()
    }

    /// Why a compile that ran to the end is not verified, in one line.
    pub fn unverified_reason(&self) -> String {
        let mut r = Vec::new();
        if !self.disputed.is_empty() {
            r.push(format!(
                "{} of {} scenarios still disagree with the rules",
                self.disputed.len(),
                self.scenario_count + self.derived_count
            ));
        }
        if !self.coverage_disputes.is_empty() {
            r.push(format!(
                "{} sentence(s) declared to state no policy state policy on a second reading ({})",
                self.coverage_disputes.len(),
                self.coverage_disputes
                    .iter()
                    .map(|c| format!("S{}", c.sentence))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if r.is_empty() {
            "verification did not finish".into()
        } else {
            r.join("; ")
        }
    }

    fn sentence_text(&self, n: usize) -> &str {
        self.sentences
            .get(n.wrapping_sub(1))
            .map(|s| s.text.as_str())
            .unwrap_or("")
    }

    pub fn render(&self, status: Status) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Compile report: {} → {}\n",
            self.source_name, self.rules_name
        );
        let headline = match (status, &self.failure) {
            (Status::Verified, _) => format!(
                "**VERIFIED.** All {} scenarios pass on the compiled rules ({} written from the English, \
                 {} derived by the compiler); {} was written.",
                self.scenario_count + self.derived_count,
                self.scenario_count,
                self.derived_count,
                self.rules_name
            ),
            (_, Some((step, why))) => format!(
                "**FAILED** at step `{step}`: {why}\n\n{} was not written.",
                self.rules_name
            ),
            (Status::Held, None) => format!(
                "**HELD FOR THE OWNER.** The judge would give the agent more than the English-only \
                 scenario(s) {} say (see *Held for the owner*). {} was not written; the unverified rules \
                 are in {}.unverified. Rerun with `--accept ID` to apply a correction you agree with.",
                self.held_open().join(", "),
                self.rules_name,
                self.rules_name
            ),
            (_, None) => format!(
                "**NOT VERIFIED.** {} (see *Still disputed* and *Coverage*). {} was not written; the \
                 unverified rules are in {}.unverified.",
                self.unverified_reason(),
                self.rules_name,
                self.rules_name
            ),
        };
        let _ = writeln!(s, "{headline}\n");
        let _ = writeln!(s, "## Sources\n");
        let _ = writeln!(
            s,
            "- constitution: `{}` sha256 `{}`",
            self.source_name, self.constitution_sha256
        );
        let _ = writeln!(s, "- catalog sha256 `{}`", self.catalog_sha256);
        let _ = writeln!(
            s,
            "- model `{}`, prompts `{}`\n",
            self.model, self.prompt_version
        );
        if !self.sentences.is_empty() {
            let _ = writeln!(s, "## Sentences\n");
            for x in &self.sentences {
                let _ = writeln!(s, "- S{}: {}", x.n, x.text);
            }
            s.push('\n');
        }
        if !self.lists.is_empty() {
            let _ = writeln!(s, "## Lists\n");
            for l in &self.lists {
                let from = match l.spec.binding {
                    Binding::Service if self.list_sources.contains_key(&l.spec.name) => format!(
                        "the owner's file for the {} service (`--list` or `[lists]`)",
                        l.spec.service.as_deref().unwrap_or("?")
                    ),
                    Binding::Service => format!(
                        "from the {} service",
                        l.spec.service.as_deref().unwrap_or("?")
                    ),
                    Binding::Owner => "proposed by the model: **review it**".into(),
                };
                let _ = writeln!(
                    s,
                    "- `@{}` ({} list, S{}): `{}`, {} entries, {from}",
                    l.spec.name,
                    l.spec.kind.as_str(),
                    l.spec.sentence,
                    l.decl_path,
                    l.values.len()
                );
            }
            s.push('\n');
        }
        if !self.broad.is_empty() {
            let _ = writeln!(s, "## Broad permissions\n");
            for b in &self.broad {
                let _ = writeln!(
                    s,
                    "- `{}`, granted by S{}: \"{}\" (\"{}\")",
                    b.what,
                    b.sentence,
                    self.sentence_text(b.sentence),
                    b.phrase
                );
            }
            s.push('\n');
        }
        let _ = writeln!(s, "## What was assumed\n");
        let mut any = false;
        for a in self.assumptions.iter().chain(&self.list_notes) {
            let _ = writeln!(s, "- {a}");
            any = true;
        }
        for u in &self.uncovered {
            let _ = writeln!(
                s,
                "- S{} states no policy, so no scenario tests it: {}",
                u.sentence, u.why
            );
            any = true;
        }
        for r in &self.unsourced_rules {
            let _ = writeln!(s, "- the rule `{r}` is not stated by any sentence");
            any = true;
        }
        if !any {
            let _ = writeln!(s, "- nothing beyond the English");
        }
        s.push('\n');
        let _ = writeln!(s, "## What the owner should review\n");
        let mut any = false;
        for l in self
            .lists
            .iter()
            .filter(|l| l.spec.binding == Binding::Owner)
        {
            let _ = writeln!(s, "- the entries of `{}`", l.decl_path);
            any = true;
        }
        for f in &self.fixes {
            let call = if f.call_before == f.call_after {
                String::new()
            } else {
                format!(", call {} → {}", f.call_before, f.call_after)
            };
            let _ = writeln!(
                s,
                "- scenario {} (S{}) was judged wrong and corrected{}: expect {} → {}{call}. Judge: {}",
                f.id,
                f.sentence,
                if f.accepted {
                    " (it gives the agent more: applied because you passed `--accept`)"
                } else {
                    ""
                },
                f.expect_before,
                f.expect_after,
                f.why
            );
            any = true;
        }
        for h in self
            .held
            .iter()
            .filter(|h| !self.disputed.iter().any(|d| d.id == h.id))
        {
            let _ = writeln!(
                s,
                "- the judge would have read scenario {} (S{}) as {} rather than {}; that gives the agent more, so \
                 it was not applied and the rules were repaired to follow the scenario. Judge: {}",
                h.id, h.sentence, h.proposed_expect, h.expect, h.why
            );
            any = true;
        }
        for a in &self.unused_accepts {
            let _ = writeln!(
                s,
                "- `--accept {a}` matched no held correction and changed nothing"
            );
            any = true;
        }
        for r in &self.repaired_rounds {
            let _ = writeln!(s, "- the rules were redrafted in verification round {r} (see the compile folder's verify.json)");
            any = true;
        }
        for w in &self.warnings {
            let _ = writeln!(s, "- engine warning: {}", w.replace('\n', " "));
            any = true;
        }
        if !any && status == Status::Verified {
            let _ = writeln!(s, "- nothing in particular: read the rules once");
        } else if status == Status::Held {
            let _ = writeln!(
                s,
                "- decide each correction under *Held for the owner*: `--accept ID` applies it"
            );
        } else if !any {
            let _ = writeln!(
                s,
                "- the compile did not verify: see the headline, *Still disputed* and *Coverage*"
            );
        }
        s.push('\n');
        if !self.held.is_empty() && !self.held_open().is_empty() {
            let _ = writeln!(s, "## Held for the owner\n");
            for h in self
                .held
                .iter()
                .filter(|h| self.disputed.iter().any(|d| d.id == h.id))
            {
                let d = self.disputed.iter().find(|d| d.id == h.id);
                let _ = writeln!(
                    s,
                    "- **{}** (S{}: \"{}\")\n  - call: `{}`\n  - the scenario, written from the English: **{}**\n  \
                     - the judge: **{}**{}. Judge: {}\n  - the rules now decide: **{}**{}\n  - `--accept {}` applies the judge's reading",
                    h.id,
                    h.sentence,
                    self.sentence_text(h.sentence),
                    h.call,
                    h.expect,
                    h.proposed_expect,
                    h.proposed_call
                        .as_ref()
                        .map(|c| format!(", with the call rewritten to `{c}`"))
                        .unwrap_or_default(),
                    h.why,
                    d.map(|d| d.got.as_str()).unwrap_or("?"),
                    d.and_then(|d| d.rule_text.as_deref())
                        .map(|t| format!(" (`{t}`)"))
                        .unwrap_or_default(),
                    h.id
                );
            }
            s.push('\n');
        }
        let _ = writeln!(s, "## Coverage\n");
        for (n, w, d) in &self.per_sentence {
            let declared = self.uncovered.iter().find(|u| u.sentence == *n);
            match declared {
                Some(_) if *w == 0 => {
                    let _ = writeln!(
                        s,
                        "- S{n}: no scenarios (states no policy, on two readings)"
                    );
                }
                _ => {
                    let _ = writeln!(s, "- S{n}: {w} written, {d} derived");
                }
            }
        }
        for c in &self.coverage_disputes {
            let _ = writeln!(
                s,
                "- **S{} was declared to state no policy** (\"{}\"), **but a second reading says it does** \
                 (\"{}\"): the two readings disagree, so the compile does not count as verified; make the sentence \
                 plainer",
                c.sentence, c.first, c.second
            );
        }
        if self.unexercised.is_empty() {
            let _ = writeln!(s, "- every rule decided at least one scenario");
        }
        for (l, r) in &self.unexercised {
            let _ = writeln!(s, "- no scenario exercised line {l}: `{r}`");
        }
        s.push('\n');
        let _ = writeln!(s, "## Still disputed\n");
        if self.disputed.is_empty() {
            let _ = writeln!(s, "- none");
        }
        for d in &self.disputed {
            let _ = writeln!(
                s,
                "- {} (S{}{}): {} — the scenario expects {}**{}**, the rules decide **{}** ({}{})",
                d.id,
                d.sentence,
                d.derived
                    .as_ref()
                    .map(|x| format!(", derived from {}: {}", x.from, x.how))
                    .unwrap_or_default(),
                d.call,
                match d.derived.as_ref().map(|x| x.bound) {
                    Some(crate::derive::Bound::AtMost) => "at most ",
                    _ => "",
                },
                d.expect,
                d.got,
                d.rule
                    .map(|l| format!("line {l}"))
                    .unwrap_or_else(|| d.by.to_string()),
                d.rule_text
                    .as_deref()
                    .map(|t| format!(": `{t}`"))
                    .unwrap_or_default()
            );
        }
        s.push('\n');
        let _ = writeln!(s, "## Steps\n");
        for st in &self.steps {
            let _ = writeln!(s, "- {st}");
        }
        s
    }
}
