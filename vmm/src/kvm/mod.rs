//! The VM itself: host capability checks, guest memory, vCPUs and the boot sequence.

pub mod capability;
