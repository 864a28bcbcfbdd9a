//! The JSON-lines MCP client `iron` uses on port 1, and how each outcome of a
//! `tools/call` becomes `iron call`'s exit code (docs/image.md).

use std::io::{self, BufRead, BufReader, Write};

use serde_json::{json, Value};

use crate::conn::{GateAddr, Stream};
use crate::PROTOCOL_VERSION;

/// Exit codes of `iron call`.
pub use ironvmm_wire::iron_exit::{
    DENIED as EXIT_DENIED, OK as EXIT_OK, TOOL_ERROR as EXIT_ERROR, UNREACHABLE as EXIT_UNREACHABLE,
};

/// A reply line longer than this is a protocol error (the gate's frames are
/// at most 1 MiB; this leaves room without trusting the peer unboundedly).
pub const MAX_LINE: usize = 16 << 20;

/// A denial, as the gate reports it in a tool result's `structuredContent`.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// The p.rules line, or null when no rule decided (default, invariant…).
    pub rule: Option<Value>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

/// Why a call did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The gate could not be reached.
    Unreachable(String),
    /// A tool result whose `structuredContent.decision` is `deny`.
    Denied(Box<Denial>),
    /// The tool ran and failed (`isError: true`); the text it returned.
    Tool(String),
    /// A JSON-RPC error.
    Rpc { code: i64, message: String },
    /// A reply that is not what MCP says, or a connection lost mid-call.
    Protocol(String),
}

impl CallError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CallError::Unreachable(_) => EXIT_UNREACHABLE,
            CallError::Denied(_) => EXIT_DENIED,
            CallError::Tool(_) | CallError::Rpc { .. } | CallError::Protocol(_) => EXIT_ERROR,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) => write!(f, "cannot reach the gate: {m}"),
            CallError::Denied(d) => {
                let by = d.decided_by.as_deref().unwrap_or("unknown");
                let reason = d.reason.as_deref().unwrap_or("no reason given");
                match &d.rule {
                    Some(Value::Null) | None => write!(f, "denied (decided by {by}): {reason}"),
                    Some(r) => {
                        let r = r.as_str().map_or(r.to_string(), str::to_string);
                        write!(f, "denied by rule {r} (decided by {by}): {reason}")
                    }
                }
            }
            CallError::Tool(t) => write!(f, "tool error: {t}"),
            CallError::Rpc { code, message } => write!(f, "error {code}: {message}"),
            CallError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

/// Turns a JSON-RPC error object into a [`CallError`].
pub fn error_from_rpc(err: &Value) -> CallError {
    let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    CallError::Rpc { code, message }
}

/// The denial a `tools/call` result carries, if it is one: `isError` with
/// `structuredContent.decision` = `deny` (a tool's own successful result may hold
/// any members it likes).
pub fn denial(result: &Value) -> Option<Denial> {
    let s = result.get("structuredContent")?;
    if result.get("isError") != Some(&Value::Bool(true))
        || s.get("decision").and_then(Value::as_str) != Some("deny")
    {
        return None;
    }
    let text = |k: &str| s.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Denial {
        rule: s.get("rule").cloned(),
        decided_by: text("decided_by"),
        reason: text("reason"),
    })
}

/// What `iron call` prints for a `tools/call` result: its text content, else its
/// structured content as JSON. A denial is a [`CallError::Denied`]; any other
/// `isError: true` is a [`CallError::Tool`].
pub fn tool_output(result: &Value) -> Result<String, CallError> {
    let Some(obj) = result.as_object() else {
        return Err(CallError::Protocol(format!(
            "tools/call result is not an object: {result}"
        )));
    };
    if let Some(d) = denial(result) {
        return Err(CallError::Denied(Box::new(d)));
    }
    let texts: Vec<&str> = obj
        .get("content")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|i| i.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|i| i.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let out = if !texts.is_empty() {
        texts.join("\n")
    } else if let Some(s) = obj.get("structuredContent") {
        s.to_string()
    } else {
        String::new()
    };
    match obj.get("isError") {
        Some(Value::Bool(true)) => Err(CallError::Tool(out)),
        None | Some(Value::Bool(false)) => Ok(out),
        Some(other) => Err(CallError::Protocol(format!(
            "isError is not a boolean: {other}"
        ))),
    }
}

/// One connection to the gate.
pub struct Client {
    reader: BufReader<Stream>,
    writer: Stream,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: &GateAddr) -> Result<Client, CallError> {
        let stream = addr
            .connect()
            .map_err(|e| CallError::Unreachable(format!("{addr}: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| CallError::Unreachable(format!("{addr}: {e}")))?;
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            next_id: 1,
        })
    }

    /// The MCP handshake: `initialize`, then `notifications/initialized`.
    pub fn initialize(&mut self) -> Result<Value, CallError> {
        let params = json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "iron", "version": env!("CARGO_PKG_VERSION")},
        });
        let result = self.request("initialize", params)?;
        self.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(result)
    }

    /// `tools/call`; returns the raw result (check it with [`tool_output`]).
    pub fn call_tool(&mut self, name: &str, args: Value) -> Result<Value, CallError> {
        self.request("tools/call", json!({"name": name, "arguments": args}))
    }

    /// Sends a request and waits for the reply with the same id. Notifications
    /// and server requests that arrive meanwhile are skipped.
    pub fn request(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        loop {
            let line = self.read_line()?;
            let msg: Value = serde_json::from_slice(&line)
                .map_err(|e| CallError::Protocol(format!("reply is not JSON: {e}")))?;
            if msg.get("method").is_some() {
                continue;
            }
            match msg.get("id") {
                Some(v) if v.as_u64() == Some(id) => {}
                Some(v) => {
                    return Err(CallError::Protocol(format!(
                        "reply for id {v}, expected {id}"
                    )))
                }
                None => {
                    // An error without an id: the gate could not parse our frame.
                    if let Some(e) = msg.get("error") {
                        return Err(error_from_rpc(e));
                    }
                    return Err(CallError::Protocol(format!("reply without an id: {msg}")));
                }
            }
            if let Some(e) = msg.get("error") {
                return Err(error_from_rpc(e));
            }
            return msg
                .get("result")
                .cloned()
                .ok_or_else(|| CallError::Protocol(format!("reply has no result: {msg}")));
        }
    }

    fn send(&mut self, msg: &Value) -> Result<(), CallError> {
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| CallError::Protocol(format!("sending to the gate: {e}")))
    }

    fn read_line(&mut self) -> Result<Vec<u8>, CallError> {
        read_line_limited(&mut self.reader, MAX_LINE)
            .map_err(|e| CallError::Protocol(format!("reading from the gate: {e}")))?
            .ok_or_else(|| CallError::Protocol("the gate closed the connection".into()))
    }
}

/// Reads one `\n`-terminated line (without the newline), at most `max` bytes.
/// `Ok(None)` at a clean end of stream.
pub fn read_line_limited<R: BufRead>(r: &mut R, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a line",
                ))
            };
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let denied = tool_output(&json!({"content": [{"type": "text",
            "text": "denied by rule 3 (decided by rule): no mail"}],
            "structuredContent": {"decision": "deny", "rule": 3, "decided_by": "rule", "reason": "no mail"},
            "isError": true}))
        .unwrap_err();
        assert_eq!(denied.exit_code(), 3);
        assert_eq!(
            denied.to_string(),
            "denied by rule 3 (decided by rule): no mail"
        );
        let timeout = tool_output(&json!({"content": [],
            "structuredContent": {"decision": "deny", "rule": null, "decided_by": "timeout", "reason": "r"},
            "isError": true}))
        .unwrap_err();
        assert_eq!(timeout.exit_code(), 3);
        assert_eq!(timeout.to_string(), "denied (decided by timeout): r");
        // The old error codes are plain protocol errors now.
        assert_eq!(
            error_from_rpc(&json!({"code": -32001, "message": "m"})).exit_code(),
            4
        );
        assert_eq!(
            error_from_rpc(&json!({"code": -32601, "message": "m"})).exit_code(),
            4
        );
        assert_eq!(CallError::Unreachable("x".into()).exit_code(), 5);
        assert_eq!(CallError::Protocol("x".into()).exit_code(), 4);
        assert_eq!(CallError::Tool("x".into()).exit_code(), 4);
        // A structuredContent that merely has a `decision` member of another value
        // is an ordinary result.
        let r = json!({"content": [], "structuredContent": {"decision": "deny"}, "isError": false});
        assert!(tool_output(&r).is_ok());
    }

    #[test]
    fn tool_output_prefers_text() {
        let r = json!({"content": [{"type": "text", "text": "a"}, {"type": "image"},
            {"type": "text", "text": "b"}], "structuredContent": {"x": 1}, "isError": false});
        assert_eq!(tool_output(&r).unwrap(), "a\nb");
        let r = json!({"content": [], "structuredContent": {"x": 1}});
        assert_eq!(tool_output(&r).unwrap(), r#"{"x":1}"#);
        let r = json!({"content": [{"type": "text", "text": "no such file"}], "isError": true});
        assert_eq!(tool_output(&r), Err(CallError::Tool("no such file".into())));
        assert!(matches!(
            tool_output(&json!([1])),
            Err(CallError::Protocol(_))
        ));
        assert!(matches!(
            tool_output(&json!({"isError": "yes"})),
            Err(CallError::Protocol(_))
        ));
    }

    #[test]
    fn lines_are_bounded() {
        let mut r = io::Cursor::new(b"abc\ndef".to_vec());
        assert_eq!(
            read_line_limited(&mut r, 10).unwrap(),
            Some(b"abc".to_vec())
        );
        assert!(read_line_limited(&mut r, 10).is_err()); // no newline before EOF
        let mut r = io::Cursor::new(b"0123456789\n".to_vec());
        assert!(read_line_limited(&mut r, 5).is_err());
        let mut r = io::Cursor::new(Vec::new());
        assert_eq!(read_line_limited(&mut r, 5).unwrap(), None);
    }
}
