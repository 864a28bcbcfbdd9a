//! How runs of the `ironvmm` binary end, where no guest has to boot: `gate` on
//! SIGINT and SIGHUP, `--max-clients`, an existing audit file (125), the log's mode
//! 0600, `audit verify` on a file it cannot read (125), and `boot` on a host without
//! usable KVM (125, with the doctor's reason, and the log closed). The endings that
//! need a running guest are in the booting suite (boot_endings.rs).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{ironvmm, records, stderr_of, verify, GateEnv as Env, Killed};

const POLICY: &str = "version 1\nallow fs.read when path under \"/workspace\"\ndefault deny\n";

/// Far longer than any of these steps takes on a loaded machine; only a hang hits it.
const PATIENCE: Duration = Duration::from_secs(60);

fn env() -> Env {
    Env::new(POLICY)
}

/// Waits for the child to exit; kills it and fails if it does not in time.
fn wait(child: &mut Child) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("still running after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PING: &str = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n";

/// `gate --stdio`, returned once it has answered a ping: its log is open and its
/// signal thread is waiting. Keep `stdin` alive to keep it running.
fn running_stdio_gate(e: &Env) -> (Killed, ChildStdin, BufReader<ChildStdout>) {
    let mut child = Killed(
        e.gate(&["--stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    stdin.write_all(PING.as_bytes()).unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line:?}"));
    assert_eq!(v["result"], json!({}), "{line}");
    (child, stdin, stdout)
}

#[test]
fn gate_on_sigint_exits_130_and_on_sighup_129_with_the_log_closed() {
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGHUP, 129)] {
        let e = env();
        let (mut child, _stdin, _stdout) = running_stdio_gate(&e);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.0.id() as i32, sig) };
        let status = wait(&mut child.0);
        let err = stderr_of(&mut child.0);
        assert_eq!(status.code(), Some(code), "signal {sig}: {err}");
        let recs = records(&e.audit);
        let last = recs.last().unwrap();
        assert_eq!(last["kind"], "close", "{recs:?}");
        assert_eq!(last["exit"], code, "{last}");
        let (rc, out) = verify(&e.audit, &[]);
        assert_eq!(rc, Some(0), "{out}");
    }
}

fn connect_and_ping(sock: &Path) -> std::io::Result<Option<Value>> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(PATIENCE))?;
    // A client closed at once may see the write fail: that is an answer too.
    if (&s).write_all(PING.as_bytes()).is_err() {
        return Ok(None);
    }
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(serde_json::from_str(&line).unwrap())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
    }
}

#[test]
fn max_clients_closes_the_extra_client_at_once_and_frees_its_place() {
    let e = env();
    let sock = e.dir.path().join("gate.sock");
    let mut child = Killed(
        e.gate(&["--max-clients", "1", "--listen"])
            .arg(&sock)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(child.0.try_wait().unwrap().is_none(), "the gate exited");
        assert!(t.elapsed() < PATIENCE, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first client is served, and stays connected.
    let first = UnixStream::connect(&sock).unwrap();
    first.set_read_timeout(Some(PATIENCE)).unwrap();
    (&first).write_all(PING.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&first).read_line(&mut line).unwrap();
    assert!(line.contains("\"result\""), "{line}");

    // A second one at the same time is closed, unanswered; a hang would time out.
    let second = connect_and_ping(&sock).expect("closed, not left hanging");
    assert_eq!(second, None, "served past --max-clients 1");

    // When the first leaves, its place is free again.
    drop(first);
    let t = Instant::now();
    let third = loop {
        if let Some(v) = connect_and_ping(&sock).unwrap() {
            break v;
        }
        assert!(t.elapsed() < PATIENCE, "the place was never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(third["result"], json!({}));

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = wait(&mut child.0);
    assert_eq!(status.code(), Some(143), "{}", stderr_of(&mut child.0));
}

#[test]
fn an_existing_audit_file_exits_125_and_is_left_alone() {
    let e = env();
    std::fs::write(&e.audit, "an earlier run's log\n").unwrap();
    let out = e.gate(&["--stdio"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains(&e.audit.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read_to_string(&e.audit).unwrap(),
        "an earlier run's log\n"
    );

    // `boot` opens its log before it reads a kernel or touches KVM.
    let junk = e.dir.path().join("junk");
    std::fs::write(&junk, "not a kernel").unwrap();
    let out = ironvmm()
        .arg("boot")
        .arg("--policy")
        .arg(&e.policy)
        .arg("--audit")
        .arg(&e.audit)
        .arg("--kernel")
        .arg(&junk)
        .arg("--initrd")
        .arg(&junk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains(&e.audit.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read_to_string(&e.audit).unwrap(),
        "an earlier run's log\n"
    );
}

#[test]
fn the_audit_log_is_created_mode_0600_whatever_the_umask() {
    let e = env();
    let nested = e.dir.path().join("new/folder/audit.jsonl");
    let mut cmd = ironvmm();
    cmd.arg("gate")
        .arg("--policy")
        .arg(&e.policy)
        .arg("--audit")
        .arg(&nested)
        .arg("--stdio")
        .stdin(Stdio::null());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&nested).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600, "mode {mode:o}");
}

#[test]
fn audit_verify_on_a_file_it_cannot_read_exits_125_naming_it() {
    let e = env();
    let missing = e.dir.path().join("missing.jsonl");
    let (rc, out) = verify(&missing, &[]);
    assert_eq!(rc, Some(125), "{out}");
    assert!(out.contains("missing.jsonl"), "{out}");
    assert!(out.contains("No such file"), "{out}");

    // A real log, made unreadable. Root reads anything, so then verify as nobody.
    let dir = e.dir.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.join("audit.jsonl");
    std::fs::write(&log, "{}\n").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = ironvmm();
    cmd.args(["audit", "verify"]).arg(&log);
    // SAFETY: geteuid is always safe.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("audit.jsonl"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

/// Runs `ironvmm ARGS` in a mount namespace whose /dev holds only null, zero and
/// urandom, so /dev/kvm is missing whatever the host has. None when namespaces are
/// not allowed here.
fn without_dev_kvm(args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    let out = Command::new("unshare")
        .args(["-m", "--", "sh", "-c"])
        .arg(concat!(
            "t=$(mktemp -d) && mount -t tmpfs none \"$t\" || exit 99; ",
            "for d in null zero urandom; do touch \"$t/$d\" && mount --bind /dev/$d \"$t/$d\" || exit 99; done; ",
            "mount --move \"$t\" /dev || exit 99; exec \"$@\""
        ))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_ironvmm"))
        .args(args)
        .output()
        .ok()?;
    (out.status.code() != Some(99) && !String::from_utf8_lossy(&out.stderr).contains("unshare:"))
        .then_some(out)
}

#[test]
fn boot_without_usable_kvm_exits_125_with_the_doctors_reason() {
    let e = env();
    let junk = e.dir.path().join("junk");
    std::fs::write(&junk, "not a kernel").unwrap();
    let args = [
        "boot".as_ref(),
        "--policy".as_ref(),
        e.policy.as_os_str(),
        "--audit".as_ref(),
        e.audit.as_os_str(),
        "--kernel".as_ref(),
        junk.as_os_str(),
        "--initrd".as_ref(),
        junk.as_os_str(),
    ];
    let Some(out) = without_dev_kvm(&args) else {
        let _ = writeln!(
            std::io::stderr().lock(),
            "cli_endings: SKIPPED boot_without_usable_kvm: no mount namespace here (needs root)"
        );
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let reason = err
        .lines()
        .find_map(|l| l.strip_prefix("ironvmm: cannot boot a guest here: "))
        .unwrap_or_else(|| panic!("no refusal in: {err}"));
    let reason = reason.split("; ").next().unwrap();
    assert!(reason.contains("/dev/kvm"), "{reason}");
    // The doctor, on the same host, gives the same reason.
    let doctor = without_dev_kvm(&["doctor".as_ref()]).unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(report.contains(reason), "doctor: {report}\nboot: {reason}");
    // The log was opened first, so it is closed with the exit status.
    let recs = records(&e.audit);
    let last = recs.last().unwrap();
    assert_eq!(
        (&last["kind"], &last["exit"]),
        (&json!("close"), &json!(125))
    );
    assert_eq!(verify(&e.audit, &[]).0, Some(0));
}
