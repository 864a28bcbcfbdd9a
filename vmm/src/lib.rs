//! ironvmm: a KVM micro-VM monitor whose only guest egress is one virtio-vsock
//! device, with a policy engine deciding every request frame on that path.
//!
//! Data flows one way: frame → call → decision → service → audit.
//! - `kvm`      the VM: memory, vCPUs, boot
//! - `devices`  what the guest can touch: serial, i8042, status port, virtio-mmio vsock
//! - `gate`     frames and JSON-RPC on the vsock, turned into policy calls
//! - `services` what an allowed call reaches (fs, ...)
//! - `audit`    the hash-chained decision log
//! - `image`    guest.img: manifest, tar, cpio
//! - `cli`      the `ironvmm` command line

pub mod audit;
pub mod cli;
pub mod devices;
pub mod exit;
pub mod gate;
pub mod image;
pub mod kvm;
pub mod services;
pub mod timing;
pub mod vm_event;
