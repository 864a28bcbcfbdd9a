//! The annotate step: argument roles proposed for tools nobody gave roles to (an
//! owner's MCP servers, marked `"rolesKnown": false` in the catalog). Without roles a
//! rule can only compare an argument's raw text, and the protected paths are not
//! checked against it. The model reads each tool's name, description and schema and
//! says which arguments are paths, whole trees, URLs, hosts or e-mail addresses. Its
//! answer is checked here (every argument exists and holds strings, every role is
//! one the engine knows, the engine loads the result), cached like every LLM answer,
//! and rendered as `[mcp.roles]` tables for the owner to review and copy into
//! ironvmm.toml: nothing is applied on the model's word.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use ironvmm_policy::{Catalog, Role, Tool};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ask::{ask_json, StepError};
use crate::cache::Cache;
use crate::config::{FileConfig, LlmSettings};
use crate::exchange_log::ExchangeLog;
use crate::llm::{Completer, Llm, LlmError, Message};

/// In every cache key of this step: bump it whenever the prompt's wording changes.
pub const PROMPT_VERSION: &str = "ironvmm-annotate/1";

/// Most tools asked about in one exchange (a server lists at most 512; the prompt
/// stays a size a small local model can read).
const TOOLS_PER_EXCHANGE: usize = 32;

/// The model's answer: roles per tool, each with a reason.
#[derive(Debug, Clone, Deserialize)]
pub struct AnnotateAnswer {
    pub tools: Vec<ToolRoles>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolRoles {
    pub tool: String,
    /// Argument (dotted for a nested one) → `{"role": ..., "why": ...}`.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleWhy>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RoleWhy {
    pub role: String,
    #[serde(default)]
    pub why: String,
}

/// One proposed role, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposed {
    pub argument: String,
    pub role: Role,
    pub why: String,
}

/// The checked proposal for every tool asked about, by tool name (possibly empty:
/// no argument of that tool holds such a value).
pub type Proposal = BTreeMap<String, Vec<Proposed>>;

/// The tools that need roles: those the catalog marks as having unknown roles.
pub fn tools_without_roles(catalog: &Catalog) -> Vec<&Tool> {
    catalog.tools().filter(|t| !t.roles_known).collect()
}

const SYSTEM: &str = "ironvmm policy compiler, step: annotate\n\n\
You help the owner of an AI agent describe the tools of their own MCP servers to ironvmm, a sandbox \
that checks every tool call against the owner's policy. A policy rule can reason about an argument \
only when it knows what kind of value the argument holds. For each tool below, say which arguments \
hold one of these kinds of value:\n\
- \"path\": a file or directory the tool reads, writes or looks at\n\
- \"tree\": a path the tool acts on as a whole subtree (moving, deleting or copying a directory)\n\
- \"url\": a URL the tool fetches or sends to\n\
- \"host\": a host name or IP address the tool connects to\n\
- \"email\": an e-mail address the tool sends to or reads from\n\n\
Give a role only where you are confident: a wrong role makes the policy normalise a value that is \
not of that kind. Arguments that hold anything else (text, numbers, flags, ids) get no role. \
Name a nested argument with dots (\"options.target\"). An argument that is a list of such values \
gets the role of its items.\n\n\
Shape: {\"tools\": [{\"tool\": \"files.read_text_file\", \"roles\": {\"path\": {\"role\": \"path\", \
\"why\": \"the file to read\"}}}]}\n\
Answer every tool asked about, with \"roles\": {} when none of its arguments has a role.\n\n\
Answer with one JSON object and nothing else: no prose, no code fence.";

pub fn system() -> String {
    SYSTEM.to_string()
}

/// The user message: the tools, as the catalog describes them.
pub fn user(tools: &[&Tool]) -> String {
    let list: Vec<Value> = tools
        .iter()
        .map(|t| json!({"tool": t.name, "description": t.description, "inputSchema": t.input_schema}))
        .collect();
    format!(
        "The tools:\n\n{}\n",
        serde_json::to_string_pretty(&list).unwrap_or_default()
    )
}

/// The schema of argument `dotted` of a tool's input schema, if it names one.
fn argument_schema<'a>(schema: &'a Value, dotted: &str) -> Option<&'a Value> {
    let mut s = schema;
    for part in dotted.split('.') {
        s = s.get("properties")?.get(part)?;
    }
    Some(s)
}

/// Whether a schema holds a string, or a list of strings (a role applies to each).
fn holds_strings(s: &Value) -> bool {
    let is_string = |v: &Value| match v.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
        None => false,
        _ => false,
    };
    is_string(s)
        || (s.get("type") == Some(&json!("array")) && s.get("items").is_some_and(is_string))
}

/// Checks an answer against the tools asked about; the error goes back to the model.
pub fn check(answer: &AnnotateAnswer, tools: &[&Tool]) -> Result<Proposal, String> {
    let mut problems = Vec::new();
    let mut out = Proposal::new();
    for t in &answer.tools {
        let Some(tool) = tools.iter().find(|x| x.name == t.tool) else {
            problems.push(format!("`{}` is not one of the tools asked about", t.tool));
            continue;
        };
        if out.contains_key(&t.tool) {
            problems.push(format!("`{}` is answered twice", t.tool));
            continue;
        }
        let mut roles = Vec::new();
        for (arg, rw) in &t.roles {
            let Some(role) = Role::parse(&rw.role) else {
                problems.push(format!(
                    "`{}`: the role of `{arg}` is {:?}; it must be path, tree, url, host or email",
                    t.tool, rw.role
                ));
                continue;
            };
            match argument_schema(&tool.input_schema, arg) {
                None => problems.push(format!(
                    "`{}` has no argument `{arg}` (its schema's properties are the arguments)",
                    t.tool
                )),
                Some(s) if !holds_strings(s) => problems.push(format!(
                    "`{}`: `{arg}` does not hold a string or a list of strings, so it cannot be a {}",
                    t.tool, rw.role
                )),
                Some(_) => roles.push(Proposed {
                    argument: arg.clone(),
                    role,
                    why: rw.why.clone(),
                }),
            }
        }
        // The engine must accept the tool with these roles, as the gate will build it.
        let map: BTreeMap<String, Role> =
            roles.iter().map(|p| (p.argument.clone(), p.role)).collect();
        if let Err(e) = Tool::new(
            &tool.name,
            &tool.description,
            tool.input_schema.clone(),
            map,
        ) {
            problems.push(format!("`{}`: {e}", t.tool));
        }
        out.insert(t.tool.clone(), roles);
    }
    for t in tools {
        if !out.contains_key(&t.name) && !answer.tools.iter().any(|a| a.tool == t.name) {
            problems.push(format!("`{}` is not answered (give it \"roles\": {{}} if none of its arguments has a role)", t.name));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("\n"))
    }
}

/// Asks the model about `tools`, in batches; every answer checked (and repaired at
/// most `max_repairs` times).
pub fn annotate(
    llm: &mut dyn Completer,
    tools: &[&Tool],
    max_repairs: u32,
) -> Result<Proposal, StepError> {
    let mut all = Proposal::new();
    for batch in tools.chunks(TOOLS_PER_EXCHANGE) {
        let mut checked = Proposal::new();
        ask_json::<AnnotateAnswer>(
            llm,
            "annotate",
            system(),
            vec![Message::user(user(batch))],
            max_repairs,
            |a| {
                checked = check(a, batch)?;
                Ok(())
            },
        )?;
        all.append(&mut checked);
    }
    Ok(all)
}

/// A TOML string (basic string) for a key or value.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The proposal as ironvmm.toml tables, one `[[mcp]]` per server, for the owner to
/// review: the server `files` of tool `files.read_text_file` gets
/// `"read_text_file.path" = "path"` under its `[mcp.roles]`.
pub fn render(proposal: &Proposal, model_id: &str, catalog_name: &str) -> String {
    let mut s = format!(
        "# Argument roles proposed by `ironvmm policy annotate` (model {model_id}) from the\n\
         # tools' schemas in {catalog_name}. Nothing has been applied: review every line, then\n\
         # copy each server's roles into its [[mcp]] table in ironvmm.toml.\n"
    );
    let mut by_server: BTreeMap<&str, Vec<(&str, &Vec<Proposed>)>> = BTreeMap::new();
    for (tool, roles) in proposal {
        let (server, name) = tool.split_once('.').unwrap_or(("", tool));
        by_server.entry(server).or_default().push((name, roles));
    }
    for (server, tools) in by_server {
        s.push_str(&format!(
            "\n[[mcp]]\nname = {}\n[mcp.roles]\n",
            toml_str(server)
        ));
        for (name, roles) in tools {
            if roles.is_empty() {
                s.push_str(&format!(
                    "# {name}: no argument holds a path, URL, host or address\n"
                ));
            }
            for p in roles {
                let key = toml_str(&format!("{name}.{}", p.argument));
                let why = p.why.replace(['\n', '\r'], " ");
                let why = if why.trim().is_empty() {
                    String::new()
                } else {
                    format!("  # {}", why.trim())
                };
                s.push_str(&format!("{key} = {}{why}\n", toml_str(p.role.as_str())));
            }
        }
    }
    s
}

/// `ironvmm policy annotate`'s inputs, as parsed by the command line.
#[derive(Debug, Clone, Default)]
pub struct AnnotateArgs {
    /// How the catalog is named in messages and the output's header.
    pub catalog_name: String,
    pub catalog_text: String,
    /// ironvmm.toml: its [llm] and [compile] tables.
    pub config: Option<PathBuf>,
    /// `--cache-dir`; else `cache_dir` of [compile]; else `default_cache_dir`.
    pub cache_dir: Option<PathBuf>,
    pub default_cache_dir: PathBuf,
    pub offline: bool,
    pub llm: LlmSettings,
    pub max_repairs: Option<u32>,
    /// Where the proposal goes; None: `out`.
    pub output: Option<PathBuf>,
}

/// `ironvmm policy annotate`. Exit codes as `policy compile`: 0 done, 1 no acceptable
/// answer, 2 bad input or configuration, 3 the model could not be reached (or
/// `--offline` found no cached answer).
pub fn run(
    a: &AnnotateArgs,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let catalog = match Catalog::from_json(&a.catalog_text) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(
                err,
                "ironvmm policy annotate: the catalog {}: {e}",
                a.catalog_name
            );
            return 2;
        }
    };
    let tools = tools_without_roles(&catalog);
    if tools.is_empty() {
        let _ = writeln!(
            err,
            "ironvmm policy annotate: every tool of {} has its roles (none is marked \"rolesKnown\": false); nothing to propose",
            a.catalog_name
        );
        return 0;
    }
    let prepared = (|| {
        let file = match &a.config {
            Some(p) => FileConfig::load(p).map_err(|e| e.to_string())?,
            None => FileConfig::default(),
        };
        let cfg = file
            .llm
            .clone()
            .overlay(LlmSettings::from_env(env).map_err(|e| e.to_string())?)
            .overlay(a.llm.clone())
            .resolve(env)
            .map_err(|e| e.to_string())?;
        let cache_dir = a
            .cache_dir
            .clone()
            .or(file.compile.cache_dir.clone())
            .unwrap_or_else(|| a.default_cache_dir.clone());
        let log_path = cache_dir.join("annotate-exchanges.jsonl");
        let log = ExchangeLog::create(&log_path, cfg.api_key.clone())
            .map_err(|e| format!("creating the exchange log {}: {e}", log_path.display()))?;
        let repairs = a
            .max_repairs
            .or(file.compile.max_repairs)
            .unwrap_or(crate::driver::DEFAULT_MAX_REPAIRS)
            .min(10);
        Ok::<_, String>((
            Llm::new(cfg, PROMPT_VERSION, Cache::new(cache_dir), log, a.offline),
            repairs,
        ))
    })();
    let (mut llm, repairs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(err, "ironvmm policy annotate: {e}");
            return 2;
        }
    };
    let result = annotate(&mut llm, &tools, repairs);
    let s = llm.stats;
    let _ = writeln!(
        err,
        "LLM: {} answer(s) from the cache, {} exchange(s) over HTTP ({} attempt(s)); log: {}",
        s.cache_hits,
        s.exchanges,
        s.http_attempts,
        llm.log_path().display()
    );
    let proposal = match result {
        Ok(p) => p,
        Err(StepError::Llm(e)) => {
            let _ = writeln!(err, "ironvmm policy annotate: {e}");
            return match e {
                LlmError::Io(_) => 2,
                _ => 3,
            };
        }
        Err(e) => {
            let _ = writeln!(err, "ironvmm policy annotate: {e}");
            return 1;
        }
    };
    let text = render(&proposal, &llm.model_id(), &a.catalog_name);
    match &a.output {
        Some(p) => {
            if let Err(e) = std::fs::write(p, &text) {
                let _ = writeln!(err, "ironvmm policy annotate: writing {}: {e}", p.display());
                return 2;
            }
            let _ = writeln!(
                err,
                "ironvmm policy annotate: roles proposed for {} tool(s) in {}: review them, then copy them into ironvmm.toml",
                proposal.len(),
                p.display()
            );
        }
        None => {
            let _ = out.write_all(text.as_bytes());
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_json(
            r#"{"tools":[
            {"name":"files.read_text_file","rolesKnown":false,"inputSchema":{"type":"object",
              "properties":{"path":{"type":"string"},"head":{"type":"number"}},"required":["path"]}},
            {"name":"files.move_file","rolesKnown":false,"inputSchema":{"type":"object",
              "properties":{"source":{"type":"string"},"destination":{"type":"string"},
              "opts":{"type":"object","properties":{"backup":{"type":"array","items":{"type":"string"}}}}}}},
            {"name":"fs.read","roles":{"path":"path"},"inputSchema":{"type":"object",
              "properties":{"path":{"type":"string"}}}}]}"#,
        )
        .unwrap()
    }

    fn answer(text: &str) -> AnnotateAnswer {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn only_tools_with_unknown_roles_are_asked_about() {
        let c = catalog();
        let names: Vec<&str> = tools_without_roles(&c)
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["files.move_file", "files.read_text_file"]);
    }

    #[test]
    fn a_sound_answer_is_kept_and_rendered_as_mcp_roles() {
        let c = catalog();
        let tools = tools_without_roles(&c);
        let p = check(
            &answer(
                r#"{"tools":[{"tool":"files.read_text_file","roles":{"path":{"role":"path","why":"the file to read"}}},
                {"tool":"files.move_file","roles":{"source":{"role":"tree","why":"moved whole"},
                 "destination":{"role":"tree"},"opts.backup":{"role":"path"}}}]}"#,
            ),
            &tools,
        )
        .unwrap();
        let text = render(&p, "openai:m", "catalog.json");
        assert!(text.contains("Nothing has been applied"), "{text}");
        assert!(
            text.contains("[[mcp]]\nname = \"files\"\n[mcp.roles]\n"),
            "{text}"
        );
        assert!(
            text.contains("\"read_text_file.path\" = \"path\"  # the file to read\n"),
            "{text}"
        );
        assert!(
            text.contains("\"move_file.opts.backup\" = \"path\"\n"),
            "{text}"
        );
        // The rendering is TOML that reads back as an [[mcp]] table's roles.
        let v: toml::Table = text.parse().unwrap();
        let roles = &v["mcp"].as_array().unwrap()[0]["roles"];
        assert_eq!(roles["move_file.source"].as_str(), Some("tree"));
    }

    #[test]
    fn a_wrong_answer_is_sent_back_with_every_reason() {
        let c = catalog();
        let tools = tools_without_roles(&c);
        let e = check(
            &answer(
                r#"{"tools":[{"tool":"files.read_text_file","roles":{"path":{"role":"file"},"head":{"role":"path"},"tail":{"role":"path"}}},
                {"tool":"fs.read","roles":{}}]}"#,
            ),
            &tools,
        )
        .unwrap_err();
        for needle in [
            "the role of `path` is \"file\"",
            "`head` does not hold a string",
            "has no argument `tail`",
            "`fs.read` is not one of the tools asked about",
            "`files.move_file` is not answered",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
