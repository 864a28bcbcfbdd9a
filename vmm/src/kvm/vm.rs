//! The boot sequence, one step at a time: open KVM, create the VM and its irqchip,
//! map memory, add devices, load the kernel, set up vCPUs, run until an event.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ironvmm_seccomp::ThreadRole;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::cpu_state;
use super::layout::{
    KBD_IRQ, KVM_TSS_ADDR, MAX_VCPUS, SERIAL_IRQ, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE,
};
use super::{cpuid, loader, memory, mptable};
use crate::devices::bus::{lock, Bus, IrqTrigger, MmioDevice};
use crate::devices::console::ConsoleOut;
use crate::devices::status_port::StatusPort;
use crate::devices::virtio_mmio::{
    cmdline_entry, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::vsock::{event_loop, PortListener, VsockConfig, VsockDevice};
use crate::timing::Timings;
use crate::vm_event::{EventSender, VmEvent};

/// What to boot and how.
pub struct VmConfig {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub cmdline: String,
}

/// Why the VM could not be built; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot use KVM: {0}")]
    Kvm(String),
    #[error("{0}")]
    Memory(#[from] memory::MemoryError),
    #[error("guest kernel: {0}")]
    Load(#[from] loader::LoadError),
    #[error("{0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("vCPU set-up: {0}")]
    Cpu(#[from] cpu_state::CpuStateError),
    #[error("{0} vCPUs requested; ironvmm runs 1 to {max}", max = MAX_VCPUS)]
    VcpuCount(u8),
    #[error("{0}")]
    Io(String),
}

impl VmError {
    /// 126 for a kernel that cannot be loaded, 125 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::Load(_) => crate::exit::BAD_IMAGE,
            _ => crate::exit::VMM_ERROR,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(format!("{what}: {e}"))
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    AgentExit(u8),
    Timeout,
    Interrupted,
    Crash(String),
    Fatal(String),
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    pub bus: Arc<Bus>,
    vcpus: Vec<VcpuFd>,
    events_tx: EventSender,
    events_rx: Receiver<VmEvent>,
    pub timings: Arc<Timings>,
    /// Device threads and the EventFd that stops each.
    device_threads: Vec<(EventFd, thread::JoinHandle<()>)>,
}

impl Vm {
    /// Steps 1–4: KVM, VM with irqchip and PIT, guest memory, legacy devices.
    /// The kernel is loaded by `boot` once the caller has added its MMIO devices.
    pub fn create(
        mem_mib: u64,
        vcpus: u8,
        console: ConsoleOut,
        timings: Arc<Timings>,
    ) -> Result<Vm, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(vcpus));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(mem_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Io(format!("guest memory region {slot}: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps
            // for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let (events_tx, events_rx) = channel();
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io(format!("eventfd: {e}")))?;
        fd.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let kbd_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io(format!("eventfd: {e}")))?;
        fd.register_irqfd(&kbd_irq, KBD_IRQ)
            .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
        let serial = Serial::new(IrqTrigger(serial_irq), console);
        let status = StatusPort::new(timings.clone(), events_tx.clone());
        let bus = Bus::new(serial, IrqTrigger(kbd_irq), events_tx.clone(), status);
        timings.vm_created.set_once();
        Ok(Vm {
            _kvm: kvm,
            fd,
            mem,
            bus: Arc::new(bus),
            vcpus: Vec::new(),
            events_tx,
            events_rx,
            timings,
            device_threads: Vec::new(),
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn events(&self) -> EventSender {
        self.events_tx.clone()
    }

    /// Adds an MMIO device before boot; only possible while no vCPU runs.
    pub fn add_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), VmError> {
        Arc::get_mut(&mut self.bus)
            .ok_or_else(|| VmError::Io("devices can only be added before boot".into()))?
            .add_mmio(base, len, dev);
        Ok(())
    }

    /// Steps 5–6: kernel, initramfs, command line, MP table; vCPUs with CPUID,
    /// MSRs, registers and LAPIC.
    pub fn load(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let entry = loader::load(
            &self.mem,
            cfg.mem_mib << 20,
            &cfg.kernel,
            &cfg.initrd,
            &cfg.cmdline,
        )?;
        mptable::write(&self.mem, cfg.vcpus)?;
        let kvm = &self._kvm;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = msr_list.as_slice().to_vec();
        for id in 0..cfg.vcpus {
            let vcpu = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(&supported, id, cfg.vcpus))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            cpu_state::set_msrs(&vcpu, &msrs)?;
            cpu_state::set_lint(&vcpu)?;
            if id == 0 {
                // The others wait in the in-kernel LAPIC for the guest's INIT/SIPI.
                vcpu.set_regs(&cpu_state::boot_regs(entry.mode, entry.addr))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
                cpu_state::set_sregs(&vcpu, &self.mem, entry.mode)?;
                cpu_state::set_fpu(&vcpu)?;
            }
            self.vcpus.push(vcpu);
        }
        self.timings.kernel_loaded.set_once();
        Ok(())
    }

    /// Step 7: one thread per vCPU, then wait for the first reason to stop (an
    /// event: the agent's exit, a crash, a fatal condition such as the audit log
    /// failing), the deadline, or Ctrl-C. The device threads are stopped and joined
    /// before it returns.
    pub fn run(
        mut self,
        timeout: Option<Duration>,
        interrupts: &AtomicUsize,
    ) -> (Outcome, Arc<Bus>) {
        let deadline = timeout.map(|t| Instant::now() + t);
        let stop = Arc::new(AtomicBool::new(false));
        super::vcpu::install_kick_handler();
        let mut vcpu_threads = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let (bus, timings, events, vcpu_stop) = (
                self.bus.clone(),
                self.timings.clone(),
                self.events_tx.clone(),
                Arc::clone(&stop),
            );
            let spawned = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // Confined before the first KVM_RUN: no guest code runs unfiltered.
                    if let Err(e) = ironvmm_seccomp::install(ThreadRole::Vcpu) {
                        let _ = events.send(VmEvent::Fatal(e.to_string()));
                        return;
                    }
                    super::vcpu::run(vcpu, id as u8, bus, timings, events, vcpu_stop)
                });
            match spawned {
                Ok(h) => vcpu_threads.push(h),
                Err(e) => {
                    let _ = stop_vcpus(&stop, vcpu_threads);
                    return (
                        Outcome::Fatal(format!("cannot start vCPU thread: {e}")),
                        self.bus,
                    );
                }
            }
        }
        // Last: every thread this one starts would inherit its filter.
        if let Err(e) = ironvmm_seccomp::install(ThreadRole::Main) {
            return (Outcome::Fatal(e.to_string()), self.bus);
        }
        let outcome = loop {
            if interrupts.load(Ordering::Relaxed) > 0 {
                break Outcome::Interrupted;
            }
            let mut wait = Duration::from_millis(50);
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Outcome::Timeout;
                }
                wait = wait.min(left);
            }
            match self.events_rx.recv_timeout(wait) {
                Ok(VmEvent::AgentExit(code)) => break Outcome::AgentExit(code),
                Ok(VmEvent::Reset(why)) | Ok(VmEvent::Crash(why)) => break Outcome::Crash(why),
                Ok(VmEvent::Fatal(why)) => break Outcome::Fatal(why),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    break Outcome::Fatal("every vCPU thread ended".into())
                }
            }
        };
        // vCPUs first: they may be inside a device (MMIO) when the devices stop.
        let _ = stop_vcpus(&stop, vcpu_threads);
        for (stop_evt, handle) in self.device_threads.drain(..) {
            let _ = stop_evt.write(1);
            let _ = handle.join();
        }
        let _ = lock(&self.bus.serial).writer_mut().flush_console();
        (outcome, self.bus)
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
        let dev =
            VsockDevice::new(cfg, listener).map_err(|e| VmError::Io(format!("vsock: {e}")))?;
        let dev = Arc::new(Mutex::new(dev));
        let transport = MmioTransport::new(dev.clone(), self.mem.clone())
            .map_err(|e| VmError::Io(format!("vsock transport: {e}")))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            self.fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD (vsock queue notify)"))?;
        }
        self.fd
            .register_irqfd(transport.interrupt().evt(), irq)
            .map_err(kvm_err("KVM_IRQFD (vsock)"))?;
        let evts = transport
            .queue_evts()
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VmError::Io(format!("eventfd: {e}")))?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io(format!("eventfd: {e}")))?;
        let events = self.events_tx.clone();
        let stop_handle = stop
            .try_clone()
            .map_err(|e| VmError::Io(format!("eventfd: {e}")))?;
        let handle = thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                if let Err(e) = ironvmm_seccomp::install(ThreadRole::Device) {
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
        self.device_threads.push((stop_handle, handle));
        self.add_mmio(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
        Ok(cmdline_entry(base, irq))
    }
}

/// Stops the vCPU threads and joins them: each is kicked out of KVM_RUN with
/// `vcpu::kick_signal` until it has ended (a kick that lands outside KVM_RUN is
/// followed by another). A thread still running after a second is left to end with
/// the process, and reported. Returns how many were left.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<thread::JoinHandle<()>>) -> usize {
    use std::os::unix::thread::JoinHandleExt;
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut left = 0;
    for h in threads {
        while !h.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(h.as_pthread_t(), super::vcpu::kick_signal()) };
            thread::sleep(Duration::from_millis(1));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            log::warn!("a vCPU thread did not stop within a second; leaving it");
            left += 1;
        }
    }
    left
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

impl ConsoleOut {
    /// Flushes buffered console output (named so it reads clearly at call sites).
    pub fn flush_console(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kick reaches a thread blocked in a system call (as a vCPU is in KVM_RUN),
    /// which then sees `stop` and ends; `stop_vcpus` joins it.
    #[test]
    fn stopping_kicks_blocked_threads_and_joins_them() {
        super::super::vcpu::install_kick_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        // SAFETY: poll with no descriptors sleeps until a signal.
                        unsafe { libc::poll(std::ptr::null_mut(), 0, -1) };
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(stop_vcpus(&stop, threads), 0, "every thread joined");
    }
}
