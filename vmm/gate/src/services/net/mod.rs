//! The `net` service: network egress through the guest's proxy on vsock port 2.
//!
//! `iron proxy` in the guest only relays TCP connections to port 2; the host does
//! all the parsing and deciding:
//!
//! - `head`   HTTP/1.1 request and response heads, bounded and strict
//! - `body`   where a body ends; chunked bodies re-framed by the host
//! - `route`  a request's target: `CONNECT`, an `http://` URL, or the model route
//! - `model`  the model route: `/llm/<provider>/…` sent on with the host's key
//! - `pipe`   the bounded, never-blocking hand-over with the vsock device thread
//! - `relay`  one connection's thread: decide each request, connect (SSRF guard),
//!   relay; tunnels
//!
//! Each plain-HTTP request is decided as `net.http {method, url}`, each `CONNECT`
//! once as `net.connect {host, port}`, through the gate's own decider and audit
//! log (`Gate::decide_direct`). `net.*` are not served as `tools/call`s: on port 1
//! they are unknown tools. A request of the model route is decided as `llm.chat
//! {provider, model, path}` and spends the run's `[llm.budget]`.

pub mod body;
pub mod head;
mod model;
pub mod pipe;
mod relay;
pub mod route;

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::ssrf::AddressGuard;
use super::{ToolSpec, DEFAULT_REPLY_CAP};
use crate::config::NetConfig;
use crate::gate::budget::CallBudget;
use crate::gate::inflight::Wake;
use crate::gate::Gate;
use crate::services::llm::LlmService;
use pipe::Pipe;

/// Most bytes for the guest moved per `poll`: the device's own backlog bound
/// (`max_pending_output`) is checked between polls.
const POLL_CHUNK: usize = 64 * 1024;

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

/// The port-2 side of one VM's gate: its settings, the SSRF guard, and the
/// bound on connections (each holds a relay thread, a tunnel two).
pub struct NetService {
    gate: Arc<Gate>,
    guard: AddressGuard,
    /// No byte either way for this long ends an exchange (a server that never
    /// answers, a guest that stops reading, a kept-alive connection left idle).
    idle: Duration,
    connect_timeout: Duration,
    budget: Option<Arc<CallBudget>>,
    /// The model route's provider and keys; None: no `[[llm.providers]]`.
    llm: Option<Arc<LlmService>>,
    max_connections: usize,
    live: Arc<AtomicUsize>,
    /// The relays running, so `shutdown` can cut them: their pipes, and the
    /// server connection each has open.
    running: Mutex<HashMap<u64, Running>>,
    next_relay: AtomicU64,
    /// Connections refused at the bound; the guest decides how many, so their
    /// warning is logged at the 1st, 2nd, 4th... only.
    refused: AtomicU64,
}

struct Running {
    pipe: Arc<Pipe>,
    upstream: Option<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetService {
    /// `budget`: the run's `--max-egress-bytes`, which request bodies and tunnel
    /// bytes from the guest are charged to. `llm`: the service the model route
    /// sends through (sharing its budget).
    pub fn new(
        gate: Arc<Gate>,
        cfg: &NetConfig,
        budget: Option<Arc<CallBudget>>,
        llm: Option<Arc<LlmService>>,
    ) -> Result<Arc<NetService>, String> {
        let mut allowed = Vec::new();
        for a in &cfg.allow_addresses {
            allowed.push(a.parse().map_err(|e| format!("net.allow_addresses: {e}"))?);
        }
        let idle = Duration::from_secs(cfg.timeout_secs.max(1));
        Ok(Arc::new(NetService {
            gate,
            guard: AddressGuard::new(allowed),
            idle,
            connect_timeout: idle.min(Duration::from_secs(30)),
            budget: budget.filter(|b| b.is_limited()),
            llm,
            max_connections: cfg.max_connections.max(1),
            live: Arc::new(AtomicUsize::new(0)),
            refused: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
            next_relay: AtomicU64::new(0),
        }))
    }

    /// Cuts every connection (the VM is ending): exchanges and tunnels in progress
    /// end and write their outcomes. Waits up to `wait` for their threads; returns
    /// how many are still running.
    pub fn shutdown(&self, wait: Duration) -> usize {
        for r in lock(&self.running).values() {
            r.pipe.guest_closed();
            if let Some(s) = &r.upstream {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + wait;
        while self.live() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.live()
    }

    fn register(&self, pipe: &Arc<Pipe>) -> u64 {
        let id = self.next_relay.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).insert(
            id,
            Running {
                pipe: Arc::clone(pipe),
                upstream: None,
            },
        );
        id
    }

    /// The server connection relay `id` uses now (`shutdown` cuts it).
    fn set_upstream(&self, id: u64, s: Option<&TcpStream>) {
        if let Some(r) = lock(&self.running).get_mut(&id) {
            r.upstream = s.and_then(|s| s.try_clone().ok());
        }
    }

    fn unregister(&self, id: u64) {
        lock(&self.running).remove(&id);
    }

    /// Connections being served now (their relay threads running).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// A new guest connection, `conn` its id in the audit log; `wake` tells the
    /// transport that output or room is ready. `None` at the connection bound (or
    /// when no thread can be started): the transport refuses the connection.
    pub fn accept(self: &Arc<Self>, conn: String, wake: Wake) -> Option<NetStream> {
        let taken = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                log::warn!(
                    "net: {conn} refused: {} connections open ({refused} refused so far)",
                    self.max_connections
                );
            }
            return None;
        }
        let pipe = Pipe::new(wake);
        let id = self.register(&pipe);
        let relay = relay::Relay {
            svc: Arc::clone(self),
            conn: conn.clone(),
            pipe: Arc::clone(&pipe),
            id,
        };
        let live = Arc::clone(&self.live);
        let spawned = std::thread::Builder::new()
            .name("ironvmm-net".into())
            .spawn(move || {
                // Freed however the relay ends.
                struct Slot(Arc<AtomicUsize>);
                impl Drop for Slot {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let _slot = Slot(live);
                relay.run();
            });
        match spawned {
            Ok(_) => Some(NetStream { pipe, conn }),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::AcqRel);
                self.unregister(id);
                log::warn!("net: {conn} refused: cannot start its thread: {e}");
                None
            }
        }
    }
}

/// Why a stream must be reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{conn}: the guest sent more than the room it was given")]
    Overrun { conn: String },
}

/// One guest connection to port 2 as the transport (the vsock device thread)
/// drives it: nothing here blocks.
pub struct NetStream {
    pipe: Arc<Pipe>,
    conn: String,
}

impl NetStream {
    pub fn id(&self) -> &str {
        &self.conn
    }

    /// Guest bytes (at most `input_room`); output ready now is appended to `out`.
    pub fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), NetError> {
        if !self.pipe.push(data) {
            return Err(NetError::Overrun {
                conn: self.conn.clone(),
            });
        }
        self.poll(out);
        Ok(())
    }

    /// Moves output that became ready into `out`.
    pub fn poll(&mut self, out: &mut Vec<u8>) {
        self.pipe.take(out, POLL_CHUNK);
    }

    pub fn input_room(&self) -> usize {
        self.pipe.input_room()
    }

    /// More output may come: the relay still runs, or output waits.
    pub fn has_pending_output(&self) -> bool {
        self.pipe.pending()
    }

    /// The relay ended and its output was all handed over.
    pub fn finished(&self) -> bool {
        self.pipe.finished()
    }

    /// Bytes held for this connection, both ways (bounded by twice `pipe::CAP`).
    pub fn held(&self) -> usize {
        self.pipe.held()
    }

    /// The guest's connection is gone: the relay stops (an exchange in progress
    /// is cut and audited).
    pub fn on_close(&mut self) {
        self.pipe.guest_closed();
    }
}

impl Drop for NetStream {
    fn drop(&mut self) {
        self.pipe.guest_closed();
    }
}
