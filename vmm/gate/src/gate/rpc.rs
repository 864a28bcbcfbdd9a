//! JSON-RPC 2.0 reply lines, written straight into the connection's output buffer.

use serde_json::{json, Value};

pub use ironvmm_wire::rpc_code::{INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR};
/// Denied by a rule, the default, an invariant, a limit, a user...
pub const DENIED: i64 = -32001;
/// Denied because nobody answered an ask in time.
pub const APPROVAL_TIMEOUT: i64 = -32002;

pub use ironvmm_wire::PROTOCOL_VERSION;

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

/// The `data` of a denial (-32001 / -32002).
pub fn denial_data(rule: Option<u32>, decided_by: &str, reason: &str) -> Value {
    json!({"decision": "deny", "rule": rule, "decided_by": decided_by, "reason": reason})
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
