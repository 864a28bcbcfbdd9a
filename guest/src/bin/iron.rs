//! iron: the guest's client of the gate (docs/image.md, "iron").
//!
//!   iron call [--json] TOOL [JSON|-]   one tools/call; exit 0 ok, 3 denied, 4 error, 5 unreachable
//!   iron list                          the tools the policy could allow
//!   iron agent [--model M] TASK...     a tool-using agent; its model is llm.chat
//!   iron mcp                           an MCP stdio server relaying to the gate
//!   iron bench [-n N] [-c C] [--tool T --args JSON]
//!   iron send [--port P] [--no-read SECS]   raw bytes, for testing the gate itself
//!   iron poke-status [ROUNDS]          junk on the status port, for testing the VMM
//!   iron proxy [--listen ADDR | --listen-fd FD] [--to ADDR]   the HTTP proxy relay
//!
//! It connects to vsock CID 2 port 1, or to `$IRON_GATE` (`unix:PATH`,
//! `vsock:PORT`, `vsock:CID:PORT`).

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ironvmm_guest::agent_loop;
use ironvmm_guest::conn::GateAddr;
use ironvmm_guest::rpc::{
    read_line_limited, tool_output, CallError, Client, EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE,
    MAX_LINE,
};
use ironvmm_guest::stats::summarize;
use ironvmm_guest::{HOST_CID, NET_PORT};
use serde_json::{json, Value};

const USAGE: &str = "usage:
  iron call [--json] TOOL [JSON|-]   call a tool (JSON arguments, '-' reads them from stdin)
  iron list                          list the tools the policy could allow
  iron agent [--model M] [--provider P] [--max-steps N] [--max-denials N]
             [--max-tokens N] [--system TEXT] TASK...
                                     a tool-using agent: every model turn is an llm.chat
                                     call, every tool call is decided; prints its transcript
                                     (model: $IRON_AGENT_MODEL; exit 0 done, 3 stopped by
                                     denials or the model budget, 4 error, 5 no gate)
  iron mcp                           MCP stdio server relaying to the gate
  iron bench [-n N] [-c C] [--tool T --args JSON]
                                     N calls over C connections (default: 1000 pings on 1)
  iron send [--port P] [--no-read SECS]
                                     raw bytes from stdin to the gate, replies to stdout
                                     (for testing the gate's framing; --no-read holds the
                                     connection open without reading for SECS)
  iron poke-status [ROUNDS]          junk on the status port (for testing the VMM; root)
  iron proxy [--listen ADDR | --listen-fd FD] [--to ADDR]
                                     relay TCP connections (default 127.0.0.1:3128) to the
                                     host's network egress port (vsock CID 2 port 2); the
                                     host decides every request. ironinit starts it
The gate is vsock CID 2 port 1, or $IRON_GATE (unix:PATH | vsock:PORT | vsock:CID:PORT).
Exit codes: 0 ok, 3 denied, 4 tool or protocol error (and bad usage), 5 gate unreachable.";

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("iron: {msg}\n{USAGE}");
    ExitCode::from(EXIT_ERROR)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sub) = args.first() else {
        return usage_error("no command");
    };
    let rest = &args[1..];
    let addr = match GateAddr::from_env() {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    match sub.as_str() {
        "call" => call(&addr, rest),
        "list" => list(&addr),
        "agent" => agent(&addr, rest),
        "mcp" => mcp(&addr),
        "bench" => bench(&addr, rest),
        "send" => send(&addr, rest),
        "poke-status" => poke_status(rest),
        "proxy" => proxy(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        "-V" | "--version" => {
            println!("iron {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => usage_error(&format!("unknown command {other:?}")),
    }
}

fn fail(e: &CallError) -> ExitCode {
    eprintln!("iron: {e}");
    ExitCode::from(e.exit_code())
}

fn connect(addr: &GateAddr) -> Result<Client, CallError> {
    let mut c = Client::connect(addr)?;
    c.initialize()?;
    Ok(c)
}

fn call(addr: &GateAddr, args: &[String]) -> ExitCode {
    let mut raw_json = false;
    let mut pos = Vec::new();
    for a in args {
        match a.as_str() {
            "--json" => raw_json = true,
            _ => pos.push(a.as_str()),
        }
    }
    let (tool, arg_text) = match pos.as_slice() {
        [tool] => (*tool, "{}".to_string()),
        [tool, "-"] => {
            let mut s = String::new();
            if let Err(e) = io::stdin().read_to_string(&mut s) {
                return usage_error(&format!("reading arguments from stdin: {e}"));
            }
            (*tool, s)
        }
        [tool, j] => (*tool, j.to_string()),
        _ => return usage_error("call needs TOOL and at most one JSON argument"),
    };
    let arguments: Value = match serde_json::from_str(&arg_text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return usage_error("the arguments must be a JSON object"),
        Err(e) => return usage_error(&format!("the arguments are not JSON: {e}")),
    };
    let result = connect(addr).and_then(|mut c| c.call_tool(tool, arguments));
    let result = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if raw_json {
        println!("{result}");
    }
    match tool_output(&result) {
        Ok(text) => {
            if !raw_json {
                print_text(&text);
            }
            ExitCode::from(EXIT_OK)
        }
        Err(e) => fail(&e),
    }
}

/// Prints text as is, with a final newline only if it lacks one.
fn print_text(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    if !text.is_empty() && !text.ends_with('\n') {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}

fn agent(addr: &GateAddr, args: &[String]) -> ExitCode {
    let opts = match agent_loop::parse_args(args, &|k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(e) => return usage_error(&format!("agent: {e}")),
    };
    let mut client = match connect(addr) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let ending = agent_loop::run(&mut client, &opts, &mut io::stdout().lock());
    match &ending {
        agent_loop::Ending::Done(_) => {}
        agent_loop::Ending::Error(e) => eprintln!("iron agent: {e}"),
        other => eprintln!("iron agent: {other}"),
    }
    ExitCode::from(ending.exit_code())
}

fn list(addr: &GateAddr) -> ExitCode {
    let result = connect(addr).and_then(|mut c| c.request("tools/list", json!({})));
    let result = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let Some(tools) = result.get("tools").and_then(Value::as_array) else {
        return fail(&CallError::Protocol(
            "tools/list result has no tools".into(),
        ));
    };
    for t in tools {
        let name = t.get("name").and_then(Value::as_str).unwrap_or("?");
        let desc = t.get("description").and_then(Value::as_str).unwrap_or("");
        println!("{name:<20} {desc}");
    }
    ExitCode::from(EXIT_OK)
}

/// Relays MCP messages line by line between stdio and the gate. The gate speaks
/// MCP itself, so the client's own `initialize` goes straight through.
fn mcp(addr: &GateAddr) -> ExitCode {
    let stream = match addr.connect() {
        Ok(s) => s,
        Err(e) => return fail(&CallError::Unreachable(format!("{addr}: {e}"))),
    };
    let mut to_gate = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return fail(&CallError::Unreachable(format!("{addr}: {e}"))),
    };
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        loop {
            match read_line_limited(&mut stdin, MAX_LINE) {
                Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(mut line)) => {
                    line.push(b'\n');
                    if to_gate.write_all(&line).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("iron mcp: reading stdin: {e}");
                    break;
                }
            }
        }
        // The client is done: let the gate answer what is in flight, then end.
        let _ = to_gate.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(5));
        std::process::exit(0);
    });
    let mut from_gate = BufReader::with_capacity(64 * 1024, stream);
    let mut stdout = io::stdout().lock();
    loop {
        match read_line_limited(&mut from_gate, MAX_LINE) {
            Ok(Some(mut line)) => {
                line.push(b'\n');
                if stdout
                    .write_all(&line)
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            Ok(None) => return ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("iron mcp: reading from the gate: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    }
}

/// Per-connection results of `iron bench`.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    ok: u64,
    denied: u64,
    tool_errors: u64,
    errors: u64,
    unreachable: bool,
    first_error: Option<String>,
}

fn bench(addr: &GateAddr, args: &[String]) -> ExitCode {
    let mut n: u64 = 1000;
    let mut c: u64 = 1;
    let mut tool: Option<String> = None;
    let mut tool_args = json!({});
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let parsed: Result<(), String> = (|| {
            match a.as_str() {
                "-n" => n = val("-n")?.parse().map_err(|_| "-n needs a number")?,
                "-c" => c = val("-c")?.parse().map_err(|_| "-c needs a number")?,
                "--tool" => tool = Some(val("--tool")?),
                "--args" => {
                    tool_args = serde_json::from_str(&val("--args")?)
                        .map_err(|e| format!("--args is not JSON: {e}"))?;
                    if !tool_args.is_object() {
                        return Err("--args must be a JSON object".into());
                    }
                }
                other => return Err(format!("unknown bench option {other:?}")),
            }
            Ok(())
        })();
        if let Err(e) = parsed {
            return usage_error(&e);
        }
    }
    if n == 0 || c == 0 || c > 1024 {
        return usage_error("-n must be at least 1, -c between 1 and 1024");
    }
    let c = c.min(n);
    let barrier = Arc::new(Barrier::new(c as usize + 1));
    let mut handles = Vec::new();
    for i in 0..c {
        let share = n / c + u64::from(i < n % c);
        let (addr, tool, tool_args, barrier) = (
            addr.clone(),
            tool.clone(),
            tool_args.clone(),
            barrier.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut t = Tally::default();
            let client = connect(&addr);
            barrier.wait();
            let mut client = match client {
                Ok(cl) => cl,
                Err(e) => {
                    t.unreachable = matches!(e, CallError::Unreachable(_));
                    t.errors = share;
                    t.first_error = Some(e.to_string());
                    return t;
                }
            };
            t.latencies_ns.reserve(share as usize);
            for _ in 0..share {
                let start = Instant::now();
                let r = match &tool {
                    Some(name) => client.call_tool(name, tool_args.clone()),
                    None => client.request("ping", json!({})),
                };
                t.latencies_ns.push(start.elapsed().as_nanos() as u64);
                let r = r.and_then(|v| {
                    if tool.is_some() {
                        tool_output(&v).map(|_| ())
                    } else {
                        Ok(())
                    }
                });
                match r {
                    Ok(()) => t.ok += 1,
                    Err(CallError::Denied(_)) => t.denied += 1,
                    Err(CallError::Tool(_)) => t.tool_errors += 1,
                    Err(e @ CallError::Rpc { .. }) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e.to_string());
                    }
                    Err(e) => {
                        // The connection is unusable after a protocol error.
                        t.first_error.get_or_insert(e.to_string());
                        t.errors += share - (t.ok + t.denied + t.tool_errors + t.errors);
                        break;
                    }
                }
            }
            t
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let tallies: Vec<Tally> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    let elapsed = start.elapsed();

    let mut all = Vec::with_capacity(n as usize);
    let (mut ok, mut denied, mut tool_errors, mut errors) = (0, 0, 0, 0);
    let mut first_error = None;
    for t in &tallies {
        all.extend_from_slice(&t.latencies_ns);
        ok += t.ok;
        denied += t.denied;
        tool_errors += t.tool_errors;
        errors += t.errors;
        if first_error.is_none() {
            first_error = t.first_error.clone();
        }
    }
    let s = summarize(&all);
    let secs = elapsed.as_secs_f64();
    let replies = ok + denied + tool_errors;
    let per_sec = if secs > 0.0 {
        replies as f64 / secs
    } else {
        0.0
    };
    println!("latency histogram ({} round trips):", s.count);
    for line in s.histogram_lines() {
        println!("{line}");
    }
    println!(
        "p50 {:.1} us, p99 {:.1} us, {:.0} calls/s over {c} connection(s)",
        s.p50_us, s.p99_us, per_sec
    );
    if let Some(e) = &first_error {
        eprintln!("iron bench: first error: {e}");
    }
    let mut out = s.to_json();
    let o = out.as_object_mut().expect("summary is an object");
    o.insert(
        "method".into(),
        json!(if tool.is_some() { "tools/call" } else { "ping" }),
    );
    o.insert("tool".into(), json!(tool));
    o.insert("calls".into(), json!(n));
    o.insert("connections".into(), json!(c));
    o.insert("ok".into(), json!(ok));
    o.insert("denied".into(), json!(denied));
    o.insert("tool_errors".into(), json!(tool_errors));
    o.insert("errors".into(), json!(errors));
    o.insert("elapsed_ms".into(), json!((secs * 1e4).round() / 10.0));
    o.insert("calls_per_s".into(), json!(per_sec.round()));
    println!("{out}");
    if tallies.iter().all(|t| t.unreachable) {
        ExitCode::from(EXIT_UNREACHABLE)
    } else if errors > 0 {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::from(EXIT_OK)
    }
}

/// Sends stdin as is (no framing, no JSON check) and copies every reply byte to
/// stdout until the gate closes. Exit 0 on a clean close, 4 on a reset, 5 when
/// the connection is refused.
fn send(addr: &GateAddr, args: &[String]) -> ExitCode {
    let mut addr = addr.clone();
    let mut hold: Option<u64> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => match (it.next().and_then(|p| p.parse().ok()), &addr) {
                (Some(port), GateAddr::Vsock { cid, .. }) => {
                    addr = GateAddr::Vsock { cid: *cid, port }
                }
                (Some(_), _) => return usage_error("--port applies to a vsock gate only"),
                (None, _) => return usage_error("--port needs a number"),
            },
            "--no-read" => match it.next().and_then(|s| s.parse().ok()) {
                Some(secs) => hold = Some(secs),
                None => return usage_error("--no-read needs seconds"),
            },
            other => return usage_error(&format!("unknown option {other:?} for send")),
        }
    }
    let mut input = Vec::new();
    if let Err(e) = io::stdin().read_to_end(&mut input) {
        eprintln!("iron: cannot read stdin: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    let mut stream = match addr.connect() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("iron: cannot reach the gate: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    // A gate that refuses the input (a frame over the limit) answers and resets:
    // keep what it said, so the caller sees the error reply.
    let sent = stream.write_all(&input);
    if let Err(e) = &sent {
        eprintln!("iron: send failed: {e}");
    }
    if let Some(secs) = hold {
        std::thread::sleep(Duration::from_secs(secs));
        return ExitCode::from(EXIT_OK);
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) if sent.is_ok() => return ExitCode::from(EXIT_OK),
            Ok(0) => return ExitCode::from(EXIT_ERROR),
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("iron: connection reset: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    }
}

/// Hammers the status port with what a hostile guest could write there besides its
/// exit: every access width, unknown words, repeated boot marks, reads. Never an
/// exit word (that would end the VM, as it may). Prints the accesses made.
fn poke_status(args: &[String]) -> ExitCode {
    let rounds: u64 = match args.first().map(|s| s.parse()) {
        None => 10_000,
        Some(Ok(n)) => n,
        Some(Err(_)) => return usage_error("poke-status takes a number of rounds"),
    };
    let port = ironvmm_wire::STATUS_PORT;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 4, 1) } != 0 {
        eprintln!("iron: ioperm: {}", io::Error::last_os_error());
        return ExitCode::from(EXIT_ERROR);
    }
    let mut x: u32 = 0x9E37_79B9;
    let mut accesses = 0u64;
    for _ in 0..rounds {
        // xorshift: varied words without a dependency.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let word = if x & ironvmm_wire::STATUS_EXIT_MASK == ironvmm_wire::STATUS_EXIT {
            x ^ 0x0100_0000
        } else {
            x
        };
        let (byte, half) = (x as u8, x as u16);
        let mut read: u32;
        // SAFETY: ioperm granted these ports; port I/O touches no memory of ours.
        unsafe {
            std::arch::asm!("out dx, eax", in("dx") port, in("eax") word,
                options(nomem, nostack, preserves_flags));
            std::arch::asm!("out dx, al", in("dx") port, in("al") byte,
                options(nomem, nostack, preserves_flags));
            std::arch::asm!("out dx, ax", in("dx") port + 1, in("ax") half,
                options(nomem, nostack, preserves_flags));
            std::arch::asm!("out dx, eax", in("dx") port, in("eax") ironvmm_wire::STATUS_BOOT,
                options(nomem, nostack, preserves_flags));
            std::arch::asm!("in eax, dx", in("dx") port, out("eax") read,
                options(nomem, nostack, preserves_flags));
        }
        std::hint::black_box(read);
        accesses += 5;
    }
    println!("{accesses}");
    ExitCode::SUCCESS
}

/// Relays TCP connections to the host's port 2 until killed.
fn proxy(args: &[String]) -> ExitCode {
    let mut listen = ironvmm_guest::proxy::LISTEN.to_string();
    let mut fd: Option<i32> = None;
    let mut to = GateAddr::Vsock {
        cid: HOST_CID,
        port: NET_PORT,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--listen", Some(v)) => listen = v.clone(),
            ("--listen-fd", Some(v)) => match v.parse() {
                Ok(n) if n > 2 => fd = Some(n),
                _ => return usage_error("--listen-fd needs a descriptor number above 2"),
            },
            ("--to", Some(v)) => match GateAddr::parse(v) {
                Ok(t) => to = t,
                Err(e) => return usage_error(&e),
            },
            (other, _) => {
                return usage_error(&format!("proxy: {other:?} needs a value or is unknown"))
            }
        }
    }
    let listener = match fd {
        // SAFETY: ironinit passes a listening socket it opened for us and no
        // longer uses; nothing else in this process owns the descriptor.
        Some(fd) => unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        None => match std::net::TcpListener::bind(&listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("iron proxy: cannot listen on {listen}: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        },
    };
    match ironvmm_guest::proxy::serve(listener, to) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("iron proxy: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
