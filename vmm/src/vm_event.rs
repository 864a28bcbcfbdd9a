//! Why a running VM must stop: sent by vCPU threads and devices to the thread that
//! owns the VM, which turns the first one into the process exit code.

use std::sync::mpsc::Sender;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// ironinit reported the agent's exit status on the status port.
    AgentExit(u8),
    /// The guest reset itself (i8042, triple fault, KVM shutdown).
    Reset(String),
    /// A vCPU halted for good or KVM could not run it.
    Crash(String),
    /// ironvmm itself cannot go on (audit log unwritable, KVM error).
    Fatal(String),
}

/// A cloneable handle devices use to stop the VM.
pub type EventSender = Sender<VmEvent>;
