//! The gate behind vsock port 1: each guest connection to port 1 gets its own
//! `Connection`, fed by the vsock device through `StreamHandler`.
//!
//! Flow control: the device stops feeding a handler while its replies wait for the
//! guest. A `Connection` itself stops taking frames once `max_output` reply bytes are
//! pending and keeps the rest (`has_backlog`); `poll` goes on with them, so the device
//! must call `poll` again when the guest has read (as well as after a wake-up).
//! When the audit log fails, the connection is reset and `fatal_evt` (if given) is
//! written so that the VMM stops the VM; `Gate::fatal` says why.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{Connection, ConnectionError, Gate};
use crate::devices::vsock::{PortListener, StreamError, StreamHandler};

/// The host port of tool calls (architecture.md).
pub const TOOLS_PORT: u32 = 1;

/// Accepts guest connections to port 1; refuses every other port (RST).
pub struct GateListener {
    gate: Arc<Gate>,
    fatal_evt: Option<Arc<EventFd>>,
}

impl GateListener {
    /// `fatal_evt` is written once the audit log fails (the VMM must then stop).
    pub fn new(gate: Arc<Gate>, fatal_evt: Option<EventFd>) -> Self {
        GateListener {
            gate,
            fatal_evt: fatal_evt.map(Arc::new),
        }
    }

    /// A handler for one connection from `guest_port`, for listeners that serve
    /// several ports and delegate port 1 here.
    pub fn stream(&self, guest_port: u32) -> GateStream {
        GateStream {
            conn: Connection::new(Arc::clone(&self.gate), format!("vsock:{guest_port}")),
            fatal_evt: self.fatal_evt.clone(),
        }
    }
}

impl PortListener for GateListener {
    fn accept(&mut self, host_port: u32, guest_port: u32) -> Option<Box<dyn StreamHandler>> {
        (host_port == TOOLS_PORT)
            .then(|| Box::new(self.stream(guest_port)) as Box<dyn StreamHandler>)
    }
}

/// One guest connection to the gate.
pub struct GateStream {
    conn: Connection,
    fatal_evt: Option<Arc<EventFd>>,
}

impl GateStream {
    fn check(&self, r: Result<(), ConnectionError>) -> Result<(), StreamError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                if let (ConnectionError::AuditFailed(_), Some(evt)) = (&e, &self.fatal_evt) {
                    let _ = evt.write(1);
                }
                Err(StreamError(format!("{}: {e}", self.conn.id())))
            }
        }
    }
}

impl StreamHandler for GateStream {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        let r = self.conn.on_data(data, out);
        self.check(r)
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if !self.conn.has_backlog() {
            return Ok(());
        }
        let r = self.conn.resume(out);
        self.check(r)
    }

    fn on_close(&mut self) {
        self.conn.on_close();
    }
}
