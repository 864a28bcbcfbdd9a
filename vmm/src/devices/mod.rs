//! What the guest can touch: serial console, i8042 reset, the status port, and the
//! virtio-mmio vsock that is its only egress.

pub mod bus;
pub mod console;
pub mod console_input;
pub mod i8042;
pub mod status_port;
pub mod virtio_mmio;
pub mod vsock;
