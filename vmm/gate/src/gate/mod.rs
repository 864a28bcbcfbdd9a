//! The gate: guest bytes on vsock port 1 in, decided and served reply lines out.
//!
//! bytes → `frame` (newline framing, size limit) → `json` (strict parse, once)
//! → JSON-RPC / MCP dispatch → `Decider` → audit `decision` record (durable)
//! → service → reply → audit `outcome` record.
//!
//! Threads: a transport (the vsock device thread, or a client thread of the
//! host-only `ironvmm gate`) owns one `Connection` per guest connection and feeds it
//! bytes; it only frames them, and never parses nor waits. Every complete frame goes
//! with its in-flight slot to the gate's `pool` of workers, which parses and checks
//! it, answers the cheap methods and the errors, and decides and serves a
//! `tools/call` (decision, audit fsync, service); an `ask` is parked in a table
//! until its `Approver` answers. Replies come back through `inflight` and the
//! transport's wake. `Gate` is shared by all connections of one VM.

pub mod approver;
pub mod budget;
pub mod connection;
pub mod decide;
pub mod direct;
pub mod followup;
pub mod frame;
pub mod inflight;
pub mod policy;
pub mod pool;
pub mod rpc;
pub mod setup;

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::audit::{AnswerRef, AuditLog, DecisionRecord, OutcomeStatus};
use crate::json::{self, JsonError};
use crate::services::{Lane, Reply, Services};
use approver::{Answer, Approver, AskRequest, DenyAll};
pub use connection::{Connection, ConnectionError};
pub use decide::{Call, DecidedBy, Decider, DecisionRef, Verdict};
use frame::DEFAULT_MAX_FRAME;
use inflight::{Slot, VmSlots};
use pool::{Pool, PoolConfig};

/// Most bytes of one serialised reply line. Past it the call gets a tool error
/// instead. A reply is built whole and held in its in-flight slot until collected,
/// so this times `max_inflight` bounds the replies a VM holds (docs/gate.md
/// "Memory"). A full 512 KiB read (base64, or text) fits.
pub const MAX_REPLY: usize = 2 << 20;

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
    /// Calls in flight on one connection (running, parked, or answered and not yet
    /// sent). At the bound the connection stops taking frames.
    pub max_inflight_per_conn: usize,
    /// Calls in flight in the whole VM (all connections).
    pub max_inflight: usize,
    /// Worker threads of each lane: the local one reads every frame and runs the
    /// decisions, their fsyncs and the local services; the outside one runs the
    /// services that wait on the outside world (`services::Lane`).
    pub workers: usize,
    /// Longest a service may run before the call is answered with a tool error.
    pub call_timeout: Duration,
}

impl Default for GateLimits {
    fn default() -> Self {
        GateLimits {
            max_frame: DEFAULT_MAX_FRAME,
            max_buffered: 2 * DEFAULT_MAX_FRAME,
            max_output: DEFAULT_MAX_FRAME,
            max_inflight_per_conn: DEFAULT_MAX_INFLIGHT_PER_CONN,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            workers: DEFAULT_WORKERS,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// Defaults of `--max-inflight-per-conn`, `--max-inflight`, `--workers`, `--call-timeout`.
pub const DEFAULT_MAX_INFLIGHT_PER_CONN: usize = 64;
pub const DEFAULT_MAX_INFLIGHT: usize = 256;
pub const DEFAULT_WORKERS: usize = 16;
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

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

/// The gate of one VM: policy, services, audit log, approver and workers.
/// `Send + Sync`, used via `Arc`.
pub struct Gate {
    decider: Box<dyn Decider>,
    services: Services,
    audit: Arc<AuditLog>,
    limits: GateLimits,
    /// `tools/list` never changes for a loaded policy, so it is serialised once.
    tools_list: Vec<u8>,
    approver: RwLock<Arc<dyn Approver>>,
    /// `None` when the workers could not be started: every call is then denied.
    pool: Option<Pool>,
    /// The outside lane's workers; `None` when they could not be started, and the
    /// local workers serve those calls too.
    outside: Option<Pool>,
    vm_slots: Arc<VmSlots>,
    /// Asked calls waiting for their answer, by the `seq` of their `ask` record.
    parked: Mutex<HashMap<u64, Parked>>,
}

/// A call waiting for the owner: a table entry, not a thread.
struct Parked {
    slot: Slot,
    id: Value,
    call: Call,
    rule: Option<u32>,
    t0: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let lane = |worker, watchdog| {
            Pool::new(PoolConfig {
                worker,
                watchdog,
                workers: limits.workers,
                max_stuck: limits.workers,
            })
        };
        let pool = match lane("gate-worker", "gate-watchdog") {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!("gate: {e}; every call will be denied");
                None
            }
        };
        let outside = match pool
            .as_ref()
            .map(|_| lane("gate-outside", "gate-out-watch"))
        {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                log::error!("gate: {e} for the outside lane; the local workers serve it too");
                None
            }
            None => None,
        };
        Gate {
            decider,
            services,
            audit,
            vm_slots: VmSlots::new(limits.max_inflight),
            limits,
            tools_list,
            approver: RwLock::new(Arc::new(DenyAll)),
            pool,
            outside,
            parked: Mutex::new(HashMap::new()),
        }
    }

    /// Who answers asks from now on (`DenyAll` until set).
    pub fn set_approver(&self, approver: Arc<dyn Approver>) {
        *self.approver.write().unwrap_or_else(|e| e.into_inner()) = approver;
    }

    /// `Gate::new` with an approver, for builders.
    pub fn with_approver(self, approver: Arc<dyn Approver>) -> Gate {
        self.set_approver(approver);
        self
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn limits(&self) -> GateLimits {
        self.limits
    }

    pub(crate) fn vm_slots(&self) -> &Arc<VmSlots> {
        &self.vm_slots
    }

    /// Calls in flight in the whole VM.
    pub fn in_flight(&self) -> usize {
        self.vm_slots.used()
    }

    /// Asked calls waiting for an answer.
    pub fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Worker threads stuck in a service past `call_timeout` right now.
    pub fn stuck_workers(&self) -> usize {
        self.pools().map(Pool::stuck).sum()
    }

    /// A condition the VMM must act on by stopping the VM (exit 125): the audit log
    /// can no longer be written, so every call is being denied. The VMM learns it
    /// from `AuditLog::on_failure`, as an event; this is for connections.
    pub fn fatal(&self) -> Option<String> {
        if let Some(f) = self.audit.failure() {
            return Some(format!("the audit log can no longer be written: {f}"));
        }
        self.audit.exhausted().map(str::to_string)
    }

    /// Stops the workers once the calls queued have run, and joins them. Calls still
    /// parked stay unanswered (their connections are going away). Returns the
    /// number of worker threads left stuck in a service.
    pub fn shutdown(&self) -> usize {
        // Local first: a call it runs may still hand its service to the outside lane.
        self.pools().map(Pool::shutdown).sum()
    }

    /// The lanes' pools, local first.
    fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pool.iter().chain(self.outside.iter())
    }

    /// Takes one complete frame from a connection, with its in-flight slot, and
    /// hands it to a worker, which parses, checks and answers it (`run_frame`). The
    /// calling thread (the vsock device thread) never parses nor waits.
    pub(crate) fn take_frame(self: &Arc<Self>, slot: Slot, frame: Vec<u8>) {
        let Some(pool) = &self.pool else {
            // No worker could be started, so there is no other thread: the frame is
            // read here, and a call is denied (`deny_call`), never served.
            return match self.read_frame(&frame) {
                Read::Reply(out) => slot.complete(out),
                Read::Call { id, .. } => deny_call(slot, &id),
                Read::Silent => slot.release(),
            };
        };
        let gate = Arc::clone(self);
        if pool.submit(move || gate.run_frame(slot, frame)).is_err() {
            // Only while shutting down: the connection is going away unanswered.
            log::debug!("gate: a frame arrived during shutdown and was dropped unread");
        }
    }

    /// One frame, on a worker: a cheap method or an error is answered through its
    /// slot; a `tools/call` is decided and served right here.
    fn run_frame(self: &Arc<Self>, slot: Slot, frame: Vec<u8>) {
        let read = self.read_frame(&frame);
        // The bytes are not needed past the parse: a slot holds a frame, a call or a
        // reply, one at a time (docs/gate.md "Memory").
        drop(frame);
        match read {
            Read::Reply(out) => slot.complete(out),
            Read::Call { id, call } => self.serve_call(slot, &id, call),
            Read::Silent => slot.release(),
        }
    }

    /// Parses and checks one frame: the reply of a cheap method or of an error, the
    /// call to serve, or nothing to answer.
    fn read_frame(&self, frame: &[u8]) -> Read {
        let value = match json::parse_strict(frame) {
            Ok(v) => v,
            Err(e @ JsonError::TooDeep { .. }) => {
                let m = format!("Invalid Request: {e}");
                return Read::error(&Value::Null, rpc::INVALID_REQUEST, &m);
            }
            Err(e) => {
                let m = format!("Parse error: {e}");
                return Read::error(&Value::Null, rpc::PARSE_ERROR, &m);
            }
        };
        let mut req = match value {
            Value::Object(m) => m,
            Value::Array(_) => {
                let m = "Invalid Request: batches are not supported";
                return Read::error(&Value::Null, rpc::INVALID_REQUEST, m);
            }
            _ => {
                let m = "Invalid Request: not a request object";
                return Read::error(&Value::Null, rpc::INVALID_REQUEST, m);
            }
        };
        if !req.contains_key("method") && (req.contains_key("result") || req.contains_key("error"))
        {
            // A response from the client (the gate sends no requests, so it answers
            // nothing); answering it could start an endless exchange of errors.
            return Read::Silent;
        }
        let id = match req.remove("id") {
            None => None,
            Some(id @ Value::String(_)) => Some(id),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
            Some(_) => {
                let m = "Invalid Request: id must be a string or an integer";
                return Read::error(&Value::Null, rpc::INVALID_REQUEST, m);
            }
        };
        let reply_id = id.clone().unwrap_or(Value::Null);
        if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            let m = "Invalid Request: jsonrpc must be \"2.0\"";
            return Read::error(&reply_id, rpc::INVALID_REQUEST, m);
        }
        let method = match req.remove("method") {
            Some(Value::String(m)) => m,
            _ => {
                let m = "Invalid Request: method must be a string";
                return Read::error(&reply_id, rpc::INVALID_REQUEST, m);
            }
        };
        let Some(id) = id else {
            // A notification gets no reply, and has no effect: nothing here acts on
            // `notifications/initialized` or `notifications/cancelled`, and a
            // tools/call without an id is not served (it could not be answered).
            return Read::Silent;
        };
        let params = req.remove("params");
        match method.as_str() {
            "initialize" | "ping" | "tools/list" => {
                let mut out = Vec::new();
                let params = match params {
                    None => Map::new(),
                    Some(Value::Object(p)) => p,
                    Some(_) => {
                        let m = "Invalid params: params must be an object";
                        return Read::error(&id, rpc::INVALID_PARAMS, m);
                    }
                };
                match method.as_str() {
                    "initialize" => match initialize_result(&params) {
                        Ok(r) => rpc::result(&mut out, &id, &r),
                        Err(m) => rpc::error(&mut out, &id, rpc::INVALID_PARAMS, &m, None),
                    },
                    "ping" => rpc::result(&mut out, &id, &json!({})),
                    // The one page has no cursor: any cursor is one the gate never gave.
                    _ => match params.get("cursor") {
                        None | Some(Value::Null) => {
                            rpc::raw_result(&mut out, &id, &self.tools_list)
                        }
                        Some(c) => {
                            let m = format!("Invalid params: unknown cursor {c}");
                            rpc::error(&mut out, &id, rpc::INVALID_PARAMS, &m, None)
                        }
                    },
                }
                Read::Reply(out)
            }
            "tools/call" => match tool_call(params) {
                Ok(call) => Read::Call { id, call },
                Err(m) => Read::error(&id, rpc::INVALID_PARAMS, &m),
            },
            _ => {
                let m = format!("Method not found: {method}");
                Read::error(&id, rpc::METHOD_NOT_FOUND, &m)
            }
        }
    }

    /// Why calls are refused, as the guest may read it: never the log's host path
    /// (the VMM reports the whole of `fatal` on its own stderr).
    fn guest_fatal(&self) -> String {
        if self.audit.failure().is_none() && self.audit.exhausted().is_some() {
            "the VM's audit budget is spent: the VM is stopping".into()
        } else {
            "the audit log can no longer be written: the VM is stopping".into()
        }
    }

    /// Decide, audit (durably), then serve, deny or park one call. Runs on a worker.
    fn serve_call(self: &Arc<Self>, slot: Slot, id: &Value, call: Call) {
        let t0 = Instant::now();
        let mut out = Vec::new();
        if self.fatal().is_some() {
            deny(
                &mut out,
                id,
                None,
                DecidedBy::Invariant,
                &self.guest_fatal(),
            );
            return slot.complete(out);
        }
        // The catalog the policy knows lists every builtin tool; a tool this gate does
        // not serve (fs without --workspace) is an unknown tool here.
        let unknown = !self.services.offers(&call.tool);
        let ruling = self.rule_on(&call, unknown);
        let policy_ns = t0.elapsed().as_nanos() as u64;
        let (allowed, by, reason) = match ruling.verdict {
            Verdict::Allow => (true, ruling.by, &*ruling.reason),
            Verdict::Deny => (false, ruling.by, &*ruling.reason),
            Verdict::Ask => {
                let asked = Ask {
                    rule: ruling.rule,
                    by: ruling.by,
                    reason: ruling.reason.into_owned(),
                    policy_ns,
                };
                return self.park(slot, id, call, asked, t0);
            }
        };
        let record = DecisionRecord {
            conn: slot.conn(),
            rpc_id: id,
            tool: &call.tool,
            args: &call.args,
            decision: if allowed {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            asked: false,
            answer: None,
            rule: ruling.rule,
            decided_by: by,
            reason,
            policy_ns,
        };
        let seq = match self.audit.decision(&record) {
            Ok(seq) => seq,
            Err(_) => {
                deny(
                    &mut out,
                    id,
                    None,
                    DecidedBy::Invariant,
                    &self.guest_fatal(),
                );
                return slot.complete(out);
            }
        };
        if unknown {
            // MCP makes an unknown tool a protocol error, not a tool result; it is
            // audited above all the same.
            let m = format!("Unknown tool: {}", call.tool);
            rpc::error(&mut out, id, rpc::INVALID_PARAMS, &m, None);
            return slot.complete(out);
        }
        if !allowed {
            deny(&mut out, id, ruling.rule, by, reason);
            return slot.complete(out);
        }
        self.serve_allowed(slot, id, call, seq, t0);
    }

    /// The policy's word on a call; an `unknown` tool, or a bug in the engine, is a
    /// denial by an invariant (a panic must not take the VMM down, nor let the call
    /// through).
    fn rule_on(&self, call: &Call, unknown: bool) -> DecisionRef<'_> {
        let invariant = |reason: &'static str| DecisionRef {
            verdict: Verdict::Deny,
            rule: None,
            by: DecidedBy::Invariant,
            reason: reason.into(),
        };
        if unknown {
            return invariant("unknown tool");
        }
        panic::catch_unwind(AssertUnwindSafe(|| {
            self.decider.decide(&call.tool, &call.args)
        }))
        .unwrap_or_else(|_| invariant("internal error in the policy engine"))
    }

    /// The policy said ask: the `ask` record is written, the call becomes an entry
    /// of the parked table (its slot with it), and the approver is asked. No
    /// thread waits; the answer comes through `answered`.
    fn park(self: &Arc<Self>, slot: Slot, id: &Value, call: Call, ask: Ask, t0: Instant) {
        let mut out = Vec::new();
        let record = DecisionRecord {
            conn: slot.conn(),
            rpc_id: id,
            tool: &call.tool,
            args: &call.args,
            decision: Verdict::Ask,
            asked: false,
            answer: None,
            rule: ask.rule,
            decided_by: ask.by,
            reason: &ask.reason,
            policy_ns: ask.policy_ns,
        };
        let ask_seq = match self.audit.decision(&record) {
            Ok(seq) => seq,
            Err(_) => {
                deny(
                    &mut out,
                    id,
                    None,
                    DecidedBy::Invariant,
                    &self.guest_fatal(),
                );
                return slot.complete(out);
            }
        };
        let req = AskRequest {
            ask_seq,
            conn: slot.conn().to_string(),
            rpc_id: id.clone(),
            tool: call.tool.clone(),
            args: call.args.clone(),
            rule: ask.rule,
            reason: ask.reason,
        };
        let parked = Parked {
            slot,
            id: id.clone(),
            call,
            rule: ask.rule,
            t0,
        };
        lock(&self.parked).insert(ask_seq, parked);
        let approver = Arc::clone(&self.approver.read().unwrap_or_else(|e| e.into_inner()));
        let gate = Arc::downgrade(self);
        let asked = panic::catch_unwind(AssertUnwindSafe(|| {
            approver.ask(
                req,
                Box::new(move |answer| {
                    if let Some(g) = gate.upgrade() {
                        g.answered(ask_seq, answer);
                    }
                }),
            )
        }));
        if asked.is_err() {
            // Fail closed; a no-op when the approver answered before panicking.
            self.answered(ask_seq, Answer::failed("the approver failed"));
        }
    }

    /// An approver's answer (any thread): the parked entry leaves the table and a
    /// worker goes on with it. A second answer to the same ask finds nothing.
    fn answered(self: &Arc<Self>, ask_seq: u64, answer: Answer) {
        let Some(parked) = lock(&self.parked).remove(&ask_seq) else {
            return;
        };
        let Some(pool) = &self.pool else { return };
        let gate = Arc::clone(self);
        if pool
            .submit(move || gate.resume_asked(ask_seq, parked, answer))
            .is_err()
        {
            log::debug!("gate: an answer to ask {ask_seq} came after shutdown");
        }
    }

    /// The answer's `decision` record (synced), then the service or a denial.
    fn resume_asked(self: &Arc<Self>, ask_seq: u64, p: Parked, answer: Answer) {
        let mut out = Vec::new();
        let by = answer.answerer.by;
        let record = DecisionRecord {
            conn: p.slot.conn(),
            rpc_id: &p.id,
            tool: &p.call.tool,
            args: &p.call.args,
            decision: if answer.allow {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            asked: true,
            answer: Some(AnswerRef {
                ask_seq,
                channel: &answer.answerer.channel,
                who: answer.answerer.who.as_deref(),
            }),
            rule: p.rule,
            decided_by: by,
            reason: &answer.reason,
            policy_ns: 0,
        };
        let seq = match self.audit.decision(&record) {
            Ok(seq) => seq,
            Err(_) => {
                deny(
                    &mut out,
                    &p.id,
                    None,
                    DecidedBy::Invariant,
                    &self.guest_fatal(),
                );
                return p.slot.complete(out);
            }
        };
        if !answer.allow {
            deny(&mut out, &p.id, p.rule, by, &answer.reason);
            return p.slot.complete(out);
        }
        if p.slot.is_closed() {
            // Allowed, but the guest hung up while it waited: nobody would read the
            // result, so the service is not run. The outcome says so.
            let _ = self.audit.outcome(
                seq,
                OutcomeStatus::Error,
                0,
                p.t0.elapsed().as_micros() as u64,
            );
            return;
        }
        self.serve_allowed(p.slot, &p.id, p.call, seq, p.t0);
    }

    /// Serves an allowed call in its lane: here, on a local worker, or handed to an
    /// outside worker.
    fn serve_allowed(self: &Arc<Self>, slot: Slot, id: &Value, call: Call, seq: u64, t0: Instant) {
        let outside = match (&self.outside, self.services.lane(&call.tool)) {
            (Some(outside), Lane::Outside) => outside,
            _ => return self.serve_here(self.pool.as_ref(), slot, id, &call, seq, t0),
        };
        let (gate, id) = (Arc::clone(self), id.clone());
        let job = move || gate.serve_here(gate.outside.as_ref(), slot, &id, &call, seq, t0);
        if outside.submit(job).is_err() {
            // Only while shutting down, when the connection is going away unanswered.
            log::debug!("gate: an allowed call reached the outside lane after its shutdown");
        }
    }

    /// Runs the service of an allowed call under `call_timeout`, on a worker of
    /// `pool`, audits the outcome and hands the reply back. A service that overruns
    /// is answered by that pool's watchdog with a tool error (outcome `error`); its
    /// own result is dropped.
    fn serve_here(
        &self,
        pool: Option<&Pool>,
        slot: Slot,
        id: &Value,
        call: &Call,
        seq: u64,
        t0: Instant,
    ) {
        // The reply goes out once: from here, or from the watchdog at the deadline.
        let slot = Arc::new(Mutex::new(Some(slot)));
        let deadline = pool.map(|pool| {
            let (cell, audit) = (Arc::clone(&slot), Arc::clone(&self.audit));
            let (id, tool, timeout) = (id.clone(), call.tool.clone(), self.limits.call_timeout);
            pool.deadline(timeout, move || {
                let Some(slot) = lock(&cell).take() else {
                    return;
                };
                let m = format!(
                    "no result within {} ms; the service may still complete its work",
                    timeout.as_millis()
                );
                let structured = json!({"error": {"kind": "timeout", "message": m}});
                let result = rpc::tool_result(structured, true, Some(format!("{tool}: {m}")));
                let mut out = Vec::new();
                rpc::result(&mut out, &id, &result);
                let us = t0.elapsed().as_micros() as u64;
                let _ = audit.outcome(seq, OutcomeStatus::Error, out.len() as u64, us);
                slot.complete(out);
            })
        });
        let served = panic::catch_unwind(AssertUnwindSafe(|| {
            self.services.serve(&call.tool, &call.args)
        }));
        if deadline.is_some_and(|d| !d.finish()) {
            return;
        }
        let Some(slot) = lock(&slot).take() else {
            return;
        };
        let (result, status) = match served {
            Ok(Ok(Reply::Structured(v))) => (rpc::tool_result(v, false, None), OutcomeStatus::Ok),
            Ok(Ok(Reply::Forwarded { result, is_error })) => {
                let status = if is_error {
                    OutcomeStatus::ToolError
                } else {
                    OutcomeStatus::Ok
                };
                (result, status)
            }
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
        let mut out = Vec::new();
        rpc::result(&mut out, id, &result);
        let mut status = status;
        if out.len() > MAX_REPLY {
            // The bound holds per reply: the serialised reply is dropped, and the
            // model reads why and how to ask for less.
            let m = format!(
                "the reply would be {} bytes, over the limit of {MAX_REPLY} per reply: ask for less (fs.list offset and limit, fs.read length)",
                out.len()
            );
            out.clear();
            let structured = json!({"error": {"kind": "reply_too_large", "message": m}});
            let text = format!("{}: {m}", call.tool);
            rpc::result(
                &mut out,
                id,
                &rpc::tool_result(structured, true, Some(text)),
            );
            status = OutcomeStatus::ToolError;
        }
        let bytes = out.len() as u64;
        // Audited before the reply is handed over, so a reader of the reply finds it.
        // A failure here is remembered by the log; the next call is denied for it.
        let _ = self
            .audit
            .outcome(seq, status, bytes, t0.elapsed().as_micros() as u64);
        slot.complete(out);
    }
}

impl Drop for Gate {
    /// The workers end once their queue is empty (`shutdown` also joins them).
    fn drop(&mut self) {
        for p in self.pools() {
            p.stop();
        }
    }
}

/// What the policy said about an asked call.
struct Ask {
    rule: Option<u32>,
    by: DecidedBy,
    reason: String,
    policy_ns: u64,
}

/// What a frame asks for, once read (`Gate::read_frame`).
enum Read {
    /// Answered: a cheap method's reply, or an error reply.
    Reply(Vec<u8>),
    /// A `tools/call` to decide and serve.
    Call { id: Value, call: Call },
    /// Nothing to answer: a notification, or a response sent by the client.
    Silent,
}

impl Read {
    fn error(id: &Value, code: i64, message: &str) -> Read {
        let mut out = Vec::new();
        rpc::error(&mut out, id, code, message, None);
        Read::Reply(out)
    }
}

/// A call when the gate has no workers: denied, undecided and unaudited, as a
/// gate that cannot run calls fails closed.
fn deny_call(slot: Slot, id: &Value) {
    let mut out = Vec::new();
    let m = "the gate cannot start its worker threads";
    deny(&mut out, id, None, DecidedBy::Invariant, m);
    slot.complete(out);
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
