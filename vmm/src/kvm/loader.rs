//! Puts the kernel, initramfs and command line into guest memory and writes what
//! the kernel reads at entry: the PVH start info or the Linux zero page.

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu_state::EntryMode;
use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, MMIO_GAP_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use super::memory::e820_map;

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage sits 0x200 past its protected-mode start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel is neither an ELF vmlinux nor a bzImage (first bytes {0:02x?})")]
    NotAKernel(Vec<u8>),
    #[error("cannot load the kernel: {0}")]
    Kernel(String),
    #[error("the initramfs ({size} bytes) does not fit in guest memory above the kernel (which ends at {kernel_end:#x}); give the guest more memory")]
    InitrdTooBig { size: usize, kernel_end: u64 },
    #[error("the kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data into guest memory")]
    Memory,
}

/// Where the boot vCPU starts, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub mode: EntryMode,
    pub addr: u64,
}

/// Where each part of an initramfs made of `sizes` concatenated archives starts,
/// and the total length: every archive after the first starts 4-byte aligned, as
/// the kernel's unpacker expects of concatenated cpio archives.
pub fn initrd_layout(sizes: &[usize]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        let start = if i == 0 { 0 } else { end.next_multiple_of(4) };
        offsets.push(start);
        end = start + size;
    }
    (offsets, end)
}

/// Loads `kernel` (ELF vmlinux, preferring its PVH entry, or bzImage), the initramfs
/// and the command line, and writes the boot structures for the chosen entry. The
/// initramfs is `initrd`'s archives, concatenated (see [`initrd_layout`]); each is
/// written straight from where it lies (the image file's bytes), with no copy.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &[u8],
    initrd: &[&[u8]],
    cmdline: &str,
) -> Result<Entry, LoadError> {
    let mut image = Cursor::new(kernel);
    let highmem = Some(GuestAddress(HIMEM_START));
    let (entry, kernel_end, header) = if kernel.starts_with(b"\x7fELF") {
        let r = Elf::load(mem, None, &mut image, highmem)
            .map_err(|e| LoadError::Kernel(e.to_string()))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Entry {
                mode: EntryMode::Pvh,
                addr: addr.raw_value(),
            },
            _ => Entry {
                mode: EntryMode::Linux64,
                addr: r.kernel_load.raw_value(),
            },
        };
        (entry, r.kernel_end, None)
    } else if kernel.len() > 0x206 && &kernel[0x202..0x206] == b"HdrS" {
        let r = BzImage::load(mem, None, &mut image, highmem)
            .map_err(|e| LoadError::Kernel(e.to_string()))?;
        let entry = Entry {
            mode: EntryMode::Linux64,
            addr: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
        };
        (entry, r.kernel_end, r.setup_header)
    } else {
        return Err(LoadError::NotAKernel(
            kernel.iter().take(8).copied().collect(),
        ));
    };

    let (offsets, initrd_len) = initrd_layout(&initrd.iter().map(|p| p.len()).collect::<Vec<_>>());
    let initrd_addr = place_initrd(
        mem_bytes,
        kernel_end,
        initrd_len,
        header.map(|h| h.initrd_addr_max),
    )?;
    let mut written = 0usize;
    for (part, &at) in initrd.iter().zip(&offsets) {
        // The alignment gap is zeros, whatever the memory held.
        let gap = [0u8; 3];
        mem.write_slice(
            &gap[..at - written],
            GuestAddress(initrd_addr + written as u64),
        )
        .map_err(|_| LoadError::Memory)?;
        mem.write_slice(part, GuestAddress(initrd_addr + at as u64))
            .map_err(|_| LoadError::Memory)?;
        written = at + part.len();
    }

    if cmdline.len() >= CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;

    match entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, mem_bytes, initrd_addr, initrd_len)?,
        EntryMode::Linux64 => {
            let zp = zero_page(header, mem_bytes, cmdline.len(), initrd_addr, initrd_len);
            mem.write_obj(zp, GuestAddress(ZERO_PAGE_ADDR))
                .map_err(|_| LoadError::Memory)?;
        }
    }
    Ok(entry)
}

/// The initramfs goes page-aligned at the top of low RAM, above the kernel and
/// below what the kernel says it can reach.
pub fn place_initrd(
    mem_bytes: u64,
    kernel_end: u64,
    size: usize,
    addr_max: Option<u32>,
) -> Result<u64, LoadError> {
    let mut top = mem_bytes.min(MMIO_GAP_START);
    if let Some(max) = addr_max.filter(|m| *m != 0) {
        top = top.min(u64::from(max) + 1);
    }
    let size = size as u64;
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(a) if a >= kernel_end => Ok(a),
        _ => Err(LoadError::InitrdTooBig {
            size: size as usize,
            kernel_end,
        }),
    }
}

pub fn zero_page(
    header: Option<setup_header>,
    mem_bytes: u64,
    cmdline_len: usize,
    initrd_addr: u64,
    initrd_len: usize,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32 + 1;
    if initrd_len > 0 {
        p.hdr.ramdisk_image = initrd_addr as u32;
        p.hdr.ramdisk_size = initrd_len as u32;
    }
    let map = e820_map(mem_bytes);
    for (i, e) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    p
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd_addr: u64,
    initrd_len: usize,
) -> Result<(), LoadError> {
    let map = e820_map(mem_bytes);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(
                PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            ),
        )
        .map_err(|_| LoadError::Memory)?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if initrd_len > 0 {
        let module = hvm_modlist_entry {
            paddr: initrd_addr,
            size: initrd_len as u64,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|_| LoadError::Memory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|_| LoadError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::create_guest_memory;

    #[test]
    fn initrd_goes_page_aligned_to_the_top() {
        let a = place_initrd(128 << 20, 0x200_0000, 5000, None).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 5000 <= 128 << 20);
        assert!(a >= (128 << 20) - 8192);
        let capped = place_initrd(4 << 30, 0x200_0000, 4096, Some(0x7fff_ffff)).unwrap();
        assert_eq!(capped, 0x8000_0000 - 4096);
        assert!(matches!(
            place_initrd(64 << 20, 60 << 20, 8 << 20, None),
            Err(LoadError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn zero_page_has_loader_fields_and_e820() {
        let zp = zero_page(None, 256 << 20, 10, 0x800_0000, 99);
        let hdr = zp.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ hdr.ramdisk_size }, 99);
        assert_eq!(zp.e820_entries, 3);
        let last = zp.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, 256 << 20);
    }

    #[test]
    fn junk_is_not_a_kernel() {
        let mem = create_guest_memory(64).unwrap();
        let err = load(
            &mem,
            64 << 20,
            b"#!/bin/sh\necho hi\n",
            &[],
            "console=ttyS0",
        )
        .unwrap_err();
        assert!(matches!(err, LoadError::NotAKernel(_)), "{err}");
        let err = load(&mem, 64 << 20, b"\x7fELF\x02\x01\x01", &[], "").unwrap_err();
        assert!(matches!(err, LoadError::Kernel(_)), "{err}");
        let mut fake_bz = vec![0u8; 0x400];
        fake_bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(load(&mem, 64 << 20, &fake_bz, &[], "").is_err());
    }

    /// The smallest ELF64 vmlinux the loader accepts: one header, one PT_LOAD of
    /// `code` at `paddr`, entry at `paddr`, and a PVH note when `pvh_entry` is set.
    fn minimal_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let note = pvh_entry.map(|e| {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz: "Xen\0"
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&e.to_le_bytes());
            n
        });
        let phnum = 1 + usize::from(note.is_some());
        let code_off = EHDR + phnum * PHDR;
        let note_off = code_off + code.len();
        let mut f = vec![0u8; EHDR];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // ELFDATA2LSB
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let phdr = |kind: u32, off: usize, addr: u64, len: usize| {
            let mut p = vec![0u8; PHDR];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&(off as u64).to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&(len as u64).to_le_bytes());
            p[40..48].copy_from_slice(&(len as u64).to_le_bytes());
            p
        };
        f.extend(phdr(1, code_off, paddr, code.len())); // PT_LOAD
        if let Some(n) = &note {
            f.extend(phdr(4, note_off, 0, n.len())); // PT_NOTE
        }
        f.extend_from_slice(code);
        if let Some(n) = note {
            f.extend(n);
        }
        f
    }

    #[test]
    fn a_minimal_elf_loads_with_its_cmdline_and_zero_page() {
        let mem = create_guest_memory(64).unwrap();
        let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp back
        let elf = minimal_elf(0x100_0000, &code, None);
        let entry = load(&mem, 64 << 20, &elf, &[&b"initrd"[..]], "console=ttyS0").unwrap();
        assert_eq!(
            entry,
            Entry {
                mode: EntryMode::Linux64,
                addr: 0x100_0000
            }
        );
        let mut loaded = [0u8; 3];
        mem.read_slice(&mut loaded, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(loaded, code);
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ zp.hdr.ramdisk_size }, 6);
        assert_eq!({ zp.hdr.cmdline_size }, 14);
    }

    #[test]
    fn initrd_parts_start_four_byte_aligned() {
        assert_eq!(initrd_layout(&[]), (vec![], 0));
        assert_eq!(initrd_layout(&[5]), (vec![0], 5));
        assert_eq!(initrd_layout(&[5, 3, 8]), (vec![0, 8, 12], 20));
        assert_eq!(initrd_layout(&[4, 0, 2]), (vec![0, 4, 4], 6));
    }

    #[test]
    fn initrd_parts_land_concatenated_with_zero_gaps() {
        let mem = create_guest_memory(64).unwrap();
        // Dirty the top of memory, where the initramfs goes, so the gap must be written.
        mem.write_slice(&[0xaa; 8192], GuestAddress((64 << 20) - 8192))
            .unwrap();
        let elf = minimal_elf(0x100_0000, &[0xf4], None);
        load(&mem, 64 << 20, &elf, &[&b"abcde"[..], &b"XYZ"[..]], "").unwrap();
        let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ zp.hdr.ramdisk_size }, 11);
        let mut got = [0u8; 11];
        let at = zp.hdr.ramdisk_image;
        mem.read_slice(&mut got, GuestAddress(u64::from(at)))
            .unwrap();
        assert_eq!(&got, b"abcde\0\0\0XYZ");
    }

    #[test]
    fn a_pvh_note_selects_the_pvh_entry() {
        let mem = create_guest_memory(64).unwrap();
        let elf = minimal_elf(0x100_0000, &[0xf4], Some(0x100_0000));
        let entry = load(&mem, 64 << 20, &elf, &[], "").unwrap();
        assert_eq!(entry.mode, EntryMode::Pvh);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!({ info.magic }, PVH_MAGIC);
    }

    #[test]
    fn long_cmdline_is_refused() {
        let mem = create_guest_memory(64).unwrap();
        let elf = minimal_elf(0x100_0000, &[0xf4], None);
        // The longest that fits with its NUL loads; one byte more is refused, by length.
        let longest = "x".repeat(CMDLINE_MAX - 1);
        load(&mem, 64 << 20, &elf, &[], &longest).unwrap();
        let long = "x".repeat(CMDLINE_MAX);
        let err = load(&mem, 64 << 20, &elf, &[], &long).unwrap_err();
        assert!(
            matches!(err, LoadError::CmdlineTooLong(n) if n == CMDLINE_MAX),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "the kernel command line is {CMDLINE_MAX} bytes; the limit is {}",
                CMDLINE_MAX - 1
            )
        );
    }
}
