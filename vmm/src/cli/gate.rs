//! `ironvmm gate`: the same gate, services and audit log as a VM gets, served over
//! stdio or a Unix socket with no VM. The client runs on the host, so the only thing
//! between it and the host is its own honesty about using the gate: this is weaker
//! isolation than a VM (see docs/gate.md).

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::audit::{AuditLog, SyncMode};
use crate::config::Config;
use crate::exit;
use crate::gate::frame::DEFAULT_MAX_FRAME;
use crate::gate::setup::{self, GateConfig};
use crate::gate::{Connection, ConnectionError, Gate, GateLimits};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["stdio", "listen"])))]
pub struct GateArgs {
    /// The policy (p.rules).
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Host folder served by the fs service as /workspace.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Service configuration (ironvmm.toml): workspace, mail, http, net.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Audit log [default: $XDG_STATE_HOME/ironvmm/audit/<vm>.jsonl].
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// The audit log's HMAC key (default: the log's path + `.key`; never inside the workspace).
    #[arg(long, value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// Most bytes this VM's audit log may grow to; past it the VM stops with its close record.
    #[arg(long, value_name = "BYTES", default_value_t = crate::audit::DEFAULT_AUDIT_BUDGET)]
    pub audit_budget: u64,
    /// Most bytes fs.write may write in this VM, all calls together.
    #[arg(long, value_name = "BYTES", default_value_t = crate::services::fs::DEFAULT_MAX_WRITE_BYTES)]
    pub max_write_bytes: u64,
    /// always: fsync before every service call; batch: at most every 10 ms.
    #[arg(long, value_name = "MODE", default_value = "always")]
    pub audit_sync: SyncMode,
    /// Largest frame in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Serve one client on stdin/stdout.
    #[arg(long)]
    pub stdio: bool,
    /// Serve clients on a Unix socket, one thread each.
    #[arg(long, value_name = "PATH")]
    pub listen: Option<PathBuf>,
    /// Most clients served at once over --listen; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_clients: usize,
}

pub fn run(args: GateArgs) -> u8 {
    match start(&args) {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("ironvmm gate: {msg}");
            code
        }
    }
}

type Failure = (u8, String);

fn start(args: &GateArgs) -> Result<u8, Failure> {
    // Block the stop signals in every thread; one thread waits for them and writes
    // the close record before exiting.
    let sigs = stop_signals();
    let config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| (exit::VMM_ERROR, e.to_string()))?,
        None => Config::default(),
    };
    let mut cfg = GateConfig {
        policy: args.policy.clone(),
        workspace: args.workspace.clone(),
        config,
        audit: args.audit.clone(),
        audit_key: args.audit_key.clone(),
        audit_budget: args.audit_budget,
        max_write_bytes: args.max_write_bytes,
        audit_sync: args.audit_sync,
        limits: GateLimits::with_max_frame(args.max_frame),
        vm: vm_id(),
        image_sha256: None,
        flags: Value::Null,
    };
    cfg.flags = setup::gate_flags(if args.stdio { "--stdio" } else { "--listen" }, &cfg);
    let opened = setup::open_gate(&cfg).map_err(|e| (e.code, e.message))?;
    if !opened.warnings.is_empty() {
        eprint!("{}", opened.warnings);
    }
    eprintln!(
        "ironvmm gate: vm {}, audit log {} ({}); no VM: weaker isolation than ironvmm boot",
        cfg.vm,
        opened.audit_path.display(),
        args.audit_sync.as_str()
    );
    let (gate, log) = (opened.gate, opened.audit);
    spawn_signal_waiter(sigs, Arc::clone(&log));

    let code = if args.stdio {
        serve_stdio(&gate)
    } else {
        let path = args.listen.as_deref().unwrap_or(Path::new(""));
        serve_listen(&gate, path, args.max_clients)?
    };
    finish(&log, code)
}

/// Writes the close record; an audit failure turns any exit into 125.
fn finish(log: &AuditLog, code: u8) -> Result<u8, Failure> {
    if let Some(f) = log.failure() {
        return Err((
            exit::VMM_ERROR,
            format!("the audit log can no longer be written, stopping: {f}"),
        ));
    }
    match log.close(Some(i32::from(code))) {
        Ok(head) => {
            eprintln!("ironvmm gate: audit log closed, head {head}");
            Ok(code)
        }
        Err(e) => Err((exit::VMM_ERROR, format!("cannot close the audit log: {e}"))),
    }
}

/// Feeds `data` to the connection and writes every reply, the backlog included
/// (blocking writes are the back-pressure on a client that does not read).
/// Outer `Err`: the peer cannot be written to; inner `Err`: reset the connection.
fn pump(
    conn: &mut Connection,
    data: &[u8],
    out: &mut Vec<u8>,
    w: &mut impl Write,
) -> std::io::Result<Result<(), ConnectionError>> {
    out.clear();
    let mut r = conn.on_data(data, out);
    loop {
        w.write_all(out)?;
        w.flush()?;
        out.clear();
        if r.is_err() || !conn.has_backlog() {
            return Ok(r);
        }
        r = conn.resume(out);
    }
}

/// One client on stdin/stdout until EOF. Returns the exit code.
fn serve_stdio(gate: &Arc<Gate>) -> u8 {
    let mut conn = Connection::new(Arc::clone(gate), "stdio".into());
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("ironvmm gate: stdin: {e}");
                break;
            }
        };
        match pump(&mut conn, &buf[..n], &mut out, &mut stdout) {
            Err(_) => break, // the client went away
            Ok(Ok(())) => {}
            Ok(Err(ConnectionError::AuditFailed(_))) => return exit::VMM_ERROR,
            Ok(Err(e)) => {
                eprintln!("ironvmm gate: connection reset: {e}");
                conn.on_close();
                return exit::VMM_ERROR;
            }
        }
    }
    conn.on_close();
    0
}

/// Clients on a Unix socket, a thread each, until a signal stops the process.
fn serve_listen(gate: &Arc<Gate>, path: &Path, max_clients: usize) -> Result<u8, Failure> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path); // a stale socket of an earlier gate
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| (exit::VMM_ERROR, format!("--listen {}: {e}", path.display())))?;
    eprintln!("ironvmm gate: listening on {}", path.display());
    let active = Arc::new(AtomicUsize::new(0));
    let mut next = 0u64;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ironvmm gate: accept: {e}");
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= max_clients {
            drop(stream); // over the limit: closed at once, nothing decided
            continue;
        }
        next += 1;
        active.fetch_add(1, Ordering::SeqCst);
        let conn = Connection::new(Arc::clone(gate), format!("unix:{next}"));
        let done = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name(format!("gate-client-{next}"))
            .spawn(move || {
                serve_client(conn, stream);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            eprintln!("ironvmm gate: cannot start a client thread: {e}");
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(0)
}

fn serve_client(mut conn: Connection, mut stream: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(4096);
    let mut w = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        match pump(&mut conn, &buf[..n], &mut out, &mut w) {
            Err(_) => break,
            Ok(Ok(())) => {}
            Ok(Err(ConnectionError::AuditFailed(m))) => {
                // Fail closed for the whole gate, as the VMM stops the VM.
                eprintln!("ironvmm gate: {m}; stopping");
                std::process::exit(i32::from(exit::VMM_ERROR));
            }
            Ok(Err(_)) => break,
        }
    }
    conn.on_close();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// `gate-<unix ms>-<pid>`: unique per process on one host.
fn vm_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("gate-{ms}-{}", std::process::id())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the calls only fill and apply it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// On SIGINT (exit 130), SIGTERM (143) or SIGHUP (129): write close, then exit.
fn spawn_signal_waiter(set: libc::sigset_t, log: Arc<AuditLog>) {
    let _ = std::thread::Builder::new()
        .name("gate-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let code = 128 + sig;
            let code = match log.failure() {
                Some(_) => i32::from(exit::VMM_ERROR),
                None => match log.close(Some(code)) {
                    Ok(_) => code,
                    Err(e) => {
                        eprintln!("ironvmm gate: cannot close the audit log: {e}");
                        i32::from(exit::VMM_ERROR)
                    }
                },
            };
            std::process::exit(code);
        });
}
