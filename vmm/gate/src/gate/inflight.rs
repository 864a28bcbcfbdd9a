//! Calls in flight: the bounds on them and the way their replies come back.
//!
//! A connection takes a `Slot` before it hands a frame to the gate. The frame carries
//! its slot to a worker (and a call on into the parked table, if asked) and hands it
//! back with its reply (`Slot::complete`); the reply then waits in the connection's
//! `Inflight` until the transport collects it, and only then is the slot free. A
//! frame that gets no reply (a notification) frees its slot at once
//! (`Slot::release`). So a peer that does not read holds its slots, and at the bound
//! its connection stops taking frames: the transport stops reading, and credit flow
//! (or the socket buffer) pushes back.
//!
//! Two bounds: per connection (`max_inflight_per_conn`) and per VM (`max_inflight`).
//! They also bound the memory of finished replies waiting to be sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// How a connection's transport is told that replies are ready (or that the VM's
/// in-flight bound has room again). Must not block: the vsock device writes its
/// waker eventfd.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VM-wide in-flight bound, shared by all connections of one gate.
pub struct VmSlots {
    used: AtomicUsize,
    max: usize,
    /// Connections that stopped at this bound, woken when a slot frees up.
    blocked: Mutex<Vec<Weak<Inflight>>>,
}

impl VmSlots {
    pub fn new(max: usize) -> Arc<VmSlots> {
        Arc::new(VmSlots {
            used: AtomicUsize::new(0),
            max: max.max(1),
            blocked: Mutex::new(Vec::new()),
        })
    }

    /// Calls in flight in the whole VM.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        if before < self.max {
            return; // nobody can have been refused since
        }
        let waiting = std::mem::take(&mut *lock(&self.blocked));
        for w in waiting.iter().filter_map(Weak::upgrade) {
            (w.wake)();
        }
    }
}

struct State {
    /// Slots held: calls running, parked, or answered and not yet collected.
    held: usize,
    /// Finished reply lines, oldest first.
    ready: VecDeque<Vec<u8>>,
    closed: bool,
}

/// One connection's calls in flight, shared by the connection and the threads that
/// finish its calls.
pub struct Inflight {
    conn: String,
    max: usize,
    vm: Arc<VmSlots>,
    wake: Wake,
    state: Mutex<State>,
    ready_cv: Condvar,
}

impl Inflight {
    pub fn new(conn: String, max: usize, vm: Arc<VmSlots>, wake: Wake) -> Arc<Inflight> {
        Arc::new(Inflight {
            conn,
            max: max.max(1),
            vm,
            wake,
            state: Mutex::new(State {
                held: 0,
                ready: VecDeque::new(),
                closed: false,
            }),
            ready_cv: Condvar::new(),
        })
    }

    pub fn conn(&self) -> &str {
        &self.conn
    }

    /// A slot for the next frame, or `None` at a bound (the connection is then woken
    /// when one frees up).
    pub fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        let mut st = lock(&self.state);
        if st.closed || st.held >= self.max {
            return None;
        }
        if !self.vm.try_take() {
            // Registered before the lock is dropped, so a slot freed meanwhile
            // still finds us (give_back takes the list after decrementing).
            let me = Arc::downgrade(self);
            let mut blocked = lock(&self.vm.blocked);
            if !blocked.iter().any(|w| w.ptr_eq(&me)) {
                blocked.push(me);
            }
            drop(blocked);
            drop(st);
            // A slot may have been freed between try_take and the push.
            if self.vm.used() < self.vm.max {
                (self.wake)();
            }
            return None;
        }
        st.held += 1;
        Some(Slot {
            calls: Some(Arc::clone(self)),
        })
    }

    /// Slots held by this connection.
    pub fn held(&self) -> usize {
        lock(&self.state).held
    }

    /// Whether finished replies wait to be collected.
    pub fn has_ready(&self) -> bool {
        !lock(&self.state).ready.is_empty()
    }

    /// Moves finished replies into `out` while it is under `max_output`; each frees
    /// its slot. Returns how many were moved.
    pub fn take_ready(&self, out: &mut Vec<u8>, max_output: usize) -> usize {
        let mut st = lock(&self.state);
        let mut n = 0;
        while out.len() < max_output {
            let Some(r) = st.ready.pop_front() else { break };
            out.extend_from_slice(&r);
            n += 1;
        }
        st.held -= n;
        drop(st);
        self.vm.give_back(n);
        n
    }

    /// Waits up to `timeout` for a finished reply, or for nothing to be left in
    /// flight (a frame that gets no reply gives its slot back without one); true
    /// when a reply is there.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let st = lock(&self.state);
        let (st, _) = self
            .ready_cv
            .wait_timeout_while(st, timeout, |s| {
                s.ready.is_empty() && !s.closed && s.held > 0
            })
            .unwrap_or_else(|e| e.into_inner());
        !st.ready.is_empty()
    }

    /// The connection is gone: replies waiting are dropped and their slots freed;
    /// calls still running free theirs when they finish.
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        let n = st.ready.len();
        st.ready.clear();
        st.held -= n;
        drop(st);
        self.ready_cv.notify_all();
        self.vm.give_back(n);
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }
}

/// A place within the in-flight bounds, taken for one frame. The frame hands it back
/// with its reply (`complete`), or without one (`release`, or dropped: a
/// notification, a response sent by the client, a call dropped at shutdown).
pub struct Slot {
    calls: Option<Arc<Inflight>>,
}

impl Slot {
    pub fn conn(&self) -> &str {
        self.calls.as_ref().map_or("", |c| c.conn())
    }

    /// Whether the connection is gone (nobody would read a reply).
    pub fn is_closed(&self) -> bool {
        self.calls.as_ref().is_none_or(|c| c.is_closed())
    }

    /// The call's reply: it waits for the transport, holding the slot until then.
    pub fn complete(mut self, reply: Vec<u8>) {
        let Some(calls) = self.calls.take() else {
            return;
        };
        let mut st = lock(&calls.state);
        if st.closed {
            st.held -= 1;
            drop(st);
            calls.vm.give_back(1);
            return;
        }
        let was_empty = st.ready.is_empty();
        st.ready.push_back(reply);
        drop(st);
        calls.ready_cv.notify_all();
        // One wake per batch: the transport takes every ready reply when it polls.
        if was_empty {
            (calls.wake)();
        }
    }

    /// The frame gets no reply: its place is free at once.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(calls) = self.calls.take() {
            let mut st = lock(&calls.state);
            st.held -= 1;
            drop(st);
            calls.ready_cv.notify_all();
            calls.vm.give_back(1);
            // Someone may wait for this very slot: a frame at the bound, or a
            // transport waiting for the last frame in flight before it ends the
            // connection (the peer half-closed, the audit log failed, a reset).
            (calls.wake)();
        }
    }
}
