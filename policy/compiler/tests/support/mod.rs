//! A real HTTP server on loopback that speaks both chat APIs (OpenAI-compatible
//! `/v1/chat/completions` and Anthropic `/v1/messages`) and replays scripted answers,
//! per step: the compiler names its step on the first line of every system prompt.
//! Every request is recorded so tests can count and inspect them.
#![allow(dead_code)]

pub mod inbox;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

/// What the server does with one request of a step.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A model answer, wrapped in the envelope of the API that was called.
    Answer(String),
    /// A bare HTTP status with a body, and an optional Retry-After (seconds).
    Status(u16, String, Option<u64>),
    /// A 200 whose body is not an API response at all.
    RawBody(String),
    /// Wait this long before doing the inner reply (the client times out first).
    Stall(Duration, Box<Reply>),
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub step: String,
}

impl Recorded {
    /// The last user message of the conversation.
    pub fn last_user(&self) -> String {
        let msgs = self.body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        msgs.iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string()
    }
    /// All user messages joined.
    pub fn all_user(&self) -> String {
        let msgs = self.body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        msgs.iter()
            .filter(|m| m["role"] == "user")
            .filter_map(|m| m["content"].as_str())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

#[derive(Default)]
struct State {
    scripts: BTreeMap<String, VecDeque<Reply>>,
    requests: Vec<Recorded>,
}

pub struct ScriptedServer {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
}

impl ScriptedServer {
    pub fn start() -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        {
            let (state, stop, connections) = (state.clone(), stop.clone(), connections.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let state = state.clone();
                    thread::spawn(move || serve(conn, &state));
                }
            });
        }
        ScriptedServer {
            addr,
            state,
            stop,
            connections,
        }
    }

    /// Queues replies for a step, in order.
    pub fn script(&self, step: &str, replies: impl IntoIterator<Item = Reply>) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.scripts
            .entry(step.to_string())
            .or_default()
            .extend(replies);
        self
    }

    /// Queues model answers (plain text) for a step.
    pub fn answers(&self, step: &str, answers: &[&str]) -> &Self {
        self.script(step, answers.iter().map(|a| Reply::Answer(a.to_string())))
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// TCP connections accepted, whether or not a full request arrived.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn steps(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.step).collect()
    }

    /// Scripted replies nobody asked for (a test usually expects none left).
    pub fn unused(&self) -> BTreeMap<String, usize> {
        let s = self.state.lock().unwrap();
        s.scripts
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, q)| (k.clone(), q.len()))
            .collect()
    }

    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn anthropic_base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn step_of(body: &Value) -> String {
    let system = body["system"]
        .as_str()
        .or_else(|| body["messages"][0]["content"].as_str())
        .unwrap_or("");
    let first = system.lines().next().unwrap_or("");
    first
        .split("step: ")
        .nth(1)
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // the Drop wake-up, or a client that gave up
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let step = step_of(&body);
    let anthropic = path.ends_with("/v1/messages");
    let openai = path.ends_with("/chat/completions");
    let reply = {
        let mut s = state.lock().unwrap();
        s.requests.push(Recorded {
            path: path.clone(),
            headers,
            body: body.clone(),
            step: step.clone(),
        });
        s.scripts.get_mut(&step).and_then(VecDeque::pop_front)
    };
    let reply = match (anthropic || openai, reply) {
        (false, _) => Reply::Status(404, format!("no API at {path}"), None),
        // 418 is not retried: a test that runs out of script fails at once, clearly.
        (true, None) => Reply::Status(
            418,
            format!("the test scripted no (more) answers for step '{step}'"),
            None,
        ),
        (true, Some(r)) => r,
    };
    respond(conn, reply, anthropic, &body);
}

fn respond(mut conn: TcpStream, reply: Reply, anthropic: bool, req: &Value) {
    let (status, body, retry_after) = match reply {
        Reply::Stall(d, inner) => {
            thread::sleep(d);
            return respond(conn, *inner, anthropic, req);
        }
        Reply::Status(s, b, ra) => (s, b, ra),
        Reply::RawBody(b) => (200, b, None),
        Reply::Answer(text) => {
            let model = req["model"].clone();
            // Asked to answer through a tool (structured output), a JSON answer comes
            // back as the tool's input, as Anthropic's API returns it.
            let tool = req["tool_choice"]["name"].as_str();
            let as_json = serde_json::from_str::<Value>(&text)
                .ok()
                .filter(Value::is_object);
            let v = if let (true, Some(name), Some(input)) = (anthropic, tool, as_json) {
                json!({"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "tool_use", "id": "toolu_1", "name": name, "input": input}],
                       "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}})
            } else if anthropic {
                json!({"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 1, "output_tokens": 1}})
            } else {
                json!({"id": "chatcmpl-test", "object": "chat.completion", "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
            };
            (200, v.to_string(), None)
        }
    };
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(s) = retry_after {
        head.push_str(&format!("retry-after: {s}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    let _ = conn.flush();
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ivc-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The repository's examples/inbox folder.
pub fn inbox_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/inbox")
}

/// Copies the inbox example's inputs into `dir` (constitution, contacts, catalog).
pub fn inbox_inputs(dir: &Path) {
    for f in ["constitution.md", "contacts.txt", "catalog.json"] {
        std::fs::copy(inbox_dir().join(f), dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

/// An environment with nothing but what the test sets.
pub fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}
