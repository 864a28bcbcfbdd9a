//! `ironvmm gate --net-listen PATH`: the gate's network egress (what a VM serves on
//! vsock port 2) on a Unix socket, so that a guest's `iron proxy --to unix:PATH`
//! and the agents behind it run on the host against the same decisions, audit log
//! and model route as in a VM. Each connection is driven the way the vsock device
//! drives one: bytes in up to the stream's room, output as the relay makes it, a
//! half-close from the client ends its input but not the answer.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::services::net::{NetService, NetStream};

/// Binds `path` (replacing a stale socket) and serves it on a thread of its own.
pub fn spawn(net: Arc<NetService>, path: &Path) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path); // an earlier gate's
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("--net-listen {}: {e}", path.display()))?;
    eprintln!(
        "ironvmm gate: network egress (port 2) on {}",
        path.display()
    );
    std::thread::Builder::new()
        .name("gate-net-listen".into())
        .spawn(move || accept_loop(&net, &listener))
        .map_err(|e| format!("--net-listen: cannot start its thread: {e}"))?;
    Ok(())
}

fn accept_loop(net: &Arc<NetService>, listener: &UnixListener) {
    let mut next = 0u64;
    for sock in listener.incoming() {
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ironvmm gate: --net-listen accept: {e}");
                continue;
            }
        };
        next += 1;
        let evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                eprintln!("ironvmm gate: eventfd: {e}");
                continue;
            }
        };
        let waker = Arc::clone(&evt);
        let wake = Arc::new(move || {
            let _ = waker.write(1);
        });
        // None at the service's connection bound: the client is closed at once,
        // as the device resets a guest connection.
        let Some(stream) = net.accept(format!("net:unix#{next}"), wake) else {
            continue;
        };
        let spawned = std::thread::Builder::new()
            .name(format!("gate-net-{next}"))
            .spawn(move || serve(stream, sock, &evt));
        if let Err(e) = spawned {
            eprintln!("ironvmm gate: cannot start a net client thread: {e}");
        }
    }
}

/// One connection until the relay has finished and its output is delivered, or
/// the client is gone. Sleeps in poll(2) on the socket and the relay's wake.
fn serve(mut stream: NetStream, mut sock: UnixStream, evt: &EventFd) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::with_capacity(32 * 1024);
    let mut eof = false;
    'conn: loop {
        loop {
            out.clear();
            stream.poll(&mut out);
            if out.is_empty() {
                break;
            }
            if sock.write_all(&out).is_err() {
                break 'conn;
            }
        }
        if stream.finished() {
            break;
        }
        let room = if eof { 0 } else { stream.input_room() };
        let mut fds = [
            libc::pollfd {
                fd: evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock.as_raw_fd(),
                // With no room, only a hang-up (always reported) wakes us here.
                events: if room > 0 { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            let _ = evt.read();
        }
        let sock_ev = fds[1].revents;
        if room > 0 && sock_ev & (libc::POLLIN | libc::POLLHUP) != 0 {
            let want = room.min(buf.len());
            match sock.read(&mut buf[..want]) {
                // The client sends no more; its answer still goes out.
                Ok(0) => eof = true,
                Ok(k) => {
                    out.clear();
                    if stream.on_data(&buf[..k], &mut out).is_err() {
                        break;
                    }
                    if !out.is_empty() && sock.write_all(&out).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        } else if sock_ev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            break; // gone both ways: nobody reads the answer
        }
    }
    stream.on_close();
    let _ = sock.shutdown(std::net::Shutdown::Both);
}
