//! `ironvmm approvals list|allow|deny|watch|serve`: answer a running VM's asks from
//! another shell or a browser, through its control socket; and the approver flags
//! that `gate` and `boot` share (`--approver`, `--ask-timeout`, `--answers`,
//! `--non-interactive`, `--breaker`).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::approvals::answers::AnswersFile;
use crate::approvals::breaker::{parse_duration, BreakerConfig};
use crate::approvals::socket::{self, ControlSocket};
use crate::approvals::tty::{self, TerminalShare};
use crate::approvals::{web, ApprovalHub, HubConfig, Learner, LivePolicy, Mode};
use crate::audit::AuditLog;
use crate::exit;

#[derive(clap::Subcommand, Debug)]
pub enum ApprovalsCommand {
    /// The pending asks of a running VM.
    List(VmArg),
    /// Allow a pending ask (by its id, from `list`).
    Allow(AnswerArgs),
    /// Deny a pending ask.
    Deny(AnswerArgs),
    /// Print asks, answers and decisions as they happen.
    Watch(VmArg),
    /// A local web page with the pending asks of every running VM, and a live feed.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
pub struct VmArg {
    /// The VM (from `ironvmm ps`); needed when more than one runs.
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    /// Print the socket's JSON lines as they are.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct AnswerArgs {
    /// The ask's id.
    pub id: u64,
    /// Keep the answer as a rule: once (not kept), exact, value (recipient, host or
    /// folder) or tool.
    #[arg(long, value_name = "SCOPE", default_value = "once")]
    pub learn: String,
    /// Keep the rule even if it changes the decision of some scenarios.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub vm: VmArg,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Where to serve the page: a loopback address and port (0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Only this VM (default: every running VM).
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
}

pub fn run(c: ApprovalsCommand) -> u8 {
    let r = match c {
        ApprovalsCommand::List(a) => list(&a),
        ApprovalsCommand::Allow(a) => answer(&a, true),
        ApprovalsCommand::Deny(a) => answer(&a, false),
        ApprovalsCommand::Watch(a) => watch(&a),
        ApprovalsCommand::Serve(a) => serve(&a),
    };
    match r {
        Ok(code) => code,
        Err(m) => {
            eprintln!("ironvmm approvals: {m}");
            1
        }
    }
}

fn list(a: &VmArg) -> Result<u8, String> {
    let path = socket::choose_vm(a.vm.as_deref()).map_err(|e| e.to_string())?;
    let replies = socket::request(&path, &json!({"op": "list"})).map_err(|e| e.to_string())?;
    for r in &replies {
        if a.json {
            println!("{r}");
        } else if r["event"] == "ask" {
            println!("{}", ask_line(r));
        } else if r["event"] == "listed" {
            println!(
                "{} pending ask(s) in VM {}",
                r["count"],
                r["vm"].as_str().unwrap_or("?")
            );
        } else if r["event"] == "error" {
            return Err(r["error"].as_str().unwrap_or("error").to_string());
        }
    }
    Ok(0)
}

fn ask_line(r: &Value) -> String {
    let rule = r["rule"]
        .as_u64()
        .map_or("default".into(), |l| format!("line {l}"));
    let args = tty::escape_for_terminal(&r["args"].to_string());
    let args = if args.chars().count() > 200 {
        format!("{}…", args.chars().take(200).collect::<String>())
    } else {
        args
    };
    format!(
        "{:>4}  {}  {}  ({} call(s), {} s)  rule {rule}: {}",
        r["id"],
        tty::escape_for_terminal(r["tool"].as_str().unwrap_or("?")),
        args,
        r["calls"],
        r["waited_ms"].as_u64().unwrap_or(0) / 1000,
        tty::escape_for_terminal(r["reason"].as_str().unwrap_or(""))
    )
}

fn answer(a: &AnswerArgs, allow: bool) -> Result<u8, String> {
    if !matches!(a.learn.as_str(), "once" | "exact" | "value" | "tool") {
        return Err(format!(
            "--learn {}: expected once, exact, value or tool",
            a.learn
        ));
    }
    let path = socket::choose_vm(a.vm.vm.as_deref()).map_err(|e| e.to_string())?;
    let op = if allow { "allow" } else { "deny" };
    let mut confirm = a.yes;
    loop {
        let req = json!({"op": op, "id": a.id, "learn": a.learn, "confirm": confirm});
        let replies = socket::request(&path, &req).map_err(|e| e.to_string())?;
        let r = replies.last().cloned().unwrap_or(Value::Null);
        if a.vm.json {
            println!("{r}");
        }
        match r["event"].as_str() {
            Some("decided") => {
                if !a.vm.json {
                    let learned = r["learned"]["rule"]
                        .as_str()
                        .map(|x| format!("; learned `{x}`"))
                        .unwrap_or_default();
                    println!(
                        "{} {}{learned}",
                        r["decision"].as_str().unwrap_or("?"),
                        r["tool"].as_str().unwrap_or("?")
                    );
                }
                return Ok(0);
            }
            Some("confirm") => {
                eprintln!(
                    "the rule `{}` would change the decision of these scenarios:",
                    r["rule"].as_str().unwrap_or("?")
                );
                for c in r["conflicts"].as_array().into_iter().flatten() {
                    eprintln!(
                        "  line {}: {} would be {} instead of {} (expected {}){}",
                        c["line"],
                        c["call"],
                        c["after"].as_str().unwrap_or("?"),
                        c["before"].as_str().unwrap_or("?"),
                        c["expect"].as_str().unwrap_or("?"),
                        c["note"]
                            .as_str()
                            .map(|n| format!(" — {n}"))
                            .unwrap_or_default()
                    );
                }
                if !std::io::stdin().is_terminal() {
                    eprintln!("not kept: run again with --yes to keep it");
                    return Ok(1);
                }
                eprint!("keep it anyway? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                if line.trim() != "y" {
                    eprintln!("not kept; the ask is still pending");
                    return Ok(1);
                }
                confirm = true;
            }
            _ => return Err(r["error"].as_str().unwrap_or("no reply").to_string()),
        }
    }
}

fn watch(a: &VmArg) -> Result<u8, String> {
    let path = socket::choose_vm(a.vm.as_deref()).map_err(|e| e.to_string())?;
    let json = a.json;
    socket::watch_events(&path, |v| {
        let line = if json {
            v.to_string()
        } else {
            match v["event"].as_str() {
                Some("ask") => format!("ask  {}", ask_line(&v)),
                Some("decided") => format!(
                    "answered {}: {} {} (by {} via {})",
                    v["id"],
                    v["decision"].as_str().unwrap_or("?"),
                    v["tool"].as_str().unwrap_or("?"),
                    v["decided_by"].as_str().unwrap_or("?"),
                    v["channel"].as_str().unwrap_or("?")
                ),
                Some("decision") => format!(
                    "#{} {} {} by {}{}: {}",
                    v["seq"],
                    v["decision"].as_str().unwrap_or("?"),
                    tty::escape_for_terminal(v["tool"].as_str().unwrap_or("?")),
                    v["decided_by"].as_str().unwrap_or("?"),
                    v["rule"]
                        .as_u64()
                        .map(|l| format!(" rule {l}"))
                        .unwrap_or_default(),
                    tty::escape_for_terminal(v["reason"].as_str().unwrap_or(""))
                ),
                _ => v.to_string(),
            }
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").is_ok() && out.flush().is_ok()
    })
    .map_err(|e| e.to_string())?;
    Ok(0)
}

fn serve(a: &ServeArgs) -> Result<u8, String> {
    let server = web::start(a.listen, a.vm.clone()).map_err(|e| e.to_string())?;
    println!("{}", server.url());
    let _ = std::io::stdout().flush();
    eprintln!("ironvmm approvals: serving the page on {} (loopback only); open the URL above. Ctrl-C stops.", server.addr);
    loop {
        std::thread::park();
    }
}

// ---- the approver of a VM (`ironvmm gate`, `ironvmm boot`) ----

/// Who answers asks, and how. Shared by `gate` and `boot`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApproverArgs {
    /// Who answers asks: tty (the terminal, also the control socket), socket (any
    /// client of the control socket, which may connect later), answers (only
    /// --answers), deny [default: tty when stdin is a terminal, else deny].
    #[arg(long, value_name = "WHO")]
    pub approver: Option<String>,
    /// Deny an unanswered ask after this long (300, 300s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "300s")]
    pub ask_timeout: String,
    /// Asks decided in advance: p.rules syntax, allow and deny rules only.
    #[arg(long, value_name = "FILE")]
    pub answers: Option<PathBuf>,
    /// Deny every ask that --answers does not settle.
    #[arg(long)]
    pub non_interactive: bool,
    /// The same call asked more than N times in WINDOW is denied without asking
    /// (N/WINDOW, or off).
    #[arg(long, value_name = "N/WINDOW", default_value = "5/60s")]
    pub breaker: String,
}

/// The approver of one VM, running: keep it alive as long as the VM.
pub struct Approvals {
    pub hub: ApprovalHub,
    pub socket: Option<ControlSocket>,
    /// The terminal, when the tty approver runs: the console writes through it.
    pub terminal: Option<Arc<TerminalShare>>,
}

/// Where the approver of a VM runs.
pub struct Setting<'a> {
    pub vm: &'a str,
    pub live: Option<&'a Arc<LivePolicy>>,
    pub audit: Option<&'a Arc<AuditLog>>,
    /// `ironvmm run`: implies `deny` unless told otherwise.
    pub run_mode: bool,
    /// Stdin carries something else (`gate --stdio`): no terminal approver.
    pub stdin_taken: bool,
    /// The terminal the prompts (and, in a VM, the guest console) are written to.
    pub terminal: Box<dyn Write + Send>,
    /// A guest console reads the terminal all along, in character mode (`boot`);
    /// otherwise the terminal is put in character mode only while asking (`gate`).
    pub guest_console: bool,
}

/// Builds the hub of a VM and starts its channels: the control socket always (so
/// `ironvmm approvals` can answer), the terminal approver with `tty`. Keys reach
/// the terminal approver through `Approvals::terminal` (`TerminalShare::keys`).
pub fn start(a: &ApproverArgs, s: Setting<'_>) -> Result<Approvals, (u8, String)> {
    let Setting {
        vm,
        live,
        audit,
        run_mode,
        stdin_taken,
        terminal,
        guest_console,
    } = s;
    let bad = |m: String| (exit::VMM_ERROR, m);
    // A terminal in the foreground only: reading it from the background would stop
    // the whole process (SIGTTIN).
    // SAFETY: tcgetpgrp and getpgrp only inspect fd 0 and this process.
    let foreground = unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
    let tty_in = std::io::stdin().is_terminal() && foreground && !stdin_taken;
    let mode = match a.approver.as_deref() {
        Some("tty") if stdin_taken => {
            return Err(bad(
                "--approver tty: stdin carries the protocol here (--stdio)".into(),
            ))
        }
        Some("tty") if !tty_in => {
            return Err(bad(
                "--approver tty: stdin is not a terminal in the foreground".into(),
            ))
        }
        Some("tty") => Mode::Tty,
        Some("socket") => Mode::Socket,
        Some("answers") if a.answers.is_none() => {
            return Err(bad("--approver answers needs --answers FILE".into()))
        }
        Some("answers") | Some("deny") => Mode::Deny,
        Some(o) => {
            return Err(bad(format!(
                "--approver {o}: expected tty, socket, answers or deny"
            )))
        }
        None if run_mode || !tty_in => Mode::Deny,
        None => Mode::Tty,
    };
    let ask_timeout =
        parse_duration(&a.ask_timeout).map_err(|e| bad(format!("--ask-timeout {e}")))?;
    if ask_timeout.is_zero() {
        return Err(bad("--ask-timeout must be more than 0".into()));
    }
    let breaker: BreakerConfig = a
        .breaker
        .parse()
        .map_err(|e| bad(format!("--breaker {e}")))?;
    let catalog = crate::services::builtin_catalog().ok();
    let answers = match &a.answers {
        Some(p) => Some(AnswersFile::load(p, catalog.as_ref()).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let mut cfg = HubConfig::new(vm, mode);
    cfg.ask_timeout = ask_timeout;
    cfg.breaker = breaker;
    cfg.non_interactive = a.non_interactive;
    cfg.answers = answers;
    cfg.learner = live.map(|l| Learner::new(Arc::clone(l), audit.cloned()));
    let hub = ApprovalHub::new(cfg);
    let socket = match socket::socket_path(vm).and_then(|p| ControlSocket::start(hub.clone(), &p)) {
        Ok(s) => Some(s),
        Err(e) if mode == Mode::Socket => return Err(bad(format!("control socket: {e}"))),
        Err(e) => {
            eprintln!("ironvmm: no control socket ({e}); `ironvmm approvals` cannot reach this VM");
            None
        }
    };
    if let Some(log) = audit {
        socket::spawn_audit_feed(hub.clone(), log.path().to_path_buf());
    }
    let share = (mode == Mode::Tty && !a.non_interactive).then(|| {
        use crate::devices::console_input::{enter_char_mode, restore_terminal};
        let hook = move |up: bool| {
            if up {
                if !guest_console {
                    enter_char_mode();
                }
                // Keys typed before the question must never answer it.
                // SAFETY: tcflush on fd 0 only discards its pending input.
                unsafe { libc::tcflush(0, libc::TCIFLUSH) };
            } else if !guest_console {
                restore_terminal();
            }
        };
        let share = TerminalShare::with_hook(terminal, tty::random_mark(), Some(Box::new(hook)));
        eprintln!(
            "ironvmm: asks will be shown here, marked [{}]. A prompt without this mark is not ironvmm's.",
            share.mark()
        );
        tty::spawn(hub.clone(), Arc::clone(&share));
        share
    });
    if let Some(s) = &socket {
        eprintln!(
            "ironvmm: control socket {} (ironvmm approvals list)",
            s.path().display()
        );
    }
    Ok(Approvals {
        hub,
        socket,
        terminal: share,
    })
}

/// Without a guest console (`ironvmm gate`), the terminal's keys go only to the
/// terminal approver, and stdin is read only while a question is up (the hook of
/// `start` puts the terminal in character mode then): an idle gate leaves the
/// terminal as it found it.
pub fn keys_from_stdin(share: Arc<TerminalShare>) {
    let _ = std::thread::Builder::new()
        .name("approvals-keys".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                if !share.is_held() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                let mut pfd = libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: reading into a live buffer of the given length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    return;
                }
                let _ = share.keys(&buf[..n as usize]);
            }
        });
}
