//! The `net` tools: network egress through the guest's proxy on vsock port 2.
//!
//! Only the catalog entries live here so far: policies can name `net.connect` and
//! `net.http` and be checked against the builtin catalog. No service serves them
//! yet, so the gate denies every such call as an unknown tool (fail closed).

pub mod body;
pub mod head;
pub mod pipe;

use serde_json::json;

use super::{ToolSpec, DEFAULT_REPLY_CAP};

pub fn tool_specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "net.connect",
            description: "Open a TCP tunnel to host:port (an HTTP CONNECT from the guest's proxy)",
            input_schema: json!({"type": "object",
                "properties": {"host": {"type": "string", "maxLength": 253},
                               "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                "required": ["host", "port"], "additionalProperties": false}),
            roles: &[("host", "host")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
        ToolSpec {
            name: "net.http",
            description: "One plain-HTTP request head from the guest's proxy",
            input_schema: json!({"type": "object",
                "properties": {"method": {"type": "string", "maxLength": 16},
                               "url": {"type": "string", "maxLength": 8192}},
                "required": ["method", "url"], "additionalProperties": false}),
            roles: &[("url", "url")],
            aliases: &[],
            reply_cap: DEFAULT_REPLY_CAP,
        },
    ]
}
