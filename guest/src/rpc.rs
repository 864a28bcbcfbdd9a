//! The JSON-lines MCP client `iron` uses on port 1, and how each outcome of a
//! `tools/call` becomes `iron call`'s exit code (interfaces.md).

use std::io::{self, BufRead, BufReader, Write};

use serde_json::{json, Value};

use crate::conn::{GateAddr, Stream};
use crate::PROTOCOL_VERSION;

/// Exit codes of `iron call`.
pub const EXIT_OK: u8 = 0;
pub const EXIT_DENIED: u8 = 3;
pub const EXIT_ERROR: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;

/// JSON-RPC error codes the gate uses for denials.
pub const DENIED: i64 = -32001;
pub const ASK_TIMEOUT: i64 = -32002;

/// A reply line longer than this is a protocol error (the gate's frames are
/// at most 1 MiB; this leaves room without trusting the peer unboundedly).
pub const MAX_LINE: usize = 16 << 20;

/// A denial as the gate reports it in the error's `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub code: i64,
    pub message: String,
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
    /// A -32001 or -32002 error.
    Denied(Box<Denial>),
    /// The tool ran and failed (`isError: true`); the text it returned.
    Tool(String),
    /// Any other JSON-RPC error.
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
                let Denial {
                    code,
                    message,
                    rule,
                    decided_by,
                    reason,
                } = &**d;
                let what = if *code == ASK_TIMEOUT {
                    "denied (nobody answered in time)"
                } else {
                    "denied"
                };
                let rule = match rule {
                    Some(Value::Null) | None => "no rule".to_string(),
                    Some(r) => format!("rule {}", r.as_str().map_or(r.to_string(), str::to_string)),
                };
                let by = decided_by.as_deref().unwrap_or("unknown");
                let reason = reason.as_deref().unwrap_or(message);
                write!(f, "{what} by {rule} (decided by {by}): {reason}")
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
    if code == DENIED || code == ASK_TIMEOUT {
        let data = err.get("data");
        let s = |k: &str| {
            data.and_then(|d| d.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        CallError::Denied(Box::new(Denial {
            code,
            message,
            rule: data.and_then(|d| d.get("rule")).cloned(),
            decided_by: s("decided_by"),
            reason: s("reason"),
        }))
    } else {
        CallError::Rpc { code, message }
    }
}

/// What `iron call` prints for a `tools/call` result: its text content, else its
/// structured content as JSON. `isError: true` is a [`CallError::Tool`].
pub fn tool_output(result: &Value) -> Result<String, CallError> {
    let Some(obj) = result.as_object() else {
        return Err(CallError::Protocol(format!(
            "tools/call result is not an object: {result}"
        )));
    };
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
    fn exit_codes_per_interfaces() {
        let denied = error_from_rpc(&json!({"code": -32001, "message": "denied",
            "data": {"decision": "deny", "rule": 3, "decided_by": "rule", "reason": "no mail"}}));
        assert_eq!(denied.exit_code(), 3);
        assert_eq!(
            denied.to_string(),
            "denied by rule 3 (decided by rule): no mail"
        );
        let timeout = error_from_rpc(&json!({"code": -32002, "message": "ask timed out",
            "data": {"decision": "deny", "rule": null, "decided_by": "timeout", "reason": "r"}}));
        assert_eq!(timeout.exit_code(), 3);
        assert!(timeout.to_string().contains("no rule"));
        assert_eq!(
            error_from_rpc(&json!({"code": -32601, "message": "m"})).exit_code(),
            4
        );
        assert_eq!(CallError::Unreachable("x".into()).exit_code(), 5);
        assert_eq!(CallError::Protocol("x".into()).exit_code(), 4);
        assert_eq!(CallError::Tool("x".into()).exit_code(), 4);
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
