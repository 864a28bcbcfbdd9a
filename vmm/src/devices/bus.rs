//! Routes the vCPUs' port and MMIO exits to devices. An access to nothing is
//! ignored, reads as all ones, and is counted: never a panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleOut;
use super::i8042::I8042;
use super::status_port::StatusPort;
use crate::vm_event::{EventSender, VmEvent};

/// The 16550 UART's eight registers, where Linux's `ttyS0` looks for them.
pub const SERIAL_PORT: u16 = 0x3f8;
/// The i8042's data and command ports (only its reset line matters here).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// A device in the MMIO space (virtio-mmio transports).
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Raises an interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's reset line: the guest asked to reboot, which for a micro-VM means stop.
pub struct ResetTrigger(pub EventSender);

impl Trigger for ResetTrigger {
    type E = std::sync::mpsc::SendError<VmEvent>;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0
            .send(VmEvent::Reset("the guest reset through the i8042".into()))
    }
}

pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>;

struct MmioRange {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

pub struct Bus {
    pub serial: Arc<Mutex<SerialDevice>>,
    i8042: Mutex<I8042<ResetTrigger, IrqTrigger>>,
    pub status: StatusPort,
    mmio: Vec<MmioRange>,
    unknown_pio: AtomicU64,
    unknown_mmio: AtomicU64,
    /// Every port and MMIO exit that reached userspace: the cost benchmarks report.
    pio_exits: AtomicU64,
    mmio_exits: AtomicU64,
    /// MMIO writes KVM queued without an exit (coalesced MMIO), handed over later.
    queued_writes: AtomicU64,
}

impl Bus {
    pub fn new(
        serial: SerialDevice,
        kbd_irq: IrqTrigger,
        events: EventSender,
        status: StatusPort,
    ) -> Self {
        Bus {
            serial: Arc::new(Mutex::new(serial)),
            i8042: Mutex::new(I8042::new(ResetTrigger(events), kbd_irq)),
            status,
            mmio: Vec::new(),
            unknown_pio: AtomicU64::new(0),
            unknown_mmio: AtomicU64::new(0),
            pio_exits: AtomicU64::new(0),
            mmio_exits: AtomicU64::new(0),
            queued_writes: AtomicU64::new(0),
        }
    }

    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) {
        self.mmio.push(MmioRange { base, len, dev });
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio_exits.fetch_add(1, Ordering::Relaxed);
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            super::status_port::PORT => self.status.read(data),
            _ => {
                self.unknown_pio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio_exits.fetch_add(1, Ordering::Relaxed);
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                // A console write error is the sink's problem, not the guest's.
                let _ = lock(&self.serial).write((p - SERIAL_PORT) as u8, data[0]);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]);
            }
            super::status_port::PORT => self.status.write(data),
            _ => {
                self.unknown_pio.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn find_mmio(&self, addr: u64, len: usize) -> Option<(&MmioRange, u64)> {
        self.mmio.iter().find_map(|r| {
            let off = addr.checked_sub(r.base)?;
            (off.checked_add(len as u64)? <= r.len).then_some((r, off))
        })
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        match self.find_mmio(addr, data.len()) {
            Some((r, off)) => lock(&r.dev).read(off, data),
            None => {
                self.unknown_mmio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        self.dispatch_write(addr, data);
    }

    /// A write the guest made without an exit (KVM's coalesced-MMIO ring).
    pub fn mmio_write_queued(&self, addr: u64, data: &[u8]) {
        self.queued_writes.fetch_add(1, Ordering::Relaxed);
        self.dispatch_write(addr, data);
    }

    fn dispatch_write(&self, addr: u64, data: &[u8]) {
        match self.find_mmio(addr, data.len()) {
            Some((r, off)) => lock(&r.dev).write(off, data),
            None => {
                self.unknown_mmio.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Userspace exits so far: (port I/O, MMIO).
    pub fn exits(&self) -> (u64, u64) {
        (
            self.pio_exits.load(Ordering::Relaxed),
            self.mmio_exits.load(Ordering::Relaxed),
        )
    }

    /// MMIO writes that came through KVM's coalesced-MMIO ring, not as exits.
    pub fn queued_writes(&self) -> u64 {
        self.queued_writes.load(Ordering::Relaxed)
    }

    /// Accesses that reached no device: (port I/O, MMIO).
    pub fn unknown_accesses(&self) -> (u64, u64) {
        (
            self.unknown_pio.load(Ordering::Relaxed),
            self.unknown_mmio.load(Ordering::Relaxed),
        )
    }
}

/// A device whose lock was poisoned by a panicking thread is still usable: its
/// state is plain data, and stopping the VM over it would hide the first error.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::Timings;
    use std::sync::mpsc::channel;

    struct Echo(Vec<u8>);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    fn bus() -> (Bus, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = channel();
        let serial = Serial::new(
            IrqTrigger(EventFd::new(0).unwrap()),
            ConsoleOut::new(None, false),
        );
        let status = StatusPort::new(Arc::new(Timings::default()), tx.clone());
        (
            Bus::new(serial, IrqTrigger(EventFd::new(0).unwrap()), tx, status),
            rx,
        )
    }

    #[test]
    fn unknown_accesses_read_all_ones_and_are_counted() {
        let (b, _) = bus();
        let mut d = [0u8; 4];
        b.pio_read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.pio_write(0x80, &[1]);
        b.mmio_read(0xdead_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.mmio_write(0xdead_0000, &[1, 2]);
        assert_eq!(b.unknown_accesses(), (2, 2));
        // wrong-sized serial access is unknown too, not a panic
        b.pio_read(SERIAL_PORT, &mut d);
        assert_eq!(b.unknown_accesses().0, 3);
    }

    #[test]
    fn mmio_routes_by_range_and_rejects_straddling() {
        let (mut b, _) = bus();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        b.add_mmio(0xd000_0000, 0x1000, dev.clone());
        let mut d = [0u8; 4];
        b.mmio_read(0xd000_0010, &mut d);
        assert_eq!(d, [0x10; 4]);
        b.mmio_write(0xd000_0ffe, &[1, 2, 3, 4]); // crosses the window's end
        assert!(dev.lock().unwrap().0.is_empty());
        b.mmio_write(0xd000_0ffc, &[1, 2, 3, 4]);
        assert_eq!(dev.lock().unwrap().0, vec![1, 2, 3, 4]);
        b.mmio_read(u64::MAX - 1, &mut d); // no overflow
        assert_eq!(b.unknown_accesses().1, 2);
    }

    #[test]
    fn i8042_reset_stops_the_vm() {
        let (b, rx) = bus();
        b.pio_write(I8042_COMMAND_PORT, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset(_))));
    }
}
