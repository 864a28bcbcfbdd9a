//! The gate: guest bytes on vsock port 1 in, decided and served reply lines out.
//!
//! bytes → `frame` (newline framing, size limit) → `json` (strict parse, once)
//! → JSON-RPC / MCP dispatch → `Decider` → audit `decision` record (durable)
//! → service → reply → audit `outcome` record.
//!
//! The interface is synchronous and transport-free: a vsock device (or the host-only
//! `ironvmm gate`) owns one `Connection` per guest connection and feeds it bytes.
//! `Gate` is shared by all connections of one VM.

pub mod approver;
pub mod budget;
pub mod decide;
pub mod frame;
pub mod policy;
pub mod rpc;
pub mod setup;

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::audit::{AuditLog, DecisionRecord, OutcomeStatus};
use crate::json::{self, JsonError};
use crate::services::Services;
pub use decide::{Call, DecidedBy, Decider, DecisionRef, Verdict};
use frame::{FrameError, Framer, DEFAULT_MAX_FRAME};

/// Configurable limits of the gate.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Largest frame in bytes, newline excluded.
    pub max_frame: usize,
    /// Most unprocessed input a connection holds (at least `max_frame`).
    pub max_buffered: usize,
    /// Once this many reply bytes are in `out`, a connection stops taking frames
    /// until `resume`: one small request can produce a ~1.4 MiB reply, so without it
    /// one 64 KiB packet of requests could make a gigabyte of replies at once.
    pub max_output: usize,
}

impl Default for GateLimits {
    fn default() -> Self {
        GateLimits {
            max_frame: DEFAULT_MAX_FRAME,
            max_buffered: 2 * DEFAULT_MAX_FRAME,
            max_output: DEFAULT_MAX_FRAME,
        }
    }
}

impl GateLimits {
    /// Defaults, with another frame limit (the buffer limit follows it).
    pub fn with_max_frame(max_frame: usize) -> Self {
        GateLimits {
            max_frame,
            max_buffered: 2 * max_frame,
            ..GateLimits::default()
        }
    }
}

/// The gate of one VM: policy, services and audit log. `Send + Sync`, used via `Arc`.
pub struct Gate {
    decider: Box<dyn Decider>,
    services: Services,
    audit: Arc<AuditLog>,
    limits: GateLimits,
    /// `tools/list` never changes for a loaded policy, so it is serialised once.
    tools_list: Vec<u8>,
}

impl Gate {
    pub fn new(
        decider: Box<dyn Decider>,
        services: Services,
        audit: Arc<AuditLog>,
        limits: GateLimits,
    ) -> Gate {
        let tools: Vec<Value> = services
            .specs()
            .iter()
            .filter(|s| decider.could_allow_or_ask(s.name))
            .map(|s| s.mcp_entry())
            .collect();
        let tools_list = serde_json::to_vec(&json!({ "tools": tools })).unwrap_or_default();
        Gate {
            decider,
            services,
            audit,
            limits,
            tools_list,
        }
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    /// A condition the VMM must act on by stopping the VM (exit 125): the audit log
    /// can no longer be written, so every call is being denied.
    pub fn fatal(&self) -> Option<String> {
        if let Some(f) = self.audit.failure() {
            return Some(format!("the audit log can no longer be written: {f}"));
        }
        self.audit.exhausted().map(str::to_string)
    }

    /// Handles one complete frame, appending at most one reply line to `out`.
    fn handle_frame(&self, conn: &str, frame: &[u8], out: &mut Vec<u8>) {
        let value = match json::parse_strict(frame) {
            Ok(v) => v,
            Err(e @ JsonError::TooDeep { .. }) => {
                let m = format!("Invalid Request: {e}");
                return rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, &m, None);
            }
            Err(e) => {
                let m = format!("Parse error: {e}");
                return rpc::error(out, &Value::Null, rpc::PARSE_ERROR, &m, None);
            }
        };
        let mut req = match value {
            Value::Object(m) => m,
            Value::Array(_) => {
                let m = "Invalid Request: batches are not supported";
                return rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, m, None);
            }
            _ => {
                let m = "Invalid Request: not a request object";
                return rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, m, None);
            }
        };
        if !req.contains_key("method") && (req.contains_key("result") || req.contains_key("error"))
        {
            // A response from the client (the gate sends no requests, so it answers
            // nothing); answering it could start an endless exchange of errors.
            return;
        }
        let id = match req.remove("id") {
            None => None,
            Some(id @ Value::String(_)) => Some(id),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
            Some(_) => {
                let m = "Invalid Request: id must be a string or an integer";
                return rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, m, None);
            }
        };
        let reply_id = id.clone().unwrap_or(Value::Null);
        if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            let m = "Invalid Request: jsonrpc must be \"2.0\"";
            return rpc::error(out, &reply_id, rpc::INVALID_REQUEST, m, None);
        }
        let method = match req.remove("method") {
            Some(Value::String(m)) => m,
            _ => {
                let m = "Invalid Request: method must be a string";
                return rpc::error(out, &reply_id, rpc::INVALID_REQUEST, m, None);
            }
        };
        let Some(id) = id else {
            // A notification gets no reply, and has no effect: nothing here acts on
            // `notifications/initialized` or `notifications/cancelled`, and a
            // tools/call without an id is not served (it could not be answered).
            return;
        };
        let params = req.remove("params");
        match method.as_str() {
            "initialize" | "ping" | "tools/list" => {
                let params = match params {
                    None => Map::new(),
                    Some(Value::Object(p)) => p,
                    Some(_) => {
                        let m = "Invalid params: params must be an object";
                        return rpc::error(out, &id, rpc::INVALID_PARAMS, m, None);
                    }
                };
                match method.as_str() {
                    "initialize" => match initialize_result(&params) {
                        Ok(r) => rpc::result(out, &id, &r),
                        Err(m) => rpc::error(out, &id, rpc::INVALID_PARAMS, &m, None),
                    },
                    "ping" => rpc::result(out, &id, &json!({})),
                    // The one page has no cursor: any cursor is one the gate never gave.
                    _ => match params.get("cursor") {
                        None | Some(Value::Null) => rpc::raw_result(out, &id, &self.tools_list),
                        Some(c) => {
                            let m = format!("Invalid params: unknown cursor {c}");
                            rpc::error(out, &id, rpc::INVALID_PARAMS, &m, None)
                        }
                    },
                }
            }
            "tools/call" => match tool_call(params) {
                Ok(call) => self.serve_call(conn, &id, call, out),
                Err(m) => rpc::error(out, &id, rpc::INVALID_PARAMS, &m, None),
            },
            _ => {
                let m = format!("Method not found: {method}");
                rpc::error(out, &id, rpc::METHOD_NOT_FOUND, &m, None)
            }
        }
    }

    /// Decide, audit (durably), then serve or deny one call.
    fn serve_call(&self, conn: &str, id: &Value, call: Call, out: &mut Vec<u8>) {
        let t0 = Instant::now();
        if let Some(f) = self.fatal() {
            return deny(out, id, None, DecidedBy::Invariant, &f);
        }
        let invariant = |reason: &'static str| DecisionRef {
            verdict: Verdict::Deny,
            rule: None,
            by: DecidedBy::Invariant,
            reason: reason.into(),
        };
        // The catalog the policy knows lists every builtin tool; a tool this gate does
        // not serve (fs without --workspace) is an unknown tool here.
        let unknown = !self.services.offers(&call.tool);
        let ruling = if unknown {
            invariant("unknown tool")
        } else {
            // A bug in the engine must not take the VMM down, nor let the call through.
            panic::catch_unwind(AssertUnwindSafe(|| {
                self.decider.decide(&call.tool, &call.args)
            }))
            .unwrap_or_else(|_| invariant("internal error in the policy engine"))
        };
        let policy_ns = t0.elapsed().as_nanos() as u64;
        // Until approvals exist, nobody can answer an ask: it resolves as deny.
        let (allowed, by, reason, asked) = match ruling.verdict {
            Verdict::Allow => (true, ruling.by, &*ruling.reason, false),
            Verdict::Deny => (false, ruling.by, &*ruling.reason, false),
            Verdict::Ask => (false, DecidedBy::NonInteractive, "no approver", true),
        };
        let record = DecisionRecord {
            conn,
            rpc_id: id,
            tool: &call.tool,
            args: &call.args,
            decision: if allowed { "allow" } else { "deny" },
            asked,
            rule: ruling.rule,
            decided_by: by.as_str(),
            reason,
            policy_ns,
        };
        let seq = match self.audit.decision(&record) {
            Ok(seq) => seq,
            Err(e) => {
                let m = format!("the audit log can no longer be written: {e}");
                return deny(out, id, None, DecidedBy::Invariant, &m);
            }
        };
        if unknown {
            // MCP makes an unknown tool a protocol error, not a tool result; it is
            // audited above all the same.
            let m = format!("Unknown tool: {}", call.tool);
            return rpc::error(out, id, rpc::INVALID_PARAMS, &m, None);
        }
        if !allowed {
            return deny(out, id, ruling.rule, by, reason);
        }
        let served = panic::catch_unwind(AssertUnwindSafe(|| {
            self.services.call(&call.tool, &call.args)
        }));
        let (result, status) = match served {
            Ok(Ok(v)) => (rpc::tool_result(v, false, None), OutcomeStatus::Ok),
            Err(_) => {
                let m = "internal error in the service";
                let structured = json!({"error": {"kind": "internal", "message": m}});
                let text = format!("{}: {m}", call.tool);
                (
                    rpc::tool_result(structured, true, Some(text)),
                    OutcomeStatus::Error,
                )
            }
            Ok(Err(e)) => {
                let text = format!("{}: {}", call.tool, e.message);
                let structured = json!({"error": {"kind": e.kind, "message": e.message}});
                (
                    rpc::tool_result(structured, true, Some(text)),
                    OutcomeStatus::ToolError,
                )
            }
        };
        let start = out.len();
        rpc::result(out, id, &result);
        let bytes = (out.len() - start) as u64;
        // A failure here is remembered by the log; the next call is denied for it.
        let _ = self
            .audit
            .outcome(seq, status, bytes, t0.elapsed().as_micros() as u64);
    }
}

/// A denial (by a rule, the default, an invariant such as invalid arguments, a
/// timeout…) is a tool result with `isError`, not a JSON-RPC error.
fn deny(out: &mut Vec<u8>, id: &Value, rule: Option<u32>, by: DecidedBy, reason: &str) {
    rpc::result(out, id, &rpc::denial_result(rule, by.as_str(), reason));
}

/// The `initialize` result, or the -32602 message for an incomplete request.
fn initialize_result(params: &Map<String, Value>) -> Result<Value, String> {
    let Some(Value::String(asked)) = params.get("protocolVersion") else {
        return Err("Invalid params: initialize needs params.protocolVersion (a string)".into());
    };
    if !matches!(params.get("capabilities"), Some(Value::Object(_))) {
        return Err("Invalid params: initialize needs params.capabilities (an object)".into());
    }
    if !matches!(params.get("clientInfo"), Some(Value::Object(_))) {
        return Err("Invalid params: initialize needs params.clientInfo (an object)".into());
    }
    Ok(json!({
        "protocolVersion": rpc::negotiate_version(asked),
        "capabilities": {"tools": {}},
        "serverInfo": {"name": "ironvmm", "version": env!("CARGO_PKG_VERSION")},
    }))
}

/// `tools/call` params → the policy call; the error is the -32602 message.
fn tool_call(params: Option<Value>) -> Result<Call, String> {
    let Some(Value::Object(mut p)) = params else {
        return Err("Invalid params: tools/call needs params {name, arguments}".into());
    };
    let tool = match p.remove("name") {
        Some(Value::String(s)) => s,
        _ => return Err("Invalid params: params.name must be a string".into()),
    };
    let args = match p.remove("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err("Invalid params: params.arguments must be an object".into()),
    };
    Ok(Call { tool, args })
}

/// Why a connection must be reset. Any reply lines already appended to `out`
/// (including the error reply that explains the reset) should still be sent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionError {
    /// A frame, or the unterminated start of one, passed the limit.
    FrameTooLong { limit: usize },
    /// The peer sent more than `max_buffered` bytes that could not be processed yet
    /// (it does not read its replies, and the transport kept feeding input).
    Backlog { limit: usize },
    /// The audit log failed: the VMM must stop the VM (exit 125). `Gate::fatal` says the same.
    AuditFailed(String),
    /// The connection was already reset or closed.
    Closed,
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::FrameTooLong { limit } => {
                write!(f, "a frame is over the limit of {limit} bytes")
            }
            ConnectionError::Backlog { limit } => write!(
                f,
                "over {limit} bytes of input wait behind replies the peer does not read"
            ),
            ConnectionError::AuditFailed(m) => write!(f, "{m}"),
            ConnectionError::Closed => f.write_str("the connection is closed"),
        }
    }
}

impl std::error::Error for ConnectionError {}

/// One guest connection to port 1.
pub struct Connection {
    gate: Arc<Gate>,
    id: String,
    framer: Framer,
    closed: bool,
}

impl Connection {
    pub fn new(gate: Arc<Gate>, conn_id: String) -> Self {
        let framer = Framer::new(gate.limits.max_frame, gate.limits.max_buffered);
        Connection {
            gate,
            id: conn_id,
            framer,
            closed: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes from the peer; complete reply lines are appended to `out`, until `out`
    /// holds `max_output` bytes. Frames left then wait: see `has_backlog`.
    /// `Err` means: send what is in `out`, then reset this connection.
    pub fn on_data(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        if self.closed {
            return Err(ConnectionError::Closed);
        }
        // Input is taken in pieces that fit the buffer, each processed before the
        // next, so only input that truly waits behind unread replies counts.
        loop {
            let take = data.len().min(self.framer.room());
            if take == 0 && !data.is_empty() {
                let limit = self
                    .gate
                    .limits
                    .max_buffered
                    .max(self.gate.limits.max_frame);
                return Err(self.reset(FrameError::Backlog { limit }, out));
            }
            if let Err(e) = self.framer.feed(&data[..take]) {
                return Err(self.reset(e, out));
            }
            data = &data[take..];
            self.process(out)?;
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Frames are waiting because `out` reached `max_output`. The transport should
    /// send `out`, stop taking input from the peer (no new credit), and call
    /// `resume` once it has room again.
    pub fn has_backlog(&self) -> bool {
        !self.closed && self.framer.has_frame()
    }

    /// Processes waiting frames, as `on_data` does with new ones.
    pub fn resume(&mut self, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        if self.closed {
            return Err(ConnectionError::Closed);
        }
        self.process(out)
    }

    fn process(&mut self, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        let max_output = self.gate.limits.max_output;
        while out.len() < max_output {
            match self.framer.next_frame() {
                None => break,
                Some(Ok(frame)) => self.gate.handle_frame(&self.id, frame, out),
                Some(Err(e)) => return Err(self.reset(e, out)),
            }
        }
        if let Some(f) = self.gate.fatal() {
            self.closed = true;
            return Err(ConnectionError::AuditFailed(f));
        }
        Ok(())
    }

    fn reset(&mut self, e: FrameError, out: &mut Vec<u8>) -> ConnectionError {
        self.closed = true;
        let (m, err) = match e {
            FrameError::TooLong { limit } => (
                format!("Invalid Request: frame over the limit of {limit} bytes"),
                ConnectionError::FrameTooLong { limit },
            ),
            FrameError::Backlog { limit } => (
                format!(
                    "Invalid Request: over {limit} bytes of requests wait behind unread replies"
                ),
                ConnectionError::Backlog { limit },
            ),
        };
        rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, &m, None);
        err
    }

    /// The peer closed (or reset) the connection. An unfinished frame is dropped
    /// undecided: nothing of it reached the policy or a service. So are frames still
    /// waiting in the backlog: nobody would read their replies.
    pub fn on_close(&mut self) {
        self.closed = true;
        self.framer = Framer::new(0, 0);
    }

    /// Unprocessed input held (bounded by `max_buffered`).
    pub fn pending_bytes(&self) -> usize {
        self.framer.buffered()
    }
}
