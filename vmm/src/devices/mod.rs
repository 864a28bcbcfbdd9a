//! What the guest can touch: serial console, i8042 reset, the status port, and the
//! virtio-mmio vsock that is its only egress.

pub mod bus;
pub mod console;
pub mod console_input;
pub mod i8042;
pub mod status_port;
pub mod virtio_mmio;
pub mod vsock;

/// Guest-triggered warnings are logged at 1, 2, 4, 8... occurrences, so a guest cannot
/// flood the host's log.
pub fn warn_rate(count: u64, msg: std::fmt::Arguments<'_>) {
    if count.is_power_of_two() {
        log::warn!("{msg} (occurrence {count})");
    }
}
