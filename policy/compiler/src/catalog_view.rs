//! Step 1, the catalog: which tools exist, their argument schemas and roles, as the
//! prompts show them and as the scenario checks use them. The engine loads the same
//! text with its own parser; this view only reads what the prompts need.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::cache::sha256_hex;

#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    pub roles: BTreeMap<String, String>,
    /// Argument groups: the catalog's `groups`, and its `aliases` (an alias stands
    /// for arguments that hold the same kind of thing).
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Tool {
    /// The schema of a top-level argument.
    pub fn arg(&self, name: &str) -> Option<&Value> {
        self.input_schema.get("properties")?.get(name)
    }

    pub fn arg_is_array(&self, name: &str) -> bool {
        self.arg(name)
            .and_then(|s| s.get("type"))
            .and_then(Value::as_str)
            == Some("array")
    }

    /// `minItems` and `maxItems` of an array argument.
    pub fn arg_items(&self, name: &str) -> (usize, usize) {
        let get = |k: &str| {
            self.arg(name)
                .and_then(|s| s.get(k))
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        };
        (
            get("minItems").unwrap_or(0),
            get("maxItems").unwrap_or(usize::MAX),
        )
    }

    pub fn arg_required(&self, name: &str) -> bool {
        self.input_schema
            .get("required")
            .and_then(Value::as_array)
            .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(name)))
    }
}

#[derive(Debug, Clone)]
pub struct CatalogView {
    /// The catalog file's text, exactly as given.
    pub text: String,
    /// SHA-256 of `text`, recorded in the p.rules header.
    pub sha256: String,
    pub tools: Vec<Tool>,
}

impl CatalogView {
    pub fn parse(text: &str) -> Result<CatalogView, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("the catalog is not JSON: {e}"))?;
        let list = v
            .get("tools")
            .and_then(Value::as_array)
            .ok_or("the catalog has no \"tools\" array")?;
        let mut tools = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("catalog tools[{i}] has no \"name\""))?;
            let roles = match t.get("roles") {
                None => BTreeMap::new(),
                Some(r) => serde_json::from_value(r.clone())
                    .map_err(|e| format!("catalog tool {name}: \"roles\": {e}"))?,
            };
            let mut groups: BTreeMap<String, Vec<String>> = match t.get("groups") {
                None => BTreeMap::new(),
                Some(g) => serde_json::from_value(g.clone())
                    .map_err(|e| format!("catalog tool {name}: \"groups\": {e}"))?,
            };
            if let Some(a) = t.get("aliases") {
                let aliases: BTreeMap<String, Vec<String>> = serde_json::from_value(a.clone())
                    .map_err(|e| format!("catalog tool {name}: \"aliases\": {e}"))?;
                for (alias, members) in aliases {
                    if members.len() > 1 && !groups.values().any(|g| *g == members) {
                        groups.insert(alias, members);
                    }
                }
            }
            tools.push(Tool {
                name: name.to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                input_schema: t.get("inputSchema").cloned().unwrap_or(Value::Null),
                roles,
                groups,
            });
        }
        if tools.is_empty() {
            return Err("the catalog lists no tools".into());
        }
        Ok(CatalogView {
            text: text.to_string(),
            sha256: sha256_hex(text.as_bytes()),
            tools,
        })
    }

    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The tools as the prompts list them: name, description, schema and roles.
    pub fn prompt_text(&self) -> String {
        let mut s = String::new();
        for t in &self.tools {
            s.push_str(&format!("- {}: {}\n", t.name, t.description));
            s.push_str(&format!("  arguments (JSON Schema): {}\n", t.input_schema));
            if !t.roles.is_empty() {
                let roles: Vec<String> = t.roles.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("  roles: {}\n", roles.join(", ")));
            }
            if !t.groups.is_empty() {
                let groups: Vec<String> = t
                    .groups
                    .iter()
                    .map(|(k, v)| format!("{k}=[{}]", v.join(", ")))
                    .collect();
                s.push_str(&format!(
                    "  argument groups (the same kind of value in different places): {}\n",
                    groups.join(", ")
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tools_and_refuses_what_is_not_a_catalog() {
        let c = CatalogView::parse(
            r#"{"tools":[{"name":"mail.send","description":"Send","inputSchema":{"type":"object"},"roles":{"to":"email"}}]}"#,
        )
        .unwrap();
        assert_eq!(c.tool("mail.send").unwrap().roles["to"], "email");
        assert!(c.prompt_text().contains("roles: to=email"));
        let c = CatalogView::parse(
            r#"{"tools":[{"name":"fs.move","inputSchema":{"type":"object","properties":{"from":{"type":"string"},"to":{"type":"string"}},"required":["from"]},"aliases":{"path":["from","to"]}},
                {"name":"mail.send","inputSchema":{"type":"object","properties":{"to":{"type":"array","minItems":1},"cc":{"type":"array"}}},"groups":{"recipients":["to","cc"]}}]}"#,
        )
        .unwrap();
        assert_eq!(c.tool("fs.move").unwrap().groups["path"], ["from", "to"]);
        let send = c.tool("mail.send").unwrap();
        assert_eq!(send.groups["recipients"], ["to", "cc"]);
        assert!(send.arg_is_array("to") && send.arg_items("to").0 == 1);
        assert!(c.tool("fs.move").unwrap().arg_required("from"));
        assert!(c.prompt_text().contains("recipients=[to, cc]"));
        assert!(CatalogView::parse("{}").unwrap_err().contains("tools"));
        assert!(CatalogView::parse(r#"{"tools":[]}"#)
            .unwrap_err()
            .contains("no tools"));
        assert!(CatalogView::parse(r#"{"tools":[{"x":1}]}"#)
            .unwrap_err()
            .contains("tools[0]"));
    }
}
