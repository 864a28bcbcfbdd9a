//! What `ironvmm policy compile` and `ironvmm policy refine` do, from parsed flags to
//! an exit code. The clap definitions live in the ironvmm binary; this module holds the
//! behaviour so that it can be tested with its own environment and terminal.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::config::{ConfigError, FileConfig, LlmSettings};
use crate::engine_impl::PolicyEngine;
use crate::exchange_log::ExchangeLog;
use crate::inputs::Inputs;
use crate::llm::Llm;
use crate::pipeline::{self, CompileOptions, Paths};
use crate::prompts::PROMPT_VERSION;
use crate::refine::{self, RefineInput};
use crate::report::Status;

pub const DEFAULT_MAX_REPAIRS: u32 = 3;
pub const DEFAULT_MAX_ROUNDS: u32 = 3;

/// The flags both commands share.
#[derive(Debug, Clone, Default)]
pub struct Common {
    pub constitution: PathBuf,
    pub out: PathBuf,
    pub catalog: Option<PathBuf>,
    /// A catalog given as text (`--catalog builtin`); wins over the configuration's.
    pub catalog_text: Option<String>,
    /// The catalog used when neither a file nor the configuration names one.
    pub fallback_catalog_text: Option<String>,
    pub config: Option<PathBuf>,
    /// `--list NAME=FILE`, for lists bound to a service.
    pub lists: Vec<(String, PathBuf)>,
    pub offline: bool,
    pub cache_dir: Option<PathBuf>,
    /// `--provider`, `--model`, `--base-url`: override config and environment.
    pub llm: LlmSettings,
    pub max_repairs: Option<u32>,
    pub max_rounds: Option<u32>,
    /// `--accept SCENARIO`: apply the judge's held correction of that scenario.
    pub accept: Vec<String>,
}

/// How `refine` learns whether the owner accepts the proposed edits.
pub trait Confirm {
    /// `None`: nobody can be asked (not a terminal, no `--accept`).
    fn confirm(&mut self, question: &str) -> Option<bool>;
}

/// `--accept`: yes without asking.
pub struct AcceptAll;
impl Confirm for AcceptAll {
    fn confirm(&mut self, _: &str) -> Option<bool> {
        Some(true)
    }
}

/// Nobody to ask.
pub struct NoOne;
impl Confirm for NoOne {
    fn confirm(&mut self, _: &str) -> Option<bool> {
        None
    }
}

struct Prepared {
    opts: CompileOptions,
    llm: Llm,
    engine: PolicyEngine,
    paths: Paths,
    cache_dir: PathBuf,
    offline: bool,
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn prepare(
    c: &Common,
    env: &dyn Fn(&str) -> Option<String>,
    log_name: &str,
) -> Result<Prepared, String> {
    let constitution = read(&c.constitution, "the constitution")?;
    let file = match &c.config {
        Some(p) => FileConfig::load(p).map_err(|e| e.to_string())?,
        None => FileConfig::default(),
    };
    let paths = Paths::new(&c.out);
    let cache_dir = c
        .cache_dir
        .clone()
        .or_else(|| file.compile.cache_dir.clone())
        .unwrap_or_else(|| paths.cache.clone());
    let cached_inputs = Inputs::load(&cache_dir);
    let settings = file
        .llm
        .clone()
        .overlay(LlmSettings::from_env(env).map_err(|e| e.to_string())?)
        .overlay(c.llm.clone());
    let cfg = settings
        .resolve(env)
        .map_err(|e| match (&e, &cached_inputs) {
            // Offline, the model only names which cached answers to use: say which.
            (ConfigError::NoModel, Some(i)) => format!(
                "{e}. The cache in {} holds answers of the model {}: pass --model {}{}",
                cache_dir.display(),
                i.model,
                i.model.split_once(':').map(|(_, m)| m).unwrap_or(&i.model),
                match i.model.split_once(':') {
                    Some(("anthropic", _)) => " --provider anthropic",
                    _ => "",
                }
            ),
            _ => e.to_string(),
        })?;
    let (catalog_name, catalog_text) = match (&c.catalog, &c.catalog_text, &file.compile.catalog) {
        (Some(p), _, _) => (p.display().to_string(), read(p, "the catalog")?),
        (None, Some(t), _) => ("builtin".to_string(), t.clone()),
        (None, None, Some(p)) => (p.display().to_string(), read(p, "the catalog")?),
        (None, None, None) => match &c.fallback_catalog_text {
            Some(t) => ("builtin".to_string(), t.clone()),
            None => {
                return Err(
                    "no catalog: pass --catalog FILE (the format of `ironvmm tools --json`) \
                                or set `catalog` in the [compile] table of ironvmm.toml"
                        .into(),
                )
            }
        },
    };
    let engine =
        PolicyEngine::new(&catalog_text).map_err(|e| format!("the catalog {catalog_name}: {e}"))?;
    let mut list_sources: BTreeMap<String, PathBuf> = file.lists.clone();
    for (name, path) in &c.lists {
        list_sources.insert(name.clone(), path.clone());
    }
    std::fs::create_dir_all(&paths.work)
        .map_err(|e| format!("creating {}: {e}", paths.work.display()))?;
    let log = ExchangeLog::create(&paths.work.join(log_name), cfg.api_key.clone())
        .map_err(|e| format!("creating the exchange log in {}: {e}", paths.work.display()))?;
    let llm = Llm::new(
        cfg,
        PROMPT_VERSION,
        Cache::new(cache_dir.clone()),
        log,
        c.offline,
    );
    let source_name = c
        .constitution
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "constitution".into());
    Ok(Prepared {
        opts: CompileOptions {
            source_name,
            constitution,
            catalog_text,
            list_sources,
            out: c.out.clone(),
            max_repairs: c
                .max_repairs
                .or(file.compile.max_repairs)
                .unwrap_or(DEFAULT_MAX_REPAIRS)
                .min(10),
            max_rounds: c
                .max_rounds
                .or(file.compile.max_rounds)
                .unwrap_or(DEFAULT_MAX_ROUNDS)
                .min(10),
            accept: c.accept.clone(),
            cached_inputs,
        },
        llm,
        engine,
        paths,
        cache_dir,
        offline: c.offline,
    })
}

fn stats_line(llm: &Llm) -> String {
    let s = llm.stats;
    format!(
        "LLM: {} answer(s) from the cache, {} exchange(s) over HTTP ({} attempt(s)); log: {}",
        s.cache_hits,
        s.exchanges,
        s.http_attempts,
        llm.log_path().display()
    )
}

/// `ironvmm policy compile`. Exit codes: 0 verified, 1 not verified (artifacts
/// written), 2 bad input or configuration, 3 the model could not be reached (or
/// `--offline` found no cached answer), 4 held for the owner (a judge's correction
/// that would widen what the agent may do; `--accept SCENARIO` applies it).
pub fn run_compile(c: &Common, env: &dyn Fn(&str) -> Option<String>, err: &mut dyn Write) -> u8 {
    let mut p = match prepare(c, env, "llm-exchanges.jsonl") {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(err, "ironvmm policy compile: {e}");
            return Status::BadInput.exit_code();
        }
    };
    compile_prepared(&mut p, err)
}

fn compile_prepared(p: &mut Prepared, err: &mut dyn Write) -> u8 {
    match pipeline::compile(&p.opts, &mut p.llm, &p.engine) {
        Ok(r) => {
            let _ = writeln!(err, "ironvmm policy compile: {}", r.summary);
            let _ = writeln!(err, "{}", stats_line(&p.llm));
            // Recorded so that a later --offline miss can say which input changed.
            if !p.offline && r.status != Status::BadInput {
                if let Err(e) = r.inputs.save(&p.cache_dir) {
                    let _ = writeln!(
                        err,
                        "ironvmm policy compile: recording the inputs in {}: {e}",
                        p.cache_dir.display()
                    );
                }
            }
            r.status.exit_code()
        }
        Err(e) => {
            let _ = writeln!(
                err,
                "ironvmm policy compile: writing the artifacts in {}: {e}",
                p.paths.dir.display()
            );
            Status::BadInput.exit_code()
        }
    }
}

/// `ironvmm policy refine`.
#[derive(Debug, Clone, Default)]
pub struct RefineArgs {
    pub common: Common,
    pub audit: PathBuf,
    pub learned: Option<PathBuf>,
}

/// Proposes edits to the English from the audit log, shows them as a diff on `out`,
/// and on the owner's yes writes the English and recompiles (the compile's exit code).
/// Without a yes nothing changes and the exit code is 0.
pub fn run_refine(
    a: &RefineArgs,
    env: &dyn Fn(&str) -> Option<String>,
    confirm: &mut dyn Confirm,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let fail = |err: &mut dyn Write, e: String| {
        let _ = writeln!(err, "ironvmm policy refine: {e}");
        Status::BadInput.exit_code()
    };
    let audit_text = match read(&a.audit, "the audit log") {
        Ok(t) => t,
        Err(e) => return fail(err, e),
    };
    let learned = match &a.learned {
        Some(p) => match read(p, "the learned rules") {
            Ok(t) => Some(t),
            Err(e) => return fail(err, e),
        },
        None => None,
    };
    let mut p = match prepare(&a.common, env, "refine-exchanges.jsonl") {
        Ok(p) => p,
        Err(e) => return fail(err, e),
    };
    let rules = std::fs::read_to_string(&p.paths.out).ok();
    let summary = refine::summarize(&audit_text);
    if summary.cases.is_empty() && learned.is_none() && summary.learned_records.is_empty() {
        let _ = writeln!(
            err,
            "ironvmm policy refine: {} holds no asks, denials or learned rules: nothing to learn from",
            a.audit.display()
        );
        return 0;
    }
    let input = RefineInput {
        source_name: &p.opts.source_name,
        constitution: &p.opts.constitution,
        audit: &summary,
        learned: learned.as_deref(),
        rules: rules.as_deref(),
    };
    let proposal = match refine::propose(&mut p.llm, &input, p.opts.max_repairs) {
        Ok(x) => x,
        Err(e) => {
            let _ = writeln!(err, "ironvmm policy refine: step 'refine': {e}");
            let _ = writeln!(err, "{}", stats_line(&p.llm));
            return match e {
                crate::ask::StepError::Llm(_) => Status::LlmUnavailable.exit_code(),
                _ => Status::Unverified.exit_code(),
            };
        }
    };
    let _ = std::fs::write(p.paths.work.join("refine.diff"), &proposal.diff);
    let _ = std::fs::write(
        p.paths.work.join("refine.json"),
        serde_json::to_string_pretty(&serde_json::json!({"audit": summary, "proposal": proposal}))
            .unwrap_or_default(),
    );
    if proposal.diff.is_empty() {
        let _ = writeln!(
            err,
            "ironvmm policy refine: no edits proposed; {} is unchanged",
            a.common.constitution.display()
        );
        return 0;
    }
    let _ = write!(out, "{}", proposal.diff);
    for ch in &proposal.changes {
        let _ = writeln!(err, "  why: {} (evidence: {})", ch.why, ch.evidence);
    }
    match confirm.confirm(&format!(
        "Apply these edits to {} and recompile? [y/N] ",
        a.common.constitution.display()
    )) {
        Some(true) => {}
        Some(false) => {
            let _ = writeln!(err, "ironvmm policy refine: not applied");
            return 0;
        }
        None => {
            let _ = writeln!(
                err,
                "ironvmm policy refine: not applied (no terminal to ask): rerun with --accept to apply; the diff is also in {}",
                p.paths.work.join("refine.diff").display()
            );
            return 0;
        }
    }
    if let Err(e) = write_atomic(&a.common.constitution, proposal.revised.as_bytes()) {
        return fail(
            err,
            format!("writing {}: {e}", a.common.constitution.display()),
        );
    }
    p.opts.constitution = proposal.revised;
    let _ = writeln!(err, "ironvmm policy refine: applied; recompiling");
    // The compile's own log replaces the refine log's name, not its content.
    p.llm
        .set_log(ExchangeLog::create(&p.paths.llm_log, p.llm.config().api_key.clone()).ok());
    compile_prepared(&mut p, err)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("refine.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
