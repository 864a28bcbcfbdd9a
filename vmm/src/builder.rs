//! Wires the devices to a VM: the serial console, the i8042, the status port and the
//! virtio-mmio vsock, each at its place in the layout, behind the bus the vCPUs hand
//! their exits to. The one module that knows both `kvm` and `devices`, so that
//! neither knows the other.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kvm_ioctls::IoEventAddress;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{lock, Bus, IrqTrigger, SerialDevice};
use crate::devices::console::ConsoleOut;
use crate::devices::status_port::{self, StatusPort};
use crate::devices::virtio_mmio::{
    cmdline_entry, LinePulse, MmioTransport, INTERRUPT_ACK_OFFSET, MMIO_WINDOW_SIZE,
    QUEUE_NOTIFY_OFFSET,
};
use crate::devices::vsock::{event_loop, PortListener, VsockConfig, VsockDevice, VsockStats};
use crate::kvm::layout::{KBD_IRQ, SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE};
use crate::kvm::vcpu::{ExitHandler, Flow};
use crate::kvm::vm::{kvm_err, IrqPulser, Outcome, Vm, VmError};
use crate::vm_event::VmEvent;

/// The kernel command-line entry that announces the vsock [`Machine::attach_vsock`]
/// adds: known before the device exists, so the kernel can be loaded first.
pub fn vsock_cmdline_entry() -> String {
    cmdline_entry(VIRTIO_MMIO_BASE, VIRTIO_IRQ_BASE)
}

/// A virtio-mmio interrupt raised by the thread that raises it (the device thread,
/// or a vCPU's for a configuration change).
struct PulsedLine(IrqPulser);

impl LinePulse for PulsedLine {
    fn pulse(&self) -> std::io::Result<()> {
        self.0.pulse()
    }
}

/// A VM with its devices, before it runs.
pub struct Machine {
    vm: Vm,
    bus: Bus,
    /// The vsock, for its counters once the VM has ended.
    vsock: Option<Arc<Mutex<VsockDevice>>>,
}

/// How a run ended, with what the devices counted.
pub struct Ended {
    pub outcome: Outcome,
    /// The bus: its exit counters, and what the console saw.
    pub bus: Arc<Bus>,
    /// The vsock's counters (interrupts, the guest's notifies, packets), if it had one.
    pub vsock: Option<VsockStats>,
}

impl Machine {
    /// The legacy devices on `vm` (created, its kernel possibly loaded already):
    /// serial console (`console` is where its output goes), i8042 (for its reset
    /// line) and the status port.
    pub fn new(vm: Vm, console: ConsoleOut) -> Result<Machine, VmError> {
        let timings = vm.timings.clone();
        let serial_irq = vm.irq_line(SERIAL_IRQ, "KVM_IRQFD (serial)")?;
        let kbd_irq = vm.irq_line(KBD_IRQ, "KVM_IRQFD (i8042)")?;
        let serial = Serial::new(IrqTrigger(serial_irq), console);
        let status = StatusPort::new(timings, vm.events());
        let bus = Bus::new(serial, IrqTrigger(kbd_irq), vm.events(), status);
        Ok(Machine {
            vm,
            bus,
            vsock: None,
        })
    }

    /// Where device threads and the gate report why the VM must stop.
    pub fn events(&self) -> crate::vm_event::EventSender {
        self.vm.events()
    }

    /// The serial port, for the thread that feeds it the host's keyboard.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.bus.serial.clone()
    }

    /// Adds the virtio-mmio vsock, the guest's only egress: MMIO window, QueueNotify
    /// ioeventfds, irqfd and its device thread. Returns the kernel command-line entry
    /// that announces it.
    pub fn attach_vsock(
        &mut self,
        cfg: VsockConfig,
        listener: Box<dyn PortListener>,
    ) -> Result<String, VmError> {
        let (base, irq) = (VIRTIO_MMIO_BASE, VIRTIO_IRQ_BASE);
        let (coalesce_ack, irq_from_device_thread) = (cfg.coalesce_ack, cfg.irq_from_device_thread);
        let dev =
            VsockDevice::new(cfg, listener).map_err(|e| VmError::Io(format!("vsock: {e}")))?;
        let dev = Arc::new(Mutex::new(dev));
        self.vsock = Some(dev.clone());
        let transport = MmioTransport::new(dev.clone(), self.vm.memory().clone())
            .map_err(|e| VmError::Io(format!("vsock transport: {e}")))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD (vsock queue notify)"))?;
        }
        if irq_from_device_thread {
            transport
                .interrupt()
                .set_line(Box::new(PulsedLine(self.vm.irq_pulser(irq))));
        } else {
            self.vm
                .fd()
                .register_irqfd(transport.interrupt().evt(), irq)
                .map_err(kvm_err("KVM_IRQFD (vsock)"))?;
        }
        // The guest acknowledges every interrupt; that write need not exit.
        if coalesce_ack {
            self.vm.coalesce_writes(base + INTERRUPT_ACK_OFFSET, 4)?;
        }
        let evts = transport
            .queue_evts()
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::EventFd)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let stop_handle = stop.try_clone().map_err(VmError::EventFd)?;
        let events = self.vm.events();
        let handle = thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                // Confined before it reads the first queue the guest wrote.
                if let Err(e) = ironvmm_seccomp::install(ironvmm_seccomp::ThreadRole::Device) {
                    let _ = events.send(VmEvent::Fatal(e.to_string()));
                    return;
                }
                // The device thread ending (an error, or a panic in a handler) leaves the
                // guest without its gate: stop the VM rather than let calls hang.
                let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    event_loop::run(dev, evts, stop)
                })) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => format!("the vsock device thread failed: {e}"),
                    Err(_) => "the vsock device thread panicked".to_string(),
                };
                let _ = events.send(VmEvent::Fatal(why));
            })
            .map_err(|e| VmError::Io(format!("cannot start the vsock thread: {e}")))?;
        self.vm.add_device_thread(stop_handle, handle);
        self.bus
            .add_mmio(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)));
        Ok(cmdline_entry(base, irq))
    }

    /// Runs the VM (`Vm::run`) with the bus behind its exits. Returns how it ended,
    /// with what the bus and the vsock counted.
    pub fn run(self, timeout: Option<Duration>, interrupts: &AtomicUsize) -> Ended {
        let bus = Arc::new(self.bus);
        let outcome = self.vm.run(bus.clone(), timeout, interrupts);
        let _ = lock(&bus.serial).writer_mut().flush_console();
        // The device thread has been joined: the counters are final.
        let vsock = self.vsock.map(|d| lock(&d).stats().clone());
        Ended {
            outcome,
            bus,
            vsock,
        }
    }
}

impl ExitHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        Bus::pio_read(self, port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Flow {
        Bus::pio_write(self, port, data);
        if port == status_port::PORT && self.status.exited() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        Bus::mmio_read(self, addr, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        Bus::mmio_write(self, addr, data)
    }

    fn mmio_write_queued(&self, addr: u64, data: &[u8]) {
        Bus::mmio_write_queued(self, addr, data)
    }
}
