//! The bounded pipe between the vsock device thread and a connection's relay
//! thread. The device side never waits: it takes what fits (`input_room`) and
//! hands over what is ready. The relay side blocks, with a deadline, and wakes the
//! device whenever it makes room or output. Each direction holds at most `CAP`
//! bytes, so neither a guest nor a server that stops reading grows host memory.

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::gate::inflight::Wake;

/// Bytes held per direction.
pub const CAP: usize = 64 * 1024;

#[derive(Default)]
struct State {
    /// Guest bytes the relay has not read yet.
    to_host: Vec<u8>,
    /// Bytes for the guest the device has not taken yet.
    to_guest: Vec<u8>,
    /// The guest's connection is gone (closed, reset, device reset).
    guest_gone: bool,
    /// The relay has finished: nothing more will come after `to_guest`.
    relay_done: bool,
}

pub struct Pipe {
    state: Mutex<State>,
    cv: Condvar,
    wake: Wake,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipe {
    pub fn new(wake: Wake) -> Arc<Pipe> {
        Arc::new(Pipe {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            wake,
        })
    }

    // The device side: never blocks.

    /// How many guest bytes `push` takes now.
    pub fn input_room(&self) -> usize {
        let st = lock(&self.state);
        if st.relay_done || st.guest_gone {
            return 0;
        }
        CAP.saturating_sub(st.to_host.len())
    }

    /// Guest bytes. `false` when they did not fit (the device gave more than
    /// `input_room`), which ends the connection.
    pub fn push(&self, data: &[u8]) -> bool {
        let mut st = lock(&self.state);
        if st.relay_done {
            return true; // consumed unread: the exchange is over
        }
        if st.to_host.len() + data.len() > CAP {
            return false;
        }
        st.to_host.extend_from_slice(data);
        drop(st);
        self.cv.notify_all();
        true
    }

    /// Moves at most `max` bytes for the guest into `out`.
    pub fn take(&self, out: &mut Vec<u8>, max: usize) {
        let mut st = lock(&self.state);
        let n = st.to_guest.len().min(max);
        if n == 0 {
            return;
        }
        out.extend_from_slice(&st.to_guest[..n]);
        st.to_guest.drain(..n);
        drop(st);
        self.cv.notify_all();
    }

    /// Whether more output may come (the relay runs, or output waits).
    pub fn pending(&self) -> bool {
        let st = lock(&self.state);
        !st.relay_done || !st.to_guest.is_empty()
    }

    /// The relay is done and all its output was taken.
    pub fn finished(&self) -> bool {
        let st = lock(&self.state);
        st.relay_done && st.to_guest.is_empty()
    }

    /// Output bytes held, both ways (for tests of the memory bound).
    pub fn held(&self) -> usize {
        let st = lock(&self.state);
        st.to_host.len() + st.to_guest.len()
    }

    pub fn guest_closed(&self) {
        lock(&self.state).guest_gone = true;
        self.cv.notify_all();
    }

    // The relay side: blocks up to a deadline.

    /// The relay ends: the device delivers what is left, then ends the stream.
    pub fn finish(&self) {
        lock(&self.state).relay_done = true;
        self.cv.notify_all();
        (self.wake)();
    }

    pub fn is_guest_gone(&self) -> bool {
        lock(&self.state).guest_gone
    }

    /// Waits until `ready` holds, the guest goes, the relay is stopped, or the
    /// deadline passes.
    fn wait_for(
        &self,
        deadline: Instant,
        ready: impl Fn(&State) -> bool,
    ) -> io::Result<MutexGuard<'_, State>> {
        let mut st = lock(&self.state);
        loop {
            if ready(&st) {
                return Ok(st);
            }
            if st.guest_gone {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the guest closed the connection",
                ));
            }
            if st.relay_done {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the exchange is over",
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The relay's reading end: guest bytes, each read waiting at most `timeout`.
pub struct PipeReader {
    pub pipe: Arc<Pipe>,
    pub timeout: Duration,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = Instant::now() + self.timeout;
        let mut st = self.pipe.wait_for(deadline, |s| !s.to_host.is_empty())?;
        let n = st.to_host.len().min(buf.len());
        buf[..n].copy_from_slice(&st.to_host[..n]);
        st.to_host.drain(..n);
        drop(st);
        // The device may hold guest bytes that waited for this room.
        (self.pipe.wake)();
        Ok(n)
    }
}

/// The relay's writing end: bytes for the guest, each write waiting at most
/// `timeout` for room (a guest that stops reading ends the exchange).
pub struct PipeWriter {
    pub pipe: Arc<Pipe>,
    pub timeout: Duration,
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = Instant::now() + self.timeout;
        let mut st = self.pipe.wait_for(deadline, |s| s.to_guest.len() < CAP)?;
        let n = (CAP - st.to_guest.len()).min(buf.len());
        st.to_guest.extend_from_slice(&buf[..n]);
        drop(st);
        (self.pipe.wake)();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_direction_is_bounded_and_times_out() {
        let pipe = Pipe::new(Arc::new(|| {}));
        assert_eq!(pipe.input_room(), CAP);
        assert!(pipe.push(&vec![1; CAP]));
        assert_eq!(pipe.input_room(), 0);
        assert!(!pipe.push(b"x"));
        let mut w = PipeWriter {
            pipe: Arc::clone(&pipe),
            timeout: Duration::from_millis(10),
        };
        w.write_all(&vec![2; CAP]).unwrap();
        let e = w.write_all(b"more").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let mut out = Vec::new();
        pipe.take(&mut out, 1000);
        assert_eq!(out.len(), 1000);
        assert!(pipe.held() <= 2 * CAP);
        let mut r = PipeReader {
            pipe: Arc::clone(&pipe),
            timeout: Duration::from_millis(10),
        };
        let mut buf = vec![0; 2 * CAP];
        assert_eq!(r.read(&mut buf).unwrap(), CAP);
        assert_eq!(
            r.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        pipe.guest_closed();
        assert_eq!(
            r.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
