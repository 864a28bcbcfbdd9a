//! Guest RAM (via vm-memory) and the e820 map that describes it to the guest.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least {min} MiB)", min = super::layout::MIN_MEM_MIB)]
    TooSmall(u64),
    #[error("guest memory of {0} MiB is too large (at most 65536 MiB)")]
    TooLarge(u64),
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Mmap(u64, String),
}

/// The RAM ranges for `mem_bytes` of guest memory: below the 32-bit MMIO gap, then
/// above 4 GiB for the rest.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// Maps guest RAM. Memory is anonymous and lazily faulted in, so a large `--mem`
/// costs only what the guest touches.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_mib < super::layout::MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if mem_mib > 65536 {
        return Err(MemoryError::TooLarge(mem_mib));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib << 20))
        .map_err(|e| MemoryError::Mmap(mem_mib, e.to_string()))
}

/// The e820 map: low RAM up to the EBDA, the legacy hole reserved, RAM from 1 MiB
/// to the MMIO gap, and RAM above 4 GiB if there is more.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_bytes.min(MMIO_GAP_START);
    map.push(E820Entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        kind: E820_RAM,
    });
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_memory_is_one_region_and_three_e820_entries() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[1].addr + m[1].size, 0x10_0000);
        assert_eq!(
            m[2],
            E820Entry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(ram_ranges(128 << 20).len(), 1);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let mem = 4u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1 as u64, MMIO_GAP_START);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[1].1 as u64, mem - MMIO_GAP_START);
        let m = e820_map(mem);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn guest_memory_bounds_are_checked() {
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::TooSmall(1))
        ));
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooLarge(_))
        ));
        let gm = create_guest_memory(64).unwrap();
        assert_eq!(gm.num_regions(), 1);
    }
}
