//! CPUID for each vCPU: what KVM supports, with the hypervisor bit set and the APIC
//! id and topology of an N-vCPU machine (one thread per core, one socket).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` cores.
fn core_bits(n: u8) -> u32 {
    (u32::from(n.max(1)) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(id);
    let n = u32::from(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        adjust(e, apic_id, n, core_bits(count));
    }
    cpuid
}

fn adjust(e: &mut kvm_cpuid_entry2, apic_id: u32, n: u32, bits: u32) {
    match e.function {
        LEAF_FEATURES => {
            e.ecx |= ECX_HYPERVISOR;
            // EBX: APIC id, logical processor count, CLFLUSH line size (8 × 8 bytes).
            e.ebx = (apic_id << 24) | (n << 16) | (8 << 8) | (e.ebx & 0xff);
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let shared = if (e.eax >> 5) & 0x7 >= 3 { n - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((n - 1) << 26) | (shared << 14);
        }
        LEAF_EXT_TOPOLOGY => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    e.eax = bits;
                    e.ebx = n;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
            e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (n - 1);
        }
        LEAF_AMD_TOPOLOGY => {
            e.eax = apic_id;
            e.ebx = apic_id & 0xff; // core id; threads per core - 1 = 0
            e.ecx = 0; // one node
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0),
            entry(LEAF_FEATURES, 0),
            kvm_cpuid_entry2 {
                function: LEAF_CACHE_PARAMS,
                index: 2,
                eax: 3 << 5,
                ..Default::default()
            },
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
            entry(LEAF_AMD_SIZES, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn hypervisor_bit_and_apic_ids() {
        let s = sample();
        for id in 0..4 {
            let c = for_vcpu(&s, id, 4);
            let f = find(&c, LEAF_FEATURES, 0);
            assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(f.ebx >> 24, u32::from(id));
            assert_eq!((f.ebx >> 16) & 0xff, 4);
            assert_ne!(f.edx & EDX_HTT, 0);
            assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 1).edx, u32::from(id));
        }
    }

    #[test]
    fn topology_counts() {
        let c = for_vcpu(&sample(), 0, 8);
        let core = find(&c, LEAF_EXT_TOPOLOGY, 1);
        assert_eq!(core.ebx, 8);
        assert_eq!(core.eax, 3);
        assert_eq!((core.ecx >> 8) & 0xff, 2);
        assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 0).ebx, 1);
        assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 2).ecx & 0xff00, 0);
        assert_eq!(find(&c, LEAF_AMD_SIZES, 0).ecx & 0xff, 7);
        assert_eq!(find(&c, LEAF_CACHE_PARAMS, 2).eax >> 26, 7);
        let one = for_vcpu(&sample(), 0, 1);
        assert_eq!(find(&one, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn core_bits_rounds_up() {
        assert_eq!(core_bits(1), 0);
        assert_eq!(core_bits(2), 1);
        assert_eq!(core_bits(3), 2);
        assert_eq!(core_bits(4), 2);
        assert_eq!(core_bits(5), 3);
        assert_eq!(core_bits(8), 3);
    }
}
