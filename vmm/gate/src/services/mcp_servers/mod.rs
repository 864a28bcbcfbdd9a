//! `[[mcp]]`: the owner's own MCP servers, started on the host over stdio, each
//! offered as a service whose tools are `NAME.<tool>`, every call decided first.
//!
//! - `conn`   one server process and the JSON-lines conversation with it
//! - `server` its life: initialise, list, restart with a bounded backoff
//! - `names`  server tool names mapped to the policy's grammar
//!
//! What the policy sees is fixed when the gate starts: the tools of the first
//! listing, with the schemas they declared then and the roles the configuration
//! gives their arguments. A server that later changes its listing
//! (`notifications/tools/list_changed`) is listed again, but a new tool is not served
//! (it is an unknown tool to this gate), a withdrawn one is refused, and a changed
//! schema is ignored: arguments are still checked against the first one. So a server
//! cannot widen what a loaded policy allows by what it says about itself.

mod conn;
mod names;
mod server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use ironvmm_policy::{Role, Tool};
use serde_json::{json, Map, Value};

pub use conn::{ConnError, Counters, MAX_LINE};
pub use names::map_name;
pub use server::{Listed, ServerError, CLIENT_VERSIONS, MAX_FAILURES, MAX_TOOLS};

use super::{json_size, Reply, Service, ToolError, ToolSpec, DEFAULT_REPLY_CAP};
use conn::Launch;
use server::Server;

/// Longest tool description passed on (the model reads it; it is the server's text).
const MAX_DESCRIPTION: usize = 2048;
/// Default of `timeout_secs`: below the gate's own call timeout, so the server's
/// silence is reported as this server's timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of start-up (initialize and the first listing): a first `npx` downloads.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// One `[[mcp]]` table.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The service name: tools are `NAME.<tool>`. `[a-z0-9_-]`.
    pub name: String,
    pub command: String,
    pub args: Vec<String>,
    /// Variables added to the server's clean environment.
    pub env: BTreeMap<String, String>,
    /// Longest one call may take.
    pub timeout: Duration,
    pub startup_timeout: Duration,
    /// `"tool.argument"` → role (`path`, `tree`, `url`, `host`, `email`); `tool` is
    /// the mapped name, without the `NAME.` prefix.
    pub roles: BTreeMap<String, String>,
}

impl ServerSpec {
    pub fn new(name: &str, command: &str, args: &[&str]) -> ServerSpec {
        ServerSpec {
            name: name.into(),
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            roles: BTreeMap::new(),
        }
    }
}

impl From<&crate::config::McpServerConfig> for ServerSpec {
    fn from(c: &crate::config::McpServerConfig) -> ServerSpec {
        ServerSpec {
            name: c.name.clone(),
            command: c.command.clone(),
            args: c.args.clone(),
            env: c.env.clone(),
            timeout: c.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            roles: c.roles.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum McpSetupError {
    #[error("mcp server `{name}`: the name must be lowercase [a-z0-9_-]")]
    BadName { name: String },
    #[error("mcp server `{name}`: the name is a builtin service's; choose another")]
    Builtin { name: String },
    #[error("mcp server `{name}`: {source}")]
    Start { name: String, source: ServerError },
    #[error("mcp server `{name}`: roles: `{key}`: {message}")]
    Role {
        name: String,
        key: String,
        message: String,
    },
}

/// Counters of the running process (zero while it is down) and restarts so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub pid: Option<u32>,
    pub restarts: u32,
    pub notifications: u64,
    pub list_changed: u64,
    pub stray: u64,
    pub malformed: u64,
    pub requests: u64,
    pub stderr_dropped: u64,
}

/// A tool of the first listing.
struct Offered {
    /// The name the server knows it by.
    server_name: String,
    /// The first listing's schema, compiled: every call is checked against it.
    checked: Tool,
    spec: ToolSpec,
    roles_known: bool,
}

/// One configured MCP server as a service.
pub struct McpService {
    name: String,
    server: Server,
    timeout: Duration,
    /// By policy name (`files.read_text_file`).
    tools: HashMap<String, Offered>,
    /// Catalog order.
    order: Vec<String>,
    /// Server names of the latest listing; a withdrawn tool is refused.
    current: Mutex<BTreeSet<String>>,
}

impl McpService {
    /// Starts the server and builds its tools from its first listing. Tools whose
    /// names cannot be mapped, or whose schemas the policy engine cannot check, are
    /// refused and logged; a role for a tool or argument that does not exist is an
    /// error (a role the owner meant must not be silently lost).
    pub fn start(spec: &ServerSpec) -> Result<McpService, McpSetupError> {
        if spec.name.is_empty() || map_name(&spec.name).ok().as_deref() != Some(&spec.name) {
            return Err(McpSetupError::BadName {
                name: spec.name.clone(),
            });
        }
        let builtin = super::builtin_specs();
        if builtin
            .iter()
            .any(|t| t.name.split('.').next() == Some(spec.name.as_str()))
        {
            return Err(McpSetupError::Builtin {
                name: spec.name.clone(),
            });
        }
        let launch = Launch {
            name: spec.name.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
        };
        let (server, listed) =
            Server::start(launch, spec.startup_timeout).map_err(|source| McpSetupError::Start {
                name: spec.name.clone(),
                source,
            })?;
        let role_err = |key: &str, message: String| McpSetupError::Role {
            name: spec.name.clone(),
            key: key.to_string(),
            message,
        };
        // Roles by mapped tool name.
        let mut roles: BTreeMap<&str, BTreeMap<String, Role>> = BTreeMap::new();
        for (key, role) in &spec.roles {
            let Some((tool, arg)) = key.split_once('.') else {
                return Err(role_err(key, "expected \"tool.argument\"".into()));
            };
            let r = Role::parse(role).ok_or_else(|| {
                role_err(
                    key,
                    format!("unknown role {role:?} (path, tree, url, host, email)"),
                )
            })?;
            roles.entry(tool).or_default().insert(arg.to_string(), r);
        }
        let (mapped, refused) = names::map_all(listed.iter().map(|t| t.name.as_str()));
        for (n, why) in &refused {
            log::warn!("mcp server {}: tool {n:?} refused: {why}", spec.name);
        }
        let mut tools = HashMap::new();
        let mut order = Vec::new();
        for t in &listed {
            let Some((m, _)) = mapped.iter().find(|(_, orig)| **orig == t.name) else {
                continue;
            };
            let full = format!("{}.{m}", spec.name);
            let description: String = t.description.chars().take(MAX_DESCRIPTION).collect();
            let tool_roles = roles.remove(m.as_str());
            let roles_known = tool_roles.is_some();
            let tool_roles = tool_roles.unwrap_or_default();
            let checked = match Tool::new(&full, &description, t.input_schema.clone(), tool_roles) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!(
                        "mcp server {}: tool {:?} refused: {}",
                        spec.name,
                        t.name,
                        e.0
                    );
                    continue;
                }
            };
            for arg in checked.roles.keys() {
                let path: Vec<String> = arg.split('.').map(str::to_string).collect();
                if !checked.has_arg(&path) {
                    return Err(role_err(
                        &format!("{m}.{arg}"),
                        format!("`{full}` has no argument `{arg}`"),
                    ));
                }
            }
            let role_pairs: Vec<(&'static str, &'static str)> = checked
                .roles
                .iter()
                .map(|(a, r)| (leak(a.clone()), r.as_str()))
                .collect();
            // The catalog is built once per process from the first listing, so
            // these strings live as long as the process; their number is bounded
            // by the configuration and MAX_TOOLS.
            let spec_entry = ToolSpec {
                name: leak(full.clone()),
                description: leak(description),
                input_schema: t.input_schema.clone(),
                roles: Box::leak(role_pairs.into_boxed_slice()),
                aliases: &[],
                reply_cap: DEFAULT_REPLY_CAP,
            };
            order.push(full.clone());
            tools.insert(
                full,
                Offered {
                    server_name: t.name.clone(),
                    checked,
                    spec: spec_entry,
                    roles_known,
                },
            );
        }
        if let Some((tool, args)) = roles.into_iter().next() {
            let arg = args.keys().next().map_or("", String::as_str);
            return Err(role_err(
                &format!("{tool}.{arg}"),
                format!("the server lists no tool `{tool}` that is served"),
            ));
        }
        let current = listed.iter().map(|t| t.name.clone()).collect();
        Ok(McpService {
            name: spec.name.clone(),
            server,
            timeout: spec.timeout,
            tools,
            order,
            current: Mutex::new(current),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tools of the catalog in the `--catalog` file format; a tool without roles
    /// from the configuration says so (`"rolesKnown": false`), so that `policy check`
    /// can warn that its arguments are compared literally.
    pub fn catalog_entries(&self) -> Vec<Value> {
        self.order
            .iter()
            .filter_map(|n| self.tools.get(n))
            .map(|t| {
                let mut e = t.spec.catalog_entry();
                if !t.roles_known {
                    e["rolesKnown"] = Value::Bool(false);
                }
                e
            })
            .collect()
    }

    /// What the server has done besides answering, for logs and tests.
    pub fn stats(&self) -> Stats {
        let conn = self.server.current();
        let c = conn.as_ref().map(|c| c.counters());
        let n = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
            c.map_or(0, |c| f(c).load(std::sync::atomic::Ordering::Relaxed))
        };
        Stats {
            pid: conn.as_ref().map(|c| c.pid()),
            restarts: self.server.restarts(),
            notifications: n(|c| &c.notifications),
            list_changed: n(|c| &c.list_changed),
            stray: n(|c| &c.stray),
            malformed: n(|c| &c.malformed),
            requests: n(|c| &c.requests),
            stderr_dropped: n(|c| &c.stderr_dropped),
        }
    }

    /// Records a new listing: what changed is logged; only withdrawals take effect.
    fn note_listing(&self, listed: Vec<Listed>) {
        for t in &listed {
            let known = self.tools.values().find(|o| o.server_name == t.name);
            match known {
                None => log::warn!(
                    "mcp server {}: new tool {:?} is not served (the catalog is fixed when the gate starts)",
                    self.name,
                    t.name
                ),
                Some(o) if o.spec.input_schema != t.input_schema => log::warn!(
                    "mcp server {}: {:?} changed its schema; calls are still checked against the first one",
                    self.name,
                    t.name
                ),
                Some(_) => {}
            }
        }
        *lock(&self.current) = listed.into_iter().map(|t| t.name).collect();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn server_error(name: &str, e: ServerError) -> ToolError {
    let kind = match &e {
        ServerError::Conn(ConnError::Timeout(_)) => "timeout",
        ServerError::Conn(ConnError::Rpc { .. }) => "server_error",
        ServerError::Conn(ConnError::Backlog) => "busy",
        _ => "unavailable",
    };
    ToolError::new(kind, format!("mcp server {name}: {e}"))
}

/// The server's tool result, reduced to what MCP defines and held to `cap` bytes.
fn forward(result: Value, cap: usize) -> Result<Reply, ToolError> {
    let Value::Object(mut r) = result else {
        return Err(ToolError::new(
            "bad_reply",
            "the tool result is not an object",
        ));
    };
    let content = match r.remove("content") {
        Some(Value::Array(a)) if a.iter().all(Value::is_object) => Value::Array(a),
        None => Value::Array(Vec::new()),
        Some(_) => {
            return Err(ToolError::new(
                "bad_reply",
                "the tool result's `content` is not an array of objects",
            ))
        }
    };
    let is_error = match r.remove("isError") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(ToolError::new(
                "bad_reply",
                "the tool result's `isError` is not a boolean",
            ))
        }
    };
    let mut out = Map::new();
    out.insert("content".into(), content);
    match r.remove("structuredContent") {
        None | Some(Value::Null) => {}
        Some(s @ Value::Object(_)) => {
            out.insert("structuredContent".into(), s);
        }
        Some(_) => {
            return Err(ToolError::new(
                "bad_reply",
                "the tool result's `structuredContent` is not an object",
            ))
        }
    }
    out.insert("isError".into(), Value::Bool(is_error));
    let out = Value::Object(out);
    let size = json_size(&out);
    if size > cap {
        return Err(ToolError::new(
            "reply_too_large",
            format!("the server's reply is {size} bytes, over the cap of {cap}"),
        ));
    }
    Ok(Reply::Forwarded {
        result: out,
        is_error,
    })
}

impl Service for McpService {
    fn tools(&self) -> Vec<ToolSpec> {
        self.order
            .iter()
            .filter_map(|n| self.tools.get(n))
            .map(|t| t.spec.clone())
            .collect()
    }

    /// The structured content of a successful call (callers that want a value).
    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError> {
        match self.serve(tool, args)? {
            Reply::Forwarded {
                is_error: true,
                result,
            } => Err(ToolError::new(
                "tool_error",
                result["content"][0]["text"]
                    .as_str()
                    .unwrap_or("the tool failed")
                    .to_string(),
            )),
            Reply::Forwarded { result, .. } => Ok(result
                .get("structuredContent")
                .cloned()
                .unwrap_or_else(|| json!({"content": result["content"]}))),
            Reply::Structured(v) => Ok(v),
        }
    }

    fn serve(&self, tool: &str, args: &Value) -> Result<Reply, ToolError> {
        let Some(t) = self.tools.get(tool) else {
            return Err(ToolError::new(
                "unknown_tool",
                format!("{tool} is not served"),
            ));
        };
        // The gate's policy already checked the arguments against the catalog; this
        // holds even where a decider runs without one.
        t.checked
            .validate(args)
            .map_err(|e| ToolError::new("invalid_arguments", format!("{tool}: {e}")))?;
        let (conn, fresh) = self
            .server
            .conn()
            .map_err(|e| server_error(&self.name, e))?;
        if let Some(listed) = fresh {
            self.note_listing(listed);
        }
        if conn.take_list_changed() {
            match self.server.relist(&conn) {
                Ok(listed) => self.note_listing(listed),
                Err(e) => return Err(server_error(&self.name, e)),
            }
        }
        if !lock(&self.current).contains(&t.server_name) {
            return Err(ToolError::new(
                "withdrawn",
                format!("the server no longer offers {:?}", t.server_name),
            ));
        }
        let params = json!({"name": t.server_name, "arguments": args});
        let result = conn
            .request("tools/call", params, self.timeout)
            .map_err(|e| server_error(&self.name, e.into()))?;
        self.server.succeeded();
        forward(result, DEFAULT_REPLY_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_reduced_to_mcp_and_capped() {
        let r = forward(
            json!({"content": [{"type": "text", "text": "hi"}], "isError": true, "_meta": {"x": 1}}),
            1000,
        )
        .unwrap();
        let Reply::Forwarded { result, is_error } = r else {
            panic!()
        };
        assert!(is_error);
        assert_eq!(
            result,
            json!({"content": [{"type": "text", "text": "hi"}], "isError": true})
        );
        assert_eq!(
            forward(json!({"content": "x"}), 1000).unwrap_err().kind,
            "bad_reply"
        );
        assert_eq!(
            forward(json!({"content": [], "structuredContent": [1]}), 1000)
                .unwrap_err()
                .kind,
            "bad_reply"
        );
        let big = json!({"content": [{"type": "text", "text": "x".repeat(2000)}]});
        assert_eq!(forward(big, 1000).unwrap_err().kind, "reply_too_large");
    }
}
