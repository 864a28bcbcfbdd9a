//! Where things live in guest physical memory, and the interrupt lines. One table, so
//! the loader, the MP table, the e820 map and the builder cannot disagree.

/// GDT and IDT of the boot vCPU.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, then its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// The initrd as the one PVH module.
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// The Linux boot protocol's zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity map of the first 1 GiB with 2 MiB pages (64-bit boot only).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line, NUL-terminated; x86 Linux reads at most 2 KiB of it.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 2048;
/// Start of the EBDA, where Linux looks for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at 1 MiB; everything from 640 KiB up to here is reserved.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO hole below 4 GiB: guest RAM skips it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each from here, IRQs from `VIRTIO_IRQ_BASE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IO-APIC and local APIC, as the in-kernel irqchip places them.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Interrupt lines of the legacy devices (their ports belong to `devices::bus`).
pub const SERIAL_IRQ: u32 = 4;
pub const KBD_IRQ: u32 = 1;
/// KVM's TSS needs three pages inside the 32-bit address space, outside RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Most vCPUs ironvmm gives a guest.
pub const MAX_VCPUS: u8 = 8;
/// Least guest memory that boots our kernel with a small initramfs.
pub const MIN_MEM_MIB: u64 = 32;
