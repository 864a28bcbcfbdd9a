//! Exit codes of `ironvmm boot` and `ironvmm run` (interfaces.md): the agent's own
//! status passes through, ironvmm's own conditions take 124 and up.

/// `--timeout` expired.
pub const TIMEOUT: u8 = 124;
/// ironvmm could not run or had to stop (no KVM, bad flags, I/O, audit log failure).
pub const VMM_ERROR: u8 = 125;
/// The image is invalid, or the guest kernel could not be loaded.
pub const BAD_IMAGE: u8 = 126;
/// The policy is invalid.
pub const BAD_POLICY: u8 = 127;
/// The guest crashed: panic, triple fault, reset or halt before an exit status.
pub const GUEST_CRASH: u8 = 128;
/// Stopped by Ctrl-C.
pub const INTERRUPTED: u8 = 130;
