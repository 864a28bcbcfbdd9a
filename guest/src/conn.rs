//! Connecting to the gate: AF_VSOCK to the host (CID 2, port 1) in the guest, or a
//! Unix socket (`IRON_GATE=unix:/path`) to test against `ironvmm gate --listen`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::{GATE_ENV, HOST_CID, TOOLS_PORT};

/// Where the gate is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateAddr {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
}

impl std::fmt::Display for GateAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            GateAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            GateAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl GateAddr {
    /// `unix:PATH`, `vsock:PORT` (host CID) or `vsock:CID:PORT`.
    pub fn parse(s: &str) -> Result<GateAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{GATE_ENV}={s:?}: empty socket path"));
            }
            return Ok(GateAddr::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let num = |x: &str| {
                x.parse::<u32>()
                    .map_err(|_| format!("{GATE_ENV}={s:?}: {x:?} is not a number"))
            };
            return match rest.split_once(':') {
                Some((cid, port)) => Ok(GateAddr::Vsock {
                    cid: num(cid)?,
                    port: num(port)?,
                }),
                None => Ok(GateAddr::Vsock {
                    cid: HOST_CID,
                    port: num(rest)?,
                }),
            };
        }
        Err(format!(
            "{GATE_ENV}={s:?}: expected unix:PATH, vsock:PORT or vsock:CID:PORT"
        ))
    }

    /// `$IRON_GATE`, or the host's tool port.
    pub fn from_env() -> Result<GateAddr, String> {
        match std::env::var(GATE_ENV) {
            Ok(s) if !s.is_empty() => GateAddr::parse(&s),
            _ => Ok(GateAddr::Vsock {
                cid: HOST_CID,
                port: TOOLS_PORT,
            }),
        }
    }

    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            GateAddr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            GateAddr::Vsock { cid, port } => vsock_connect(*cid, *port).map(Stream::Vsock),
        }
    }
}

/// A connected byte stream to the gate.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Vsock(OwnedFd),
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    loop {
        // SAFETY: addr is a valid sockaddr_vm of the size passed.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fd_io(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Vsock(fd) => fd.try_clone().map(Stream::Vsock),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Vsock(fd) => {
                let how = match how {
                    Shutdown::Read => libc::SHUT_RD,
                    Shutdown::Write => libc::SHUT_WR,
                    Shutdown::Both => libc::SHUT_RDWR,
                };
                // SAFETY: shutdown(2) on a descriptor we own.
                let r = unsafe { libc::shutdown(fd.as_raw_fd(), how) };
                fd_io(r as isize).map(|_| ())
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(fd) => loop {
                // SAFETY: buf is valid for buf.len() bytes of writes.
                let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                match fd_io(r) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            },
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Vsock(fd) => loop {
                // SAFETY: buf is valid for buf.len() bytes of reads.
                let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                match fd_io(r) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return other,
                }
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addresses() {
        assert_eq!(
            GateAddr::parse("unix:/tmp/g.sock").unwrap(),
            GateAddr::Unix("/tmp/g.sock".into())
        );
        assert_eq!(
            GateAddr::parse("vsock:1").unwrap(),
            GateAddr::Vsock { cid: 2, port: 1 }
        );
        assert_eq!(
            GateAddr::parse("vsock:3:9").unwrap(),
            GateAddr::Vsock { cid: 3, port: 9 }
        );
        assert!(GateAddr::parse("tcp:1").is_err());
        assert!(GateAddr::parse("vsock:x").is_err());
        assert!(GateAddr::parse("unix:").is_err());
    }
}
