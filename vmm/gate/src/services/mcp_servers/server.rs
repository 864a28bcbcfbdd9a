//! One configured MCP server over its life: started, initialised, listed, and
//! restarted with a bounded backoff when it dies.
//!
//! Restarts are lazy: a call that finds the server dead starts it again once the
//! backoff has passed, and fails at once before that. After `MAX_FAILURES` deaths
//! with no successful call in between the server is given up for this run.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::conn::{Conn, ConnError, Launch};

/// Protocol versions this client speaks, oldest first. Tool calls have not changed
/// shape between them.
pub const CLIENT_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// Most pages one `tools/list` may take.
const MAX_PAGES: usize = 64;
/// Most tools one server may list.
pub const MAX_TOOLS: usize = 512;
/// Deaths in a row after which the server is not started again.
pub const MAX_FAILURES: u32 = 5;
/// The first restart waits this long; each next one twice as long, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A tool as the server listed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

enum State {
    Up(Arc<Conn>),
    /// Dead; may be started again at `retry_at`.
    Down {
        retry_at: Instant,
        why: String,
    },
    /// Given up for this run.
    Failed(String),
}

pub struct Server {
    launch: Launch,
    /// Deadline of `initialize` and `tools/list` (a first `npx` may download).
    startup_timeout: Duration,
    state: Mutex<State>,
    /// Deaths since the last successful call.
    failures: AtomicU32,
    restarts: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a server could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("initialize: {0}")]
    Handshake(String),
    #[error("tools/list: {0}")]
    Listing(String),
    #[error("it died ({why}); restart {attempt} in {wait_ms} ms")]
    Restarting {
        why: String,
        attempt: u32,
        wait_ms: u128,
    },
    #[error("it was given up after {MAX_FAILURES} deaths in a row; last: {0}")]
    GivenUp(String),
    #[error("{0}")]
    Confined(String),
}

impl Server {
    /// Starts the server and lists its tools (the listing the catalog is built from).
    pub fn start(
        launch: Launch,
        startup_timeout: Duration,
    ) -> Result<(Server, Vec<Listed>), ServerError> {
        let (conn, tools) = open(&launch, startup_timeout)?;
        let server = Server {
            launch,
            startup_timeout,
            state: Mutex::new(State::Up(Arc::new(conn))),
            failures: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
        };
        Ok((server, tools))
    }

    /// The process now running, if it is up.
    pub fn current(&self) -> Option<Arc<Conn>> {
        match &*lock(&self.state) {
            State::Up(c) => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// The running server, started again first if it died and its backoff is over.
    /// Returns the tools of a fresh listing when it was (re)started now.
    pub fn conn(&self) -> Result<(Arc<Conn>, Option<Vec<Listed>>), ServerError> {
        let mut st = lock(&self.state);
        if let State::Up(c) = &*st {
            match c.closed() {
                None => return Ok((Arc::clone(c), None)),
                Some(why) => {
                    c.kill(&why);
                    let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                    *st = if n >= MAX_FAILURES {
                        State::Failed(why)
                    } else {
                        State::Down {
                            retry_at: Instant::now() + backoff(n),
                            why,
                        }
                    };
                }
            }
        }
        match &*st {
            State::Up(_) => unreachable!("handled above"),
            State::Failed(why) => Err(ServerError::GivenUp(why.clone())),
            State::Down { retry_at, why } => {
                let now = Instant::now();
                if now < *retry_at {
                    return Err(ServerError::Restarting {
                        why: why.clone(),
                        attempt: self.failures.load(Ordering::Acquire),
                        wait_ms: (*retry_at - now).as_millis(),
                    });
                }
                if ironvmm_seccomp::setting() == ironvmm_seccomp::Setting::On {
                    // A confined worker may not create pipes or exec: trying would
                    // end the whole VMM with SIGSYS. The server stays down instead.
                    let why = format!(
                        "it died ({why}) and is not restarted: ironvmm runs confined \
                         (--seccomp on), and a confined thread cannot start a process"
                    );
                    *st = State::Failed(why.clone());
                    return Err(ServerError::Confined(why));
                }
                self.restarts.fetch_add(1, Ordering::Relaxed);
                log::warn!("mcp server {}: restarting ({why})", self.launch.name);
                match open(&self.launch, self.startup_timeout) {
                    Ok((conn, tools)) => {
                        let conn = Arc::new(conn);
                        *st = State::Up(Arc::clone(&conn));
                        Ok((conn, Some(tools)))
                    }
                    Err(e) => {
                        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                        let why = e.to_string();
                        *st = if n >= MAX_FAILURES {
                            State::Failed(why)
                        } else {
                            State::Down {
                                retry_at: Instant::now() + backoff(n),
                                why,
                            }
                        };
                        Err(e)
                    }
                }
            }
        }
    }

    /// A call was served: the server is healthy again.
    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Lists the tools of the running server again.
    pub fn relist(&self, conn: &Conn) -> Result<Vec<Listed>, ServerError> {
        list_tools(conn, self.startup_timeout)
    }
}

fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    (FIRST_BACKOFF * (1u32 << shift)).min(MAX_BACKOFF)
}

/// Spawns, initialises and lists: a server is usable only after all three.
fn open(launch: &Launch, timeout: Duration) -> Result<(Conn, Vec<Listed>), ServerError> {
    let conn = Conn::spawn(launch)?;
    let newest = CLIENT_VERSIONS[CLIENT_VERSIONS.len() - 1];
    let params = json!({
        "protocolVersion": newest,
        "capabilities": {},
        "clientInfo": {"name": "ironvmm", "version": env!("CARGO_PKG_VERSION")},
    });
    let init = conn.request("initialize", params, timeout)?;
    let version = init.get("protocolVersion").and_then(Value::as_str);
    match version {
        Some(v) if CLIENT_VERSIONS.contains(&v) => {}
        other => {
            return Err(ServerError::Handshake(format!(
                "the server speaks protocol version {}, not one of {}",
                other.map_or("(none)".to_string(), |v| format!("{v:?}")),
                CLIENT_VERSIONS.join(", ")
            )))
        }
    }
    conn.notify("notifications/initialized", json!({}))?;
    if init.pointer("/capabilities/tools").is_none() {
        log::warn!("mcp server {}: it declares no tools", launch.name);
        return Ok((conn, Vec::new()));
    }
    let tools = list_tools(&conn, timeout)?;
    Ok((conn, tools))
}

/// `tools/list`, every page.
fn list_tools(conn: &Conn, timeout: Duration) -> Result<Vec<Listed>, ServerError> {
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut params = Map::new();
        if let Some(c) = cursor.take() {
            params.insert("cursor".into(), c.into());
        }
        let page = conn.request("tools/list", Value::Object(params), timeout)?;
        let list = page
            .get("tools")
            .and_then(Value::as_array)
            .ok_or_else(|| ServerError::Listing("the reply has no `tools` array".into()))?;
        for (i, t) in list.iter().enumerate() {
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ServerError::Listing(format!("tools[{i}] has no `name` string")))?;
            tools.push(Listed {
                name: name.to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                input_schema: t
                    .get("inputSchema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"})),
            });
            if tools.len() > MAX_TOOLS {
                return Err(ServerError::Listing(format!("more than {MAX_TOOLS} tools")));
            }
        }
        match page.get("nextCursor") {
            Some(Value::String(c)) => cursor = Some(c.clone()),
            None | Some(Value::Null) => return Ok(tools),
            Some(_) => return Err(ServerError::Listing("`nextCursor` is not a string".into())),
        }
    }
    Err(ServerError::Listing(format!("more than {MAX_PAGES} pages")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_doubles_and_is_capped() {
        use super::*;
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
