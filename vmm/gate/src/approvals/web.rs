//! `ironvmm approvals serve`: a small page on 127.0.0.1 over the VMs' control
//! sockets. Pending asks with allow/deny/always buttons, and a live feed of
//! decisions.
//!
//! Any web site the owner visits can make the browser send requests to
//! 127.0.0.1, so every request must carry the random token of the printed URL:
//! the page itself (`?token=`, as Jupyter does) and the API (an `X-Ironvmm-Token`
//! header, which a cross-site form cannot set). Actions are POSTs with a JSON body;
//! the `Host` header must name the loopback address (against DNS rebinding), and an
//! `Origin`, when sent, must be this page's. It binds to loopback only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::socket;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("--listen {0}: only a loopback address (127.0.0.1, ::1) may be served")]
    NotLoopback(SocketAddr),
    #[error("--listen {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error("cannot make a token: {0}")]
    Token(String),
}

/// Decisions kept for the feed.
const FEED: usize = 200;
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
const MAX_CONNS: usize = 32;

#[derive(Default)]
struct State {
    /// vm -> (its socket, its pending asks by id)
    vms: BTreeMap<String, (PathBuf, BTreeMap<u64, Value>)>,
    feed: VecDeque<Value>,
}

/// A running page.
pub struct WebServer {
    pub addr: SocketAddr,
    pub token: String,
}

impl WebServer {
    /// The URL to open (it carries the token).
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }
}

fn random_token() -> Result<String, WebError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| WebError::Token(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Binds `listen` and serves the page for `vm` (or every running VM), in threads.
pub fn start(listen: SocketAddr, vm: Option<String>) -> Result<WebServer, WebError> {
    if !listen.ip().is_loopback() {
        return Err(WebError::NotLoopback(listen));
    }
    let listener = TcpListener::bind(listen).map_err(|e| WebError::Bind {
        addr: listen,
        message: e.to_string(),
    })?;
    let addr = listener.local_addr().map_err(|e| WebError::Bind {
        addr: listen,
        message: e.to_string(),
    })?;
    let token = random_token()?;
    let state = Arc::new(Mutex::new(State::default()));
    {
        let state = Arc::clone(&state);
        let _ = thread::Builder::new()
            .name("web-vms".into())
            .spawn(move || follow_vms(state, vm));
    }
    {
        let (state, token) = (Arc::clone(&state), token.clone());
        let _ = thread::Builder::new()
            .name("web-accept".into())
            .spawn(move || accept(listener, addr, token, state));
    }
    Ok(WebServer { addr, token })
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Finds running VMs every second and follows each one's events.
fn follow_vms(state: Arc<Mutex<State>>, only: Option<String>) {
    loop {
        let found: Vec<(String, PathBuf)> = match &only {
            Some(vm) => socket::socket_path(vm)
                .ok()
                .filter(|p| p.exists())
                .map(|p| vec![(vm.clone(), p)])
                .unwrap_or_default(),
            None => socket::running_vms()
                .map(|v| v.into_iter().map(|i| (i.vm, i.socket)).collect())
                .unwrap_or_default(),
        };
        for (vm, path) in found {
            let mut st = lock(&state);
            if st.vms.contains_key(&vm) {
                continue;
            }
            st.vms.insert(vm.clone(), (path.clone(), BTreeMap::new()));
            drop(st);
            let state = Arc::clone(&state);
            let _ = thread::Builder::new()
                .name("web-watch".into())
                .spawn(move || {
                    let _ = socket::watch_events(&path, |ev| {
                        on_event(&state, &vm, ev);
                        true
                    });
                    lock(&state).vms.remove(&vm);
                });
        }
        thread::sleep(Duration::from_secs(1));
    }
}

fn on_event(state: &Mutex<State>, vm: &str, ev: Value) {
    let mut st = lock(state);
    let kind = ev.get("event").and_then(Value::as_str).unwrap_or("");
    let id = ev.get("id").and_then(Value::as_u64);
    match (kind, id) {
        ("ask", Some(id)) => {
            if let Some((_, p)) = st.vms.get_mut(vm) {
                p.insert(id, ev);
            }
        }
        ("decided", Some(id)) => {
            if let Some((_, p)) = st.vms.get_mut(vm) {
                p.remove(&id);
            }
            push_feed(&mut st, ev);
        }
        ("decision", _) => push_feed(&mut st, ev),
        _ => {}
    }
}

fn push_feed(st: &mut State, mut ev: Value) {
    if let Some(o) = ev.as_object_mut() {
        o.remove("prev");
        o.remove("hash");
    }
    if st.feed.len() == FEED {
        st.feed.pop_front();
    }
    st.feed.push_back(ev);
}

fn accept(listener: TcpListener, addr: SocketAddr, token: String, state: Arc<Mutex<State>>) {
    let active = Arc::new(AtomicUsize::new(0));
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        if active.load(Ordering::SeqCst) >= MAX_CONNS {
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (token, state, active) = (token.clone(), Arc::clone(&state), Arc::clone(&active));
        let spawned = thread::Builder::new()
            .name("web-conn".into())
            .spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = handle(s, addr, &token, &state);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure (and its count) is gone with the failed spawn.
            continue;
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(s: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut r)
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut line)
            .ok()?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return None;
        }
        let end = line == b"\r\n" || line == b"\n";
        head.extend_from_slice(&line);
        if end {
            break;
        }
    }
    let text = String::from_utf8(head).ok()?;
    let mut lines = text.lines();
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn respond(
    mut s: &TcpStream,
    status: &str,
    ctype: &str,
    extra: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nX-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn refuse(s: &TcpStream, status: &str, why: &str) -> std::io::Result<()> {
    respond(s, status, "text/plain; charset=utf-8", "", why.as_bytes())
}

/// Compares without an early exit, so the time taken does not reveal the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn handle(
    s: TcpStream,
    addr: SocketAddr,
    token: &str,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let Some(req) = read_request(&s) else {
        return refuse(&s, "400 Bad Request", "bad request");
    };
    let port = addr.port();
    let hosts = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    let host_ok = req.headers.get("host").is_some_and(|h| hosts.contains(h));
    if !host_ok {
        return refuse(
            &s,
            "403 Forbidden",
            "refused: the Host header must name this loopback address",
        );
    }
    if let Some(o) = req.headers.get("origin") {
        if !hosts.iter().any(|h| *o == format!("http://{h}")) {
            return refuse(
                &s,
                "403 Forbidden",
                "refused: a request from another origin",
            );
        }
    }
    let given = match req.method.as_str() {
        // Only the page itself takes the token from the URL; the API wants the header.
        "GET" if req.path == "/" => req.query.get("token").cloned(),
        _ => req.headers.get("x-ironvmm-token").cloned(),
    };
    if !given.is_some_and(|t| same(&t, token)) {
        return refuse(
            &s,
            "403 Forbidden",
            "refused: this page needs the token of the URL that `ironvmm approvals serve` printed",
        );
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") => {
            let nonce = random_token().unwrap_or_else(|_| "n".into());
            let csp = format!(
                "Content-Security-Policy: default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'\r\n"
            );
            let page = PAGE
                .replace("{{NONCE}}", &nonce)
                .replace("{{TOKEN}}", &Value::String(token.to_string()).to_string());
            respond(
                &s,
                "200 OK",
                "text/html; charset=utf-8",
                &csp,
                page.as_bytes(),
            )
        }
        ("GET", "/api/state") => {
            let st = lock(state);
            let pending: Vec<&Value> = st.vms.values().flat_map(|(_, p)| p.values()).collect();
            let body = json!({
                "vms": st.vms.keys().collect::<Vec<_>>(),
                "pending": pending,
                "feed": st.feed.iter().rev().collect::<Vec<_>>(),
            });
            respond(
                &s,
                "200 OK",
                "application/json",
                "",
                body.to_string().as_bytes(),
            )
        }
        ("POST", "/api/answer") => {
            let json_body = req
                .headers
                .get("content-type")
                .is_some_and(|c| c.starts_with("application/json"));
            if !json_body {
                return refuse(&s, "415 Unsupported Media Type", "actions take a JSON body");
            }
            let Ok(a) = serde_json::from_slice::<Value>(&req.body) else {
                return refuse(&s, "400 Bad Request", "bad JSON");
            };
            let reply = forward_answer(state, &a);
            respond(
                &s,
                "200 OK",
                "application/json",
                "",
                reply.to_string().as_bytes(),
            )
        }
        ("GET" | "POST", _) => refuse(&s, "404 Not Found", "not found"),
        _ => refuse(&s, "405 Method Not Allowed", "GET or POST only"),
    }
}

fn forward_answer(state: &Mutex<State>, a: &Value) -> Value {
    let vm = a.get("vm").and_then(Value::as_str).unwrap_or("");
    let Some(path) = lock(state).vms.get(vm).map(|(p, _)| p.clone()) else {
        return json!({"event": "error", "error": format!("no running VM `{vm}`")});
    };
    let op = if a.get("allow").and_then(Value::as_bool) == Some(true) {
        "allow"
    } else {
        "deny"
    };
    let req = json!({
        "op": op,
        "id": a.get("id").cloned().unwrap_or(Value::Null),
        "learn": a.get("learn").and_then(Value::as_str).unwrap_or("once"),
        "confirm": a.get("confirm").and_then(Value::as_bool).unwrap_or(false),
        "channel": "web",
    });
    match socket::request(&path, &req) {
        Ok(r) => r.into_iter().last().unwrap_or(Value::Null),
        Err(e) => json!({"event": "error", "error": e.to_string()}),
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ironvmm approvals</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;max-width:60em;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.5em}
.ask{border:2px solid #c60;border-radius:6px;padding:.6em 1em;margin:.6em 0;background:#fff8f0}
pre{background:#f4f4f4;padding:.5em;overflow:auto;max-height:20em;white-space:pre-wrap;word-break:break-all}
button{margin:.2em .3em .2em 0;padding:.3em .8em}
.allow{background:#2a7;color:#fff;border:0} .deny{background:#c33;color:#fff;border:0}
.feed li{margin:.2em 0;font-family:monospace;font-size:12px}
.conflict{color:#a00} .muted{color:#777}
</style></head><body>
<h1>ironvmm approvals</h1>
<p class="muted" id="vms">looking for running VMs…</p>
<h2>Pending asks</h2><div id="asks"><p class="muted">none</p></div>
<h2>Decisions</h2><ul class="feed" id="feed"></ul>
<script nonce="{{NONCE}}">
const TOKEN = {{TOKEN}};
const el = (t, props, ...kids) => { const e = document.createElement(t); Object.assign(e, props || {}); for (const k of kids) e.append(k); return e; };
async function api(path, body) {
  const opts = {headers: {'X-Ironvmm-Token': TOKEN}};
  if (body) { opts.method = 'POST'; opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  return r.json();
}
const notes = {}, scopes = {};
let shown = '';
async function answer(a, allow, learn, confirm) {
  const r = await api('/api/answer', {vm: a.vm, id: a.id, allow, learn, confirm});
  const key = a.vm + '/' + a.id;
  if (r.event === 'confirm') notes[key] = {confirm: r, allow, learn};
  else if (r.event === 'error') notes[key] = {error: r.error};
  else delete notes[key];
  refresh();
}
function askBox(a) {
  const key = a.vm + '/' + a.id;
  const box = el('div', {className: 'ask', id: 'ask-' + a.id});
  box.dataset.tool = a.tool;
  box.append(el('div', {}, el('b', {textContent: a.tool}), ' — VM ' + a.vm + ', question ' + a.id + ', ' + a.calls + ' parked call(s), waiting ' + Math.round(a.waited_ms / 1000) + ' s'));
  box.append(el('pre', {textContent: JSON.stringify(a.args, null, 2)}));
  box.append(el('div', {textContent: 'rule ' + (a.rule === null ? 'default' : 'line ' + a.rule) + ': ' + a.reason}));
  const scope = el('select', {}, el('option', {value: 'exact', textContent: 'this exact call'}), el('option', {value: 'value', textContent: 'this recipient / host / folder'}), el('option', {value: 'tool', textContent: 'every ' + a.tool + ' call'}));
  scope.value = scopes[key] || 'value';
  scope.onchange = () => { scopes[key] = scope.value; };
  const b = (label, cls, action, fn) => { const x = el('button', {textContent: label, className: cls}); x.dataset.action = action; x.onclick = fn; return x; };
  box.append(el('div', {},
    b('Allow once', 'allow', 'allow', () => answer(a, true, 'once', false)),
    b('Deny once', 'deny', 'deny', () => answer(a, false, 'once', false)),
    b('Always allow', '', 'always-allow', () => answer(a, true, scope.value, false)),
    b('Always deny', '', 'always-deny', () => answer(a, false, scope.value, false)),
    ' for ', scope));
  const n = notes[key];
  if (n && n.error) box.append(el('p', {className: 'conflict', textContent: n.error}));
  if (n && n.confirm) {
    const c = n.confirm;
    box.append(el('p', {className: 'conflict', textContent: 'The rule ' + c.rule + ' would change these scenarios:'}));
    const ul = el('ul');
    for (const x of c.conflicts) ul.append(el('li', {className: 'conflict', textContent: 'line ' + x.line + ': ' + JSON.stringify(x.call) + ' → ' + x.after + ' instead of ' + x.before + ' (expected ' + x.expect + ')' + (x.note ? ' — ' + x.note : '')}));
    box.append(ul, b('Keep the rule anyway', 'deny', 'confirm', () => answer(a, n.allow, n.learn, true)));
  }
  return box;
}
function feedLine(e) {
  if (e.event === 'decided') return 'answered: ' + e.decision + ' ' + e.tool + ' (by ' + e.decided_by + ' via ' + e.channel + ')' + (e.learned ? ' learned ' + e.learned.rule : '') + ' — ' + e.reason;
  return '#' + e.seq + ' ' + e.vm + ' ' + e.conn + ': ' + e.decision + (e.asked ? ' (asked)' : '') + ' ' + e.tool + ' by ' + e.decided_by + (e.rule === null ? '' : ' rule ' + e.rule) + ' — ' + e.reason;
}
async function refresh() {
  let s;
  try { s = await api('/api/state'); } catch (e) { document.getElementById('vms').textContent = 'lost the server'; return; }
  document.getElementById('vms').textContent = s.vms.length ? 'VMs: ' + s.vms.join(', ') : 'no running VM';
  // Redrawn only when something changed, so a click never lands on a stale button.
  const sig = JSON.stringify([s.pending.map(a => [a.vm, a.id, a.calls]), notes]);
  const asks = document.getElementById('asks');
  if (sig !== shown) asks.replaceChildren(...(s.pending.length ? s.pending.map(askBox) : [el('p', {className: 'muted', textContent: 'none'})]));
  shown = sig;
  document.getElementById('feed').replaceChildren(...s.feed.map(e => el('li', {textContent: feedLine(e)})));
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback() {
        let e = start("0.0.0.0:0".parse().unwrap(), None).err().unwrap();
        assert!(matches!(e, WebError::NotLoopback(_)));
    }

    #[test]
    fn token_compare() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
