//! The boot sequence, one step at a time: open KVM, create the VM and its irqchip,
//! map memory, load the kernel, set up vCPUs, run until an event. Which devices the
//! guest gets is the builder's business: here a vCPU's exits go to an
//! [`ExitHandler`], whatever it is.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ironvmm_seccomp::ThreadRole;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::cpu_state;
use super::layout::{KVM_TSS_ADDR, MAX_VCPUS};
use super::vcpu::ExitHandler;
use super::{cpuid, loader, memory, mptable};
use crate::timing::Timings;
use crate::vm_event::{EventSender, VmEvent};

/// What to boot and how. The kernel and the initramfs archives are borrowed from
/// where they were read (the image file's bytes): loading copies them once, into
/// guest memory.
pub struct VmConfig<'a> {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub kernel: &'a [u8],
    /// Archives the kernel unpacks in order (the image's, then `--copy-in`'s).
    pub initrd: Vec<&'a [u8]>,
    pub cmdline: String,
}

/// Why the VM could not be built; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed; `op` names it (`KVM_CREATE_VM`, `KVM_IRQFD (serial)`…).
    #[error("cannot use KVM: {op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
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
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
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

/// `map_err` for a KVM ioctl: `op` names the ioctl in the error.
pub fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
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

/// Raises an edge on one IO-APIC line of the VM (`Vm::irq_pulser`). It keeps the VM
/// fd open, but can do nothing with it except raise that line.
pub struct IrqPulser {
    vm: Arc<VmFd>,
    irq: u32,
}

impl IrqPulser {
    pub fn pulse(&self) -> std::io::Result<()> {
        let err = |e: kvm_ioctls::Error| std::io::Error::from_raw_os_error(e.errno());
        self.vm.set_irq_line(self.irq, true).map_err(err)?;
        self.vm.set_irq_line(self.irq, false).map_err(err)
    }
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    /// Shared with the interrupt lines that raise themselves (`irq_pulser`).
    fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    events_tx: EventSender,
    events_rx: Receiver<VmEvent>,
    pub timings: Arc<Timings>,
    /// Device threads and the EventFd that stops each (the builder adds them).
    device_threads: Vec<(EventFd, thread::JoinHandle<()>)>,
    /// A zone of coalesced MMIO writes was registered: every vCPU maps KVM's ring of
    /// queued writes and drains it.
    coalesced_writes: bool,
}

impl Vm {
    /// Steps 1–3: KVM, VM with irqchip and PIT, guest memory. The builder adds the
    /// devices; `load` then loads the kernel.
    pub fn create(mem_mib: u64, vcpus: u8, timings: Arc<Timings>) -> Result<Vm, VmError> {
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
        timings.vm_created.set_once();
        Ok(Vm {
            _kvm: kvm,
            fd: Arc::new(fd),
            mem,
            vcpus: Vec::new(),
            events_tx,
            events_rx,
            timings,
            device_threads: Vec::new(),
            coalesced_writes: false,
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

    /// Lets the guest's writes to `[addr, addr + len)` queue in KVM's coalesced-MMIO
    /// ring instead of exiting; the vCPUs hand them to the bus at their next exit, so
    /// only registers whose writes may be applied late belong here. False where KVM
    /// has no such ring (the writes then exit as usual). Before `run`.
    pub fn coalesce_writes(&mut self, addr: u64, len: u32) -> Result<bool, VmError> {
        if !self._kvm.check_extension(Cap::CoalescedMmio) {
            return Ok(false);
        }
        self.fd
            .register_coalesced_mmio(IoEventAddress::Mmio(addr), len)
            .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO"))?;
        self.coalesced_writes = true;
        Ok(true)
    }

    /// An interrupt line the VMM raises by writing the returned eventfd (an irqfd).
    /// `op` names the line in a KVM error.
    pub fn irq_line(&self, irq: u32, op: &'static str) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd.register_irqfd(&evt, irq).map_err(kvm_err(op))?;
        Ok(evt)
    }

    /// An edge-triggered line that the raising thread pulses itself with two
    /// `KVM_IRQ_LINE` calls (an irqfd's IO-APIC interrupt is injected by a kernel
    /// worker instead, one more wake-up per interrupt).
    pub fn irq_pulser(&self, irq: u32) -> IrqPulser {
        IrqPulser {
            vm: self.fd.clone(),
            irq,
        }
    }

    /// A device's thread, stopped (by writing `stop`) and joined after the vCPUs
    /// when the VM ends.
    pub fn add_device_thread(&mut self, stop: EventFd, handle: thread::JoinHandle<()>) {
        self.device_threads.push((stop, handle));
    }

    /// Steps 5–6: kernel, initramfs, command line, MP table; vCPUs with CPUID,
    /// MSRs, registers and LAPIC.
    pub fn load(&mut self, cfg: &VmConfig<'_>) -> Result<(), VmError> {
        let entry = loader::load(
            &self.mem,
            cfg.mem_mib << 20,
            cfg.kernel,
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

    /// Step 7: one thread per vCPU, each handing its exits to `exits`, then wait for
    /// the first reason to stop (an event: the agent's exit, a crash, a fatal
    /// condition such as the audit log failing), the deadline, or Ctrl-C. The device
    /// threads are stopped and joined before it returns.
    pub fn run(
        mut self,
        exits: Arc<dyn ExitHandler>,
        timeout: Option<Duration>,
        interrupts: &AtomicUsize,
    ) -> Outcome {
        let deadline = timeout.map(|t| Instant::now() + t);
        let stop = Arc::new(AtomicBool::new(false));
        // The coalesced-MMIO ring is the VM's, one for all vCPUs.
        let mut ring = self.coalesced_writes.then(|| Arc::new(Mutex::new(())));
        if ring.is_some() {
            // Mapped here, before the threads are confined (no mmap for them).
            let mapped = self
                .vcpus
                .iter_mut()
                .try_for_each(|v| v.map_coalesced_mmio_ring());
            if let Err(e) = mapped {
                // Queued writes then reach us only once KVM's ring is full and they
                // exit again; for InterruptACK that only leaves its bits set, and the
                // driver looks at its queues once more per interrupt (see `Interrupt`).
                log::warn!("cannot map KVM's coalesced MMIO ring ({e}); queued writes wait until it is full");
                ring = None;
            }
        }
        super::vcpu::install_kick_handler();
        let mut vcpu_threads = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let (exits, timings, events, vcpu_stop, ring) = (
                exits.clone(),
                self.timings.clone(),
                self.events_tx.clone(),
                Arc::clone(&stop),
                ring.clone(),
            );
            let spawned = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // Confined before the first KVM_RUN: no guest code runs unfiltered.
                    if let Err(e) = ironvmm_seccomp::install(ThreadRole::Vcpu) {
                        let _ = events.send(VmEvent::Fatal(e.to_string()));
                        return;
                    }
                    super::vcpu::run(vcpu, id as u8, exits, ring, timings, events, vcpu_stop)
                });
            match spawned {
                Ok(h) => vcpu_threads.push(h),
                Err(e) => {
                    let _ = stop_vcpus(&stop, vcpu_threads);
                    return Outcome::Fatal(format!("cannot start vCPU thread: {e}"));
                }
            }
        }
        // Last: every thread this one starts would inherit its filter.
        let confined = ironvmm_seccomp::install(ThreadRole::Main);
        let outcome = if let Err(e) = confined {
            Outcome::Fatal(e.to_string())
        } else {
            loop {
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
            }
        };
        // vCPUs first: they may be inside a device (MMIO) when the devices stop.
        let _ = stop_vcpus(&stop, vcpu_threads);
        for (stop_evt, handle) in self.device_threads.drain(..) {
            let _ = stop_evt.write(1);
            let _ = handle.join();
        }
        outcome
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
