//! The tool catalog: which tools exist, their argument schemas, and which arguments
//! are paths, URLs, hosts or email addresses (their roles drive normalisation).
//!
//! File format (`--catalog FILE`, and exactly what `ironvmm tools --json` prints):
//! ```json
//! {"tools": [
//!   {"name": "fs.read",
//!    "description": "Read a file of the workspace",
//!    "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}},
//!                    "required": ["path"], "additionalProperties": false},
//!    "roles": {"path": "path"}}
//! ]}
//! ```
//! `roles` maps a top-level argument name to one of `path`, `tree`, `url`, `host`,
//! `email`. `tree` is a path the tool acts on as a whole tree (a move, a delete):
//! `under` in a deny or ask rule, and the protected-path invariant, hold for it when
//! the two paths overlap (either lies under the other).
//! An argument that is an array of such values has the role applied to each element.
//! A dotted key (`"a.b"`) gives a role to a nested argument.
//!
//! `aliases` (optional) names an argument that conditions may use for others:
//! `{"path": ["from", "to"]}` on `fs.move` makes `path` in a condition mean `from`
//! and then `to`. The call is decided once per listed argument and the most
//! restrictive decision wins (deny, then ask, then allow), so both ends of a move
//! are decided by the same rules.
//!
//! `rolesKnown` (optional, default `true`): `false` says nobody has said which of
//! the tool's arguments are paths, URLs, hosts or addresses (an MCP server of the
//! owner's, configured without `roles`). Its arguments are then compared literally,
//! and `policy check` warns of every rule whose conditions read them.
//!
//! `replyCap` (optional, a positive integer): the most bytes of structured result a
//! call of the tool may return; the VMM replaces a larger one by a `reply_too_large`
//! tool error. The engine does not read it; `ironvmm tools --json` shows it.
//!
//! `groups` (optional) names arguments that hold the same kind of thing in different
//! places: `{"recipients": ["to", "cc", "bcc"]}` on `mail.send`, `{"ends": ["from",
//! "to"]}` on `fs.move`. The engine does not read them; the policy compiler derives
//! test calls from them (a value moved from one member to another must decide the
//! same unless the English singles one out).
//!
//! The schema subset is the one [`crate::schema`] implements; unknown keys in the
//! file, unknown schema keywords, and unknown roles are errors.

use crate::schema::Schema;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// How an argument's value is normalised before every operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Path,
    /// A path whose tool acts on the whole tree below it (`fs.move`, `fs.delete`):
    /// normalised like `path`; `under` in deny/ask rules and the protected-path
    /// invariant hold when the paths overlap (see `eval`).
    Tree,
    Url,
    Host,
    Email,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Path => "path",
            Role::Tree => "tree",
            Role::Url => "url",
            Role::Host => "host",
            Role::Email => "email",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "path" => Role::Path,
            "tree" => Role::Tree,
            "url" => Role::Url,
            "host" => Role::Host,
            "email" => Role::Email,
            _ => return None,
        })
    }

    /// `path` and `tree`: values normalised as paths.
    pub fn is_path(self) -> bool {
        matches!(self, Role::Path | Role::Tree)
    }
}

/// One tool that a service offers.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// The schema as given (what `tools/list` shows).
    pub input_schema: Value,
    /// Argument path (dotted) to role.
    pub roles: BTreeMap<String, Role>,
    /// Argument name usable in conditions to the arguments it stands for.
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Argument groups (see the module doc): group name to its member arguments.
    pub groups: BTreeMap<String, Vec<String>>,
    /// `false`: the roles of the arguments are unknown, not merely absent.
    pub roles_known: bool,
    /// `replyCap`: most bytes of structured result a call may return (the VMM's).
    pub reply_cap: Option<u64>,
    pub(crate) schema: Schema,
}

impl Tool {
    /// Builds a tool; the schema is compiled now so that a bad one fails here.
    pub fn new(
        name: &str,
        description: &str,
        input_schema: Value,
        roles: BTreeMap<String, Role>,
    ) -> Result<Tool, CatalogError> {
        if !crate::parser::valid_tool_name(name) {
            return Err(CatalogError(format!(
                "tool name `{name}`: expected SERVICE.TOOL in lowercase [a-z0-9_-]"
            )));
        }
        let schema = Schema::compile(&input_schema)
            .map_err(|e| CatalogError(format!("tool `{name}`: inputSchema{e}")))?;
        Ok(Tool {
            name: name.to_string(),
            description: description.to_string(),
            input_schema,
            roles,
            aliases: BTreeMap::new(),
            groups: BTreeMap::new(),
            roles_known: true,
            reply_cap: None,
            schema,
        })
    }

    /// Makes `alias` stand for each of `targets` in conditions (see the module doc).
    pub fn with_alias(mut self, alias: &str, targets: &[&str]) -> Result<Tool, CatalogError> {
        if targets.is_empty()
            || targets
                .iter()
                .any(|t| !self.schema.properties.contains_key(*t))
        {
            return Err(CatalogError(format!(
                "tool `{}`: alias `{alias}` must name arguments of the schema",
                self.name
            )));
        }
        if self.schema.properties.contains_key(alias) {
            return Err(CatalogError(format!(
                "tool `{}`: alias `{alias}` is already an argument",
                self.name
            )));
        }
        self.aliases.insert(
            alias.to_string(),
            targets.iter().map(|t| t.to_string()).collect(),
        );
        Ok(self)
    }

    /// Marks `members` as one argument group named `group` (see the module doc).
    pub fn with_group(mut self, group: &str, members: &[&str]) -> Result<Tool, CatalogError> {
        if members.len() < 2
            || members
                .iter()
                .any(|m| !self.schema.properties.contains_key(*m))
        {
            return Err(CatalogError(format!(
                "tool `{}`: group `{group}` must name two or more arguments of the schema",
                self.name
            )));
        }
        self.groups.insert(
            group.to_string(),
            members.iter().map(|m| m.to_string()).collect(),
        );
        Ok(self)
    }

    /// The role of the argument at `path` (segments of `args`), if any.
    pub fn role_of(&self, path: &[String]) -> Option<Role> {
        if let Some(t) = path.first().and_then(|a| self.aliases.get(a)) {
            let mut p = path.to_vec();
            p[0] = t[0].clone();
            return self.role_of(&p);
        }
        if path.len() == 1 {
            return self.roles.get(&path[0]).copied();
        }
        self.roles.get(&path.join(".")).copied()
    }

    /// Does the schema say the argument at `path` is an array?
    pub fn arg_is_array(&self, path: &[String]) -> bool {
        self.arg_schema(path).is_some_and(|s| s.is_array())
    }

    /// Is `path` an argument the schema describes (or could hold)?
    pub fn has_arg(&self, path: &[String]) -> bool {
        self.arg_schema(path).is_some()
            || (path.len() > 1
                && self
                    .arg_schema(&path[..1])
                    .is_some_and(|s| s.properties.is_empty()))
    }

    fn arg_schema(&self, path: &[String]) -> Option<&Schema> {
        let mut s = &self.schema;
        let first = path
            .first()
            .and_then(|a| self.aliases.get(a))
            .and_then(|t| s.properties.get(&t[0]));
        if let Some(f) = first {
            s = f;
        }
        let skip = usize::from(first.is_some());
        for seg in &path[skip..] {
            s = s.properties.get(seg)?;
        }
        Some(s)
    }

    /// Validates call arguments against the schema.
    pub fn validate(&self, args: &Value) -> Result<(), String> {
        self.schema.validate(args)
    }
}

/// Every tool the services offer.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tools: BTreeMap<String, Tool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError(pub String);

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "catalog: {}", self.0)
    }
}
impl std::error::Error for CatalogError {}

impl Catalog {
    pub fn new() -> Catalog {
        Catalog::default()
    }

    /// Adds a tool; a second tool of the same name is an error.
    pub fn add(&mut self, tool: Tool) -> Result<(), CatalogError> {
        if self.tools.contains_key(&tool.name) {
            return Err(CatalogError(format!(
                "tool `{}` is listed twice",
                tool.name
            )));
        }
        self.tools.insert(tool.name.clone(), tool);
        Ok(())
    }

    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.get(name)
    }

    pub fn tools(&self) -> impl Iterator<Item = &Tool> {
        self.tools.values()
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Parses the `--catalog` file format.
    pub fn from_json(text: &str) -> Result<Catalog, CatalogError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| CatalogError(format!("not valid JSON: {e}")))?;
        let top = v
            .as_object()
            .ok_or(CatalogError("expected an object {\"tools\": [...]}".into()))?;
        if let Some(k) = top.keys().find(|k| *k != "tools") {
            return Err(CatalogError(format!("unknown key `{k}` at the top level")));
        }
        let tools = top
            .get("tools")
            .and_then(Value::as_array)
            .ok_or(CatalogError("expected `tools`, an array".into()))?;
        let mut cat = Catalog::new();
        for (i, t) in tools.iter().enumerate() {
            cat.add(tool_from_json(t).map_err(|e| CatalogError(format!("tools[{i}]: {}", e.0)))?)?;
        }
        Ok(cat)
    }

    /// The `--catalog` file format (what `ironvmm tools --json` prints).
    pub fn to_json(&self) -> Value {
        let tools: Vec<Value> = self
            .tools
            .values()
            .map(|t| {
                let roles: Map<String, Value> =
                    t.roles.iter().map(|(k, r)| (k.clone(), Value::from(r.as_str()))).collect();
                let mut v = json!({"name": t.name, "description": t.description, "inputSchema": t.input_schema, "roles": roles});
                if !t.aliases.is_empty() {
                    v["aliases"] = json!(t.aliases);
                }
                if !t.groups.is_empty() {
                    v["groups"] = json!(t.groups);
                }
                if !t.roles_known {
                    v["rolesKnown"] = Value::Bool(false);
                }
                if let Some(cap) = t.reply_cap {
                    v["replyCap"] = json!(cap);
                }
                v
            })
            .collect();
        json!({ "tools": tools })
    }
}

fn tool_from_json(v: &Value) -> Result<Tool, CatalogError> {
    let o = v
        .as_object()
        .ok_or(CatalogError("expected an object".into()))?;
    if let Some(k) = o.keys().find(|k| {
        ![
            "name",
            "description",
            "inputSchema",
            "roles",
            "aliases",
            "groups",
            "rolesKnown",
            "replyCap",
        ]
        .contains(&k.as_str())
    }) {
        return Err(CatalogError(format!("unknown key `{k}`")));
    }
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .ok_or(CatalogError("expected `name`, a string".into()))?;
    let description = match o.get("description") {
        None => "",
        Some(d) => d.as_str().ok_or(CatalogError(format!(
            "`{name}`: `description` must be a string"
        )))?,
    };
    let schema = o
        .get("inputSchema")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    let mut roles = BTreeMap::new();
    if let Some(r) = o.get("roles") {
        let r = r
            .as_object()
            .ok_or(CatalogError(format!("`{name}`: `roles` must be an object")))?;
        for (arg, role) in r {
            let role = role
                .as_str()
                .and_then(Role::parse)
                .ok_or(CatalogError(format!(
                    "`{name}`: role of `{arg}` must be one of path, url, host, email"
                )))?;
            roles.insert(arg.clone(), role);
        }
    }
    let mut tool = Tool::new(name, description, schema, roles)?;
    match o.get("rolesKnown") {
        None => {}
        Some(Value::Bool(b)) => tool.roles_known = *b,
        Some(_) => {
            return Err(CatalogError(format!(
                "`{name}`: `rolesKnown` must be a boolean"
            )))
        }
    }
    match o.get("replyCap") {
        None => {}
        Some(c) => match c.as_u64().filter(|&c| c > 0) {
            Some(c) => tool.reply_cap = Some(c),
            None => {
                return Err(CatalogError(format!(
                    "`{name}`: `replyCap` must be a positive integer (bytes)"
                )))
            }
        },
    }
    if let Some(a) = o.get("aliases") {
        let a = a.as_object().ok_or(CatalogError(format!(
            "`{name}`: `aliases` must be an object"
        )))?;
        for (alias, targets) in a {
            let targets: Option<Vec<&str>> = targets
                .as_array()
                .and_then(|t| t.iter().map(Value::as_str).collect());
            let targets = targets.ok_or(CatalogError(format!(
                "`{name}`: alias `{alias}` must be an array of argument names"
            )))?;
            tool = tool.with_alias(alias, &targets)?;
        }
    }
    if let Some(g) = o.get("groups") {
        let g = g.as_object().ok_or(CatalogError(format!(
            "`{name}`: `groups` must be an object"
        )))?;
        for (group, members) in g {
            let members: Option<Vec<&str>> = members
                .as_array()
                .and_then(|t| t.iter().map(Value::as_str).collect());
            let members = members.ok_or(CatalogError(format!(
                "`{name}`: group `{group}` must be an array of argument names"
            )))?;
            tool = tool.with_group(group, &members)?;
        }
    }
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_roles() {
        let text = r#"{"tools":[{"name":"fs.read","description":"d",
            "inputSchema":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]},
            "roles":{"path":"path"}}]}"#;
        let c = Catalog::from_json(text).unwrap();
        let t = c.tool("fs.read").unwrap();
        assert_eq!(t.role_of(&["path".into()]), Some(Role::Path));
        let again = Catalog::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(again.len(), 1);
        let text = r#"{"tools":[{"name":"fs.move",
            "inputSchema":{"type":"object","properties":{"from":{"type":"string"},"to":{"type":"string"}}},
            "groups":{"ends":["from","to"]}}]}"#;
        let c = Catalog::from_json(text).unwrap();
        assert_eq!(c.tool("fs.move").unwrap().groups["ends"], ["from", "to"]);
        let again = Catalog::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(again.tool("fs.move").unwrap().groups.len(), 1);
        let text = r#"{"tools":[{"name":"files.read","rolesKnown":false}]}"#;
        let c = Catalog::from_json(text).unwrap();
        assert!(!c.tool("files.read").unwrap().roles_known);
        let again = Catalog::from_json(&c.to_json().to_string()).unwrap();
        assert!(!again.tool("files.read").unwrap().roles_known);
        assert!(Catalog::from_json(r#"{"tools":[{"name":"a.b","rolesKnown":1}]}"#).is_err());
        let c = Catalog::from_json(r#"{"tools":[{"name":"a.b","replyCap":1024}]}"#).unwrap();
        let again = Catalog::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(again.tool("a.b").unwrap().reply_cap, Some(1024));
        for bad in ["0", "-1", "\"1k\"", "1.5"] {
            let e = Catalog::from_json(&format!(
                r#"{{"tools":[{{"name":"a.b","replyCap":{bad}}}]}}"#
            ))
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains("`replyCap` must be a positive integer"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (text, needle) in [
            (r#"{"tools":[{"name":"Bad"}]}"#, "tool name `Bad`"),
            (
                r#"{"tools":[{"name":"a.b","roles":{"x":"file"}}]}"#,
                "role of `x`",
            ),
            (
                r#"{"tools":[{"name":"a.b","extra":1}]}"#,
                "unknown key `extra`",
            ),
            (
                r#"{"tools":[{"name":"a.b"},{"name":"a.b"}]}"#,
                "listed twice",
            ),
            (
                r#"{"tools":[{"name":"a.b","inputSchema":{"anyOf":[]}}]}"#,
                "anyOf",
            ),
            (r#"{"tool":[]}"#, "unknown key `tool`"),
            (
                r#"{"tools":[{"name":"a.b","inputSchema":{"type":"object","properties":{"x":{"type":"string"}}},"groups":{"g":["x","y"]}}]}"#,
                "group `g` must name two or more",
            ),
        ] {
            let e = Catalog::from_json(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }
}
