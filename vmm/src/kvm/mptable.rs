//! The Intel MultiProcessor table: how a guest without ACPI finds its vCPUs, its
//! IO-APIC and how legacy IRQs are wired.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, MAX_VCPUS};

/// ISA IRQs 0..24 are routed to the IO-APIC pin of the same number.
const IOAPIC_PINS: u8 = 24;
const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs requested; the MP table describes 1 to {max}", max = MAX_VCPUS)]
    VcpuCount(u8),
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// Builds the floating pointer and the configuration table as bytes, for a table
/// placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus; // the first id after the local APICs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, BUS_ID_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let mut ioapic = vec![2, ioapic_id, IOAPIC_VERSION, CPU_ENABLED];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&ioapic);
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Every ISA IRQ, the PIT's IRQ 0 included, is a plain interrupt on its own
        // pin: Linux's timer check looks for IRQ 0 as an INT entry.
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, BUS_ID_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of the boot CPU is ExtINT (the 8259), LINT1 of every CPU is NMI.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = vec![0u8; 44];
    table[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = MPC_SPEC_REV;
    table[8..16].copy_from_slice(b"IRONVMM ");
    table[16..28].copy_from_slice(b"MICROVM     ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MPC_SPEC_REV;
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table at the start of the EBDA, where Linux scans for it.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| MpTableError::Write)
}

/// The byte that makes the sum of `bytes` zero (`bytes` holds a zero in its place).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_hold_for_every_vcpu_count() {
        for n in 1..=MAX_VCPUS {
            let b = build(EBDA_START, n).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as usize, n as usize + 1 + 1 + 24 + 2);
            // processors come first, the boot one flagged
            assert_eq!(t[44], 0);
            assert_eq!(t[44 + 3], CPU_ENABLED | CPU_BOOT);
            if n > 1 {
                assert_eq!(t[64 + 1], 1);
                assert_eq!(t[64 + 3], CPU_ENABLED);
            }
            // fits below the end of the EBDA
            assert!(EBDA_START + b.len() as u64 <= 0xa0000);
            // IRQ 0 (the PIT) must be a plain INT entry on pin 0: Linux's timer check needs it
            let first_irq = 44 + 20 * n as usize + 8 + 8;
            assert_eq!(
                &t[first_irq..first_irq + 8],
                &[3, INT_TYPE_INT, 0, 0, BUS_ID_ISA, 0, n, 0]
            );
        }
    }

    #[test]
    fn vcpu_count_is_checked() {
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, MAX_VCPUS + 1).is_err());
    }
}
