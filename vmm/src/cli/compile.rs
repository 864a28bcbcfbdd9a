//! `ironvmm policy compile` and `ironvmm policy refine`: the owner's English to a
//! verified p.rules, and the English improved from the audit log. The behaviour lives
//! in `ironvmm_policy_compiler::driver`; this module is the command line over it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use ironvmm_policy_compiler::config::{process_env, LlmSettings};
use ironvmm_policy_compiler::driver::{
    self, AcceptAll, Common, Confirm, NoOne, RefineArgs as DriverRefine,
};

/// Flags shared by `compile` and `refine`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompileFlags {
    /// Where the rules go; the scenarios, the report and the `<stem>.compile/` folder
    /// of artifacts go next to it. Default: p.rules beside the constitution.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The tool catalog (the format of `ironvmm tools --json`), or `builtin` for the
    /// services compiled into ironvmm. Default: `catalog` of [compile] in --config,
    /// else builtin.
    #[arg(long, value_name = "FILE|builtin")]
    pub catalog: Option<PathBuf>,
    /// ironvmm.toml: its [llm], [lists] and [compile] tables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The values of a list bound to a service, e.g. `--list contacts=contacts.vcf`.
    #[arg(long = "list", value_name = "NAME=FILE", value_parser = parse_list)]
    pub lists: Vec<(String, PathBuf)>,
    /// Use only cached answers; fail if one is missing.
    #[arg(long)]
    pub offline: bool,
    /// The answer cache. Default: `<stem>.compile/cache` next to the output.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// `openai` (any OpenAI-compatible server: Ollama, vLLM, llama.cpp, LiteLLM) or `anthropic`.
    #[arg(long)]
    pub provider: Option<String>,
    /// The model name, as the provider spells it (e.g. qwen2.5-coder:14b, gpt-4o).
    #[arg(long)]
    pub model: Option<String>,
    /// e.g. http://127.0.0.1:11434/v1 for Ollama.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Repairs per step (bad JSON, engine diagnostics). Default 3.
    #[arg(long, value_name = "N")]
    pub max_repairs: Option<u32>,
    /// Judge-and-repair rounds of verification. Default 3.
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
}

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    /// The owner's policy in plain English (Markdown).
    pub constitution: PathBuf,
    /// Apply the judge's held correction of this scenario (as the report names it,
    /// e.g. s9): one that gives the agent more than the scenario said. Repeatable.
    #[arg(long = "accept", value_name = "SCENARIO")]
    pub accept: Vec<String>,
    #[command(flatten)]
    pub flags: CompileFlags,
}

#[derive(clap::Args, Debug)]
pub struct RefineArgs {
    /// The owner's policy in plain English (Markdown); rewritten only on acceptance.
    pub constitution: PathBuf,
    /// The audit log (JSONL) whose asks and denials to learn from.
    #[arg(long, value_name = "FILE")]
    pub audit: PathBuf,
    /// Learned rules (p.rules.learned).
    #[arg(long, value_name = "FILE")]
    pub learned: Option<PathBuf>,
    /// Apply the proposed edits and recompile without asking.
    #[arg(long)]
    pub accept: bool,
    #[command(flatten)]
    pub flags: CompileFlags,
}

#[derive(clap::Args, Debug)]
pub struct AnnotateArgs {
    /// The catalog whose tools without roles (`"rolesKnown": false`) to annotate.
    /// Default: the builtin tools and those of the [[mcp]] servers of --config (started
    /// to list them, then stopped).
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// ironvmm.toml: its [[mcp]] servers, [llm] and [compile] tables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write the proposal here instead of to stdout. ironvmm.toml is never changed.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Use only cached answers; fail if one is missing.
    #[arg(long)]
    pub offline: bool,
    /// The answer cache. Default: `cache_dir` of [compile], else
    /// $XDG_CACHE_HOME/ironvmm/annotate (~/.cache/ironvmm/annotate).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// `openai` (any OpenAI-compatible server) or `anthropic`.
    #[arg(long)]
    pub provider: Option<String>,
    /// The model name, as the provider spells it.
    #[arg(long)]
    pub model: Option<String>,
    /// e.g. http://127.0.0.1:11434/v1 for Ollama.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Repairs of a wrong answer. Default 3.
    #[arg(long, value_name = "N")]
    pub max_repairs: Option<u32>,
}

fn parse_list(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((n, f)) if !n.is_empty() && !f.is_empty() => Ok((n.to_string(), PathBuf::from(f))),
        _ => Err(format!(
            "{s:?}: expected NAME=FILE, e.g. contacts=contacts.vcf"
        )),
    }
}

fn common(constitution: &Path, f: &CompileFlags) -> Common {
    let out = f.out.clone().unwrap_or_else(|| {
        constitution
            .parent()
            .map(|d| d.join("p.rules"))
            .unwrap_or_else(|| PathBuf::from("p.rules"))
    });
    let builtin = f.catalog.as_deref() == Some(Path::new("builtin"));
    let builtin_text = crate::services::builtin_catalog_json().to_string();
    Common {
        constitution: constitution.to_path_buf(),
        out,
        catalog: f.catalog.clone().filter(|_| !builtin),
        catalog_text: builtin.then(|| builtin_text.clone()),
        fallback_catalog_text: Some(builtin_text),
        config: f.config.clone(),
        lists: f.lists.clone(),
        offline: f.offline,
        cache_dir: f.cache_dir.clone(),
        llm: LlmSettings {
            provider: f.provider.clone(),
            model: f.model.clone(),
            base_url: f.base_url.clone(),
            ..Default::default()
        },
        max_repairs: f.max_repairs,
        max_rounds: f.max_rounds,
        accept: Vec::new(),
    }
}

pub fn run_compile(a: CompileArgs) -> u8 {
    let mut c = common(&a.constitution, &a.flags);
    c.accept = a.accept;
    driver::run_compile(&c, &process_env, &mut std::io::stderr())
}

/// Asks on the terminal; anything but y/yes is a no.
struct Tty;
impl Confirm for Tty {
    fn confirm(&mut self, question: &str) -> Option<bool> {
        eprint!("{question}");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).ok()?;
        Some(matches!(
            line.trim().to_ascii_lowercase().as_str(),
            "y" | "yes"
        ))
    }
}

pub fn run_refine(a: RefineArgs) -> u8 {
    let args = DriverRefine {
        common: common(&a.constitution, &a.flags),
        audit: a.audit,
        learned: a.learned,
    };
    let mut confirm: Box<dyn Confirm> = if a.accept {
        Box::new(AcceptAll)
    } else if std::io::stdin().is_terminal() {
        Box::new(Tty)
    } else {
        Box::new(NoOne)
    };
    driver::run_refine(
        &args,
        &process_env,
        confirm.as_mut(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
}

/// `policy check --against CONSTITUTION`: 0 when p.rules still matches its English
/// (and catalog, when one is given), 1 with the reasons when it does not.
pub fn check_against(rules: &Path, constitution: &Path, catalog: Option<&str>) -> u8 {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let read_catalog = |spec: &str| match spec {
        "builtin" => Ok(crate::services::builtin_catalog_json().to_string()),
        path => read(Path::new(path)),
    };
    let texts = (|| {
        Ok::<_, String>((
            read(rules)?,
            read(constitution)?,
            catalog.map(read_catalog).transpose()?,
        ))
    })();
    let (r, c, cat) = match texts {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ironvmm policy check --against: {e}");
            return 2;
        }
    };
    let problems = ironvmm_policy_compiler::against::check(&r, &c, cat.as_deref());
    if problems.is_empty() {
        outln!("{}: matches {}", rules.display(), constitution.display());
        return 0;
    }
    for p in problems {
        eprintln!(
            "{}: does not match {}: {p}",
            rules.display(),
            constitution.display()
        );
    }
    1
}

/// `ironvmm policy annotate`: roles proposed for the tools that have none, printed
/// (or written to -o) for the owner to review; see docs/policy-compiler.md.
pub fn run_annotate(a: AnnotateArgs) -> u8 {
    let (name, text) = match (&a.catalog, &a.config) {
        (Some(p), _) => match std::fs::read_to_string(p) {
            Ok(t) => (p.display().to_string(), t),
            Err(e) => {
                eprintln!("ironvmm policy annotate: the catalog {}: {e}", p.display());
                return 2;
            }
        },
        (None, Some(cfg)) => match super::tools::start_servers(cfg) {
            Ok(servers) => (
                format!("the [[mcp]] servers of {}", cfg.display()),
                super::tools::catalog_json(&servers).to_string(),
            ),
            Err(e) => {
                eprintln!("ironvmm policy annotate: {e}");
                return 2;
            }
        },
        (None, None) => {
            eprintln!(
                "ironvmm policy annotate: give --config ironvmm.toml (its [[mcp]] servers) or --catalog FILE"
            );
            return 2;
        }
    };
    let default_cache_dir = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("ironvmm").join("annotate"))
        .unwrap_or_else(|| PathBuf::from("ironvmm-annotate.cache"));
    let args = ironvmm_policy_compiler::annotate::AnnotateArgs {
        catalog_name: name,
        catalog_text: text,
        config: a.config,
        cache_dir: a.cache_dir,
        default_cache_dir,
        offline: a.offline,
        llm: LlmSettings {
            provider: a.provider,
            model: a.model,
            base_url: a.base_url,
            ..Default::default()
        },
        max_repairs: a.max_repairs,
        output: a.out,
    };
    ironvmm_policy_compiler::annotate::run(
        &args,
        &process_env,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
}
