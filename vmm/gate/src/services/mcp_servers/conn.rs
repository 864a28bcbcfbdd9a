//! One running MCP server process and the JSON-lines conversation with it.
//!
//! Three threads per process, none of which holds memory the server controls past
//! one bounded line: a writer drains a bounded queue into the server's stdin (so a
//! server that stops reading makes calls fail fast instead of blocking workers), a
//! reader matches reply lines to waiting requests by id, and a stderr reader logs a
//! bounded number of lines. Notifications are never queued: they set a flag or bump
//! a counter, so a flood of them cannot grow memory.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Longest line read from a server. A longer one cannot be matched to its request,
/// so the process is ended (and restarted later): every call waiting on it fails.
pub const MAX_LINE: usize = 4 << 20;
/// Requests waiting for their reply at once (the gate's workers bound it anyway).
const MAX_PENDING: usize = 1024;
/// Lines waiting to be written to the server's stdin.
const OUT_QUEUE: usize = 64;
/// stderr lines logged per process; the rest are counted.
const STDERR_LINES: u64 = 100;
/// Longest stderr line logged (the rest of the line is dropped).
const STDERR_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("could not start `{command}`: {message}")]
    Spawn { command: String, message: String },
    #[error("the server is gone: {0}")]
    Closed(String),
    #[error("no reply within {0} ms")]
    Timeout(u128),
    #[error("the server is not reading its input")]
    Backlog,
    #[error("the server answered error {code}: {message}")]
    Rpc { code: i64, message: String },
}

/// What the reader saw that was not a reply to a waiting request.
#[derive(Debug, Default)]
pub struct Counters {
    /// Notifications received (all dropped after being counted).
    pub notifications: AtomicU64,
    /// `notifications/tools/list_changed` among them.
    pub list_changed: AtomicU64,
    /// Replies to no waiting request (late, duplicate or made up).
    pub stray: AtomicU64,
    /// Lines that were not a JSON-RPC message.
    pub malformed: AtomicU64,
    /// Requests from the server (answered: `ping` with `{}`, the rest -32601).
    pub requests: AtomicU64,
    /// stderr lines not logged.
    pub stderr_dropped: AtomicU64,
}

type Waiter = SyncSender<Result<Value, ConnError>>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Waiter>,
    /// Why the conversation ended, once it has.
    closed: Option<String>,
}

struct Shared {
    name: String,
    pending: Mutex<Pending>,
    /// Set by `notifications/tools/list_changed`, taken by whoever re-lists.
    list_changed: AtomicBool,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Ends the conversation: every waiting request fails with `why`.
    fn close(&self, why: String) {
        let waiting = {
            let mut p = lock(&self.pending);
            if p.closed.is_none() {
                p.closed = Some(why.clone());
            }
            std::mem::take(&mut p.waiting)
        };
        for (_, w) in waiting {
            let _ = w.try_send(Err(ConnError::Closed(why.clone())));
        }
    }
}

/// A spawned server: write requests, wait for their replies.
pub struct Conn {
    child: Mutex<Child>,
    out: SyncSender<Vec<u8>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The service name, for logs.
    pub name: String,
    pub command: String,
    pub args: Vec<String>,
    /// Added to the clean environment (`PATH` and `HOME` of ironvmm, nothing else).
    pub env: BTreeMap<String, String>,
}

impl Conn {
    /// Spawns the server with a clean environment: only `PATH` and `HOME` (so that
    /// `npx` and interpreters are found) plus the configured variables. ironvmm's
    /// own environment (API keys, tokens) never reaches it.
    pub fn spawn(launch: &Launch) -> Result<Conn, ConnError> {
        let mut cmd = Command::new(&launch.command);
        cmd.args(&launch.args).env_clear();
        for k in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.envs(&launch.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| ConnError::Spawn {
            command: launch.command.clone(),
            message: e.to_string(),
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ConnError::Spawn {
                command: launch.command.clone(),
                message: "no pipes to the child".into(),
            });
        };
        let shared = Arc::new(Shared {
            name: launch.name.clone(),
            pending: Mutex::new(Pending::default()),
            list_changed: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (out, queue) = sync_channel::<Vec<u8>>(OUT_QUEUE);
        let spawned = (|| {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("mcp-{}-out", launch.name))
                .spawn(move || write_loop(stdin, queue, &s))?;
            let (s, replies) = (Arc::clone(&shared), out.clone());
            std::thread::Builder::new()
                .name(format!("mcp-{}-in", launch.name))
                .spawn(move || read_loop(stdout, &s, &replies))?;
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("mcp-{}-err", launch.name))
                .spawn(move || stderr_loop(stderr, &s))?;
            Ok::<(), std::io::Error>(())
        })();
        if let Err(e) = spawned {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ConnError::Spawn {
                command: launch.command.clone(),
                message: format!("could not start its threads: {e}"),
            });
        }
        Ok(Conn {
            child: Mutex::new(child),
            out,
            shared,
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends a request and waits up to `timeout` for its reply's `result`.
    pub fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, ConnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (Waiter, Receiver<_>) = sync_channel(1);
        {
            let mut p = lock(&self.shared.pending);
            if let Some(why) = &p.closed {
                return Err(ConnError::Closed(why.clone()));
            }
            if p.waiting.len() >= MAX_PENDING {
                return Err(ConnError::Backlog);
            }
            p.waiting.insert(id, tx);
        }
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        if let Err(e) = self.send(&msg) {
            lock(&self.shared.pending).waiting.remove(&id);
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                lock(&self.shared.pending).waiting.remove(&id);
                // MCP's way to say the answer is no longer wanted; best effort.
                let _ = self.notify(
                    "notifications/cancelled",
                    json!({"requestId": id, "reason": "timeout"}),
                );
                Err(ConnError::Timeout(timeout.as_millis()))
            }
            Err(RecvTimeoutError::Disconnected) => Err(ConnError::Closed(
                self.closed().unwrap_or_else(|| "the reply was lost".into()),
            )),
        }
    }

    /// Sends a notification (no reply).
    pub fn notify(&self, method: &str, params: Value) -> Result<(), ConnError> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    fn send(&self, msg: &Value) -> Result<(), ConnError> {
        let mut line = serde_json::to_vec(msg).unwrap_or_default();
        line.push(b'\n');
        match self.out.try_send(line) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ConnError::Backlog),
            Err(TrySendError::Disconnected(_)) => Err(ConnError::Closed(
                self.closed()
                    .unwrap_or_else(|| "its input is closed".into()),
            )),
        }
    }

    /// Why the conversation ended, if it has.
    pub fn closed(&self) -> Option<String> {
        lock(&self.shared.pending).closed.clone()
    }

    /// Takes the `tools/list_changed` flag.
    pub fn take_list_changed(&self) -> bool {
        self.shared.list_changed.swap(false, Ordering::AcqRel)
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// Ends the process and the conversation.
    pub fn kill(&self, why: &str) {
        self.shared.close(why.to_string());
        // A confined thread may not signal or reap (kill and wait4 are outside every
        // seccomp list): the server gets EOF on its stdin once the writer ends, or
        // when ironvmm exits, and ends then.
        if ironvmm_seccomp::setting() == ironvmm_seccomp::Setting::On {
            return;
        }
        let mut c = lock(&self.child);
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.kill("ironvmm stopped the server");
    }
}

fn write_loop(mut stdin: ChildStdin, queue: Receiver<Vec<u8>>, shared: &Shared) {
    for line in queue {
        if stdin.write_all(&line).and_then(|()| stdin.flush()).is_err() {
            shared.close("its input is closed".into());
            return;
        }
    }
}

fn read_loop(stdout: impl Read, shared: &Shared, replies: &SyncSender<Vec<u8>>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => break "it closed its output (exited)".to_string(),
            Ok(_) if line.len() > MAX_LINE => {
                break format!("it wrote a line over {MAX_LINE} bytes");
            }
            Ok(_) => on_line(&line, shared, replies),
            Err(e) => break format!("reading its output failed: {e}"),
        }
    };
    log::warn!("mcp server {}: {why}", shared.name);
    shared.close(why);
}

/// One line from the server: a reply, a notification or a request of its own.
fn on_line(line: &[u8], shared: &Shared, replies: &SyncSender<Vec<u8>>) {
    let c = &shared.counters;
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let Ok(Value::Object(mut msg)) = serde_json::from_slice::<Value>(line) else {
        c.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if let Some(method) = msg.get("method").and_then(Value::as_str) {
        match msg.get("id") {
            Some(id @ (Value::Number(_) | Value::String(_))) => {
                c.requests.fetch_add(1, Ordering::Relaxed);
                // ironvmm offers the server no client features (no roots, no sampling).
                let reply = if method == "ping" {
                    json!({"jsonrpc": "2.0", "id": id, "result": {}})
                } else {
                    json!({"jsonrpc": "2.0", "id": id,
                           "error": {"code": -32601, "message": "Method not found"}})
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                // Dropped when the queue is full: a server flooding requests gets no
                // more room than that.
                let _ = replies.try_send(out);
            }
            _ => {
                c.notifications.fetch_add(1, Ordering::Relaxed);
                if method == "notifications/tools/list_changed" {
                    c.list_changed.fetch_add(1, Ordering::Relaxed);
                    shared.list_changed.store(true, Ordering::Release);
                }
            }
        }
        return;
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        c.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(waiter) = lock(&shared.pending).waiting.remove(&id) else {
        c.stray.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let answer = match (msg.remove("result"), msg.remove("error")) {
        (Some(r), None) => Ok(r),
        (None, Some(e)) => Err(ConnError::Rpc {
            code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .chars()
                .take(1024)
                .collect(),
        }),
        _ => Err(ConnError::Rpc {
            code: -32603,
            message: "a reply with neither or both of result and error".into(),
        }),
    };
    let _ = waiter.try_send(answer);
}

fn stderr_loop(stderr: impl Read, shared: &Shared) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut logged = 0u64;
    loop {
        line.clear();
        // Reads at most STDERR_LINE bytes at a time: a longer line is logged in part,
        // its remainder counted as further lines.
        match (&mut reader)
            .take(STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if logged < STDERR_LINES {
                    logged += 1;
                    let text = String::from_utf8_lossy(&line);
                    log::info!("mcp server {}: {}", shared.name, text.trim_end());
                } else {
                    shared
                        .counters
                        .stderr_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
