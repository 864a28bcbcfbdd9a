//! KVM smoke test: reads /dev/kvm's capabilities and runs a tiny 64-bit guest program
//! through kvm-ioctls (page tables, GDT, long mode, PIO and MMIO exits, HLT).
//!
//! Tiny programs work on every KVM, PVM included, so this runs natively on the
//! development machines and, through scripts/kvm-host.sh, on the software host's real
//! KVM. Without /dev/kvm it says so and passes, unless IRONVMM_REQUIRE_KVM=1 (set by
//! scripts/kvm-host/selftest.sh), which turns the absence into a failure.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 2 << 20;
const GDT: u64 = 0x500;
const CODE: u64 = 0x1000;
const DATA: u64 = 0x3000;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
/// Not backed by any memory slot: a write there must come back as an MMIO exit.
const MMIO: u64 = 0x1000_0000;
const MAGIC: u64 = 0x1122_3344_5566_7788;

/// Opens /dev/kvm, or returns None (skip) when there is none and none is required.
fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            let required = std::env::var("IRONVMM_REQUIRE_KVM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "IRONVMM_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            // Straight to the process's stderr, past the test harness's capture, so
            // that a skip shows in `cargo test` output instead of passing silently.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "kvm_smoke: SKIPPED, /dev/kvm cannot be opened here: {e} \
                 (IRONVMM_REQUIRE_KVM=1 makes this a failure)"
            );
            None
        }
    }
}

#[test]
fn dev_kvm_reports_what_a_vmm_needs() {
    let Some(kvm) = kvm() else { return };
    assert_eq!(kvm.get_api_version(), 12, "KVM API version");
    let caps = [
        ("USER_MEMORY", Cap::UserMemory),
        ("EXT_CPUID", Cap::ExtCpuid),
        ("IRQCHIP", Cap::Irqchip),
        ("SET_TSS_ADDR", Cap::SetTssAddr),
        ("PIT2", Cap::Pit2),
        ("IMMEDIATE_EXIT", Cap::ImmediateExit),
        ("NR_VCPUS", Cap::NrVcpus),
        ("MAX_VCPUS", Cap::MaxVcpus),
    ];
    for (name, cap) in caps {
        eprintln!(
            "kvm_smoke: KVM_CAP_{name} = {}",
            kvm.check_extension_int(cap)
        );
    }
    for (name, cap) in &caps[..3] {
        assert!(kvm.check_extension(*cap), "KVM_CAP_{name} is missing");
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    assert!(!cpuid.as_slice().is_empty(), "no supported CPUID entries");
    let msrs = kvm.get_msr_index_list().expect("KVM_GET_MSR_INDEX_LIST");
    eprintln!(
        "kvm_smoke: {} CPUID entries, {} MSRs, vcpu mmap size {}",
        cpuid.as_slice().len(),
        msrs.as_slice().len(),
        kvm.get_vcpu_mmap_size().expect("KVM_GET_VCPU_MMAP_SIZE")
    );
    assert!(!msrs.as_slice().is_empty(), "empty MSR index list");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The guest: two port writes, a 64-bit store, an MMIO write, HLT.
fn program() -> Vec<u8> {
    let mut p = vec![
        0xb0, 0x42, // mov al, 0x42
        0xe6, 0x10, // out 0x10, al
        0x48, 0xb8, // mov rax, MAGIC (only a 64-bit CPU mode has 64-bit immediates)
    ];
    p.extend_from_slice(&MAGIC.to_le_bytes());
    p.extend_from_slice(&[0x66, 0xba, 0x11, 0x00]); // mov dx, 0x11
    p.push(0xef); // out dx, eax
    p.extend_from_slice(&[0x48, 0xa3]); // mov [DATA], rax
    p.extend_from_slice(&DATA.to_le_bytes());
    p.push(0xa2); // mov [MMIO], al
    p.extend_from_slice(&MMIO.to_le_bytes());
    p.push(0xf4); // hlt
    p
}

/// A VM with the program loaded and one vCPU in long mode at its first instruction.
/// `before_vcpu` runs on the VM before the vCPU exists (to register zones).
fn long_mode_vm(
    kvm: &Kvm,
    before_vcpu: impl FnOnce(&kvm_ioctls::VmFd),
) -> (
    kvm_ioctls::VmFd,
    kvm_ioctls::VcpuFd,
    GuestMemoryMmap<()>,
    usize,
) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address");
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps MEM_SIZE bytes at `host` and outlives the VM (dropped after it).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");

    // GDT: null, 64-bit code, data, TSS (as Firecracker lays it out).
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    // Identity-map the first GiB with 2 MiB pages.
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | 0x3, GuestAddress(PDPT)).unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + 8 * i))
            .unwrap();
    }
    let code = program();
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();

    before_vcpu(&vm);
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = segment(0x08, 0xb, 1, 1, 0);
    let data = segment(0x10, 0x3, 1, 0, 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        limit: 0xfffff,
        g: 0,
        ..segment(0x18, 0xb, 0, 0, 0)
    };
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= (1 << 0) | (1 << 4) | (1 << 5) | (1 << 31); // PE, ET, NE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE;
    regs.rflags = 0x2;
    regs.rsp = 0x8ff0;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    (vm, vcpu, mem, code.len())
}

/// Runs the vCPU to its HLT (at most 16 exits), one line per exit.
fn run_to_hlt(vcpu: &mut kvm_ioctls::VcpuFd) -> Vec<String> {
    let mut exits = Vec::new();
    for _ in 0..16 {
        let summary = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => format!("out {port:#x} {data:02x?}"),
            VcpuExit::MmioWrite(addr, data) => format!("mmio {addr:#x} {data:02x?}"),
            VcpuExit::Hlt => "hlt".to_string(),
            other => panic!("unexpected exit {other:?} after {exits:?}"),
        };
        let done = summary == "hlt";
        exits.push(summary);
        if done {
            break;
        }
    }
    exits
}

#[test]
fn long_mode_guest_runs_pio_mmio_and_hlt() {
    let Some(kvm) = kvm() else { return };
    let started = std::time::Instant::now();
    let (vm, mut vcpu, mem, code_len) = long_mode_vm(&kvm, |_| {});
    let exits = run_to_hlt(&mut vcpu);
    assert_eq!(
        exits,
        [
            "out 0x10 [42]",
            "out 0x11 [88, 77, 66, 55]",
            &format!("mmio {MMIO:#x} [88]"),
            "hlt"
        ]
    );
    eprintln!(
        "kvm_smoke: VM set-up and run to HLT took {:.2} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let regs = vcpu.get_regs().unwrap();
    assert_eq!(regs.rax, MAGIC, "64-bit register after the run");
    assert_eq!(regs.rip, CODE + code_len as u64, "rip after hlt");
    let sregs = vcpu.get_sregs().unwrap();
    assert_ne!(
        sregs.efer & (1 << 10),
        0,
        "EFER.LMA: the guest ran in long mode"
    );
    let stored: u64 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(stored, MAGIC, "the guest's store through its page tables");
    drop(vcpu);
    drop(vm);
    drop(mem);
}

/// What the VMM relies on for InterruptACK: a write to a coalesced zone does not exit,
/// and waits in KVM's ring until the VMM reads it after a later exit.
#[test]
fn a_write_to_a_coalesced_zone_waits_in_the_ring() {
    let Some(kvm) = kvm() else { return };
    if !kvm.check_extension(Cap::CoalescedMmio) {
        eprintln!("kvm_smoke: SKIPPED coalesced MMIO, not offered by this KVM");
        return;
    }
    let (vm, mut vcpu, mem, _) = long_mode_vm(&kvm, |vm| {
        vm.register_coalesced_mmio(kvm_ioctls::IoEventAddress::Mmio(MMIO), 8)
            .expect("KVM_REGISTER_COALESCED_MMIO");
    });
    vcpu.map_coalesced_mmio_ring().expect("the ring");
    assert_eq!(
        run_to_hlt(&mut vcpu),
        ["out 0x10 [42]", "out 0x11 [88, 77, 66, 55]", "hlt"],
        "no exit for the MMIO write"
    );
    let w = vcpu
        .coalesced_mmio_read()
        .unwrap()
        .expect("the queued write");
    assert_eq!((w.phys_addr, w.len, w.data[0]), (MMIO, 1, 0x88));
    assert!(vcpu.coalesced_mmio_read().unwrap().is_none());
    drop(vcpu);
    drop(vm);
    drop(mem);
}
