//! What an allowed call reaches. Each service offers tools (name, description, JSON
//! Schema, argument roles) and serves calls on the already-parsed arguments: the
//! service reads the very value the policy decided on.

pub mod fs;
pub mod http;
pub mod llm;
pub mod mail;
pub mod mcp_servers;
pub mod net;
pub mod ssrf;
mod sys;

use std::collections::HashMap;

use serde_json::{json, Map, Value};

/// One tool as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub input_schema: Value,
    /// Top-level argument name → role (`path`, `url`, `host`, `email`); an array
    /// argument has the role applied to each element.
    pub roles: &'static [(&'static str, &'static str)],
    /// A name conditions may use for several arguments, each decided in turn
    /// (`path` → `from`, `to` on `fs.move`): see policy/src/catalog.rs.
    pub aliases: &'static [(&'static str, &'static [&'static str])],
    /// Most bytes of the structured result a call may return: a larger one is a
    /// `reply_too_large` tool error, so no service can hand the guest an unbounded reply.
    pub reply_cap: usize,
}

/// The reply cap of most tools: a reply frame stays under the 1 MiB frame limit
/// once JSON-RPC has wrapped it.
pub const DEFAULT_REPLY_CAP: usize = 768 * 1024;

impl ToolSpec {
    /// The entry in the `--catalog` file format (policy/src/catalog.rs).
    pub fn catalog_entry(&self) -> Value {
        let roles: Map<String, Value> = self
            .roles
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let mut entry = json!({
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
            "roles": roles,
            "replyCap": self.reply_cap,
        });
        if !self.aliases.is_empty() {
            let aliases: Map<String, Value> = self
                .aliases
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            entry["aliases"] = Value::Object(aliases);
        }
        entry
    }

    /// The entry as MCP `tools/list` shows it.
    pub fn mcp_entry(&self) -> Value {
        json!({
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        })
    }
}

/// A tool error: the call was allowed but could not be served. The model reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    /// Short machine-readable kind, e.g. `not_found`, `outside_root`, `too_large`.
    pub kind: &'static str,
    pub message: String,
}

impl ToolError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        ToolError {
            kind,
            message: message.into(),
        }
    }
}

/// What an allowed call gave back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The tool's structured result; the gate wraps it as a tool result.
    Structured(Value),
    /// A whole MCP tool result from another MCP server (`content`,
    /// `structuredContent`, `isError`), already checked and capped by its service.
    Forwarded { result: Value, is_error: bool },
}

/// A narrow handle on the gate's decider for a service that must have a follow-up
/// action decided as a call of its own (each redirect hop of `http.fetch`). The
/// implementation decides and audits it; `Err` is the reason it was not allowed.
pub trait Decide: Send + Sync {
    fn decide(&self, tool: &str, args: &Value) -> Result<(), String>;
}

/// Which of the gate's worker pools serves a tool's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Work on this host only (the workspace's files): bounded by the disk.
    Local,
    /// Work that waits on something the VMM does not control (a network peer, an
    /// MCP server process, a model): it gets workers of its own, so that however
    /// many such calls hang, local calls still find a worker.
    Outside,
}

/// A service: a family of tools sharing one prefix (`fs.`).
pub trait Service: Send + Sync {
    fn tools(&self) -> Vec<ToolSpec>;
    /// Its calls' lane. `Outside` unless the service says otherwise: a service that
    /// forgot costs one more hand-over, never a local call's worker.
    fn lane(&self) -> Lane {
        Lane::Outside
    }
    /// Serves an allowed call; `Ok` is the tool's structured result.
    fn call(&self, tool: &str, args: &Value) -> Result<Value, ToolError>;
    /// Serves an allowed call as the gate replies it. Services whose results are
    /// already MCP tool results (forwarded MCP servers) override this.
    fn serve(&self, tool: &str, args: &Value) -> Result<Reply, ToolError> {
        self.call(tool, args).map(Reply::Structured)
    }
}

/// The services one gate serves, indexed by tool name.
#[derive(Default)]
pub struct Services {
    services: Vec<Box<dyn Service>>,
    by_tool: HashMap<&'static str, usize>,
    specs: Vec<ToolSpec>,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, service: Box<dyn Service>) {
        let idx = self.services.len();
        for spec in service.tools() {
            self.by_tool.insert(spec.name, idx);
            self.specs.push(spec);
        }
        self.services.push(service);
    }

    /// Tools actually served here, in catalog order.
    pub fn specs(&self) -> &[ToolSpec] {
        &self.specs
    }

    pub fn offers(&self, tool: &str) -> bool {
        self.by_tool.contains_key(tool)
    }

    /// The lane of `tool`'s calls (`Outside` for a tool not served here).
    pub fn lane(&self, tool: &str) -> Lane {
        self.by_tool
            .get(tool)
            .map_or(Lane::Outside, |&i| self.services[i].lane())
    }

    /// Serves an allowed call as the gate replies it, holding a structured result
    /// to the tool's reply cap (a forwarded one was capped by its service).
    pub fn serve(&self, tool: &str, args: &Value) -> Result<Reply, ToolError> {
        let Some(&i) = self.by_tool.get(tool) else {
            return Err(ToolError::new(
                "unknown_tool",
                format!("no service here offers {tool:?}"),
            ));
        };
        let reply = self.services[i].serve(tool, args)?;
        if let Reply::Structured(v) = &reply {
            let cap = self
                .specs
                .iter()
                .find(|s| s.name == tool)
                .map_or(DEFAULT_REPLY_CAP, |s| s.reply_cap);
            let size = json_size(v);
            if size > cap {
                // The same kind as the gate's own bound on a whole reply frame.
                return Err(ToolError::new(
                    "reply_too_large",
                    format!("the reply of {tool} is {size} bytes, over its cap of {cap}"),
                ));
            }
        }
        Ok(reply)
    }
}

/// Bytes of `v` as compact JSON, counted without building the text.
pub(crate) fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// Every tool compiled into ironvmm, whatever a given run configures. `tools/list`,
/// `ironvmm tools`, `policy check --catalog builtin` and the compiler all read this.
pub fn builtin_specs() -> Vec<ToolSpec> {
    let mut v = fs::tool_specs();
    v.extend(mail::tool_specs());
    v.extend(http::tool_specs());
    v.extend(net::tool_specs());
    v.extend(llm::tool_specs());
    v
}

/// The builtin catalog as the `--catalog` file's JSON (`ironvmm tools --json`).
pub fn builtin_catalog_json() -> Value {
    json!({ "tools": builtin_specs().iter().map(ToolSpec::catalog_entry).collect::<Vec<_>>() })
}

/// The builtin catalog plus tools served by this run only (the `[[mcp]]` servers'
/// `McpService::catalog_entries`), as the policy engine reads it: what a gate with
/// such servers must load its policy against.
pub fn catalog_with(
    extra: impl IntoIterator<Item = Value>,
) -> Result<ironvmm_policy::Catalog, ironvmm_policy::CatalogError> {
    let mut json = builtin_catalog_json();
    if let Some(tools) = json["tools"].as_array_mut() {
        tools.extend(extra);
    }
    ironvmm_policy::Catalog::from_json(&json.to_string())
}

/// The builtin catalog, as the policy engine reads it.
pub fn builtin_catalog() -> Result<ironvmm_policy::Catalog, ironvmm_policy::CatalogError> {
    ironvmm_policy::Catalog::from_json(&builtin_catalog_json().to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_catalog_loads_in_the_policy_engine() {
        let c = super::builtin_catalog().unwrap();
        assert_eq!(c.len(), super::builtin_specs().len());
        let read = c.tool("fs.read").unwrap();
        assert!(read
            .validate(&serde_json::json!({"path": "/workspace/a"}))
            .is_ok());
        assert!(read
            .validate(&serde_json::json!({"path": "a", "x": 1}))
            .is_err());
        assert!(read
            .validate(&serde_json::json!({"path": "a", "length": 524289}))
            .is_err());
    }
}
