//! `iron agent TASK`: a small tool-using agent. Every model turn is itself an
//! `llm.chat` call through the gate (the host holds the key and the budget), and
//! every tool the model asks for is a `tools/call` the policy decides.
//!
//! The loop: `tools/list`; then model → tool calls → results, until the model
//! answers without a tool call (done), the gate refuses a model turn (its budget,
//! or a rule), or the model's tool calls are denied `max_denials` times in a row.
//! A denial goes back to the model as the very text the gate returned, rule
//! included, so it can adapt. The transcript is printed as it happens.

use std::io::Write;

use serde_json::{json, Map, Value};

use crate::rpc::{denial, CallError, Client, EXIT_DENIED, EXIT_ERROR, EXIT_OK};

/// Longest tool result given back to the model: a model turn must fit in one frame.
pub const MAX_RESULT_CHARS: usize = 32 * 1024;

/// What `iron agent` is told.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentOptions {
    pub task: String,
    pub model: String,
    /// None: the host's first configured provider.
    pub provider: Option<String>,
    pub max_steps: u32,
    /// Denied tool calls in a row that end the run.
    pub max_denials: u32,
    pub max_tokens: Option<u64>,
    pub system: String,
}

pub const DEFAULT_SYSTEM: &str = "You are an assistant working through tools. Every tool call \
is checked against the owner's policy: a denied call comes back as an error naming the rule. \
Do not retry a denied call; do what is allowed, then answer with a short summary.";

/// Environment variables that give defaults to the flags (an image's manifest sets them).
pub const MODEL_ENV: &str = "IRON_AGENT_MODEL";
pub const PROVIDER_ENV: &str = "IRON_AGENT_PROVIDER";

pub const AGENT_USAGE: &str =
    "iron agent [--model M] [--provider P] [--max-steps N] [--max-denials N]
           [--max-tokens N] [--system TEXT] TASK...
  the model defaults to $IRON_AGENT_MODEL, the provider to $IRON_AGENT_PROVIDER
  (else the host's first); --max-steps 20, --max-denials 3.
  Exit: 0 the model finished, 3 stopped by denials or the gate's model budget, 4 error, 5 no gate.";

/// Parses `iron agent`'s arguments; `env` reads defaults.
pub fn parse_args(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AgentOptions, String> {
    let mut o = AgentOptions {
        task: String::new(),
        model: env(MODEL_ENV).unwrap_or_default(),
        provider: env(PROVIDER_ENV).filter(|p| !p.is_empty()),
        max_steps: 20,
        max_denials: 3,
        max_tokens: None,
        system: DEFAULT_SYSTEM.into(),
    };
    let mut task = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} {v:?}: not a number"))
        };
        match a.as_str() {
            "--model" => o.model = value("--model")?,
            "--provider" => o.provider = Some(value("--provider")?),
            "--system" => o.system = value("--system")?,
            "--max-steps" => o.max_steps = num("--max-steps", value("--max-steps")?)? as u32,
            "--max-denials" => {
                o.max_denials = num("--max-denials", value("--max-denials")?)? as u32
            }
            "--max-tokens" => o.max_tokens = Some(num("--max-tokens", value("--max-tokens")?)?),
            "--" => task.extend(it.by_ref().cloned()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => task.push(a.clone()),
        }
    }
    o.task = task.join(" ");
    if o.task.trim().is_empty() {
        return Err("no task given".into());
    }
    if o.model.is_empty() {
        return Err(format!("no model: give --model or set {MODEL_ENV}"));
    }
    if o.max_steps == 0 || o.max_denials == 0 {
        return Err("--max-steps and --max-denials must be at least 1".into());
    }
    Ok(o)
}

/// Why the run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The model answered without a tool call.
    Done(String),
    /// The gate refused a model turn (the budget, or a rule on llm.chat).
    ModelDenied(String),
    /// Tool calls denied this many times in a row.
    Denials(u32),
    /// `--max-steps` model turns taken.
    Steps(u32),
    Error(String),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Ending::Done(_) => write!(f, "the model finished"),
            Ending::ModelDenied(why) => write!(f, "the gate refused a model turn: {why}"),
            Ending::Denials(n) => write!(f, "stopped after {n} denied calls in a row"),
            Ending::Steps(n) => write!(f, "stopped after {n} model turns (--max-steps)"),
            Ending::Error(e) => write!(f, "{e}"),
        }
    }
}

impl Ending {
    pub fn exit_code(&self) -> u8 {
        match self {
            Ending::Done(_) => EXIT_OK,
            Ending::ModelDenied(_) | Ending::Denials(_) | Ending::Steps(_) => EXIT_DENIED,
            Ending::Error(_) => EXIT_ERROR,
        }
    }
}

/// A tool name as a model may call it (`[A-Za-z0-9_-]`, so `mail.read` is `mail_read`).
pub fn function_name(tool: &str) -> String {
    tool.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The tool a model means by a function `tools/list` did not offer (a model that
/// follows instructions in its input asks for tools it was not shown, and the gate
/// must be the one to refuse them): `mail_purge` is `mail.purge`.
pub fn unlisted_tool(f: &str) -> String {
    if f.contains('.') {
        return f.to_string();
    }
    f.replacen('_', ".", 1)
}

/// The gate's tools as OpenAI function tools, and the map back to tool names.
/// `llm.*` is left out: the agent itself is the model's caller.
pub fn model_tools(list: &Value) -> (Vec<Value>, Vec<(String, String)>) {
    let mut tools = Vec::new();
    let mut names = Vec::new();
    for t in list["tools"].as_array().into_iter().flatten() {
        let Some(name) = t["name"].as_str() else {
            continue;
        };
        if name.starts_with("llm.") {
            continue;
        }
        let f = function_name(name);
        tools.push(json!({"type": "function", "function": {
            "name": f,
            "description": t["description"].as_str().unwrap_or(""),
            "parameters": t.get("inputSchema").cloned().unwrap_or(json!({"type": "object"})),
        }}));
        names.push((f, name.to_string()));
    }
    (tools, names)
}

/// Cuts `s` to at most `max` characters, saying so.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… [cut at {max} characters]", &s[..i]),
        None => s.to_string(),
    }
}

/// The text of a tool result as the model reads it, and whether it was a denial.
fn result_text(result: &Value) -> (String, bool) {
    let denied = denial(result).is_some();
    let texts: Vec<&str> = result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect();
    let text = if !texts.is_empty() {
        texts.join("\n")
    } else {
        result
            .get("structuredContent")
            .map_or(String::new(), Value::to_string)
    };
    let text = if result["isError"] == Value::Bool(true) && !denied {
        format!("error: {text}")
    } else {
        text
    };
    (text, denied)
}

/// Runs the loop on a connected, initialized client, writing the transcript to `out`.
pub fn run(client: &mut Client, o: &AgentOptions, out: &mut dyn Write) -> Ending {
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let list = match client.request("tools/list", json!({})) {
        Ok(l) => l,
        Err(e) => return Ending::Error(format!("tools/list: {e}")),
    };
    let (tools, names) = model_tools(&list);
    say(format!(
        "[agent] task: {}\n[agent] model {} via the gate; tools: {}",
        o.task,
        o.model,
        names
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut messages = vec![
        json!({"role": "system", "content": o.system}),
        json!({"role": "user", "content": o.task}),
    ];
    let mut denials_in_a_row = 0;
    for step in 1..=o.max_steps {
        let mut req = Map::new();
        if let Some(p) = &o.provider {
            req.insert("provider".into(), p.clone().into());
        }
        req.insert("model".into(), o.model.clone().into());
        req.insert("messages".into(), Value::Array(messages.clone()));
        if !tools.is_empty() {
            req.insert("tools".into(), Value::Array(tools.clone()));
        }
        if let Some(m) = o.max_tokens {
            req.insert("max_tokens".into(), m.into());
        }
        let result = match client.call_tool("llm.chat", Value::Object(req)) {
            Ok(r) => r,
            Err(e) => return Ending::Error(format!("llm.chat: {e}")),
        };
        if let Some(d) = denial(&result) {
            let why = CallError::Denied(Box::new(d)).to_string();
            say(format!("[step {step}] model turn {why}"));
            return Ending::ModelDenied(why);
        }
        let (text, _) = result_text(&result);
        if result["isError"] == Value::Bool(true) {
            say(format!("[step {step}] model turn failed: {text}"));
            return Ending::Error(text);
        }
        let s = &result["structuredContent"];
        let message = s["response"]["choices"][0]["message"].clone();
        if !message.is_object() {
            return Ending::Error(format!(
                "the model's response has no choices[0].message: {}",
                cut(&s["response"].to_string(), 500)
            ));
        }
        let tokens = s["usage"]["total_tokens"].as_u64().unwrap_or(0);
        let content = message["content"].as_str().unwrap_or("").to_string();
        let calls: Vec<Value> = message["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !content.is_empty() {
            say(format!("[step {step}] model ({tokens} tokens): {content}"));
        } else {
            say(format!("[step {step}] model ({tokens} tokens)"));
        }
        messages.push(message);
        if calls.is_empty() {
            say("[agent] done".into());
            return Ending::Done(content);
        }
        for c in &calls {
            let id = c["id"].as_str().unwrap_or("").to_string();
            let f = c["function"]["name"].as_str().unwrap_or("");
            let tool = names
                .iter()
                .find(|(fname, name)| fname == f || name == f)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| unlisted_tool(f));
            let raw = c["function"]["arguments"].as_str().unwrap_or("{}");
            let (text, denied) = match serde_json::from_str::<Value>(raw) {
                Ok(args @ Value::Object(_)) => {
                    say(format!("  → {tool} {}", cut(&args.to_string(), 300)));
                    match client.call_tool(&tool, args) {
                        Ok(r) => result_text(&r),
                        Err(CallError::Rpc { code, message }) => {
                            (format!("error {code}: {message}"), false)
                        }
                        Err(e) => return Ending::Error(format!("{tool}: {e}")),
                    }
                }
                _ => (
                    format!("error: the arguments of {tool} are not a JSON object: {raw}"),
                    false,
                ),
            };
            let mark = if denied { "DENIED" } else { "ok" };
            say(format!("  ← {mark}: {}", cut(&text, 300)));
            denials_in_a_row = if denied { denials_in_a_row + 1 } else { 0 };
            messages.push(json!({"role": "tool", "tool_call_id": id,
                                 "content": cut(&text, MAX_RESULT_CHARS)}));
        }
        if denials_in_a_row >= o.max_denials {
            say(format!(
                "[agent] stopped: {denials_in_a_row} denied calls in a row"
            ));
            return Ending::Denials(denials_in_a_row);
        }
    }
    say(format!("[agent] stopped: {} model turns", o.max_steps));
    Ending::Steps(o.max_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn arguments_and_defaults() {
        let a: Vec<String> = ["--model", "m", "--max-steps", "5", "tidy", "my", "inbox"]
            .map(String::from)
            .to_vec();
        let o = parse_args(&a, &env).unwrap();
        assert_eq!(
            (o.task.as_str(), o.max_steps, o.max_denials),
            ("tidy my inbox", 5, 3)
        );
        let e = parse_args(&["x".into()], &env).unwrap_err();
        assert!(e.contains("IRON_AGENT_MODEL"), "{e}");
        let with = |k: &str| (k == MODEL_ENV).then(|| "m2".to_string());
        assert_eq!(parse_args(&["x".into()], &with).unwrap().model, "m2");
        assert!(parse_args(&["--model".into()], &env)
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse_args(&["--bogus".into(), "x".into()], &env)
            .unwrap_err()
            .contains("--bogus"));
    }

    #[test]
    fn tools_become_functions_without_llm() {
        let list = json!({"tools": [
            {"name": "mail.read", "description": "d", "inputSchema": {"type": "object"}},
            {"name": "llm.chat", "description": "m", "inputSchema": {"type": "object"}}]});
        let (tools, names) = model_tools(&list);
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0]["function"]["name"], "mail_read");
        assert_eq!(names, [("mail_read".into(), "mail.read".into())]);
        assert_eq!(unlisted_tool("mail_purge"), "mail.purge");
        assert_eq!(unlisted_tool("files.read_text"), "files.read_text");
    }

    #[test]
    fn a_denial_is_the_gate_text() {
        let r = json!({"content": [{"type": "text", "text": "denied by rule 7 (decided by rule): no"}],
            "structuredContent": {"decision": "deny", "rule": 7, "decided_by": "rule", "reason": "no"},
            "isError": true});
        assert_eq!(
            result_text(&r),
            ("denied by rule 7 (decided by rule): no".into(), true)
        );
        let r = json!({"content": [{"type": "text", "text": "not found"}], "isError": true});
        assert_eq!(result_text(&r), ("error: not found".into(), false));
        assert_eq!(cut("abcdef", 3), "abc… [cut at 3 characters]");
    }
}
