//! Cheap header checks on the binaries an image carries: is the kernel an x86-64
//! ELF `vmlinux` or a bzImage, and is a guest program a static x86-64 ELF. The
//! VMM's loader does the full parse; these catch the wrong file early, by name.

/// The two kernel formats the VMM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An uncompressed ELF `vmlinux` (PVH entry when it has one).
    Elf,
    /// A bzImage with boot protocol `version` (e.g. 0x020f).
    BzImage { version: u16 },
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            KernelKind::Elf => f.write_str("ELF x86-64 vmlinux"),
            KernelKind::BzImage { version } => write!(
                f,
                "bzImage, boot protocol {}.{:02}",
                version >> 8,
                version & 0xff
            ),
        }
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_INTERP: u32 = 3;
/// The 64-bit boot protocol (and `xloadflags`) came with 2.12.
const MIN_BZIMAGE_VERSION: u16 = 0x020c;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks an x86-64 little-endian ELF64 header; returns `e_type`.
fn elf64_x86_type(b: &[u8]) -> Result<u16, String> {
    if b.get(..4) != Some(ELF_MAGIC) {
        return Err("not an ELF file".into());
    }
    if b.len() < 64 {
        return Err("ELF header truncated".into());
    }
    if b[4] != ELFCLASS64 || b[5] != ELFDATA2LSB {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let machine = u16_at(b, 18).unwrap_or(0);
    if machine != EM_X86_64 {
        return Err(format!("ELF for machine {machine}, not x86-64 (62)"));
    }
    Ok(u16_at(b, 16).unwrap_or(0))
}

/// What kind of kernel `b` is, or why it is none.
pub fn kernel_kind(b: &[u8]) -> Result<KernelKind, String> {
    if b.starts_with(ELF_MAGIC) {
        let ty = elf64_x86_type(b)?;
        if ty != ET_EXEC {
            return Err(format!(
                "an ELF of type {ty}, not an executable kernel image (vmlinux is ET_EXEC)"
            ));
        }
        return Ok(KernelKind::Elf);
    }
    // Boot sector signature at 0x1fe and "HdrS" at 0x202 (Documentation/arch/x86/boot.rst).
    if u16_at(b, 0x1fe) == Some(0xaa55) && b.get(0x202..0x206) == Some(b"HdrS") {
        let version = u16_at(b, 0x206).unwrap_or(0);
        if version < MIN_BZIMAGE_VERSION {
            return Err(format!(
                "a bzImage with boot protocol {:#06x}; 64-bit boot needs 2.12 or later",
                version
            ));
        }
        return Ok(KernelKind::BzImage { version });
    }
    Err("neither an ELF vmlinux nor a bzImage".into())
}

/// Checks that `b` is a static x86-64 executable (no `PT_INTERP`), as every
/// program in the initramfs must be: the guest has no dynamic loader.
pub fn check_static_elf(b: &[u8]) -> Result<(), String> {
    let ty = elf64_x86_type(b)?;
    if ty != ET_EXEC && ty != ET_DYN {
        return Err(format!("an ELF of type {ty}, not an executable"));
    }
    let phoff = u64_at(b, 32).ok_or("ELF header truncated")? as usize;
    let phentsize = u16_at(b, 54).ok_or("ELF header truncated")? as usize;
    let phnum = u16_at(b, 56).ok_or("ELF header truncated")? as usize;
    if phnum > 0 && phentsize < 56 {
        return Err("ELF program header entries are too small".into());
    }
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or("ELF program header offset overflows")?;
        let p_type = u32_at(b, at).ok_or("ELF program headers truncated")?;
        if p_type == PT_INTERP {
            return Err("dynamically linked (it has an ELF interpreter)".into());
        }
    }
    Ok(())
}
