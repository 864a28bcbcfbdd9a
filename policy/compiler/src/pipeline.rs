//! The whole compile: catalog → lists → draft → scenarios → verify → emit, each step
//! leaving its artifact in `<stem>.compile/` next to the output, whatever happens
//! later. Lists come before the draft (the issue lists them after it) because the
//! engine refuses a draft that names an undeclared list, and the draft must be checked
//! by the real engine.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::ask::{ask_json, StepError};
use crate::cache::sha256_hex;
use crate::catalog_view::CatalogView;
use crate::draft::{self, Context};
use crate::emit::Header;
use crate::engine::RuleEngine;
use crate::inputs::{self, Inputs};
use crate::lists::{self, ListError, ListsAnswer};
use crate::llm::{Completer, LlmError, Message};
use crate::prompts::{self, PROMPT_VERSION};
use crate::report::{Report, Status};
use crate::scenarios;
use crate::sentences;
use crate::verify;

/// Bounds that keep every prompt a reasonable size.
const MAX_CONSTITUTION: usize = 64 * 1024;
const MAX_SENTENCES: usize = 300;

/// Where a compile writes, all derived from the output path (`-o p.rules`).
#[derive(Debug, Clone)]
pub struct Paths {
    pub out: PathBuf,
    pub dir: PathBuf,
    pub stem: String,
    /// Step artifacts and the exchange log: `<stem>.compile/`.
    pub work: PathBuf,
    pub scenarios: PathBuf,
    pub report: PathBuf,
    /// Where rules that did not verify are written instead of `out`.
    pub unverified: PathBuf,
    /// The report and scenarios of a run that did not verify: they never overwrite
    /// those of the good p.rules beside them.
    pub report_unverified: PathBuf,
    pub scenarios_unverified: PathBuf,
    pub llm_log: PathBuf,
    /// The default cache folder.
    pub cache: PathBuf,
}

impl Paths {
    pub fn new(out: &Path) -> Paths {
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = out
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "p.rules".into());
        let stem = out
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "p".into());
        let work = dir.join(format!("{stem}.compile"));
        Paths {
            out: out.to_path_buf(),
            scenarios: dir.join(format!("{stem}.scenarios.jsonl")),
            report: dir.join(format!("{stem}.report.md")),
            unverified: dir.join(format!("{file}.unverified")),
            report_unverified: dir.join(format!("{stem}.report.unverified.md")),
            scenarios_unverified: dir.join(format!("{stem}.scenarios.unverified.jsonl")),
            llm_log: work.join("llm-exchanges.jsonl"),
            cache: work.join("cache"),
            work,
            dir,
            stem,
        }
    }
}

/// The inputs of one compile.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// Shown in the header and report (a file name, so output does not depend on
    /// where the command ran).
    pub source_name: String,
    pub constitution: String,
    pub catalog_text: String,
    /// Lists bound to a service: name → file with its values.
    pub list_sources: BTreeMap<String, PathBuf>,
    pub out: PathBuf,
    /// Repairs per step (bad JSON, rejected answer, engine diagnostics).
    pub max_repairs: u32,
    /// Judge-and-repair rounds of verification.
    pub max_rounds: u32,
    /// Scenario ids whose held judge corrections the owner accepts (`--accept`).
    pub accept: Vec<String>,
    /// The inputs of the compile that filled the cache, for explaining an
    /// `--offline` miss.
    pub cached_inputs: Option<Inputs>,
}

#[derive(Debug)]
pub struct CompileResult {
    pub status: Status,
    /// One line for the terminal.
    pub summary: String,
    pub paths: Paths,
    /// What this compile was made from (the driver records it beside the cache).
    pub inputs: Inputs,
}

struct Failure {
    status: Status,
    step: &'static str,
    message: String,
}

impl Failure {
    fn step(step: &'static str, e: StepError, opts: &CompileOptions, now: &Inputs) -> Failure {
        let status = match &e {
            StepError::Llm(LlmError::Io(_)) => Status::BadInput,
            StepError::Llm(_) => Status::LlmUnavailable,
            StepError::GaveUp { .. } => Status::Unverified,
        };
        let mut message = e.to_string();
        if let StepError::Llm(LlmError::Offline { .. }) = &e {
            message = format!(
                "{message}: {}",
                inputs::explain_miss(now, opts.cached_inputs.as_ref())
            );
        }
        Failure {
            status,
            step,
            message,
        }
    }
    fn input(step: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status: Status::BadInput,
            step,
            message: message.into(),
        }
    }
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), Failure> {
    fs::write(path, bytes)
        .map_err(|e| Failure::input("emit", format!("writing {}: {e}", path.display())))
}

fn pretty(v: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Runs every step. Artifacts are written even when a step fails; the result's status
/// says how far it got. Only an unwritable output folder is an `Err`.
pub fn compile(
    opts: &CompileOptions,
    llm: &mut dyn Completer,
    engine: &dyn RuleEngine,
) -> std::io::Result<CompileResult> {
    let paths = Paths::new(&opts.out);
    fs::create_dir_all(&paths.work)?;
    let now = Inputs::new(
        &opts.constitution,
        &opts.catalog_text,
        &opts.list_sources,
        llm.model_id(),
        PROMPT_VERSION,
    );
    let mut rep = Report {
        source_name: opts.source_name.clone(),
        rules_name: paths
            .out
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        constitution_sha256: sha256_hex(opts.constitution.as_bytes()),
        catalog_sha256: sha256_hex(opts.catalog_text.as_bytes()),
        model: llm.model_id(),
        prompt_version: PROMPT_VERSION.into(),
        ..Default::default()
    };
    let (status, summary) = match steps(opts, &paths, llm, engine, &mut rep, &now) {
        Ok(status) => {
            let summary = match status {
                Status::Verified => format!(
                    "{} verified: {} scenarios pass ({} written by the model, {} derived); wrote {} and {}",
                    paths.out.display(),
                    rep.scenario_count + rep.derived_count,
                    rep.scenario_count,
                    rep.derived_count,
                    paths.out.display(),
                    paths.scenarios.display()
                ),
                Status::Held => format!(
                    "HELD for the owner: the judge would give the agent more than the scenario{} {} say{}; \
                     unverified rules in {}; see {} (`--accept ID` applies a correction)",
                    if rep.held_open().len() == 1 { "" } else { "s" },
                    rep.held_open().join(", "),
                    if rep.held_open().len() == 1 { "s" } else { "" },
                    paths.unverified.display(),
                    paths.report_unverified.display()
                ),
                _ => format!(
                    "NOT verified: {}; unverified rules in {}; see {}",
                    rep.unverified_reason(),
                    paths.unverified.display(),
                    paths.report_unverified.display()
                ),
            };
            (status, summary)
        }
        Err(f) => {
            let summary = format!(
                "compile failed at step '{}': {} (report: {})",
                f.step,
                f.message,
                paths.report_unverified.display()
            );
            rep.failure = Some((f.step.to_string(), f.message));
            (f.status, summary)
        }
    };
    let report = if status == Status::Verified {
        // A stale failure report from an earlier run would only confuse.
        let _ = fs::remove_file(&paths.report_unverified);
        &paths.report
    } else {
        &paths.report_unverified
    };
    fs::write(report, rep.render(status))?;
    Ok(CompileResult {
        status,
        summary,
        paths,
        inputs: now,
    })
}

fn steps(
    opts: &CompileOptions,
    paths: &Paths,
    llm: &mut dyn Completer,
    engine: &dyn RuleEngine,
    rep: &mut Report,
    now: &Inputs,
) -> Result<Status, Failure> {
    let step_err = |step: &'static str, e: StepError| Failure::step(step, e, opts, now);
    // 1. Catalog (and the sentences every later step refers to).
    let catalog =
        CatalogView::parse(&opts.catalog_text).map_err(|e| Failure::input("catalog", e))?;
    write(&paths.work.join("catalog.json"), &opts.catalog_text)?;
    if opts.constitution.len() > MAX_CONSTITUTION {
        return Err(Failure::input(
            "catalog",
            format!("{} is over {MAX_CONSTITUTION} bytes", opts.source_name),
        ));
    }
    let sentences = sentences::split(&opts.constitution);
    if sentences.is_empty() {
        return Err(Failure::input(
            "catalog",
            format!("{} states nothing: no sentence found", opts.source_name),
        ));
    }
    if sentences.len() > MAX_SENTENCES {
        return Err(Failure::input(
            "catalog",
            format!(
                "{} has {} sentences, over the {MAX_SENTENCES} one compile handles: split the policy",
                opts.source_name,
                sentences.len()
            ),
        ));
    }
    write(
        &paths.work.join("sentences.txt"),
        sentences::numbered(&sentences),
    )?;
    rep.sentences = sentences.clone();

    // 2. Lists.
    let user = format!(
        "The owner's English, sentence by sentence:\n\n{}\nLists the owner's services provide: {}\n",
        sentences::numbered(&sentences),
        if opts.list_sources.is_empty() {
            "none".to_string()
        } else {
            opts.list_sources.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    );
    let asked = ask_json(
        llm,
        "lists",
        prompts::lists_system(),
        vec![Message::user(user)],
        opts.max_repairs,
        |a: &ListsAnswer| lists::validate(a, &sentences, &opts.list_sources),
    )
    .map_err(|e| step_err("lists", e))?;
    rep.steps.push(format!(
        "lists: {} tr{}",
        asked.tries,
        if asked.tries == 1 { "y" } else { "ies" }
    ));
    let specs = asked.value.lists;
    rep.list_notes = specs
        .iter()
        .filter(|l| !l.note.is_empty())
        .map(|l| format!("list @{}: {}", l.name, l.note))
        .collect();
    let resolved = lists::resolve(
        &specs,
        &sentences,
        &opts.list_sources,
        &paths.dir,
        &paths.stem,
    );
    write(
        &paths.work.join("lists.json"),
        pretty(&json!({"proposed": specs, "resolved": resolved.as_ref().ok()})),
    )?;
    let resolved = resolved.map_err(|e: ListError| Failure::input("lists", e.to_string()))?;
    rep.lists = resolved.clone();
    rep.list_sources = opts.list_sources.clone();

    // 3. Draft, checked by the engine.
    let lists_material: String = resolved
        .iter()
        .map(|l| format!("{}\0{}\n", l.spec.name, l.sha256))
        .collect();
    let header = Header {
        source_name: opts.source_name.clone(),
        constitution_sha256: rep.constitution_sha256.clone(),
        catalog_sha256: rep.catalog_sha256.clone(),
        lists_sha256: sha256_hex(lists_material.as_bytes()),
        model: llm.model_id(),
        prompt_version: PROMPT_VERSION.into(),
    };
    let ctx = Context {
        sentences: &sentences,
        catalog: &catalog,
        lists: &resolved,
        header: &header,
        rules_path: &paths.out,
        engine,
    };
    let checked = draft::draft(llm, &ctx, opts.max_repairs).map_err(|e| step_err("draft", e))?;
    rep.steps.push(format!(
        "draft: {} tr{}, {} rules{}",
        checked.tries,
        if checked.tries == 1 { "y" } else { "ies" },
        checked.draft.rules.len(),
        if checked.rejected.is_empty() {
            String::new()
        } else {
            format!("; {} rejected answer(s) repaired", checked.rejected.len())
        }
    ));
    write(&paths.work.join("draft.json"), pretty(&checked.draft))?;
    write(&paths.work.join("draft.rules"), &checked.assembled.text)?;

    // 4. Scenarios, from the English alone.
    let written = scenarios::write(llm, &sentences, &catalog, &resolved, opts.max_repairs)
        .map_err(|e| step_err("scenarios", e))?;
    rep.steps.push(format!(
        "scenarios: {} tr{}, {} scenarios",
        written.tries,
        if written.tries == 1 { "y" } else { "ies" },
        written.scenarios.len()
    ));
    let lines: String = written
        .scenarios
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default() + "\n")
        .collect();
    write(&paths.work.join("scenarios.jsonl"), lines)?;
    rep.uncovered = written.uncovered.clone();
    let mut scenario_list = written.scenarios;

    // 4b. A sentence declared to state no policy is read again, framed differently.
    if !written.uncovered.is_empty() {
        let again = scenarios::recheck(
            llm,
            &sentences,
            &catalog,
            &resolved,
            &written.uncovered,
            scenario_list.len() + 1,
            opts.max_repairs,
        )
        .map_err(|e| step_err("recheck", e))?;
        rep.steps.push(format!(
            "recheck: {} tr{}, {} of {} sentence(s) declared to state no policy do state policy on a second reading",
            again.tries,
            if again.tries == 1 { "y" } else { "ies" },
            again.disputes.len(),
            written.uncovered.len()
        ));
        write(
            &paths.work.join("recheck.json"),
            pretty(&json!({"disputes": again.disputes, "scenarios": again.scenarios})),
        )?;
        rep.uncovered
            .retain(|u| !again.disputes.iter().any(|d| d.sentence == u.sentence));
        rep.coverage_disputes = again.disputes;
        scenario_list.extend(again.scenarios);
    }

    // 5. Verify.
    let v = verify::verify(
        llm,
        &ctx,
        checked,
        scenario_list,
        &verify::Settings {
            max_rounds: opts.max_rounds,
            max_repairs: opts.max_repairs,
            accept: &opts.accept,
        },
    );
    write(
        &paths.work.join("verify.json"),
        pretty(&json!({"rounds": v.rounds, "remaining": v.remaining, "held": v.held})),
    )?;
    let lines: String = v
        .derived
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default() + "\n")
        .collect();
    write(&paths.work.join("derived.jsonl"), lines)?;
    rep.steps.push(format!(
        "verify: {} judge-and-repair round(s) of at most {}{}",
        v.rounds.len(),
        opts.max_rounds,
        if v.stalled {
            "; stopped early: a redraft changed nothing"
        } else {
            ""
        }
    ));
    rep.scenario_count = v.scenarios.len();
    rep.derived_count = v.derived.len();
    rep.per_sentence = sentences
        .iter()
        .map(|s| {
            (
                s.n,
                v.scenarios.iter().filter(|x| x.sentence == s.n).count(),
                v.derived.iter().filter(|x| x.sentence == s.n).count(),
            )
        })
        .collect();
    rep.fixes = v
        .rounds
        .iter()
        .flat_map(|r| r.scenario_fixes.clone())
        .collect();
    rep.held = v.held.clone();
    rep.unused_accepts = v.unused_accepts.clone();
    rep.repaired_rounds = v
        .rounds
        .iter()
        .filter(|r| r.rules_repaired)
        .map(|r| r.round)
        .collect();
    rep.disputed = v.remaining.clone();
    rep.assumptions = v.checked.draft.assumptions.clone();
    rep.unsourced_rules = v
        .checked
        .draft
        .rules
        .iter()
        .filter(|r| r.sentence == 0)
        .map(|r| r.rule.trim().to_string())
        .collect();
    rep.unexercised = v
        .checked
        .draft
        .rules
        .iter()
        .zip(&v.checked.assembled.rule_lines)
        .filter(|(_, l)| !v.exercised.contains(l))
        .map(|(r, l)| (*l, r.rule.trim().to_string()))
        .collect();
    rep.broad = draft::check_broad(&v.checked.draft, &sentences).unwrap_or_default();
    rep.warnings = v.checked.warnings.clone();

    // 6. Emit. p.rules, and the scenarios and report beside it, only when verified;
    // otherwise `.unverified` files, so a good p.rules keeps its own.
    let lines: String = v.scenarios.iter().map(|s| s.test_line() + "\n").collect();
    let verified =
        v.remaining.is_empty() && v.failure.is_none() && rep.coverage_disputes.is_empty();
    if verified {
        write(&paths.scenarios, lines)?;
        write(&paths.out, &v.checked.assembled.text)?;
        // Stale unverified files from an earlier run would only confuse.
        let _ = fs::remove_file(&paths.unverified);
        let _ = fs::remove_file(&paths.scenarios_unverified);
    } else {
        write(&paths.scenarios_unverified, lines)?;
        write(&paths.unverified, &v.checked.assembled.text)?;
    }
    let only_held = v.only_held();
    if let Some(e) = v.failure {
        return Err(step_err("verify", e));
    }
    if !verified && only_held && rep.coverage_disputes.is_empty() {
        return Ok(Status::Held);
    }
    Ok(if verified {
        Status::Verified
    } else {
        Status::Unverified
    })
}
