//! The gate of one VM, without the VM: what happens to a request between the
//! vsock device and the host.
//!
//! frame → call → decision → service → audit:
//! - `json`     the strict parser every guest frame and every audit line goes through
//! - `gate`     frames and JSON-RPC/MCP, turned into policy calls and decided
//! - `services` what an allowed call reaches (fs, ...)
//! - `audit`    the hash-chained decision log
//!
//! This crate knows nothing of KVM, guest memory or virtio: the `ironvmm` crate
//! composes it with the devices, and `ironvmm gate` serves it without a VM.

pub mod approvals;
pub mod audit;
pub mod config;
pub mod gate;
pub mod json;
pub mod services;
