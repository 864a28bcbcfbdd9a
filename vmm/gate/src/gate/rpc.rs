//! JSON-RPC 2.0 reply lines, written straight into the connection's output buffer.

use serde_json::{json, Value};

pub use ironvmm_wire::rpc_code::{INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};
pub use ironvmm_wire::{PROTOCOL_VERSION, PROTOCOL_VERSIONS};

fn head(out: &mut Vec<u8>, id: &Value) {
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    // Serialising a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, id);
}

/// `{"jsonrpc":"2.0","id":ID,"result":RESULT}\n`
pub fn result(out: &mut Vec<u8>, id: &Value, result: &Value) {
    head(out, id);
    out.extend_from_slice(b",\"result\":");
    let _ = serde_json::to_writer(&mut *out, result);
    out.extend_from_slice(b"}\n");
}

/// A result whose JSON text is already serialised (the cached `tools/list`).
pub fn raw_result(out: &mut Vec<u8>, id: &Value, raw: &[u8]) {
    head(out, id);
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(raw);
    out.extend_from_slice(b"}\n");
}

/// `{"jsonrpc":"2.0","id":ID,"error":{"code":C,"message":M[,"data":D]}}\n`
pub fn error(out: &mut Vec<u8>, id: &Value, code: i64, message: &str, data: Option<&Value>) {
    head(out, id);
    let mut e = json!({"code": code, "message": message});
    if let Some(d) = data {
        e["data"] = d.clone();
    }
    out.extend_from_slice(b",\"error\":");
    let _ = serde_json::to_writer(&mut *out, &e);
    out.extend_from_slice(b"}\n");
}

/// A denial, as a `tools/call` result rather than a JSON-RPC error: the model reads
/// it and can adapt, and no SDK mistakes it for its own error codes (-32001 is both
/// official SDKs' request timeout).
pub fn denial_result(rule: Option<u32>, decided_by: &str, reason: &str) -> Value {
    let text = match rule {
        Some(r) => format!("denied by rule {r} (decided by {decided_by}): {reason}"),
        None => format!("denied (decided by {decided_by}): {reason}"),
    };
    let structured =
        json!({"decision": "deny", "rule": rule, "decided_by": decided_by, "reason": reason});
    tool_result(structured, true, Some(text))
}

/// The `protocolVersion` the gate answers to a client asking for `asked`: the
/// client's own when the gate speaks it, else the newest the gate speaks.
pub fn negotiate_version(asked: &str) -> &'static str {
    PROTOCOL_VERSIONS
        .iter()
        .find(|v| **v == asked)
        .copied()
        .unwrap_or(PROTOCOL_VERSION)
}

/// A `tools/call` result: structured content, also as text (MCP asks for both).
pub fn tool_result(structured: Value, is_error: bool, text: Option<String>) -> Value {
    let text = text.unwrap_or_else(|| structured.to_string());
    json!({
        "content": [{"type": "text", "text": text}],
        "structuredContent": structured,
        "isError": is_error,
    })
}
