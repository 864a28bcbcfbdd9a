//! The `llm.chat` tool: the guest proxy's model route (`/llm/<provider>/...`).
//!
//! Only the catalog entry lives here so far, so that policies may put rules and
//! limits on `llm.chat`. No service serves it yet: the gate denies such calls as an
//! unknown tool.

use serde_json::json;

use super::{ToolSpec, DEFAULT_REPLY_CAP};

pub fn tool_specs() -> Vec<ToolSpec> {
    vec![ToolSpec {
        name: "llm.chat",
        description: "One request to a model provider, made by the host with the owner's key",
        input_schema: json!({"type": "object",
            "properties": {"provider": {"type": "string", "maxLength": 64},
                           "model": {"type": "string", "maxLength": 256},
                           "path": {"type": "string", "maxLength": 4096}},
            "required": ["provider"], "additionalProperties": false}),
        roles: &[],
        aliases: &[],
        reply_cap: DEFAULT_REPLY_CAP,
    }]
}
