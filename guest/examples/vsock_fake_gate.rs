//! A stand-in gate for testing `iron` inside a guest over AF_VSOCK (the guest
//! kernel's vsock loopback, CID 1): `vsock_fake_gate PORT` accepts connections
//! and answers JSON lines: `initialize`, `ping`, and `tools/call` of `echo`
//! (returns its arguments); every other tool is denied (a tool result with
//! `isError` and `structuredContent.decision` = `deny`). Test use only.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

fn answer(req: &Value) -> Option<Value> {
    let id = req.get("id")?.clone();
    let result = match req["method"].as_str().unwrap_or("") {
        "initialize" => json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
            "serverInfo": {"name": "vsock_fake_gate", "version": "0"}}),
        "ping" => json!({}),
        "tools/call" if req["params"]["name"] == "echo" => {
            let args = &req["params"]["arguments"];
            json!({"content": [{"type": "text", "text": args.to_string()}],
                "structuredContent": args, "isError": false})
        }
        "tools/call" => json!({"content": [{"type": "text",
            "text": "denied by rule 1 (decided by rule): fake gate denies everything else"}],
            "structuredContent": {"decision": "deny", "rule": 1,
            "decided_by": "rule", "reason": "fake gate denies everything else"},
            "isError": true}),
        _ => {
            return Some(json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32601, "message": "method not found"}}))
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn main() {
    let port: u32 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: vsock_fake_gate PORT");
    // SAFETY: plain socket calls on a descriptor owned here; sockaddr_vm is plain data.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let r = libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        );
        assert!(r == 0, "bind: {}", std::io::Error::last_os_error());
        assert!(libc::listen(fd.as_raw_fd(), 64) == 0);
        fd
    };
    println!("vsock_fake_gate: listening on port {port}");
    loop {
        // SAFETY: accept on our listening socket; the new fd is owned at once.
        let conn = unsafe {
            let c = libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            if c < 0 {
                continue;
            }
            OwnedFd::from_raw_fd(c)
        };
        // A UnixStream is only used as a read/write wrapper around the fd here.
        let stream = UnixStream::from(conn);
        std::thread::spawn(move || {
            let mut w = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let Ok(req) = serde_json::from_str::<Value>(&line) else {
                    return;
                };
                if let Some(a) = answer(&req) {
                    if w.write_all(format!("{a}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
    }
}
