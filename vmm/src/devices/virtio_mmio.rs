//! The virtio-mmio transport, version 2 (modern) only: the register window a guest driver
//! uses to discover a device, negotiate features, hand over its queues and take interrupts.
//!
//! Threads: the vCPU thread calls [`MmioTransport::read`]/[`MmioTransport::write`] on MMIO
//! exits; the device thread drives the device. They share the device behind a mutex, but
//! the hot registers (InterruptStatus and InterruptACK, read and written on every guest
//! interrupt) live in [`Interrupt`] and never take the device lock, so a device busy with a
//! slow request does not stall the vCPU's interrupt handler.
//!
//! QueueNotify normally never reaches this code: the VMM registers [`MmioTransport::queue_evts`]
//! as ioeventfds at `base + 0x50` with the queue index as datamatch. A notify that does
//! arrive here (no ioeventfd) is forwarded to the same EventFd, so both paths look the same
//! to the device thread. Interrupts go out through [`Interrupt::evt`], registered as an irqfd,
//! or through a [`LinePulse`] the VMM sets with [`Interrupt::set_line`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::warn_rate;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio only; legacy (version 1) drivers see a version they refuse.
pub const MMIO_VERSION: u32 = 2;
/// Size of the window the guest is told about on the command line.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, for the ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of InterruptACK: its writes may be coalesced (see [`Interrupt`]).
pub const INTERRUPT_ACK_OFFSET: u64 = VIRTIO_MMIO_INTERRUPT_ACK as u64;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Vendor ID reported to the guest ("IVMM"); drivers do not match on it.
pub const VENDOR_ID: u32 = 0x4d4d_5649;

/// The `virtio_mmio.device=` kernel command-line entry that makes Linux probe a device
/// at `base` with interrupt line `irq`.
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@0x{base:x}:{irq}")
}

/// The interrupt line of one device and the status bits behind it.
///
/// InterruptACK may reach us late: the VMM can register it for coalesced MMIO, so the
/// guest's write costs no exit and is applied at the vCPU's next exit, possibly after
/// the device raised the same bit again. So an ACK clears only bits the driver has
/// read since they were last raised (`fresh` holds the others); a raise is never lost
/// to an ACK that was meant for an earlier one.
pub struct Interrupt {
    bits: Mutex<IrqBits>,
    needs_reset: AtomicBool,
    evt: EventFd,
    /// Raises the line from the raising thread; without it, `evt` (an irqfd) does.
    line: OnceLock<Box<dyn LinePulse>>,
}

/// Raises an edge on an interrupt line, in the calling thread.
///
/// KVM injects an irqfd's IO-APIC interrupt from a kernel worker, not from the
/// thread that wrote the eventfd, so every interrupt would cost a wake-up between the
/// device thread and the vCPU; a pulse from the device thread costs none.
pub trait LinePulse: Send + Sync {
    fn pulse(&self) -> std::io::Result<()>;
}

#[derive(Default)]
struct IrqBits {
    /// InterruptStatus.
    status: u32,
    /// Bits raised since the driver last read InterruptStatus.
    fresh: u32,
}

impl Interrupt {
    fn new() -> std::io::Result<Self> {
        Ok(Interrupt {
            bits: Mutex::new(IrqBits::default()),
            needs_reset: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
            line: OnceLock::new(),
        })
    }

    /// Raise the line with `line` from now on, instead of through the irqfd. Set
    /// once, before the device starts; a second call is ignored.
    pub fn set_line(&self, line: Box<dyn LinePulse>) {
        let _ = self.line.set(line);
    }

    /// The EventFd to register as the irqfd of the device's interrupt line.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Tell the driver that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tell the driver that the configuration (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device hit an error it cannot recover from without a reset (virtio 1.2, 2.1.2):
    /// the driver sees DEVICE_NEEDS_RESET in Status and gets a configuration interrupt.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Current InterruptStatus bits (a look, not the driver's read).
    pub fn status(&self) -> u32 {
        lock(&self.bits).status
    }

    /// The driver reads InterruptStatus: what it sees is what a later ACK may clear.
    fn read_status(&self) -> u32 {
        let mut b = lock(&self.bits);
        b.fresh = 0;
        b.status
    }

    fn raise(&self, bit: u32) {
        {
            let mut b = lock(&self.bits);
            b.status |= bit;
            b.fresh |= bit;
        }
        let raised = match self.line.get() {
            Some(line) => line.pulse(),
            None => self.evt.write(1),
        };
        if let Err(e) = raised {
            log::error!("virtio-mmio: cannot raise the interrupt line: {e}");
        }
    }

    fn ack(&self, bits: u32) {
        let mut b = lock(&self.bits);
        let clear = bits & !b.fresh;
        b.status &= !clear;
    }

    fn clear(&self) {
        *lock(&self.bits) = IrqBits::default();
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Why a device refused to start at DRIVER_OK.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the device needs {expected} queues, the transport has {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} was not made ready by the driver")]
    QueueNotReady(usize),
    #[error("queue {0} has rings outside guest memory or a bad size")]
    QueueInvalid(usize),
}

/// What a device behind the transport provides. The device owns its queues; the transport
/// configures them while the driver sets the device up and hands the device guest memory
/// and its interrupt at DRIVER_OK.
pub trait VirtioDevice: Send {
    /// The virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;
    /// Every feature bit the device offers, transport bits (VERSION_1, EVENT_IDX) included.
    fn avail_features(&self) -> u64;
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the negotiated features.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Back to the state before the driver touched the device: queues reset, memory and
    /// interrupt dropped, device state (connections) dropped.
    fn reset(&mut self);
}

/// Error creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create an eventfd for the virtio-mmio transport: {0}")]
    EventFd(std::io::Error),
}

/// The register window of one virtio-mmio device.
pub struct MmioTransport<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    /// Guest accesses we ignored as invalid; for tests and diagnostics.
    bad_accesses: u64,
    /// Features or a start the device refused; a guest can repeat them at will, so
    /// their warnings are rate-limited too.
    refusals: u64,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: Arc<Mutex<D>>, mem: GuestMemoryMmap) -> Result<Self, TransportError> {
        let nqueues = lock(&device).queues().len();
        let queue_evts = (0..nqueues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new().map_err(TransportError::EventFd)?),
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            bad_accesses: 0,
            refusals: 0,
        })
    }

    /// One EventFd per queue, in queue order: register each as an ioeventfd at
    /// `base + QUEUE_NOTIFY_OFFSET` with datamatch = its index, and poll it on the device thread.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt line; `interrupt().evt()` is the irqfd to register.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &Arc<Mutex<D>> {
        &self.device
    }

    /// The Status register as the driver would read it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        s
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// A guest read of `data.len()` bytes at `offset` inside the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad_access("read", offset, data.len());
            data.fill(0);
            return;
        }
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.with_queue(|q| q.max_size() as u32).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_READY => self.with_queue(|q| q.ready() as u32).unwrap_or(0),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.read_status(),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions: length all ones means "absent" (virtio 1.2, 4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The config space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                self.bad_access("read", offset, data.len());
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` inside the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access("write", offset, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            self.bad_access("write", offset, data.len());
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(v) {
                // An invalid size is logged by the queue and leaves the old one in place.
                Ok(size) => self.setup_queue(offset, |q| q.set_size(size)),
                Err(_) => self.bad_access("queue size over 65535", offset, 4),
            },
            VIRTIO_MMIO_QUEUE_READY => self.setup_queue(offset, |q| q.set_ready(v == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.setup_queue(offset, |q| q.set_desc_table_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.setup_queue(offset, |q| q.set_desc_table_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.setup_queue(offset, |q| q.set_avail_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.setup_queue(offset, |q| q.set_avail_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.setup_queue(offset, |q| q.set_used_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.setup_queue(offset, |q| q.set_used_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.bad_access("write", offset, data.len()),
        }
    }

    fn with_queue<T>(&self, f: impl FnOnce(&Queue) -> T) -> Option<T> {
        lock(&self.device)
            .queues()
            .get(self.queue_sel as usize)
            .map(f)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK, and not on a
    /// queue the driver already made ready (except to un-ready it).
    fn setup_queue(&mut self, offset: u64, f: impl FnOnce(&mut Queue)) {
        let in_setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let sel = self.queue_sel as usize;
        let applied = {
            let mut dev = lock(&self.device);
            match dev.queues_mut().get_mut(sel) {
                Some(q) if in_setup && (!q.ready() || offset == VIRTIO_MMIO_QUEUE_READY as u64) => {
                    f(q);
                    true
                }
                _ => false,
            }
        };
        if !applied {
            self.bad_access("queue setup write", offset, 4);
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if !negotiating {
            self.bad_access(
                "driver features write",
                VIRTIO_MMIO_DRIVER_FEATURES as u64,
                4,
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            // Higher feature words do not exist; a set bit there is refused at FEATURES_OK.
            _ if v != 0 => self.acked_features |= 1 << 63,
            _ => {}
        }
    }

    fn notify(&mut self, queue: u32) {
        match self.queue_evts.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: cannot signal queue {queue} eventfd: {e}");
                }
            }
            None => self.bad_access("notify of a queue that does not exist", queue as u64, 4),
        }
    }

    /// Status only ever gains bits, in the order the spec gives (3.1.1); 0 resets.
    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            self.bad_access("status write clearing bits", VIRTIO_MMIO_STATUS as u64, 4);
            return;
        }
        let added = v & !old;
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED;
        if added & !known != 0 {
            self.bad_access(
                "status write with unknown bits",
                VIRTIO_MMIO_STATUS as u64,
                4,
            );
            return;
        }
        let has = |bits: u32| v & bits == bits;
        if added & VIRTIO_CONFIG_S_DRIVER != 0 && !has(VIRTIO_CONFIG_S_ACKNOWLEDGE) {
            return self.bad_access("DRIVER before ACKNOWLEDGE", VIRTIO_MMIO_STATUS as u64, 4);
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if !has(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) {
                return self.bad_access("FEATURES_OK before DRIVER", VIRTIO_MMIO_STATUS as u64, 4);
            }
            if !self.features_acceptable() {
                // Leaving FEATURES_OK clear is how the device refuses (3.1.1 step 6).
                self.refusals += 1;
                warn_rate(
                    self.refusals,
                    format_args!(
                        "virtio-mmio: driver features {:#x} refused (offered {:#x}, VERSION_1 required)",
                        self.acked_features,
                        lock(&self.device).avail_features()
                    ),
                );
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK & !VIRTIO_CONFIG_S_DRIVER_OK;
                return;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if !has(VIRTIO_CONFIG_S_FEATURES_OK) {
                return self.bad_access(
                    "DRIVER_OK before FEATURES_OK",
                    VIRTIO_MMIO_STATUS as u64,
                    4,
                );
            }
            self.status = v;
            let activated = lock(&self.device).activate(
                self.mem.clone(),
                self.acked_features,
                self.interrupt.clone(),
            );
            if let Err(e) = activated {
                self.refusals += 1;
                warn_rate(
                    self.refusals,
                    format_args!("virtio-mmio: device not started at DRIVER_OK: {e}"),
                );
                self.interrupt.set_needs_reset();
            }
            return;
        }
        self.status = v;
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.interrupt.clear();
        // Stale notifies would only wake the device thread for nothing; drain them.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn bad_access(&mut self, what: &str, offset: u64, len: usize) {
        self.bad_accesses += 1;
        if self.bad_accesses.is_power_of_two() {
            log::warn!(
                "virtio-mmio: ignored guest {what} at offset {offset:#x} ({len} bytes, status {:#x}); {} so far",
                self.status,
                self.bad_accesses
            );
        }
    }
}

/// Locks a device mutex. A poisoned lock means a device thread panicked mid-update; the
/// device state is still memory-safe, and the transport must keep answering the guest.
pub fn lock<D: ?Sized>(m: &Mutex<D>) -> MutexGuard<'_, D> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fresh queues with the given maximum sizes, for a device constructor.
pub fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&m| Queue::new(m).expect("queue max size must be a power of two <= 32768"))
        .collect()
}

/// The bus routes the transport's MMIO window to it.
impl<D: VirtioDevice> super::bus::MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_clears_only_what_the_driver_read() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn a_late_ack_does_not_swallow_a_later_raise() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        let seen = irq.read_status();
        // The guest's ACK is queued (coalesced MMIO); the device raises again
        // before the VMM applies it.
        irq.signal_used_queue();
        irq.ack(seen);
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING, "the second raise");
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn an_ack_applied_after_the_next_read_is_harmless() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        let first = irq.read_status();
        irq.signal_used_queue();
        // Read for the second interrupt before the first ACK is applied: the guest
        // sees the bit and looks at its queues; then both ACKs land.
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_VRING);
        irq.ack(first);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), 0);
        irq.signal_config_change();
        assert_eq!(irq.read_status(), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn a_set_line_raises_instead_of_the_irqfd() {
        use std::sync::atomic::AtomicUsize;
        struct Count(Arc<AtomicUsize>);
        impl LinePulse for Count {
            fn pulse(&self) -> std::io::Result<()> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        assert_eq!(
            irq.evt().read().unwrap(),
            1,
            "the irqfd until a line is set"
        );
        let pulses = Arc::new(AtomicUsize::new(0));
        irq.set_line(Box::new(Count(pulses.clone())));
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(pulses.load(Ordering::SeqCst), 2);
        assert!(irq.evt().read().is_err(), "nothing more on the irqfd");
        assert_eq!(
            irq.read_status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
    }

    #[test]
    fn cmdline_entry_has_the_linux_format() {
        assert_eq!(
            cmdline_entry(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
