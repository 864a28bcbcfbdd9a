//! ironvmm: a KVM micro-VM monitor whose only guest egress is one virtio-vsock
//! device, with a policy engine deciding every request frame on that path.
//!
//! Data flows one way: frame → call → decision → service → audit.
//! - `kvm`      the VM: memory, vCPUs, boot (knows no device)
//! - `devices`  what the guest can touch: serial, i8042, status port, virtio-mmio vsock
//!   (knows no KVM)
//! - `builder`  wires the devices to the VM: the one module that knows both
//! - `gate_ports` the vsock ports the gate serves (the devices ↔ gate seam)
//! - `hardening` the process settings of a VMM (no_new_privs, fds, rlimits)
//! - `gate`, `services`, `audit`: the `ironvmm-gate` crate, re-exported
//! - `image`    guest.img: manifest, tar, cpio
//! - `report`   what `ironvmm run` tells CI: run report, JUnit, summary
//! - `cli`      the `ironvmm` command line

pub mod builder;
pub mod cli;
pub mod devices;
pub mod gate_ports;
pub mod hardening;
pub mod image;
pub mod jail;
pub mod kvm;
pub mod report;

// The gate, its services and the audit log live in `ironvmm-gate` (no KVM, no
// guest memory); the wire constants in `ironvmm-wire`. Re-exported so that
// `ironvmm::gate` and friends name one thing wherever they are used.
pub use ironvmm_gate::{approvals, audit, config, gate, json, services};
pub use ironvmm_wire::exit;
pub mod timing;
pub mod vm_event;
