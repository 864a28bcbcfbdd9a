//! Connecting to the gate: AF_VSOCK to the host (CID 2, port 1) in the guest, or a
//! Unix socket (`IRON_GATE=unix:/path`) to test against `ironvmm gate --listen`.
//!
//! A vsock connect is retried when the host is slow to answer (an emulated host
//! can miss Linux's 2 s connect timeout): see [`RetryPolicy`].

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
            GateAddr::Vsock { cid, port } => {
                let t0 = Instant::now();
                VSOCK_RETRY
                    .run(
                        |timeout| vsock_connect(*cid, *port, timeout),
                        std::thread::sleep,
                        || t0.elapsed(),
                    )
                    .map(Stream::Vsock)
            }
        }
    }
}

/// How a vsock connect to the host is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// No attempt starts, and no pause ends, past this since the first attempt.
    pub total: Duration,
    /// The pause after the first failure; each later one doubles, up to `max_pause`.
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// Each attempt's connect timeout (`SO_VM_SOCKETS_CONNECT_TIMEOUT`; Linux's
    /// default is 2 s), held to what is left of `total`.
    pub attempt_timeout: Duration,
    /// Resets retried at most this many times: on AF_VSOCK a port nobody serves
    /// answers with a reset too (the guest sees ECONNRESET, not ECONNREFUSED), and
    /// that must fail fast.
    pub max_resets: u32,
}

/// What `iron` uses: up to 30 s in all for a host that is slow to answer.
pub const VSOCK_RETRY: RetryPolicy = RetryPolicy {
    total: Duration::from_secs(30),
    first_pause: Duration::from_millis(100),
    max_pause: Duration::from_secs(2),
    attempt_timeout: Duration::from_secs(10),
    max_resets: 2,
};

/// What to do after a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Again(Duration),
    GiveUp,
}

impl RetryPolicy {
    /// The pause after the `failed`-th failure (1 for the first).
    pub fn pause(&self, failed: u32) -> Duration {
        let doubled = self
            .first_pause
            .checked_mul(
                1u32.checked_shl(failed.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .unwrap_or(self.max_pause);
        doubled.min(self.max_pause)
    }

    /// Whether to try again after failure `e`, the `failed`-th (of which `resets`
    /// were resets, this one included), `elapsed` after the first attempt began.
    /// Only a timeout or a reset is worth another try; a refusal, an unknown
    /// address or anything else is final.
    pub fn decide(&self, e: &io::Error, failed: u32, resets: u32, elapsed: Duration) -> Retry {
        let again = match e.kind() {
            io::ErrorKind::TimedOut => true,
            io::ErrorKind::ConnectionReset => resets <= self.max_resets,
            _ => false,
        };
        let pause = self.pause(failed);
        if again && elapsed + pause < self.total {
            Retry::Again(pause)
        } else {
            Retry::GiveUp
        }
    }

    /// Runs `attempt` (given its connect timeout) until it connects or `decide`
    /// gives up; `sleep` pauses, `elapsed` is the time since the first attempt.
    /// The last error is returned, saying how many attempts were made.
    pub fn run<T>(
        &self,
        mut attempt: impl FnMut(Duration) -> io::Result<T>,
        mut sleep: impl FnMut(Duration),
        elapsed: impl Fn() -> Duration,
    ) -> io::Result<T> {
        let (mut failed, mut resets) = (0u32, 0u32);
        loop {
            let left = self.total.saturating_sub(elapsed());
            let timeout = self
                .attempt_timeout
                .min(left)
                .max(Duration::from_millis(100));
            let e = match attempt(timeout) {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            failed += 1;
            if e.kind() == io::ErrorKind::ConnectionReset {
                resets += 1;
            }
            match self.decide(&e, failed, resets, elapsed()) {
                Retry::Again(pause) => sleep(pause),
                Retry::GiveUp if failed == 1 => return Err(e),
                Retry::GiveUp => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{e} (after {failed} attempts in {:.1} s)",
                            elapsed().as_secs_f64()
                        ),
                    ))
                }
            }
        }
    }
}

/// A connected byte stream to the gate.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Vsock(OwnedFd),
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (not in the libc crate): on 64-bit targets, the
/// guest's, it takes a native `struct timeval` (`_OLD` in linux/vm_sockets.h).
#[cfg(target_pointer_width = "64")]
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// One connect attempt, on a fresh socket (one whose connect failed is not reused).
fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    #[cfg(target_pointer_width = "64")]
    {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt(2) reads size_of::<timeval>() bytes from &tv. A kernel
        // that refuses it keeps its default: the retries still hold.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    #[cfg(not(target_pointer_width = "64"))]
    let _ = timeout;
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

    fn err(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, format!("{kind:?}"))
    }

    #[test]
    fn only_timeouts_and_a_few_resets_are_retried() {
        use io::ErrorKind::*;
        let p = VSOCK_RETRY;
        let soon = Duration::from_secs(1);
        assert_eq!(
            p.decide(&err(TimedOut), 1, 0, soon),
            Retry::Again(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(&err(ConnectionReset), 1, 1, soon),
            Retry::Again(Duration::from_millis(100))
        );
        // A port nobody serves resets every time: it fails after max_resets retries.
        assert_eq!(p.decide(&err(ConnectionReset), 3, 3, soon), Retry::GiveUp);
        for final_kind in [
            ConnectionRefused,
            NotFound,
            PermissionDenied,
            AddrNotAvailable,
        ] {
            assert_eq!(p.decide(&err(final_kind), 1, 0, soon), Retry::GiveUp);
        }
        // Never past the total.
        assert_eq!(
            p.decide(&err(TimedOut), 4, 0, Duration::from_millis(29_500)),
            Retry::GiveUp
        );
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let p = VSOCK_RETRY;
        let ms: Vec<u128> = (1..=8).map(|n| p.pause(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(p.pause(u32::MAX), Duration::from_secs(2));
    }

    /// `run` against a fake clock: each attempt takes `cost` of it.
    fn simulate(
        outcomes: &mut dyn Iterator<Item = io::Result<()>>,
        cost: Duration,
    ) -> (io::Result<()>, Vec<Duration>, Vec<Duration>, Duration) {
        let now = std::cell::Cell::new(Duration::ZERO);
        let mut timeouts = Vec::new();
        let mut pauses = Vec::new();
        let r = std::cell::RefCell::new(&mut pauses);
        let out = VSOCK_RETRY.run(
            |timeout| {
                timeouts.push(timeout);
                now.set(now.get() + cost.min(timeout));
                outcomes.next().unwrap_or(Err(err(io::ErrorKind::TimedOut)))
            },
            |d| {
                r.borrow_mut().push(d);
                now.set(now.get() + d);
            },
            || now.get(),
        );
        (out, timeouts, pauses, now.get())
    }

    #[test]
    fn a_slow_host_is_waited_for_and_a_refused_port_is_not() {
        use io::ErrorKind::*;
        // Two timeouts, then the host answers.
        let mut it = [Err(err(TimedOut)), Err(err(TimedOut)), Ok(())].into_iter();
        let (out, timeouts, pauses, _) = simulate(&mut it, Duration::from_secs(10));
        assert!(out.is_ok());
        assert_eq!(timeouts[0], Duration::from_secs(10));
        assert_eq!(
            pauses,
            [Duration::from_millis(100), Duration::from_millis(200)]
        );
        // Refused: one attempt, its own error.
        let mut it = [Err(err(ConnectionRefused))].into_iter();
        let (out, timeouts, pauses, _) = simulate(&mut it, Duration::ZERO);
        assert_eq!(out.unwrap_err().to_string(), "ConnectionRefused");
        assert_eq!((timeouts.len(), pauses.len()), (1, 0));
        // Resets: the first and max_resets more, then the error says so.
        let (out, timeouts, _, _) = simulate(
            &mut std::iter::repeat_with(|| Err(err(ConnectionReset))),
            Duration::ZERO,
        );
        let e = out.unwrap_err();
        assert_eq!(timeouts.len(), 3);
        assert!(e.to_string().contains("after 3 attempts"), "{e}");
        // A host that never answers: given up within the total, the last attempt
        // held to what was left of it.
        let (out, timeouts, _, end) = simulate(&mut std::iter::empty(), Duration::from_secs(10));
        assert_eq!(out.unwrap_err().kind(), TimedOut);
        assert!(end <= Duration::from_secs(30), "{end:?}");
        assert!(timeouts.len() >= 3, "{timeouts:?}");
        assert!(
            timeouts.last().unwrap() < &Duration::from_secs(10),
            "{timeouts:?}"
        );
    }
}
