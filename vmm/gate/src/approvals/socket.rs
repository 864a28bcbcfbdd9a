//! The control socket: another shell (or the web page) answers a VM's asks.
//!
//! One Unix socket per VM, mode 0600, in `$XDG_RUNTIME_DIR/ironvmm/<vm>.sock`, or
//! `/tmp/ironvmm-<uid>/<vm>.sock` without `XDG_RUNTIME_DIR`; the folder is 0700.
//! A client of another uid is refused (`SO_PEERCRED`), whatever the file modes say.
//! One JSON object per line:
//! - in: `{"op":"list"}`, `{"op":"allow"|"deny","id":N,"learn":"once"|"exact"|"value"|"tool","confirm":bool}`,
//!   `{"op":"watch"}`, `{"op":"info"}`;
//! - out: `{"event":"ask"|"decided"|"decision",...}`, and `listed`, `confirm`,
//!   `info`, `error` as the replies to those.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::event::Event;
use super::hub::{AnswerError, ApprovalHub, Reply};
use super::learn::Scope;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: {message}")]
    Unsafe { path: String, message: String },
    #[error("{path}: another ironvmm with this VM id is running")]
    InUse { path: String },
    #[error("no VM is running (no socket in {0})")]
    NoVm(String),
    #[error("{0} VMs are running ({1}): choose one with --vm")]
    Ambiguous(usize, String),
    #[error("{path}: {message}")]
    Protocol { path: String, message: String },
}

fn io_err(path: &Path, e: std::io::Error) -> SocketError {
    SocketError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The folder of the sockets, created 0700 if missing, and checked: ours, a real
/// folder, closed to others.
pub fn runtime_dir() -> Result<PathBuf, SocketError> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("ironvmm"),
        // SAFETY: geteuid has no preconditions.
        None => PathBuf::from(format!("/tmp/ironvmm-{}", unsafe { libc::geteuid() })),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&dir, e)),
    }
    let m = std::fs::symlink_metadata(&dir).map_err(|e| io_err(&dir, e))?;
    let unsafe_dir = |message: String| SocketError::Unsafe {
        path: dir.display().to_string(),
        message,
    };
    if !m.is_dir() {
        return Err(unsafe_dir("not a folder (a symlink?)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(unsafe_dir(format!("owned by uid {}, not {me}", m.uid())));
    }
    if m.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "mode {:o}: others may reach the sockets (want 700)",
            m.mode() & 0o777
        )));
    }
    Ok(dir)
}

/// The socket of VM `vm`.
pub fn socket_path(vm: &str) -> Result<PathBuf, SocketError> {
    Ok(runtime_dir()?.join(format!("{vm}.sock")))
}

/// The peer's (pid, uid) of a Unix stream.
pub fn peer_cred(s: &UnixStream) -> Option<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket fd, an out-struct of the given length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some((cred.pid, cred.uid))
}

/// Longest request line.
const MAX_LINE: usize = 64 * 1024;
/// Most clients at once.
const MAX_CLIENTS: usize = 64;

/// A VM's control socket, served by a thread; the file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl ControlSocket {
    /// Binds `path` (mode 0600) and serves `hub` on it.
    pub fn start(hub: ApprovalHub, path: &Path) -> Result<ControlSocket, SocketError> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                if UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse {
                        path: path.display().to_string(),
                    });
                }
                let _ = std::fs::remove_file(path); // a stale socket of a VM that died
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| io_err(path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err(path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let p2 = path.to_path_buf();
        // The owner is who started the VMM, read now: a jailed VMM (docs/jail.md)
        // runs as another uid later, and its owner still answers.
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        thread::Builder::new()
            .name("approvals-socket".into())
            .spawn(move || accept_loop(listener, hub, s2, p2, me))
            .map_err(|e| io_err(path, e))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        // Wake the accept loop so that it sees `stop`.
        let _ = UnixStream::connect(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    hub: ApprovalHub,
    stop: Arc<AtomicBool>,
    path: PathBuf,
    me: u32,
) {
    // Its client threads inherit the filter.
    if !super::confine_thread("approvals-socket") {
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        let Some((pid, uid)) = peer_cred(&stream) else {
            continue;
        };
        if uid != me {
            let m =
                format!("refused: this socket belongs to uid {me}, and the client is uid {uid}");
            let _ = stream.write_all(error_line(&m).as_bytes());
            continue;
        }
        if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
            let _ = stream.write_all(error_line("too many clients").as_bytes());
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (hub, active2, path) = (hub.clone(), Arc::clone(&active), path.clone());
        let who = format!("uid {uid} pid {pid}");
        let spawned = thread::Builder::new()
            .name("approvals-client".into())
            .spawn(move || {
                serve_client(stream, &hub, &who, &path);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn error_line(m: &str) -> String {
    let mut s = json!({"event": "error", "error": m}).to_string();
    s.push('\n');
    s
}

fn line(v: &Value) -> String {
    let mut s = v.to_string();
    s.push('\n');
    s
}

fn serve_client(stream: UnixStream, hub: &ApprovalHub, who: &str, _path: &Path) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if n > MAX_LINE {
            let _ = w.write_all(error_line("request line too long").as_bytes());
            return;
        }
        let req: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                let _ = w.write_all(error_line(&format!("bad JSON: {e}")).as_bytes());
                continue;
            }
        };
        let op = req.get("op").and_then(Value::as_str).unwrap_or("");
        let out = match op {
            "list" => {
                let asks = hub.pending();
                let mut s = String::new();
                for a in &asks {
                    s.push_str(&Event::Ask(a.clone()).to_line());
                }
                s.push_str(&line(
                    &json!({"event": "listed", "vm": hub.vm(), "count": asks.len()}),
                ));
                s
            }
            "info" => line(&json!({
                "event": "info",
                "vm": hub.vm(),
                "pid": std::process::id(),
                "approver": format!("{:?}", hub.mode()).to_lowercase(),
                "pending": hub.pending().len(),
                "ask_timeout_s": hub.ask_timeout().as_secs(),
                "policy": hub.learner().map(|l| l.live().policy_path().display().to_string()),
            })),
            "allow" | "deny" => answer(hub, &req, op == "allow", who),
            "watch" => {
                watch(hub, &mut w);
                return;
            }
            _ => error_line("unknown op: expected list, allow, deny, watch or info"),
        };
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn answer(hub: &ApprovalHub, req: &Value, allow: bool, who: &str) -> String {
    let Some(id) = req.get("id").and_then(Value::as_u64) else {
        return error_line("`id` must be the number of a pending ask");
    };
    let learn = match req.get("learn").map(|l| l.as_str()) {
        None | Some(Some("once")) => None,
        Some(Some(s)) => match Scope::parse(s) {
            Some(sc) => Some(sc),
            None => return error_line("`learn` must be once, exact, value or tool"),
        },
        Some(None) => return error_line("`learn` must be once, exact, value or tool"),
    };
    let confirm = req.get("confirm").and_then(Value::as_bool).unwrap_or(false);
    let channel = req
        .get("channel")
        .and_then(Value::as_str)
        .filter(|c| *c == "web")
        .unwrap_or("socket");
    let reply = Reply {
        allow,
        learn,
        confirm,
        channel: channel.into(),
        who: Some(who.into()),
    };
    match hub.answer(id, reply) {
        Ok(d) => Event::Decided(d).to_line(),
        Err(AnswerError::NeedsConfirmation(c)) => line(&json!({
            "event": "confirm",
            "id": id,
            "rule": c.rule,
            "conflicts": c.conflicts,
            "message": format!("the rule would change the decision of {} scenario(s); send the same answer with \"confirm\": true to keep it", c.conflicts.len()),
        })),
        Err(e) => error_line(&e.to_string()),
    }
}

fn watch(hub: &ApprovalHub, w: &mut UnixStream) {
    let (pending, rx) = hub.subscribe();
    for a in pending {
        if w.write_all(Event::Ask(a).to_line().as_bytes()).is_err() {
            return;
        }
    }
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(e) => {
                if w.write_all(e.to_line().as_bytes()).is_err() {
                    return;
                }
            }
            // A quiet VM: make sure the watcher is still there.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if w.write_all(b"").is_err() || peer_gone(w) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn peer_gone(s: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && (pfd.revents & (libc::POLLHUP | libc::POLLERR)) != 0
}

/// Whether the feed must parse the audit `line`: the `close` record (the feed ends
/// there), or a `decision` record while `watched`. Parsing every line would cost the
/// VMM as much CPU per call as the gate's own parse of the call, watched or not.
/// The log is compact JSON of our own making, so a record of either kind holds the
/// text below; a line that merely holds it (in its arguments) is parsed, then
/// dropped.
fn feed_wants(line: &str, watched: impl FnOnce() -> bool) -> bool {
    line.contains(r#""kind":"close""#) || (line.contains(r#""kind":"decision""#) && watched())
}

/// Follows the audit log at `path` and passes its `decision` records to the hub's
/// subscribers (the decision feed).
pub fn spawn_audit_feed(hub: ApprovalHub, path: PathBuf) {
    // Opened here, not in the thread: a jailed VMM (docs/jail.md) no longer has
    // the path once the thread runs.
    let Ok(f) = std::fs::File::open(&path) else {
        return;
    };
    let _ = thread::Builder::new()
        .name("approvals-feed".into())
        .spawn(move || {
            if !super::confine_thread("approvals-feed") {
                return;
            }
            let mut r = BufReader::new(f);
            let mut buf = String::new();
            loop {
                match r.read_line(&mut buf) {
                    Ok(0) => thread::sleep(Duration::from_millis(100)),
                    Ok(_) if !buf.ends_with('\n') => {} // a line still being written
                    Ok(_) => {
                        if feed_wants(&buf, || hub.watched()) {
                            let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&buf) else {
                                buf.clear();
                                continue;
                            };
                            match m.get("kind").and_then(Value::as_str) {
                                Some("decision") => hub.publish_decision(m),
                                Some("close") => return,
                                _ => {}
                            }
                        }
                        buf.clear();
                    }
                    Err(_) => return,
                }
            }
        });
}

// ---- the client side: `ironvmm approvals`, `ironvmm ps`, the web page ----

/// A running VM, as its socket says.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vm: String,
    pub socket: PathBuf,
    pub info: Map<String, Value>,
}

/// The VMs whose sockets answer, in the runtime folder.
pub fn running_vms() -> Result<Vec<VmInfo>, SocketError> {
    let dir = runtime_dir()?;
    let mut out = Vec::new();
    let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    for p in paths {
        let vm = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Err(e) = UnixStream::connect(&p) {
            // Nobody listens: the socket of a VM that died (the folder is ours).
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(&p);
            }
            continue;
        }
        if let Ok(replies) = request(&p, &json!({"op": "info"})) {
            if let Some(Value::Object(info)) = replies.into_iter().last() {
                out.push(VmInfo {
                    vm,
                    socket: p,
                    info,
                });
            }
        }
    }
    Ok(out)
}

/// The socket of `vm`, or of the only running VM.
pub fn choose_vm(vm: Option<&str>) -> Result<PathBuf, SocketError> {
    if let Some(v) = vm {
        return socket_path(v);
    }
    let vms = running_vms()?;
    match vms.len() {
        0 => Err(SocketError::NoVm(runtime_dir()?.display().to_string())),
        1 => Ok(vms[0].socket.clone()),
        n => Err(SocketError::Ambiguous(
            n,
            vms.iter()
                .map(|v| v.vm.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Sends one request and reads the replies up to the one that ends it
/// (`listed`, `decided`, `confirm`, `info` or `error`).
pub fn request(path: &Path, req: &Value) -> Result<Vec<Value>, SocketError> {
    let s = UnixStream::connect(path).map_err(|e| io_err(path, e))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = s.try_clone().map_err(|e| io_err(path, e))?;
    w.write_all(line(req).as_bytes())
        .map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|e| io_err(path, e))?;
        let v: Value = serde_json::from_str(&l).map_err(|e| SocketError::Protocol {
            path: path.display().to_string(),
            message: format!("bad reply: {e}"),
        })?;
        let ev = v
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        out.push(v);
        if matches!(
            ev.as_str(),
            "listed" | "decided" | "confirm" | "info" | "error"
        ) {
            return Ok(out);
        }
    }
    Err(SocketError::Protocol {
        path: path.display().to_string(),
        message: "the VM closed the socket without a reply".into(),
    })
}

/// Streams the events of `path` to `each` until it returns false or the VM ends.
pub fn watch_events(path: &Path, mut each: impl FnMut(Value) -> bool) -> Result<(), SocketError> {
    let s = UnixStream::connect(path).map_err(|e| io_err(path, e))?;
    let mut w = s.try_clone().map_err(|e| io_err(path, e))?;
    w.write_all(b"{\"op\":\"watch\"}\n")
        .map_err(|e| io_err(path, e))?;
    for l in BufReader::new(s).lines() {
        let Ok(l) = l else { break };
        if let Ok(v) = serde_json::from_str::<Value>(&l) {
            if !each(v) {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::feed_wants;

    #[test]
    fn the_feed_parses_decisions_only_while_watched_and_always_the_close() {
        let decision =
            r#"{"seq":3,"kind":"decision","tool":"fs.stat","args":{"path":"/workspace"}}"#;
        let outcome = r#"{"seq":4,"kind":"outcome","status":"ok"}"#;
        let close = r#"{"seq":9,"kind":"close","calls":2}"#;
        let lookalike = r#"{"seq":5,"kind":"outcome","args":{"kind":"decision"}}"#;
        assert!(feed_wants(decision, || true));
        assert!(!feed_wants(decision, || false));
        assert!(!feed_wants(outcome, || true));
        assert!(feed_wants(close, || false));
        // Parsed, then dropped by its real kind.
        assert!(feed_wants(lookalike, || true));
        // A guest's string is escaped in the log: it never looks like a record's kind.
        let escaped = r#"{"seq":6,"kind":"outcome","args":{"text":"\"kind\":\"close\""}}"#;
        assert!(!feed_wants(escaped, || true));
    }
}
