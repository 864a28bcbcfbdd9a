//! The short report a compile leaves for the owner: what was assumed, what is still
//! disputed, what to review. It holds nothing that changes from run to run (no times,
//! no cache counts), so a replayed compile writes the same bytes.

use std::fmt::Write as _;

use crate::lists::{Binding, ResolvedList};
use crate::scenarios::Uncovered;
use crate::sentences::Sentence;
use crate::verify::{Disagreement, Fix};

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
}

impl Status {
    /// The exit code of `ironvmm policy compile` (docs/policy-compiler.md).
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Verified => 0,
            Status::Unverified => 1,
            Status::BadInput => 2,
            Status::LlmUnavailable => 3,
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
    /// The one-line reason for a failure, and the step it happened in.
    pub failure: Option<(String, String)>,
}

impl Report {
    pub fn render(&self, status: Status) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Compile report: {} → {}\n",
            self.source_name, self.rules_name
        );
        let headline = match (status, &self.failure) {
            (Status::Verified, _) => format!(
                "**VERIFIED.** All {} scenarios pass on the compiled rules; {} was written.",
                self.scenario_count, self.rules_name
            ),
            (_, Some((step, why))) => format!(
                "**FAILED** at step `{step}`: {why}\n\n{} was not written.",
                self.rules_name
            ),
            (_, None) => format!(
                "**NOT VERIFIED.** {} scenario(s) still disagree with the rules (see *Still disputed*). \
                 {} was not written; the unverified rules are in {}.unverified.",
                self.disputed.len(),
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
                    Binding::Service => format!(
                        "from the {} service",
                        l.spec.service.as_deref().unwrap_or("?")
                    ),
                    Binding::Owner => "proposed by the model: **review it**".into(),
                };
                let _ = writeln!(
                    s,
                    "- `@{}` (S{}): `{}`, {} entries, {from}",
                    l.spec.name,
                    l.spec.sentence,
                    l.decl_path,
                    l.values.len()
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
                "- scenario {} (S{}) was judged wrong and corrected: expect {} → {}{call}. Judge: {}",
                f.id, f.sentence, f.expect_before, f.expect_after, f.why
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
        if !any {
            let _ = writeln!(s, "- nothing in particular: read the rules once");
        }
        s.push('\n');
        let _ = writeln!(s, "## Still disputed\n");
        if self.disputed.is_empty() {
            let _ = writeln!(s, "- none");
        }
        for d in &self.disputed {
            let _ = writeln!(
                s,
                "- {} (S{}): {} — the scenario expects **{}**, the rules decide **{}** ({}{})",
                d.id,
                d.sentence,
                d.call,
                d.expect,
                d.got,
                d.rule
                    .map(|l| format!("line {l}"))
                    .unwrap_or_else(|| d.by.clone()),
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
