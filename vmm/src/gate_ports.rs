//! Which vsock ports the guest may connect to, and what serves them: port 1 is the
//! gate (tool calls). Network egress on port 2 is not built yet, so it is refused
//! like every other port (RST).
//!
//! Flow control: the device feeds a handler only while the replies it holds for the
//! guest are under its limit. A `Connection` itself stops taking frames once
//! `max_output` reply bytes are in `out` and keeps the rest (`has_backlog`); `poll`
//! goes on with them. So the device must call `poll` when a connection's output has
//! drained, not only after a wake-up. Never loop on `resume` until the backlog is
//! gone: with `out` full it takes nothing, so such a loop spins, and if it did take
//! frames it would undo the bound on memory.

use std::sync::Arc;

use crate::devices::vsock::{PortListener, StreamError, StreamHandler};
use crate::gate::{Connection, Gate};
pub use ironvmm_wire::TOOLS_PORT;

/// Accepts guest connections for the VM's gate.
pub struct GatePorts {
    gate: Arc<Gate>,
    next_conn: u64,
}

impl GatePorts {
    pub fn new(gate: Arc<Gate>) -> Self {
        GatePorts { gate, next_conn: 0 }
    }
}

impl PortListener for GatePorts {
    fn accept(&mut self, host_port: u32, guest_port: u32) -> Option<Box<dyn StreamHandler>> {
        if host_port != TOOLS_PORT {
            return None;
        }
        self.next_conn += 1;
        // The guest port alone can repeat across connections; the counter cannot.
        let id = format!("vsock:{guest_port}#{}", self.next_conn);
        Some(Box::new(GateStream(Connection::new(self.gate.clone(), id))))
    }
}

/// One guest connection to the gate. An audit-log failure resets it; the VMM learns
/// of the failure from `Gate::fatal` and stops the VM.
struct GateStream(Connection);

impl StreamHandler for GateStream {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0
            .on_data(data, out)
            .map_err(|e| StreamError(format!("{}: {e}", self.0.id())))
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if !self.0.has_backlog() {
            return Ok(());
        }
        self.0
            .resume(out)
            .map_err(|e| StreamError(format!("{}: {e}", self.0.id())))
    }

    fn has_pending_output(&self) -> bool {
        self.0.has_backlog()
    }

    fn on_close(&mut self) {
        self.0.on_close();
    }
}
