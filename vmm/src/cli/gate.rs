//! `ironvmm gate`: the same gate, services and audit log as a VM gets, served over
//! stdio or a Unix socket with no VM. The client runs on the host, so the only thing
//! between it and the host is its own honesty about using the gate: this is weaker
//! isolation than a VM (see docs/gate.md).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::audit::{AuditLog, SyncMode};
use crate::cli::boot::InflightArgs;
use crate::config::Config;
use crate::exit;
use crate::gate::frame::DEFAULT_MAX_FRAME;
use crate::gate::setup::{self, GateConfig};
use crate::gate::{Connection, ConnectionError, Gate};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["stdio", "listen"])))]
pub struct GateArgs {
    /// The policy (p.rules).
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// Host folder served by the fs service as /workspace.
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Service configuration (ironvmm.toml): workspace, mail, http, net, llm
    /// [default: the policy's folder's ironvmm.toml, if there is one].
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
    /// Also serve network egress (a VM's vsock port 2: the guest proxy's HTTP
    /// requests, tunnels and model route) on this Unix socket, for
    /// `iron proxy --to unix:PATH` on the host.
    #[arg(long, value_name = "PATH")]
    pub net_listen: Option<PathBuf>,
    /// Most clients served at once over --listen; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_clients: usize,
    #[command(flatten)]
    pub inflight: InflightArgs,
    #[command(flatten)]
    pub approver: super::approvals::ApproverArgs,
    #[command(flatten)]
    pub jail: super::boot::JailArgs,
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
    let config = match crate::config::choose(args.config.as_deref(), &args.policy) {
        Some(chosen) => {
            if chosen.beside_policy {
                eprintln!(
                    "ironvmm gate: configuration: {} (beside the policy; --config FILE names another)",
                    chosen.path.display()
                );
            }
            Config::load(&chosen.path).map_err(|e| (exit::VMM_ERROR, e.to_string()))?
        }
        None => Config::default(),
    };
    // The namespace while this is the only thread (docs/jail.md).
    let jail = args.jail.jail(&config).map_err(|e| (exit::VMM_ERROR, e))?;
    if let Some(j) = &jail {
        j.unshare().map_err(|e| (exit::VMM_ERROR, e.to_string()))?;
    }
    let mut cfg = GateConfig {
        policy: args.policy.clone(),
        workspace: args.workspace.clone(),
        config,
        audit: args.audit.clone(),
        audit_key: args.audit_key.clone(),
        audit_budget: args.audit_budget,
        max_write_bytes: args.max_write_bytes,
        audit_sync: args.audit_sync,
        limits: args.inflight.limits(args.max_frame),
        vm: vm_id(),
        image_sha256: None,
        flags: Value::Null,
    };
    cfg.flags = setup::gate_flags(if args.stdio { "--stdio" } else { "--listen" }, &cfg);
    if let (Some(j), Some(f)) = (&jail, cfg.flags.as_object_mut()) {
        f.insert("jail".into(), j.dir.display().to_string().into());
        f.insert("jail_user".into(), format!("{}:{}", j.uid, j.gid).into());
    }
    if let (Some(j), Some(ws)) = (&jail, cfg.workspace_dir()) {
        j.fence_workspace(&ws)
            .map_err(|e| (exit::VMM_ERROR, e.to_string()))?;
    }
    let mut prepared = setup::prepare_gate(&cfg, None).map_err(|e| (e.code, e.message))?;
    if let Some(j) = &jail {
        let warnings = prepared
            .ready_for_jail(j.uid, j.gid)
            .map_err(|e| (e.code, e.message))?;
        warnings
            .iter()
            .for_each(|w| eprintln!("ironvmm gate: warning: {w}"));
    }
    let opened = prepared.open(None).map_err(|e| (e.code, e.message))?;
    if !opened.warnings.is_empty() {
        eprint!("{}", opened.warnings);
    }
    eprintln!(
        "ironvmm gate: vm {}, audit log {} ({}); no VM: weaker isolation than ironvmm boot",
        cfg.vm,
        opened.audit_path.display(),
        args.audit_sync.as_str()
    );
    let approvals = super::approvals::start(
        &args.approver,
        super::approvals::Setting {
            vm: &cfg.vm,
            live: Some(&opened.live),
            audit: Some(&opened.audit),
            run_mode: false,
            stdin_taken: args.stdio,
            terminal: Box::new(std::io::stderr()),
            guest_console: false,
        },
    )?;
    if let Some(share) = &approvals.terminal {
        super::approvals::keys_from_stdin(Arc::clone(share));
    }
    let (gate, log, opened_net) = (opened.gate, opened.audit, opened.net);
    gate.set_approver(Arc::new(approvals.hub.clone()));
    spawn_signal_waiter(sigs, Arc::clone(&log));
    if let Some(path) = &args.net_listen {
        super::gate_net::spawn(Arc::clone(&opened_net), path).map_err(|e| (exit::VMM_ERROR, e))?;
    }
    let listener = match &args.listen {
        Some(path) if !args.stdio => Some(bind_listener(path)?),
        _ => None,
    };
    if let Some(j) = &jail {
        // Everything is open: the policy, the workspace, the audit log, the sockets.
        if let Err(e) = j.enter() {
            eprintln!("ironvmm gate: {e}");
            return finish(&log, exit::VMM_ERROR);
        }
        eprintln!(
            "ironvmm gate: jailed in {} as uid {} gid {}",
            j.dir.display(),
            j.uid,
            j.gid
        );
    }

    let code = if args.stdio {
        serve_stdio(&gate)
    } else {
        // Many clients: an audit failure stops the process at once, from the
        // thread that hit it (an event; nobody polls for it).
        log.on_failure(Box::new(|why| {
            eprintln!("ironvmm gate: the audit log can no longer be written: {why}; stopping");
            std::process::exit(i32::from(exit::VMM_ERROR));
        }));
        match listener {
            Some(l) => serve_listen(&gate, l, args.max_clients),
            None => exit::VMM_ERROR,
        }
    };
    // The client is gone: nobody is waiting for the answers any more.
    approvals
        .hub
        .close("the gate is stopping before anyone answered");
    crate::devices::console_input::restore_terminal();
    drop(approvals);
    // Calls still running finish and are audited before the close record.
    let stuck = gate.shutdown();
    if stuck > 0 {
        eprintln!("ironvmm gate: {stuck} worker thread(s) stuck in a service at exit");
    }
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

/// How one client's session ended.
enum End {
    /// EOF, every call answered.
    Eof,
    /// The client cannot be written to (or read from): it went away.
    Gone,
    /// The connection was reset (frame over the limit...) or the audit log failed.
    Reset(ConnectionError),
}

/// A file over a duplicate of `fd`, unbuffered (so `poll` sees what we have not read).
fn dup_file(fd: i32) -> std::io::Result<File> {
    // SAFETY: dup only creates a new descriptor; on success we own it.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(new) }))
}

/// Serves one client: reads requests while the connection has room for them, and
/// writes replies as calls finish, in whatever order. One thread and no busy loop:
/// it sleeps in poll(2) on the input and the connection's wake eventfd. Writes
/// block, which pushes back on a client that does not read; reading stops at the
/// in-flight bounds, which pushes back through the socket (or pipe) buffer.
fn serve_client(gate: &Arc<Gate>, id: String, input: &mut File, output: &mut File) -> End {
    let evt = match EventFd::new(EFD_NONBLOCK) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("ironvmm gate: eventfd: {e}");
            return End::Gone;
        }
    };
    let waker = Arc::clone(&evt);
    let mut conn = Connection::new(
        Arc::clone(gate),
        id,
        Arc::new(move || {
            let _ = waker.write(1);
        }),
    );
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    let mut eof = false;
    let end = 'session: loop {
        // Everything ready goes out before we sleep: a wake comes only when the
        // first of a batch of replies is ready.
        loop {
            out.clear();
            let r = conn.poll(&mut out);
            if !out.is_empty() && output.write_all(&out).is_err() {
                break 'session End::Gone;
            }
            if let Err(e) = r {
                break 'session End::Reset(e);
            }
            if out.is_empty() {
                break;
            }
        }
        if eof && !conn.has_pending_output() {
            break End::Eof;
        }
        let room = if eof { 0 } else { conn.input_room() };
        let mut fds = [
            libc::pollfd {
                fd: evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let nfds = if room > 0 { 2 } else { 1 };
        // SAFETY: `fds` is a valid array of at least `nfds` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("ironvmm gate: poll: {e}");
            break End::Gone;
        }
        if fds[0].revents != 0 {
            let _ = evt.read();
        }
        if room > 0 && fds[1].revents != 0 {
            let want = room.min(buf.len());
            let n = match input.read(&mut buf[..want]) {
                Ok(0) => {
                    eof = true;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break End::Gone,
            };
            out.clear();
            let r = conn.on_data(&buf[..n], &mut out);
            if !out.is_empty() && output.write_all(&out).is_err() {
                break End::Gone;
            }
            if let Err(e) = r {
                break End::Reset(e);
            }
        }
    };
    conn.on_close();
    end
}

/// One client on stdin/stdout until EOF and every call answered. Returns the exit code.
fn serve_stdio(gate: &Arc<Gate>) -> u8 {
    let (mut input, mut output) = match (dup_file(0), dup_file(1)) {
        (Ok(i), Ok(o)) => (i, o),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ironvmm gate: stdin/stdout: {e}");
            return exit::VMM_ERROR;
        }
    };
    match serve_client(gate, "stdio".into(), &mut input, &mut output) {
        End::Eof | End::Gone => 0,
        End::Reset(ConnectionError::AuditFailed(m)) => {
            eprintln!("ironvmm gate: stopping: {m}");
            exit::VMM_ERROR
        }
        End::Reset(e) => {
            eprintln!("ironvmm gate: connection reset: {e}");
            exit::VMM_ERROR
        }
    }
}

/// Binds `--listen` (before a jail would take the path away).
fn bind_listener(path: &Path) -> Result<UnixListener, Failure> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path); // a stale socket of an earlier gate
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| (exit::VMM_ERROR, format!("--listen {}: {e}", path.display())))?;
    eprintln!("ironvmm gate: listening on {}", path.display());
    Ok(listener)
}

/// Clients on a Unix socket, a thread each, until a signal stops the process.
fn serve_listen(gate: &Arc<Gate>, listener: UnixListener, max_clients: usize) -> u8 {
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
        let (gate, done) = (Arc::clone(gate), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name(format!("gate-client-{next}"))
            .spawn(move || {
                let fd = OwnedFd::from(stream);
                if let (Ok(mut w), mut r) = (dup_file(fd.as_raw_fd()), File::from(fd)) {
                    let _ = serve_client(&gate, format!("unix:{next}"), &mut r, &mut w);
                    // SAFETY: shutdown on a descriptor we own.
                    unsafe { libc::shutdown(r.as_raw_fd(), libc::SHUT_RDWR) };
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            eprintln!("ironvmm gate: cannot start a client thread: {e}");
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
    0
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
            crate::devices::console_input::restore_terminal();
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
