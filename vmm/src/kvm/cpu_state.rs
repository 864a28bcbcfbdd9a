//! The register state a vCPU starts in: MSRs, segments, control registers, FPU and
//! local APIC, for the two entry protocols ironvmm boots with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = zero page.
    Linux64,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuStateError {
    #[error("KVM refused {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    MsrsPartial { set: usize, wanted: usize },
    #[error("cannot write boot tables into guest memory")]
    Memory,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    move |err| CpuStateError::Kvm { what, err }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MTRRs enabled, default type write-back: without it guest RAM may be mapped
/// uncached and everything crawls.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The boot MSRs, filtered to those KVM lists as supported.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs and checks that KVM took every one of them.
pub fn set_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), CpuStateError> {
    let entries = boot_msrs(supported);
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuStateError::MsrsPartial {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuStateError::MsrsPartial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), CpuStateError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// LINT0 delivers ExtINT (the 8259) and LINT1 NMI, as firmware would leave them.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), CpuStateError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 7;
    const MODE_NMI: u32 = 4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// General registers of the boot vCPU.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => r.rbx = PVH_INFO_ADDR,
        EntryMode::Linux64 => {
            r.rsp = BOOT_STACK_ADDR;
            r.rbp = BOOT_STACK_ADDR;
            r.rsi = ZERO_PAGE_ADDR;
        }
    }
    r
}

/// A GDT entry from its parts (base, limit, access and flags as in the manual).
const fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The GDT for `mode`: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit, 4 GiB
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) the identity page tables,
/// then sets the special registers.
pub fn set_sregs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), CpuStateError> {
    let table = gdt(mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| CpuStateError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| CpuStateError::Memory)?;

    let mut s: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(table[1], 0x08);
    let data = segment(table[2], 0x10);
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(table[3], 0x18);

    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    match mode {
        EntryMode::Pvh => {
            s.cr0 = CR0_PE | CR0_ET;
            s.cr4 = 0;
            s.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            s.cr3 = PML4_ADDR;
            s.cr4 = CR4_PAE;
            s.cr0 = CR0_PE | CR0_ET | CR0_PG;
            s.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel's own
/// early page-table setup.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), CpuStateError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| CpuStateError::Memory)
    };
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    w(PD_ADDR | 0x3, PDPT_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_are_filtered_by_kvm_list() {
        let all = boot_msrs(&[MSR_MTRR_DEF_TYPE, MSR_LSTAR, 0xdead]);
        assert_eq!(all.len(), 2);
        assert!(all
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == 0x806));
        assert!(boot_msrs(&[]).is_empty());
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let g = gdt(EntryMode::Linux64);
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        let cs = segment(g[1], 8);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let p = gdt(EntryMode::Pvh);
        assert_eq!(p[1], 0x00cf_9b00_0000_ffff);
        let cs32 = segment(p[1], 8);
        assert_eq!((cs32.l, cs32.db, cs32.g), (0, 1, 1));
        let tss = segment(g[3], 0x18);
        assert_eq!((tss.type_, tss.present, tss.s), (0xb, 1, 0));
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(EntryMode::Pvh, 0x1000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x1000, PVH_INFO_ADDR, 2));
        let r = boot_regs(EntryMode::Linux64, 0x20_0000);
        assert_eq!((r.rsi, r.rsp), (ZERO_PAGE_ADDR, BOOT_STACK_ADDR));
    }
}
