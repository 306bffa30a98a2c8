use super::*;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn read_table(ram: &GuestRam, gpa: u64) -> Vec<u8> {
    let mut head = [0u8; 8];
    ram.read(gpa, &mut head).unwrap();
    let len = u32_at(&head, 4) as usize;
    let mut t = vec![0u8; len];
    ram.read(gpa, &mut t).unwrap();
    t
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_table_sums_to_zero_and_xsdt_points_at_them() {
    let ram = GuestRam::new(32 << 20).unwrap();
    let l = write_tables(&ram, 4).unwrap();
    let mut rsdp = [0u8; 36];
    ram.read(l.rsdp, &mut rsdp).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(checksum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(checksum(&rsdp), 0, "extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2 (XSDT)");
    assert_eq!(u64_at(&rsdp, 24), l.xsdt);

    let xsdt = read_table(&ram, l.xsdt);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(checksum(&xsdt), 0);
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt, o))
        .collect();
    assert_eq!(entries, vec![l.fadt, l.madt, l.dsdt]);

    for (addr, sig) in [(l.fadt, b"FACP"), (l.madt, b"APIC"), (l.dsdt, b"DSDT")] {
        let t = read_table(&ram, addr);
        assert_eq!(&t[..4], sig);
        assert_eq!(checksum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert!(addr + t.len() as u64 <= ACPI_END);
    }
}

#[test]
fn fadt_is_hardware_reduced_and_names_the_dsdt() {
    let f = fadt(0xE1234);
    assert_eq!(f.len() as u64, FADT_LEN);
    assert_eq!(u32_at(&f, 4) as u64, FADT_LEN);
    assert_eq!(checksum(&f), 0);
    assert_eq!(u64_at(&f, 140), 0xE1234, "X_DSDT");
    assert_ne!(u32_at(&f, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_eq!(u16::from_le_bytes([f[109], f[110]]), IAPC_BOOT_ARCH);
}

#[test]
fn madt_lists_one_lapic_per_vp_and_the_ioapic() {
    let m = madt(3);
    assert_eq!(checksum(&m), 0);
    assert_eq!(u32_at(&m, 36), LAPIC_BASE);
    assert_eq!(u32_at(&m, 40), 1);
    let mut off = 44;
    let mut lapics = Vec::new();
    let mut ioapics = 0;
    while off < m.len() {
        let (ty, len) = (m[off], m[off + 1] as usize);
        match ty {
            0 => {
                assert_eq!(len, 8);
                lapics.push((m[off + 2], m[off + 3], u32_at(&m, off + 4)));
            }
            1 => {
                assert_eq!(len, 12);
                assert_eq!(u32_at(&m, off + 4), IOAPIC_BASE);
                ioapics += 1;
            }
            _ => panic!("unexpected MADT entry {ty}"),
        }
        off += len;
    }
    assert_eq!(off, m.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapics, 1);
}

#[test]
fn dsdt_has_com1_and_the_vmbus_device_linux_matches() {
    let d = dsdt();
    assert_eq!(checksum(&d), 0);
    assert_eq!(u32_at(&d, 4) as usize, d.len());
    // Names, as AML NameSegs.
    for seg in [
        &b"_SB_"[..],
        b"COM1",
        b"VMOD",
        b"VMBS",
        b"_HID",
        b"_CID",
        b"_UID",
        b"_CRS",
    ] {
        assert!(contains(&d, seg), "{}", String::from_utf8_lossy(seg));
    }
    // String _HID / _CID (StringPrefix 0x0D, NUL-terminated): what vmbus_acpi_device_ids match.
    assert!(contains(&d, b"\x0DVMBus\0"));
    assert!(contains(&d, b"\x0DVMBUS\0"));
    assert!(contains(&d, b"\x0DACPI0004\0"));
    // EISAID("PNP0501") = 0x0105D041 as a DWord constant.
    assert!(contains(&d, &[0x0C, 0x41, 0xD0, 0x05, 0x01]));
    // COM1 resources: IO descriptor for 0x3F8 length 8, extended IRQ 4.
    assert!(contains(&d, &[0x47, 1, 0xF8, 0x03, 0xF8, 0x03, 1, 8]));
    assert!(contains(&d, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
    // VMOD's MMIO window: Memory32Fixed (0x86) read/write at the hole.
    let mut win = vec![0x86, 9, 0, 1];
    win.extend_from_slice(&VMBUS_MMIO_LOW.to_le_bytes());
    win.extend_from_slice(&VMBUS_MMIO_LOW_LEN.to_le_bytes());
    assert!(contains(&d, &win));
    // VMBS must be inside VMOD: its Device op comes after VMOD's.
    let vmod = d.windows(4).position(|w| w == b"VMOD").unwrap();
    let vmbs = d.windows(4).position(|w| w == b"VMBS").unwrap();
    assert!(vmbs > vmod);
}
