//! One thread per vCPU: KVM_RUN, and each exit handed to an [`ExitHandler`] (the
//! device bus) or turned into a reason for the VM to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::timing::Timings;
use crate::vm_event::{EventSender, VmEvent};

/// What the vCPUs hand their port and MMIO exits to. The builder implements it for
/// the device bus; the VM itself knows no device.
pub trait ExitHandler: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]) -> Flow;
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
    /// A write KVM queued in its coalesced-MMIO ring instead of exiting.
    fn mmio_write_queued(&self, addr: u64, data: &[u8]);
}

/// Whether the vCPU goes on after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The VM is ending (the agent's exit status is in): this vCPU stops here rather
    /// than let the guest run on (and print its reboot) while the VM is being ended.
    Stop,
}

/// The signal that kicks a vCPU thread out of KVM_RUN when the VM ends. Its
/// handler does nothing: KVM_RUN returns EINTR and the thread sees `stop`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) handler of `kick_signal`, without SA_RESTART.
pub fn install_kick_handler() {
    // SAFETY: a zeroed sigaction with an async-signal-safe handler that does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
}

/// Runs `vcpu` until the guest stops it, KVM fails, or `stop` is set (and the thread
/// kicked); the reason to stop goes to `events`.
pub fn run(
    mut vcpu: VcpuFd,
    id: u8,
    exits: Arc<dyn ExitHandler>,
    coalesced: Option<Arc<Mutex<()>>>,
    timings: Arc<Timings>,
    events: EventSender,
    stop: Arc<AtomicBool>,
) {
    if id == 0 {
        timings.first_run.set_once();
    }
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        if let Some(ring) = &coalesced {
            drain_coalesced(&mut vcpu, ring, &*exits);
        }
        let stop = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => match exits.pio_write(port, data) {
                    Flow::Continue => None,
                    Flow::Stop => return,
                },
                VcpuExit::IoIn(port, data) => {
                    exits.pio_read(port, data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    exits.mmio_read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    exits.mmio_write(addr, data);
                    None
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                // With an in-kernel irqchip HLT does not exit; if it does, this vCPU is done.
                VcpuExit::Hlt => Some(VmEvent::Crash(format!("vCPU {id} halted before the agent's exit status was reported"))),
                VcpuExit::Shutdown => {
                    Some(VmEvent::Reset(format!("vCPU {id}: triple fault or reset (KVM shutdown exit); {}", cpu_snapshot(&vcpu))))
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        Some(VmEvent::Reset(format!("vCPU {id}: the guest asked for a system {}", if kind == KVM_SYSTEM_EVENT_RESET { "reset" } else { "shutdown" })))
                    }
                    other => Some(VmEvent::Crash(format!("vCPU {id}: unexpected system event {other}"))),
                },
                VcpuExit::FailEntry(reason, cpu) => Some(VmEvent::Crash(format!(
                    "KVM could not enter vCPU {id} (hardware reason {reason:#x}, cpu {cpu}); {}",
                    cpu_snapshot(&vcpu)
                ))),
                VcpuExit::InternalError => Some(VmEvent::Crash(format!(
                    "KVM internal error on vCPU {id} (emulation failure); on a PVM host guests cannot boot: run `ironvmm doctor`"
                ))),
                other => Some(VmEvent::Crash(format!("vCPU {id}: unhandled exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmEvent::Fatal(format!("KVM_RUN failed on vCPU {id}: {e}"))),
        };
        if let Some(ev) = stop {
            // The receiver may be gone when the VM is already ending; nothing to do then.
            let _ = events.send(ev);
            return;
        }
    }
}

/// Hands the writes KVM queued in the coalesced-MMIO ring to the bus, oldest first.
/// Every exit passes here, so a queued write waits at most until the vCPU's next
/// exit. The ring is shared by the VM's vCPUs, hence the lock.
fn drain_coalesced(vcpu: &mut VcpuFd, ring: &Mutex<()>, exits: &dyn ExitHandler) {
    let _one_reader = ring.lock().unwrap_or_else(|e| e.into_inner());
    // Only MMIO zones are registered, so no entry is a port write.
    while let Ok(Some(w)) = vcpu.coalesced_mmio_read() {
        let len = (w.len as usize).min(w.data.len());
        exits.mmio_write_queued(w.phys_addr, &w.data[..len]);
    }
}

/// Where the vCPU was when the guest died: the registers a triple fault is read
/// from, so that a crash report says whether the guest kernel or the VMM is to blame.
fn cpu_snapshot(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x} idt {:#x}+{:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.idt.base, s.idt.limit
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
    }
}
