//! How a `boot` run ends while its guest runs: Ctrl-C (130, the VM stopped and the
//! log closed), a second Ctrl-C (out at once, the log left open but intact), and an
//! audit log that fails mid-run (125, the VM stopped). They boot a guest, so they
//! are ignored in the fast suite; `scripts/test.sh` runs them inside the KVM host.
//! (`--timeout` and its close record: boot.rs. Endings without a guest:
//! cli_endings.rs.)
//!
//! Inputs: IRONVMM_KERNEL and the static guest binaries, as boot.rs.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Far longer than a boot takes under the software KVM host on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(300);

fn ironvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ironvmm"))
}

fn kernel() -> PathBuf {
    PathBuf::from(
        std::env::var("IRONVMM_KERNEL").expect(
            "IRONVMM_KERNEL must name the guest kernel (scripts/build-kernel.sh prints it)",
        ),
    )
}

struct Run {
    _dir: tempfile::TempDir,
    image: PathBuf,
    policy: PathBuf,
    workspace: PathBuf,
    audit: PathBuf,
}

/// An image whose agent runs `cmd`, a policy allowing fs.stat, a workspace.
fn prepare(cmd: &str) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("ironvmm-boot-endings-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("agent.img");
    let o = ironvmm()
        .args(["image", "build", "--kernel"])
        .arg(kernel())
        .args(["--cmd", cmd, "-o"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let policy = dir.path().join("p.rules");
    std::fs::write(&policy, "version 1\nallow fs.stat\ndefault deny\n").unwrap();
    let workspace = dir.path().join("ws");
    std::fs::create_dir(&workspace).unwrap();
    Run {
        image,
        policy,
        workspace,
        audit: dir.path().join("audit.jsonl"),
        _dir: dir,
    }
}

fn boot_cmd(r: &Run) -> Command {
    let mut c = ironvmm();
    c.arg("boot")
        .arg("--policy")
        .arg(&r.policy)
        .arg("--workspace")
        .arg(&r.workspace)
        .arg("--audit")
        .arg(&r.audit)
        .args(["--timeout", "600s"])
        .arg(&r.image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Kills the VMM if a failing test unwinds past it.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the console until the agent prints `marker`.
fn wait_for_marker(child: &mut Child, marker: &str) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "the VM ended before {marker}:\n{seen}");
        if line.trim() == marker {
            return out;
        }
        seen.push_str(&line);
    }
}

fn wait(child: &mut Child) -> (ExitStatus, Duration) {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s, t.elapsed());
        }
        assert!(t.elapsed() < PATIENCE, "still running after {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn verify(path: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let o = ironvmm()
        .args(["audit", "verify"])
        .arg(path)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// The agent would run for an hour: only what the test does can end the run.
const SLEEPER: &str = "echo AGENT-READY; sleep 3600; echo NOT-INTERRUPTED";

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn ctrl_c_stops_the_vm_exits_130_and_closes_the_log() {
    let r = prepare(SLEEPER);
    let mut vmm = Reaper(boot_cmd(&r).spawn().unwrap());
    let mut out = wait_for_marker(&mut vmm.0, "AGENT-READY");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vmm.0.id() as i32, libc::SIGINT) };
    let (status, took) = wait(&mut vmm.0);
    let err = stderr_of(&mut vmm.0);
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted; the VM was stopped"), "{err}");
    assert!(!rest.contains("NOT-INTERRUPTED"), "{rest}");
    let recs = records(&r.audit);
    let last = recs.last().unwrap();
    assert_eq!(last["kind"], "close", "{last}");
    assert_eq!(last["exit"], 130, "{last}");
    let (rc, text) = verify(&r.audit, &[]);
    assert_eq!(rc, Some(0), "{text}");
    eprintln!("Ctrl-C to exit: {took:?}");
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn a_second_ctrl_c_exits_at_once_leaving_the_log_open_but_intact() {
    let r = prepare(SLEEPER);
    let mut vmm = Reaper(boot_cmd(&r).spawn().unwrap());
    let _out = wait_for_marker(&mut vmm.0, "AGENT-READY");
    let pid = vmm.0.id() as i32;
    // Two Ctrl-Cs that arrive together: SIGINTs pending on one target merge into
    // one, so one goes to the process and one to its main thread (tid = pid), both
    // while it is stopped. On SIGCONT both handlers run before any other code of
    // the main thread, so the graceful stop of the first never gets to close.
    // SAFETY: signalling our own child and its main thread.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
        libc::kill(pid, libc::SIGINT);
        libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGINT);
        libc::kill(pid, libc::SIGCONT);
    }
    let (status, _) = wait(&mut vmm.0);
    let err = stderr_of(&mut vmm.0);
    assert_eq!(status.code(), Some(130), "{err}");
    // Out at once: no "interrupted" message, no close record...
    assert!(!err.contains("interrupted; the VM was stopped"), "{err}");
    let recs = records(&r.audit);
    assert!(
        recs.iter().all(|r| r["kind"] != "close"),
        "closed: {recs:?}"
    );
    // ...but what was written is an intact chain, verifiable as an open log.
    assert_eq!(recs[0]["kind"], "open");
    let (rc, text) = verify(&r.audit, &["--open-ok"]);
    assert_eq!(rc, Some(0), "{text}");
}

#[test]
#[ignore = "boots a guest: run through scripts/test.sh"]
fn an_audit_log_that_fails_mid_run_stops_the_vm_with_125() {
    // The agent calls without end; only the log failing can stop it.
    let r = prepare(
        "echo AGENT-READY; while true; do iron call fs.stat '{\"path\":\"/workspace\"}' >/dev/null; echo rc=$?; done",
    );
    // Files this process writes may not grow past LIMIT bytes: the log fills up a
    // few records in. Pipes (the console, stderr) are not files.
    const LIMIT: u64 = 4096;
    let mut cmd = boot_cmd(&r);
    // SAFETY: setrlimit and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vmm = Reaper(cmd.spawn().unwrap());
    let (status, took) = wait(&mut vmm.0);
    let err = stderr_of(&mut vmm.0);
    let mut console = String::new();
    let _ = vmm.0.stdout.take().unwrap().read_to_string(&mut console);
    assert_eq!(status.code(), Some(125), "{err}\n{console}");
    assert!(err.contains("audit log"), "{err}");
    assert!(console.contains("AGENT-READY"), "the agent ran: {console}");
    assert!(
        console.contains("rc=0"),
        "calls were served first: {console}"
    );
    assert!(std::fs::metadata(&r.audit).unwrap().len() <= LIMIT);
    // Every call the log recorded was allowed; none was served unrecorded: the
    // served calls (rc=0) are at most the recorded decisions.
    let recs = records(&r.audit);
    let decisions = recs.iter().filter(|r| r["kind"] == "decision").count();
    let served = console.lines().filter(|l| l.trim() == "rc=0").count();
    assert!(served <= decisions, "{served} served, {decisions} recorded");
    eprintln!("audit failure stopped the VM after {took:?}, {decisions} decisions recorded");
}
