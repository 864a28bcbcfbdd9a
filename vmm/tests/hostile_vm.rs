//! The hostile-guest suite (docs/hostile.md): the attacks of `tests/hostile/` run
//! as the agent of a real guest under `ironvmm run`, and each test checks what
//! they got (nothing), and that the VMM stayed up and ended with a complete,
//! verifiable audit log. Two boots: every attack that leaves the guest alive in
//! one, the exhaustion attacks (memory, a fork bomb) in another. Ignored in the
//! fast suite; `scripts/test.sh` runs them inside the KVM host. Host-only hostile
//! input to the gate is in gate_hostile.rs.
//!
//! Inputs: IRONVMM_KERNEL and the static guest binaries, as gate_vm.rs.

use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// In the VMM's environment, and in files beside the workspace: never in anything
/// the guest can show.
const SECRET: &str = "hostile-suite-host-secret-7f3a9c";
/// What the loopback web server answers: never in anything the guest can show.
const PAGE: &str = "hostile-suite-loopback-page-51d2e0";

const POLICY: &str = r#"version 1
allow fs.read  when path under "/workspace"
allow fs.list  when path under "/workspace"
allow fs.stat  when path under "/workspace"
allow fs.write when path under "/workspace/out"
allow fs.mkdir when path under "/workspace/out"
allow fs.move  when path under "/workspace/out"
allow http.fetch
default deny
"#;

fn ironvmm() -> &'static str {
    env!("CARGO_BIN_EXE_ironvmm")
}

fn kernel() -> PathBuf {
    PathBuf::from(
        std::env::var("IRONVMM_KERNEL").expect("IRONVMM_KERNEL must name the guest kernel"),
    )
}

fn attack_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/hostile")
        .join(name)
}

/// A scratch folder: `ws/` (the workspace, with `hello.txt` and `out/`), the
/// secrets beside it, and symlinks in the workspace that point at them.
fn scratch(test: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ironvmm-hostile-{test}-"))
        .tempdir()
        .unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("ws/out")).unwrap();
    std::fs::create_dir_all(d.join("outside")).unwrap();
    std::fs::write(d.join("ws/hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(d.join("secret.txt"), format!("{SECRET}\n")).unwrap();
    std::fs::write(d.join("outside/secret2.txt"), format!("{SECRET}\n")).unwrap();
    symlink(d.join("secret.txt"), d.join("ws/escape")).unwrap();
    symlink(d.join("outside"), d.join("ws/escdir")).unwrap();
    symlink(d.join("outside"), d.join("ws/out/link")).unwrap();
    std::fs::write(d.join("p.rules"), POLICY).unwrap();
    dir
}

fn build_image(dir: &Path, script: &str, mem: &str, envs: &[String]) -> PathBuf {
    let img = dir.join("agent.img");
    let mut c = Command::new(ironvmm());
    c.args(["image", "build", "--kernel"])
        .arg(kernel())
        .arg("--add")
        .arg(format!("{}:/agent.sh", attack_script(script).display()))
        .args(["--cmd", "sh /agent.sh", "--mem", mem]);
    for e in envs {
        c.args(["--env", e]);
    }
    let o = c.arg("-o").arg(&img).output().unwrap();
    assert!(
        o.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    img
}

/// A pseudo-terminal: (master, slave). The VMM's stdout is the slave, so it treats
/// the console as a person's terminal; the test reads what reached it.
fn pty() -> (File, OwnedFd) {
    // SAFETY: plain libc calls on fds this function owns; ptsname_r writes at most
    // `buf.len()` bytes and NUL-terminates.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = File::from_raw_fd(m);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut buf = [0 as libc::c_char; 256];
        assert_eq!(libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()), 0);
        let s = libc::open(
            CStr::from_ptr(buf.as_ptr()).as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY,
        );
        assert!(
            s >= 0,
            "open pty slave: {}",
            std::io::Error::last_os_error()
        );
        (master, OwnedFd::from_raw_fd(s))
    }
}

struct Ran {
    status: ExitStatus,
    /// What reached the terminal (the guest's console, after the VMM's filter).
    console: Vec<u8>,
    stderr: String,
}

/// `ironvmm run` of `img` with the scratch folder's policy and workspace, its
/// stdout on a pseudo-terminal, `SECRET` in its environment.
/// With `interrupt`: once the console shows that line, wait that long and send
/// the VMM SIGINT (Ctrl-C), as an owner would stop a runaway guest.
fn run(dir: &Path, img: &Path, timeout: &str, interrupt: Option<(&str, Duration)>) -> Ran {
    let (mut master, slave) = pty();
    let mut child = Command::new(ironvmm())
        .arg("run")
        .arg("--policy")
        .arg(dir.join("p.rules"))
        .arg("--workspace")
        .arg(dir.join("ws"))
        .arg("--audit")
        .arg(dir.join("audit.jsonl"))
        .arg("--report")
        .arg(dir.join("report.json"))
        .arg("--junit")
        .arg(dir.join("junit.xml"))
        .arg("--summary")
        .arg(dir.join("summary.md"))
        .args(["--audit-sync", "batch", "--timeout", timeout])
        .arg(img)
        .env("HOSTILE_HOST_SECRET", SECRET)
        .env_remove("GITHUB_STEP_SUMMARY")
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = stderr.read_to_end(&mut e);
        e
    });
    // Our copy of the slave went into the child's stdio and was closed with the
    // Command: the master reads EIO once the VMM exits.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut console = Vec::new();
    let mut seen_at: Option<Instant> = None;
    let mut interrupted = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(chunk) => console.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some((line, after)) = interrupt {
            if seen_at.is_none() && String::from_utf8_lossy(&console).contains(line) {
                seen_at = Some(Instant::now());
            }
            if !interrupted && seen_at.is_some_and(|t| t.elapsed() >= after) {
                // SAFETY: kill has no memory effects; the child has not been reaped.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
                interrupted = true;
            }
        }
    }
    let status = child.wait().unwrap();
    Ran {
        status,
        console,
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
    }
}

/// The value of the guest's `name=` line.
fn marker(console: &str, name: &str) -> String {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in the guest's console:\n{console}"))
        .to_string()
}

/// The VMM ended on its own terms: `ironvmm audit verify` passes on a closed log,
/// and the report names how it ended.
fn assert_vmm_intact(dir: &Path, kind: &str, code: i64) {
    let o = Command::new(ironvmm())
        .args(["audit", "verify"])
        .arg(dir.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "close", "the log ends with its close record");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["exit"]["kind"], kind, "{report}");
    assert_eq!(report["exit"]["code"], code, "{report}");
}

/// Every file the run wrote that a person or CI reads: none holds a secret.
fn assert_no_secret(dir: &Path, console: &str) {
    for (what, text) in [
        ("console", console.to_string()),
        (
            "audit log",
            std::fs::read_to_string(dir.join("audit.jsonl")).unwrap(),
        ),
        (
            "report",
            std::fs::read_to_string(dir.join("report.json")).unwrap(),
        ),
        (
            "summary",
            std::fs::read_to_string(dir.join("summary.md")).unwrap_or_default(),
        ),
        (
            "junit",
            std::fs::read_to_string(dir.join("junit.xml")).unwrap_or_default(),
        ),
    ] {
        assert!(!text.contains(SECRET), "the host's secret is in the {what}");
        assert!(!text.contains(PAGE), "the loopback page is in the {what}");
    }
}

/// A web server on the host's loopback that answers `PAGE`, counting connections.
fn loopback_server() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let mut listeners = vec![l];
    // The same port on ::1 where the host has IPv6, so `[::1]` would land too.
    if let Ok(l6) = TcpListener::bind(("::1", port)) {
        listeners.push(l6);
    }
    for l in listeners {
        let hits = Arc::clone(&hits);
        std::thread::spawn(move || {
            for s in l.incoming() {
                hits.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut s) = s {
                    let body = PAGE;
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
        });
    }
    (port, hits)
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn attacks_from_inside_the_guest_get_nothing_and_the_vmm_stays_up() {
    let tmp = scratch("attacks");
    let dir = tmp.path();
    let (port, hits) = loopback_server();
    let img = build_image(dir, "attacks.sh", "512M", &[format!("SSRF_PORT={port}")]);
    let r = run(dir, &img, "1800s", None);
    let raw = r.console.clone();
    let console = String::from_utf8_lossy(&r.console).replace('\r', "");
    let ctx = format!("console:\n{console}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert_eq!(marker(&console, "finished"), "1", "{ctx}");

    // Every vsock port: only the gate's; no other CID reached.
    assert_eq!(marker(&console, "ports_open"), "1");
    assert_eq!(marker(&console, "cids_open"), "");

    // A table full of half frames: the flood held more connections than the
    // device's table, and a new connection was still served.
    let held: usize = marker(&console, "flood_held").parse().unwrap();
    assert!(held > 128, "only {held} flooders held a connection");
    assert_eq!(marker(&console, "flood_call"), "0", "locked out by a flood");

    // Giant frames: refused as invalid requests; the gate went on.
    for m in ["giant_reply", "giant2_reply"] {
        let v = marker(&console, m);
        assert!(v.contains("-32600"), "{m}: {v}");
        assert!(!v.contains("\"result\""), "{m}: {v}");
    }
    assert_eq!(marker(&console, "after_giant"), "0");

    // JSON bombs: an error, or a denial as a tool result; never the file.
    for b in [
        "deep", "wide", "dupkey", "bignum", "nuls", "badutf8", "manykeys",
    ] {
        let v = marker(&console, &format!("bomb_{b}"));
        let refused = v.contains("\"error\"") || v.contains("\"isError\":true");
        assert!(refused, "bomb {b}: {v}");
        assert!(!v.contains("hello from the host"), "bomb {b}: {v}");
    }
    assert_eq!(marker(&console, "after_bombs"), "0");

    // Paths: nothing outside the workspace read, written or moved.
    assert_eq!(marker(&console, "path_reads_ok"), "0", "{ctx}");
    assert_eq!(marker(&console, "path_writes_ok"), "0", "{ctx}");
    assert_eq!(marker(&console, "ancestor_moves_ok"), "0", "{ctx}");
    let mut outside: Vec<String> = std::fs::read_dir(dir.join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, ["secret2.txt"], "written through a symlink");
    for f in ["planted.txt", "out", "up", "root"] {
        assert!(!dir.join(f).exists(), "{f} appeared beside the workspace");
    }
    assert!(
        dir.join("ws/hello.txt").is_file(),
        "the workspace was moved"
    );
    assert_eq!(marker(&console, "after_paths"), "0");

    // SSRF: no fetch succeeded, and nothing reached the loopback server.
    assert_eq!(marker(&console, "ssrf_ok"), "0", "{ctx}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the loopback server was hit"
    );
    assert_eq!(marker(&console, "after_ssrf"), "0");

    // Terminal escapes: the line arrived, only its colour survived.
    assert!(console.contains("esc-begin"), "{ctx}");
    assert!(console.contains("red"), "{ctx}");
    let window = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    for (what, seq) in [
        ("OSC (title, clipboard)", &b"\x1b]"[..]),
        ("clear screen", b"\x1b[2J"),
        ("cursor home", b"\x1b[H"),
        ("DCS", b"\x1bP"),
        ("BEL", b"\x07"),
    ] {
        assert!(!window(seq), "{what} reached the terminal");
    }
    assert!(!console.contains("pwned-title"), "an OSC payload was shown");

    // The status port: thousands of junk accesses, and the VM ended only on the
    // agent's own exit (checked below: kind agent, code 0).
    let accesses: u64 = marker(&console, "status_accesses").parse().unwrap();
    assert!(accesses >= 5_000, "{accesses}");
    assert_eq!(marker(&console, "after_status"), "0");

    // Secrets: through every tool, the guest's environment and command line.
    assert_eq!(marker(&console, "after_secrets"), "0");
    assert!(
        console.contains("fs.read"),
        "iron list listed the tools: {ctx}"
    );
    assert_no_secret(dir, &console);
    assert!(!r.stderr.contains(SECRET), "the secret is on stderr");

    assert_vmm_intact(dir, "agent", 0);
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn memory_exhaustion_and_a_fork_bomb_stop_at_the_guest() {
    let tmp = scratch("exhaust");
    let dir = tmp.path();
    let img = build_image(dir, "exhaust.sh", "256M", &[]);
    // The fork bomb never ends: after it has raged a while, the owner's Ctrl-C.
    let r = run(
        dir,
        &img,
        "1800s",
        Some(("forkbomb=1", Duration::from_secs(15))),
    );
    let console = String::from_utf8_lossy(&r.console).replace('\r', "");
    let ctx = format!("console:\n{console}\nstderr:\n{}", r.stderr);
    // The guest's OOM killer ended the hog; the guest went on and called out.
    assert_ne!(marker(&console, "mem_hog"), "0", "{ctx}");
    assert_eq!(marker(&console, "after_mem"), "0", "{ctx}");
    assert_eq!(marker(&console, "forkbomb"), "1", "{ctx}");
    // The VMM answered Ctrl-C through the bomb: stopped the VM, closed the log.
    assert_eq!(r.status.code(), Some(130), "{ctx}");
    assert_vmm_intact(dir, "error", 130);
    let log = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"decision\"") && l.contains("hello.txt")),
        "the call after the hog was audited"
    );
    assert_no_secret(dir, &console);
}
