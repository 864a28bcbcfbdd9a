//! Which vsock ports the guest may connect to, and what serves them: port 1 is the
//! gate (tool calls); port 2 is network egress (the guest's HTTP proxy relays its
//! connections there), served only when the image enables the proxy. Every other
//! port is refused (RST).
//!
//! The device thread only moves bytes: `on_data` frames them and starts calls,
//! which run on the gate's workers. A finished call writes the device's waker; the
//! device then calls `poll` on every handler, which collects the replies. The device
//! feeds a handler at most `input_room` bytes: a connection at its in-flight bound,
//! or with replies the guest does not read, takes none, and the guest runs out of
//! credit.
//!
//! On port 2 the same seam carries raw bytes: a relay thread per connection
//! (`services::net`) parses, decides and talks to servers, and hands bytes over
//! through a bounded pipe, so the device thread never waits there either.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::vsock::{PortListener, StreamError, StreamHandler};
use crate::gate::inflight::Wake;
use crate::gate::{Connection, Gate};
use crate::services::net::{NetService, NetStream};
pub use ironvmm_wire::{NET_PORT, TOOLS_PORT};

/// Accepts guest connections for the VM's gate.
pub struct GatePorts {
    gate: Arc<Gate>,
    /// Port 2, when the image enables the proxy.
    net: Option<Arc<NetService>>,
    next_conn: u64,
    wake: Wake,
}

impl GatePorts {
    pub fn new(gate: Arc<Gate>) -> Self {
        GatePorts {
            gate,
            net: None,
            next_conn: 0,
            // Replaced by the device's waker when the device is built.
            wake: Arc::new(|| {}),
        }
    }

    /// Serves network egress on port 2 through `net`.
    pub fn with_net(mut self, net: Arc<NetService>) -> Self {
        self.net = Some(net);
        self
    }
}

impl PortListener for GatePorts {
    fn accept(&mut self, host_port: u32, guest_port: u32) -> Option<Box<dyn StreamHandler>> {
        if host_port == NET_PORT {
            let net = self.net.as_ref()?;
            self.next_conn += 1;
            let id = format!("net:{guest_port}#{}", self.next_conn);
            let stream = net.accept(id, Arc::clone(&self.wake))?;
            return Some(Box::new(NetHandler(stream)));
        }
        if host_port != TOOLS_PORT {
            return None;
        }
        self.next_conn += 1;
        // The guest port alone can repeat across connections; the counter cannot.
        let id = format!("vsock:{guest_port}#{}", self.next_conn);
        let conn = Connection::new(self.gate.clone(), id, Arc::clone(&self.wake));
        Some(Box::new(GateStream(conn)))
    }

    fn use_waker(&mut self, waker: Arc<EventFd>) {
        self.wake = Arc::new(move || {
            // Only fails when the counter would overflow: the device is awake then.
            let _ = waker.write(1);
        });
    }
}

/// One guest connection to the gate. An audit-log failure resets it; the VMM learns
/// of the failure from the audit log's failure hook and stops the VM.
struct GateStream(Connection);

impl StreamHandler for GateStream {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0
            .on_data(data, out)
            .map_err(|e| StreamError(format!("{}: {e}", self.0.id())))
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0
            .poll(out)
            .map_err(|e| StreamError(format!("{}: {e}", self.0.id())))
    }

    fn has_pending_output(&self) -> bool {
        self.0.has_pending_output()
    }

    fn input_room(&self) -> usize {
        self.0.input_room()
    }

    fn on_close(&mut self) {
        self.0.on_close();
    }
}

/// One guest connection to port 2.
struct NetHandler(NetStream);

impl StreamHandler for NetHandler {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0
            .on_data(data, out)
            .map_err(|e| StreamError(e.to_string()))
    }

    fn poll(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.0.poll(out);
        Ok(())
    }

    fn has_pending_output(&self) -> bool {
        self.0.has_pending_output()
    }

    fn input_room(&self) -> usize {
        self.0.input_room()
    }

    fn finished(&self) -> bool {
        self.0.finished()
    }

    fn on_close(&mut self) {
        self.0.on_close();
    }
}
