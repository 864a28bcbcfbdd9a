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
            tools.push(Tool {
                name: name.to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                input_schema: t.get("inputSchema").cloned().unwrap_or(Value::Null),
                roles,
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
        assert!(CatalogView::parse("{}").unwrap_err().contains("tools"));
        assert!(CatalogView::parse(r#"{"tools":[]}"#)
            .unwrap_err()
            .contains("no tools"));
        assert!(CatalogView::parse(r#"{"tools":[{"x":1}]}"#)
            .unwrap_err()
            .contains("tools[0]"));
    }
}
