//! The control socket: list, allow, deny, watch, and a client of another uid
//! refused by SO_PEERCRED.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use ironvmm_gate::approvals::socket::{self, ControlSocket};
use ironvmm_gate::approvals::{ApprovalHub, HubConfig, Mode};
use ironvmm_gate::gate::approver::{Approver, AskRequest};
use ironvmm_gate::gate::DecidedBy;
use serde_json::{json, Value};

fn ask(
    hub: &ApprovalHub,
    seq: u64,
    path: &str,
) -> mpsc::Receiver<ironvmm_gate::gate::approver::Answer> {
    let (tx, rx) = mpsc::channel();
    hub.ask(
        AskRequest {
            ask_seq: seq,
            conn: "c1".into(),
            rpc_id: json!(seq),
            tool: "fs.write".into(),
            args: json!({"path": path, "content": "x"}),
            rule: Some(2),
            reason: "ask me".into(),
        },
        Box::new(move |a| {
            let _ = tx.send(a);
        }),
    );
    rx
}

#[test]
fn list_allow_deny_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1.sock");
    let hub = ApprovalHub::new(HubConfig::new("vm1", Mode::Socket));
    let _sock = ControlSocket::start(hub.clone(), &path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (wtx, wrx) = mpsc::channel();
    let wpath = path.clone();
    std::thread::spawn(move || {
        socket::watch_events(&wpath, |v| wtx.send(v).is_ok()).unwrap();
    });

    let a = ask(&hub, 10, "/workspace/a");
    let b = ask(&hub, 11, "/workspace/b");
    // The watcher may subscribe after the asks (it gets them replayed as pending),
    // but it must have subscribed before they are answered, or it would see neither.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let v: Value = wrx.recv_timeout(Duration::from_secs(60)).unwrap();
        seen.push(format!("{} {}", v["event"].as_str().unwrap(), v["id"]));
    }
    let listed = socket::request(&path, &json!({"op": "list"})).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0]["event"], "ask");
    assert_eq!(listed[0]["args"]["path"], "/workspace/a");
    assert_eq!(
        listed[2],
        json!({"event": "listed", "vm": "vm1", "count": 2})
    );
    let (ida, idb) = (
        listed[0]["id"].as_u64().unwrap(),
        listed[1]["id"].as_u64().unwrap(),
    );

    let r = socket::request(&path, &json!({"op": "allow", "id": ida})).unwrap();
    assert_eq!(r[0]["event"], "decided");
    assert_eq!(r[0]["decision"], "allow");
    let ans = a.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(ans.allow);
    assert_eq!(
        (ans.answerer.by, ans.answerer.channel.as_str()),
        (DecidedBy::User, "socket")
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(ans
        .answerer
        .who
        .unwrap()
        .starts_with(&format!("uid {euid} pid ")));

    let r = socket::request(&path, &json!({"op": "deny", "id": idb})).unwrap();
    assert_eq!(r[0]["decision"], "deny");
    assert!(!b.recv_timeout(Duration::from_secs(20)).unwrap().allow);

    // errors are replies, not hangs
    let r = socket::request(&path, &json!({"op": "allow", "id": 999})).unwrap();
    assert_eq!(r[0]["event"], "error");
    assert!(r[0]["error"].as_str().unwrap().contains("999"));
    let r = socket::request(
        &path,
        &json!({"op": "allow", "id": ida, "learn": "forever"}),
    )
    .unwrap();
    assert!(r[0]["error"].as_str().unwrap().contains("learn"));
    let r = socket::request(&path, &json!({"op": "allow", "id": 5, "learn": "tool"})).unwrap();
    assert_eq!(r[0]["event"], "error");
    let r = socket::request(&path, &json!({"op": "info"})).unwrap();
    assert_eq!(
        (r[0]["vm"].as_str(), r[0]["approver"].as_str()),
        (Some("vm1"), Some("socket"))
    );

    // the watcher saw both asks and both answers, in order
    while seen.len() < 4 {
        let v: Value = wrx.recv_timeout(Duration::from_secs(60)).unwrap();
        seen.push(format!("{} {}", v["event"].as_str().unwrap(), v["id"]));
    }
    assert_eq!(
        seen,
        [
            format!("ask {ida}"),
            format!("ask {idb}"),
            format!("decided {ida}"),
            format!("decided {idb}")
        ]
    );
}

/// Connects to `path` as uid/gid 65534 in a forked child and returns what the
/// server wrote before closing.
fn read_as_nobody(path: &Path) -> String {
    use std::ffi::CString;
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: plain syscalls; the child only makes async-signal-safe calls on
    // stack memory before _exit.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::close(fds[0]);
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = cpath.as_bytes_with_nul();
            for (i, b) in bytes.iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(s, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                let m = b"CONNECT FAILED";
                libc::write(fds[1], m.as_ptr().cast(), m.len());
                libc::_exit(3);
            }
            let req = b"{\"op\":\"list\"}\n";
            libc::write(s, req.as_ptr().cast(), req.len());
            let mut buf = [0u8; 512];
            loop {
                let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(fds[1], buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(fds[0]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[test]
fn a_client_of_another_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Only root can become another uid; CI runs as root.
        eprintln!("not root: the other-uid test needs root to switch uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Open the folder and the socket to everyone: only SO_PEERCRED stands in the way.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("vm2.sock");
    let hub = ApprovalHub::new(HubConfig::new("vm2", Mode::Socket));
    let _sock = ControlSocket::start(hub.clone(), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let _a = ask(&hub, 1, "/workspace/secret");

    let got = read_as_nobody(&path);
    assert!(got.contains("\"event\":\"error\""), "{got}");
    assert!(
        got.contains("refused") && got.contains("uid 65534"),
        "{got}"
    );
    assert!(
        !got.contains("/workspace/secret"),
        "nothing about the asks leaks: {got}"
    );
    // the owner still gets in
    let r = socket::request(&path, &json!({"op": "list"})).unwrap();
    assert_eq!(r.len(), 2);
}
