//! The VM itself: host capability checks, guest memory, vCPUs and the boot sequence.

pub mod capability;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod mptable;
pub mod vcpu;
pub mod vm;
