//! One guest connection to the gate, as its transport drives it.
//!
//! The transport feeds bytes (`on_data`, at most `input_room` of them) and collects
//! replies (`poll`). Nothing here parses JSON, and nothing blocks: bytes are framed,
//! and each complete frame, copied out with an in-flight slot, goes to the gate's
//! workers, which parse, check and answer it (`Gate::take_frame`). Replies come back
//! later, in any order, after the transport's `Wake` is called. Framing stays here:
//! a frame over the limit and input past the buffer are refused (and the connection
//! reset) without any frame being parsed. See `inflight` for the bounds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::frame::{FrameError, Framer};
use super::inflight::{Inflight, Wake};
use super::{rpc, Gate};

/// Why a connection must be reset. Any reply lines already appended to `out`
/// (including the error reply that explains the reset) should still be sent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionError {
    /// A frame, or the unterminated start of one, passed the limit.
    FrameTooLong { limit: usize },
    /// The peer sent more than `max_buffered` bytes that could not be processed yet
    /// (the transport gave more than `input_room`).
    Backlog { limit: usize },
    /// The audit log failed: the VMM must stop the VM (exit 125). `Gate::fatal` says the same.
    AuditFailed(String),
    /// The connection was already reset or closed.
    Closed,
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::FrameTooLong { limit } => {
                write!(f, "a frame is over the limit of {limit} bytes")
            }
            ConnectionError::Backlog { limit } => write!(
                f,
                "over {limit} bytes of input wait behind calls and replies the peer does not read"
            ),
            ConnectionError::AuditFailed(m) => write!(f, "{m}"),
            ConnectionError::Closed => f.write_str("the connection is closed"),
        }
    }
}

impl std::error::Error for ConnectionError {}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Framing failed (a frame over the limit, a backlog): no more input is taken.
    /// The frames handed over before it are still answered, then the error reply
    /// is written and the connection reset.
    Resetting(FrameError),
    /// Reset by us (bad frame, audit failure) or closed by the peer.
    Closed,
}

/// One guest connection to port 1 (or one client of the host-only gate).
pub struct Connection {
    gate: Arc<Gate>,
    calls: Arc<Inflight>,
    framer: Framer,
    state: State,
}

impl Connection {
    /// `wake` is called (from any thread) when replies are ready to be collected
    /// with `poll`, or when a bound that stopped this connection has room again.
    pub fn new(gate: Arc<Gate>, conn_id: String, wake: Wake) -> Self {
        let limits = gate.limits();
        let framer = Framer::new(limits.max_frame, limits.max_buffered);
        let calls = Inflight::new(
            conn_id,
            limits.max_inflight_per_conn,
            Arc::clone(gate.vm_slots()),
            wake,
        );
        Connection {
            gate,
            calls,
            framer,
            state: State::Open,
        }
    }

    /// A connection whose transport collects replies by waiting on it
    /// (`wait_ready`) rather than being woken.
    pub fn unwoken(gate: Arc<Gate>, conn_id: String) -> Self {
        Self::new(gate, conn_id, Arc::new(|| {}))
    }

    pub fn id(&self) -> &str {
        self.calls.conn()
    }

    /// How many bytes `on_data` takes now: none while a complete frame waits for
    /// room (in-flight bounds, unsent replies). A transport that stops reading at
    /// zero lets its flow control push back on the peer.
    pub fn input_room(&self) -> usize {
        if self.state != State::Open || self.framer.has_frame() {
            0
        } else {
            self.framer.room()
        }
    }

    /// Bytes from the peer. Frames that complete are handed to the gate's workers
    /// while the bounds allow; the rest wait for `poll`. Their replies come through
    /// `poll`, never into `out` here: `out` only gets the error reply of a reset.
    /// More input than the connection can hold is `Backlog`.
    /// `Err` means: send what is in `out`, then reset this connection.
    pub fn on_data(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        match self.state {
            State::Open => {}
            // Input after the frame that ends the connection is never read.
            State::Resetting(_) => return self.process(out),
            State::Closed => return Err(ConnectionError::Closed),
        }
        // Input is taken in pieces that fit the buffer, each processed before the
        // next, so only input that truly waits counts.
        loop {
            let take = data.len().min(self.framer.room());
            if take == 0 && !data.is_empty() {
                let limits = self.gate.limits();
                let limit = limits.max_buffered.max(limits.max_frame);
                return self.reset(FrameError::Backlog { limit }, out);
            }
            if let Err(e) = self.framer.feed(&data[..take]) {
                return self.reset(e, out);
            }
            data = &data[take..];
            self.process(out)?;
            if data.is_empty() || self.state != State::Open {
                return Ok(());
            }
        }
    }

    /// Collects finished replies into `out` and goes on with waiting frames. Call it
    /// after a wake, and whenever the peer has read what was sent.
    pub fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        if self.state == State::Closed {
            return Err(ConnectionError::Closed);
        }
        self.calls.take_ready(out, self.gate.limits().max_output);
        self.process(out)
    }

    /// Whether something is still to come out of `poll`: replies ready or frames in
    /// flight, frames waiting for room, or the error reply of a reset.
    pub fn has_pending_output(&self) -> bool {
        match self.state {
            State::Open => self.calls.held() > 0 || self.framer.has_frame(),
            State::Resetting(_) => true,
            State::Closed => false,
        }
    }

    /// Frames handed over and not yet collected (being parsed, calls running or
    /// parked, or answered).
    pub fn in_flight(&self) -> usize {
        self.calls.held()
    }

    /// Blocks up to `timeout` until a reply is ready for `poll`, or nothing is left in
    /// flight.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.calls.wait_ready(timeout)
    }

    fn process(&mut self, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        if let State::Resetting(e) = self.state {
            if self.calls.held() == 0 {
                return Err(self.end(e, out));
            }
            return Ok(());
        }
        let max_output = self.gate.limits().max_output;
        while out.len() < max_output && self.framer.has_frame() {
            // The slot is taken before the frame leaves the framer, so every frame
            // counts against the bounds (and `input_room`) until its reply is sent.
            let Some(slot) = self.calls.try_slot() else {
                break;
            };
            match self.framer.next_frame() {
                None => break,
                // Copied out, so the framer's buffer is free for the next bytes; the
                // slot bounds how many copies wait for a worker.
                Some(Ok(frame)) => self.gate.take_frame(slot, frame.to_vec()),
                Some(Err(e)) => return self.reset(e, out),
            }
        }
        // An unfinished frame over the limit is refused as soon as it is seen.
        if !self.framer.has_frame() {
            if let Some(Err(e)) = self.framer.next_frame() {
                return self.reset(e, out);
            }
        }
        if let Some(f) = self.gate.fatal() {
            // Every call is being denied now. Once those in flight are answered,
            // the connection ends.
            if self.calls.held() == 0 {
                self.close();
                return Err(ConnectionError::AuditFailed(f));
            }
        }
        Ok(())
    }

    /// A framing error: the connection takes no more input, and is reset (with an
    /// error reply) once the frames already handed over are answered, so that they
    /// are answered as if they had been read alone. Their replies and the reset then
    /// come from `poll`.
    fn reset(&mut self, e: FrameError, out: &mut Vec<u8>) -> Result<(), ConnectionError> {
        // Input held behind the bad frame is never read: free it now.
        self.framer = Framer::new(0, 0);
        self.state = State::Resetting(e);
        self.process(out)
    }

    /// Ends the connection for a framing error, with its error reply.
    fn end(&mut self, e: FrameError, out: &mut Vec<u8>) -> ConnectionError {
        self.close();
        let (m, err) = match e {
            FrameError::TooLong { limit } => (
                format!("Invalid Request: frame over the limit of {limit} bytes"),
                ConnectionError::FrameTooLong { limit },
            ),
            FrameError::Backlog { limit } => (
                format!(
                    "Invalid Request: over {limit} bytes of requests wait behind unread replies"
                ),
                ConnectionError::Backlog { limit },
            ),
        };
        rpc::error(out, &Value::Null, rpc::INVALID_REQUEST, &m, None);
        err
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.framer = Framer::new(0, 0);
        self.calls.close();
    }

    /// The peer closed (or reset) the connection. An unfinished frame is dropped
    /// undecided: nothing of it reached the policy or a service. So are frames still
    /// waiting, and replies not yet collected: nobody would read them. Calls already
    /// running finish (and are audited); their replies are dropped.
    pub fn on_close(&mut self) {
        self.close();
    }

    /// Unprocessed input held (bounded by `max_buffered`).
    pub fn pending_bytes(&self) -> usize {
        self.framer.buffered()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.calls.close();
    }
}
