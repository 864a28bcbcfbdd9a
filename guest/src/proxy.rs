//! `iron proxy`: the guest's HTTP proxy, as a thin relay. Each TCP connection
//! accepted on 127.0.0.1:3128 is copied, byte for byte both ways, over a new
//! vsock connection to the host's port 2. Nothing is parsed here: the host parses
//! every request, decides it and talks to the servers.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::conn::GateAddr;

/// Where ironinit has the proxy listen, and what it sets `HTTP_PROXY` to.
pub const LISTEN: &str = "127.0.0.1:3128";
pub const PROXY_URL: &str = "http://127.0.0.1:3128";
/// Connections relayed at once; more are closed at once (the host has its own bound).
pub const MAX_CONNECTIONS: usize = 64;

/// Accepts connections forever, relaying each to `to` on a thread of its own.
pub fn serve(listener: TcpListener, to: GateAddr) -> io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e),
        };
        if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::AcqRel);
            continue; // dropped: closed
        }
        let (to, live) = (to.clone(), Arc::clone(&live));
        let spawned = std::thread::Builder::new().spawn(move || {
            if let Err(e) = relay(tcp, &to) {
                eprintln!("iron proxy: {to}: {e}");
            }
            live.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            eprintln!("iron proxy: cannot start a thread; connection dropped");
        }
    }
}

/// Copies one connection both ways until both sides have ended, passing each
/// half-close on. `Err` only when the host cannot be reached.
pub fn relay(tcp: TcpStream, to: &GateAddr) -> io::Result<()> {
    let host = to.connect()?;
    let (mut tcp_in, mut host_out) = (tcp.try_clone()?, host.try_clone()?);
    let up = std::thread::Builder::new().spawn(move || {
        let r = copy(&mut tcp_in, &mut host_out);
        let _ = host_out.shutdown(Shutdown::Write);
        r
    })?;
    let (mut host_in, mut tcp_out) = (host, tcp);
    let down = copy(&mut host_in, &mut tcp_out);
    // The host has ended the exchange (it takes nothing more once it has): the
    // client gets its end of stream, and the other direction stops too.
    let _ = tcp_out.shutdown(Shutdown::Both);
    let _ = host_in.shutdown(Shutdown::Both);
    // A side that stopped early (the host refused a request and closed while the
    // client still sent) is how exchanges end, not an error worth a console line.
    let _ = (down, up.join());
    Ok(())
}

fn copy<R: Read, W: Write>(from: &mut R, to: &mut W) -> io::Result<u64> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut n = 0u64;
    loop {
        let k = match from.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..k])?;
        n += k as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connections_are_relayed_both_ways_with_half_closes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("host.sock");
        let host = UnixListener::bind(&sock).unwrap();
        // The "host": reads until the guest's half-close, answers in upper case.
        std::thread::spawn(move || {
            for s in host.incoming().flatten() {
                let mut s = s;
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(&got.to_ascii_uppercase()).unwrap();
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let to = GateAddr::Unix(sock);
        std::thread::spawn(move || serve(listener, to));
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"get http://x/ http/1.1").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut back = String::new();
            c.read_to_string(&mut back).unwrap();
            assert_eq!(back, "GET HTTP://X/ HTTP/1.1");
        }
    }
}
