//! CPUID for a Hyper-V partition on KVM (vmbus-protocol.md §7, kvm-here.md).
//!
//! Starts from KVM's supported set, drops every leaf in `0x40000000..=0x4FFFFFFF` (KVM's own
//! "KVMKVMKVM" signature would make Linux pick KVM over Hyper-V), adds the Hyper-V leaves, sets the
//! hypervisor-present bit, gives each vCPU its APIC id, and clears features this host's instruction
//! emulator cannot execute (POPCNT, CMPXCHG16B, XSAVE, AVX, SMEP/SMAP/UMIP).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Highest Hyper-V leaf presented.
pub const HV_MAX_LEAF: u32 = 0x4000_0005;
/// Leaf 0x40000003 EAX: SynIC MSRs (2), hypercall + guest OS id (5), VP index (6), frequency MSRs
/// (11), TSC invariant control (15). No reference counter MSR (1) without the TSC page (9), or
/// Linux reads time through RDMSR exits.
pub const HV_FEATURES_EAX: u32 = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 11) | (1 << 15);
/// Leaf 0x40000003 EBX: PostMessages (4), SignalEvents (5). Never bit 12 (root partition).
pub const HV_FEATURES_EBX: u32 = (1 << 4) | (1 << 5);
/// Leaf 0x40000003 EDX: frequency MSRs available (8).
pub const HV_FEATURES_EDX: u32 = 1 << 8;
/// Leaf 0x40000004 EAX: deprecate auto-EOI (9) — mandatory for a userspace SynIC.
pub const HV_RECOMMENDATIONS_EAX: u32 = 1 << 9;

const CPUID_1_ECX_CX16: u32 = 1 << 13;
const CPUID_1_ECX_POPCNT: u32 = 1 << 23;
const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
const CPUID_1_ECX_OSXSAVE: u32 = 1 << 27;
const CPUID_1_ECX_AVX: u32 = 1 << 28;
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
const CPUID_7_EBX_CLEAR: u32 = (1 << 5) | (1 << 7) | (1 << 16) | (1 << 20); // AVX2, SMEP, AVX512F, SMAP
const CPUID_7_ECX_UMIP: u32 = 1 << 2;

/// Errors building the CPUID table.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("CPUID table too large: {0}")]
    TooLarge(String),
}

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

fn sig(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

/// The Hyper-V leaves 0x40000000..=0x40000005 for a partition of `vp_count` VPs. The frequency
/// MSRs (EAX bit 11, EDX bit 8) are advertised only when the TSC frequency is known: Linux takes
/// its TSC frequency from them and a 0 would leave it without a usable TSC.
pub fn hyperv_leaves(vp_count: u32, tsc_known: bool) -> Vec<kvm_cpuid_entry2> {
    let (eax, edx) = if tsc_known {
        (HV_FEATURES_EAX, HV_FEATURES_EDX)
    } else {
        (HV_FEATURES_EAX & !(1 << 11), HV_FEATURES_EDX & !(1 << 8))
    };
    vec![
        leaf(
            HV_MAX_LEAF - 5,
            HV_MAX_LEAF,
            sig(b"Micr"),
            sig(b"osof"),
            sig(b"t Hv"),
        ),
        leaf(0x4000_0001, sig(b"Hv#1"), 0, 0, 0),
        // Build number (cosmetic), version 10.0.
        leaf(0x4000_0002, 0, 10 << 16, 0, 0),
        leaf(0x4000_0003, eax, HV_FEATURES_EBX, 0, edx),
        // Spin-wait notification: never.
        leaf(0x4000_0004, HV_RECOMMENDATIONS_EAX, 0xFFFF_FFFF, 0, 0),
        leaf(0x4000_0005, vp_count, vp_count, 0, 0),
    ]
}

/// Patches KVM's supported CPUID for VP `vp` of a `vp_count`-VP Hyper-V partition.
///
/// Note: on this project's PVM host, KVM still reports the host's own leaf 1 ECX/EDX and leaf 7
/// feature bits to the guest whatever the table says (measured); only EAX/EBX of leaf 1 and the
/// hypervisor leaves take effect. Linux guests therefore still need `clearcpuid=…` / `noxsave`.
pub fn partition_entries(
    supported: &[kvm_cpuid_entry2],
    vp: u32,
    vp_count: u32,
    tsc_known: bool,
) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(0x4000_0000..=0x4FFF_FFFF).contains(&e.function))
        .copied()
        .collect();
    for e in &mut out {
        match (e.function, e.index) {
            (1, _) => {
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                e.ecx &= !(CPUID_1_ECX_CX16
                    | CPUID_1_ECX_POPCNT
                    | CPUID_1_ECX_XSAVE
                    | CPUID_1_ECX_OSXSAVE
                    | CPUID_1_ECX_AVX);
                // Initial APIC id in EBX[31:24]; logical processor count in EBX[23:16].
                e.ebx = (e.ebx & 0x0000_FFFF)
                    | ((vp & 0xFF) << 24)
                    | ((vp_count.min(255) & 0xFF) << 16);
            }
            (7, 0) => {
                e.ebx &= !CPUID_7_EBX_CLEAR;
                e.ecx &= !CPUID_7_ECX_UMIP;
            }
            (0xB, _) | (0x1F, _) => e.edx = vp,
            _ => {}
        }
    }
    out.extend(hyperv_leaves(vp_count, tsc_known));
    out
}

/// [`partition_entries`] as a KVM CPUID table.
pub fn partition_cpuid(
    supported: &CpuId,
    vp: u32,
    vp_count: u32,
    tsc_known: bool,
) -> Result<CpuId, CpuidError> {
    let entries = partition_entries(supported.as_slice(), vp, vp_count, tsc_known);
    CpuId::from_entries(&entries).map_err(|e| CpuidError::TooLarge(format!("{e:?}")))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn find(v: &[kvm_cpuid_entry2], f: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f).unwrap()
    }

    #[test]
    fn hyperv_leaves_match_the_reference_values() {
        let v = hyperv_leaves(4, true);
        let no_tsc = hyperv_leaves(4, false);
        assert_eq!(find(&no_tsc, 0x4000_0003).eax, 0x0000_8064);
        assert_eq!(find(&no_tsc, 0x4000_0003).edx, 0);
        let l0 = find(&v, 0x4000_0000);
        assert_eq!(l0.eax, 0x4000_0005);
        let mut s = Vec::new();
        for r in [l0.ebx, l0.ecx, l0.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"Microsoft Hv");
        assert_eq!(
            (l0.ebx, l0.ecx, l0.edx),
            (0x7263_694D, 0x666F_736F, 0x7648_2074)
        );
        assert_eq!(find(&v, 0x4000_0001).eax, 0x3123_7648);
        let l3 = find(&v, 0x4000_0003);
        assert_eq!(l3.eax, 0x0000_8864);
        assert_eq!(l3.ebx, 0x30);
        assert_eq!(l3.edx, 0x100);
        // Must stay clear: STIMER (3), reenlightenment (13), partition id (EBX 1), root (EBX 12).
        assert_eq!(l3.eax & ((1 << 3) | (1 << 13) | (1 << 9) | (1 << 1)), 0);
        assert_eq!(l3.ebx & ((1 << 1) | (1 << 12) | (1 << 20) | (1 << 22)), 0);
        let l4 = find(&v, 0x4000_0004);
        assert_eq!(l4.eax, 0x200);
        assert_eq!(l4.ebx, 0xFFFF_FFFF);
        assert_eq!(find(&v, 0x4000_0005).eax, 4);
    }

    #[test]
    fn kvm_signature_is_dropped_and_features_patched() {
        let supported = vec![
            leaf(
                1,
                0,
                0x0001_0800,
                CPUID_1_ECX_POPCNT | CPUID_1_ECX_CX16 | 1,
                0,
            ),
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: CPUID_7_EBX_CLEAR | 1,
                ecx: CPUID_7_ECX_UMIP,
                ..Default::default()
            },
            leaf(0xB, 0, 0, 0, 0),
            leaf(
                0x4000_0000,
                0x4000_0001,
                sig(b"KVMK"),
                sig(b"VMKV"),
                sig(b"M\0\0\0"),
            ),
            leaf(0x4000_0001, 0xFFFF, 0, 0, 0),
            leaf(0x4000_0100, 0, sig(b"KVMK"), 0, 0),
        ];
        let out = partition_entries(&supported, 3, 4, true);
        assert!(
            !out.iter().any(|e| e.ebx == sig(b"KVMK")),
            "KVM signature must be hidden"
        );
        assert_eq!(
            out.iter()
                .filter(|e| (0x4000_0000..0x5000_0000).contains(&e.function))
                .count(),
            6
        );
        let l1 = find(&out, 1);
        assert_ne!(l1.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & (CPUID_1_ECX_POPCNT | CPUID_1_ECX_CX16), 0);
        assert_eq!(l1.ecx & 1, 1, "other features are kept");
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!(l1.ebx & 0xFFFF, 0x0800);
        let l7 = find(&out, 7);
        assert_eq!(l7.ebx, 1);
        assert_eq!(l7.ecx, 0);
        assert_eq!(find(&out, 0xB).edx, 3);
        assert_eq!(find(&out, 0x4000_0005).eax, 4);
    }
}
