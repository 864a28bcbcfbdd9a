//! Which vsock ports the guest may connect to, and what serves them: port 1 is the
//! gate (tool calls). Network egress on port 2 is not built yet, so it is refused
//! like every other port (RST).

use std::sync::Arc;

use super::{Connection, Gate};
use crate::devices::vsock::{PortListener, StreamError, StreamHandler};

pub const TOOLS_PORT: u32 = 1;

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
        let id = format!("vsock:{guest_port}#{}", self.next_conn);
        Some(Box::new(GateStream(Connection::new(self.gate.clone(), id))))
    }
}

/// One guest connection to the gate.
struct GateStream(Connection);

impl StreamHandler for GateStream {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0
            .on_data(data, out)
            .map_err(|e| StreamError(e.to_string()))?;
        // The device bounds what it buffers for the guest and stops feeding us past
        // that, so the gate's held-back output can be handed over now.
        while self.0.has_backlog() {
            self.0.resume(out).map_err(|e| StreamError(e.to_string()))?;
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.0.has_backlog() {
            self.0.resume(out).map_err(|e| StreamError(e.to_string()))?;
        }
        Ok(())
    }

    fn on_close(&mut self) {
        self.0.on_close();
    }
}
