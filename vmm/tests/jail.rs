//! `--jail DIR` without a VM, through `ironvmm gate --stdio --jail`: the jailed
//! process sees only the jail, runs as the unprivileged user with no capability,
//! cannot reach a host file, and still serves the workspace through the
//! descriptor it opened before. The jail needs root: CI runs these as root;
//! elsewhere they say they are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

const POLICY: &str =
    "version 1\nallow fs.read\nallow fs.write\nallow fs.list\nallow fs.delete\ndefault deny\n";
const NOBODY: u32 = 65534;

mod common;
use common::{chown_tree, ironvmm, GateEnv};

/// The gate's scratch folder with an empty jail folder beside the workspace.
struct Env {
    gate: GateEnv,
    jail: PathBuf,
}

impl std::ops::Deref for Env {
    type Target = GateEnv;
    fn deref(&self) -> &GateEnv {
        &self.gate
    }
}

/// A policy, a workspace with a file the jailed gate must read, an empty jail.
fn env() -> Env {
    let gate = GateEnv::new(POLICY);
    std::fs::write(gate.workspace.join("hello.txt"), "hello from the host\n").unwrap();
    let jail = gate.dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    Env { gate, jail }
}

/// `ironvmm gate --stdio --jail` over `e`, its three streams piped.
fn gate(e: &Env, extra: &[&str]) -> Command {
    let mut c = e.gate(&["--stdio", "--jail"]);
    c.arg(&e.jail)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A `tools/call` line, its newline included.
fn call(id: u64, tool: &str, args: Value) -> String {
    common::call(id, tool, args) + "\n"
}

/// Root with CAP_SYS_ADMIN (a container's root may lack it): what --jail needs.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let sys_admin = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 21) != 0);
    root && sys_admin
}

/// A running jailed gate: its stderr lines and stdout replies arrive on channels.
struct Jailed {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<Value>,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Jailed {
    fn start(mut cmd: Command) -> Jailed {
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take();
        let (tx, replies) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let (tx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Jailed {
            child,
            stdin,
            replies,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Waits (generously) for a stderr line containing `what`.
    fn wait_stderr(&mut self, what: &str) {
        while !self.seen.iter().any(|l| l.contains(what)) {
            match self.stderr.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no {what:?} on stderr; got:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn ask(&mut self, id: u64, tool: &str, args: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(call(id, tool, args).as_bytes()).unwrap();
        stdin.flush().unwrap();
        let v = self
            .replies
            .recv_timeout(Duration::from_secs(60))
            .expect("a reply within 60 s");
        assert_eq!(v["id"], id, "{v}");
        v
    }

    /// Closes stdin and returns the exit code and all of stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        self.seen.extend(self.stderr.iter());
        (status.code(), self.seen.join("\n"))
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_jailed_gate_sees_only_the_jail_and_serves_the_workspace() {
    if !is_root() {
        eprintln!("skipped: --jail needs root (CI runs as root)");
        return;
    }
    let e = env();
    chown_tree(&e.workspace, NOBODY, NOBODY);
    let mut g = Jailed::start(gate(&e, &[]));
    g.wait_stderr("jailed in");
    let pid = g.child.id();

    // Who it runs as: the jail user, no groups, no capability left.
    assert_eq!(status_field(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // What it sees mounted: the jail's read-only tmpfs as /, and the read-only
    // name-service files; nothing of the host's tree.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut points = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (point, opts) = (f[4], f[5]);
        assert!(opts.split(',').any(|o| o == "ro"), "writable mount: {line}");
        assert!(opts.split(',').any(|o| o == "nosuid"), "{line}");
        points.push(point.to_string());
        if point == "/" {
            assert!(line.contains(" - tmpfs ironvmm-jail "), "{line}");
        } else {
            assert!(
                ironvmm::jail::NAME_SERVICE_FILES.contains(&point),
                "unexpected mount {point} in the jail:\n{mounts}"
            );
        }
    }
    assert!(points.contains(&"/".to_string()), "{mounts}");

    // Its root, as the kernel resolves its paths: only etc/, with only those files.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(top.iter().all(|n| n == "etc"), "jail root holds {top:?}");
    for name in std::fs::read_dir(root.join("etc")).unwrap() {
        let name = format!("/etc/{}", name.unwrap().file_name().to_string_lossy());
        assert!(
            ironvmm::jail::NAME_SERVICE_FILES.contains(&name.as_str()),
            "{name}"
        );
    }
    // Host files are not there: not /etc/passwd, not the policy, not the workspace's path.
    for host in [Path::new("/etc/passwd"), &e.policy, &e.workspace, &e.audit] {
        let inside = root.join(host.strip_prefix("/").unwrap());
        let err = std::fs::metadata(&inside).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::NotFound,
            "{}",
            host.display()
        );
    }

    // The descriptors of the workspace and its trash folder climb no higher than
    // themselves: `..` at their root is their root (the old tree is detached, and
    // each was bound onto itself before it was opened). `/proc/PID/fd/N/..`
    // resolves as the gate's own `openat(N, "..")` would.
    let trash = e.dir.path().join("ws.ironvmm-trash");
    for dir in [&e.workspace, &trash] {
        let want = std::fs::metadata(dir).unwrap();
        let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|d| d.unwrap().path())
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_dir() && (m.dev(), m.ino()) == (want.dev(), want.ino()))
            })
            .unwrap_or_else(|| panic!("no descriptor of {}", dir.display()));
        let up = std::fs::metadata(fd.join("../../..")).unwrap();
        assert_eq!(
            (up.dev(), up.ino()),
            (want.dev(), want.ino()),
            "{} climbs out of {}",
            fd.display(),
            dir.display()
        );
    }

    // The workspace still works through the descriptor opened before the jail.
    let r = g.ask(1, "fs.read", json!({"path": "/workspace/hello.txt"}));
    assert_eq!(
        r["result"]["structuredContent"]["content"], "hello from the host\n",
        "{r}"
    );
    let r = g.ask(
        2,
        "fs.write",
        json!({"path": "/workspace/out/note.txt", "content": "from the jail", "create_dirs": true}),
    );
    assert_eq!(r["result"]["isError"], false, "{r}");
    let written = e.workspace.join("out/note.txt");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "from the jail");
    assert_eq!(std::fs::metadata(&written).unwrap().uid(), NOBODY);
    // A path outside the workspace is still refused (by the service, before the jail matters).
    let r = g.ask(3, "fs.read", json!({"path": "/workspace/../../etc/passwd"}));
    assert_eq!(r["result"]["isError"], true, "{r}");

    // fs.delete across the workspace's and the trash's bind mounts (a rename there is
    // EXDEV): the file is copied into the trash, synced, then unlinked.
    let r = g.ask(4, "fs.delete", json!({"path": "/workspace/out/note.txt"}));
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert!(
        !written.exists(),
        "the deleted file is still in the workspace"
    );
    let trash = ironvmm_gate::services::fs::trash_path_for(&e.workspace).unwrap();
    let kept: Vec<String> = std::fs::read_dir(&trash)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    assert_eq!(kept, ["from the jail"], "the trash holds the file");
    // A folder cannot be copied that way: refused, and left where it is.
    let r = g.ask(5, "fs.delete", json!({"path": "/workspace/out"}));
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(e.workspace.join("out").is_dir());

    let (code, stderr) = g.finish();
    assert_eq!(code, Some(0), "{stderr}");
    // The host's jail folder was never written: the tmpfs lived in the gate's namespace.
    assert_eq!(std::fs::read_dir(&e.jail).unwrap().count(), 0);
    // The audit log was written and closed through its descriptor, and says so.
    let log = std::fs::read_to_string(&e.audit).unwrap();
    let open: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(
        open["flags"]["jail"],
        e.jail.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(open["flags"]["jail_user"], "65534:65534");
    let close: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(close["kind"], "close", "{close}");
    drop(e.gate.dir);
}

#[test]
fn a_workspace_the_jail_user_cannot_read_is_refused_before_the_jail() {
    if !is_root() {
        eprintln!("skipped: --jail needs root (CI runs as root)");
        return;
    }
    let e = env();
    // Root's 0700 workspace: the jail user would get EACCES on every call.
    std::fs::set_permissions(
        &e.workspace,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let o = gate(&e, &["--jail-user", "4242:4242"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("jail user 4242:4242") && stderr.contains("cannot read the workspace"),
        "{stderr}"
    );
}

#[test]
fn without_root_the_jail_says_what_it_needs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Unprivileged already: the same check, without switching user.
        let e = env();
        let o = gate(&e, &[]).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{stderr}");
        assert!(
            stderr.contains("--jail needs root (or CAP_SYS_ADMIN)"),
            "{stderr}"
        );
        return;
    }
    let e = env();
    for p in [&e.policy, &e.workspace, &e.jail] {
        chown_tree(p, NOBODY, NOBODY);
    }
    std::os::unix::fs::chown(e.dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let o = match gate(&e, &[]).uid(NOBODY).gid(NOBODY).output() {
        Ok(o) => o,
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid {NOBODY} cannot execute the test binary here ({err})");
            return;
        }
        Err(err) => panic!("{err}"),
    };
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("--jail needs root (or CAP_SYS_ADMIN)"),
        "{stderr}"
    );
    assert!(!e.audit.exists(), "nothing was opened before the refusal");
}

#[test]
fn run_stops_on_a_bad_jail_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.rules");
    std::fs::write(&policy, POLICY).unwrap();
    let report = dir.path().join("r.json");
    let o = ironvmm()
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--jail")
        .arg(dir.path().join("no-such-jail"))
        .arg("--report")
        .arg(&report)
        .arg("--audit")
        .arg(dir.path().join("audit.jsonl"))
        .arg(dir.path().join("no-such-image.img"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("--jail"), "{stderr}");
    assert!(stderr.contains("no-such-jail"), "{stderr}");
    // The report still says what happened: an error, no guest ran.
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["exit"]["code"], 125, "{r}");
}

#[test]
fn jail_user_needs_jail_and_refuses_root() {
    let o = ironvmm()
        .args([
            "gate",
            "--stdio",
            "--policy",
            "p.rules",
            "--jail-user",
            "1000",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--jail"));
    let o = ironvmm()
        .args(["gate", "--stdio", "--policy", "p.rules", "--jail", "/tmp"])
        .args(["--jail-user", "0:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refused"));
}

#[test]
fn a_maildir_is_bound_read_write_at_its_own_path() {
    if !is_root() {
        eprintln!("skipped: --jail needs root (CI runs as root)");
        return;
    }
    let e = env();
    let md = e.dir.path().join("Maildir");
    for sub in [
        "cur",
        "new",
        "tmp",
        ".Archive/cur",
        ".Archive/new",
        ".Archive/tmp",
    ] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    std::fs::write(
        md.join("cur/1.M1P1.h:2,S"),
        "From: x@example.com\r\nTo: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
    )
    .unwrap();
    chown_tree(&md, NOBODY, NOBODY);
    chown_tree(&e.workspace, NOBODY, NOBODY);
    let config = e.dir.path().join("ironvmm.toml");
    std::fs::write(
        &config,
        format!(
            "[mail]\nbackend = \"maildir\"\nmaildir = \"{}\"\nfrom = \"a@example.com\"\n",
            md.display()
        ),
    )
    .unwrap();
    std::fs::write(
        &e.policy,
        "version 1\nallow mail.list\nallow mail.move\ndefault deny\n",
    )
    .unwrap();
    let mut g = Jailed::start(gate(&e, &["--config", config.to_str().unwrap()]));
    g.wait_stderr("jailed in");
    let pid = g.child.id();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let md_real = md.canonicalize().unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(md_real.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no Maildir mount:\n{mounts}"));
    let opts = line.split_whitespace().nth(5).unwrap();
    assert!(opts.split(',').any(|o| o == "rw"), "{line}");

    let r = g.ask(1, "mail.list", json!({"folder": "INBOX"}));
    assert_eq!(r["result"]["structuredContent"]["total"], 1, "{r}");
    let r = g.ask(
        2,
        "mail.move",
        json!({"id": "INBOX/1.M1P1.h", "folder": "Archive"}),
    );
    assert_eq!(r["result"]["isError"], false, "{r}");
    let (code, stderr) = g.finish();
    assert_eq!(code, Some(0), "{stderr}");
    // The move happened in the host's Maildir, by path, from inside the jail.
    assert_eq!(std::fs::read_dir(md.join("cur")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(md.join(".Archive/cur")).unwrap().count(),
        1
    );
}
