//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT with COM1 and the VMBus device
//! Linux's `vmbus_acpi` driver binds to (vmbus-protocol.md §8).
//!
//! DSDT namespace:
//! ```text
//! \_SB.COM1   _HID PNP0501, _UID 0, _CRS { IO 0x3F8/8, IRQ 4 }
//! \_SB.VMOD   _HID "ACPI0004", _UID 0, _CRS { the MMIO hole below the IOAPIC }
//! \_SB.VMOD.VMBS  _HID "VMBus", _CID "VMBUS", _UID 0, _CRS { } (x86: the interrupt is always
//!             HYPERVISOR_CALLBACK_VECTOR 0xF3, Linux overrides any IRQ resource; an empty _CRS
//!             keeps the resource walk happy)
//! ```
//! The tables live in `0xE0000..0x100000` (reserved in E820), RSDP first so that Linux's legacy
//! BIOS-area scan finds it too; the zero page also carries its address.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use crate::boot::{ACPI_END, ACPI_START};
use crate::memory::{GuestRam, LOW_RAM_MAX};
use crate::serial::{COM1_BASE, COM1_IRQ};

const OEM_ID: [u8; 6] = *b"VMBKVM";
const OEM_TABLE: [u8; 8] = *b"VMBKVM01";
const OEM_REVISION: u32 = 1;

/// LAPIC and IOAPIC MMIO bases (KVM's in-kernel irqchip).
pub const LAPIC_BASE: u32 = 0xFEE0_0000;
pub const IOAPIC_BASE: u32 = 0xFEC0_0000;
/// MMIO window offered to VMBus devices: from the end of low RAM to the IOAPIC.
pub const VMBUS_MMIO_LOW: u32 = LOW_RAM_MAX as u32;
pub const VMBUS_MMIO_LOW_LEN: u32 = IOAPIC_BASE - VMBUS_MMIO_LOW;

/// FADT IA-PC boot flags: no VGA (bit 2), no CMOS RTC (bit 5). No 8042 (bit 1 clear).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit 0xE0000..0x100000")]
    TooLarge(u64),
    #[error("writing ACPI tables: {0}")]
    Memory(#[from] crate::memory::MemoryError),
}

/// Where the tables went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
}

/// Pre-serialized AML (lets nested objects be built one statement at a time).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(a: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Raw(v)
}

/// The DSDT.
pub fn dsdt() -> Vec<u8> {
    let com1_crs = raw(&ResourceTemplate::new(vec![
        &aml::IO::new(COM1_BASE, COM1_BASE, 1, 8),
        &Interrupt::new(true, true, false, false, COM1_IRQ),
    ]));
    let com1 = raw(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &com1_crs),
        ],
    ));
    let vmbus_crs = raw(&ResourceTemplate::new(vec![]));
    let vmbus = raw(&Device::new(
        Path::new("VMBS"),
        vec![
            &Name::new(Path::new("_HID"), &"VMBus"),
            &Name::new(Path::new("_CID"), &"VMBUS"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &vmbus_crs),
        ],
    ));
    let vmod_crs = raw(&ResourceTemplate::new(vec![&Memory32Fixed::new(
        true,
        VMBUS_MMIO_LOW,
        VMBUS_MMIO_LOW_LEN,
    )]));
    let vmod = raw(&Device::new(
        Path::new("VMOD"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0004"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &vmod_crs),
            &vmbus,
        ],
    ));
    let sb = raw(&Scope::new(Path::new("\\_SB_"), vec![&com1, &vmod]));
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    table.append_slice(&sb.0);
    table.as_slice().to_vec()
}

/// The MADT: one enabled local APIC per VP (APIC id = VP index), the IOAPIC at GSI 0, PC-AT
/// compatible (KVM's in-kernel 8259s exist).
pub fn madt(vp_count: u32) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, LAPIC_BASE);
    t.write_u32(40, 1); // PCAT_COMPAT
    for vp in 0..vp_count.min(255) {
        // type 0, length 8, ACPI processor uid, APIC id, flags (enabled)
        t.append_slice(&[0, 8, vp as u8, vp as u8, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![1u8, 12, vp_count.min(254) as u8, 0];
    ioapic.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    t.as_slice().to_vec()
}

/// The FADT: hardware-reduced ACPI, DSDT at `dsdt_addr`, hypervisor vendor "VMBKVM".
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMBusKVM").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn align(x: u64) -> u64 {
    (x + 63) & !63
}

/// Builds and writes every table; returns their addresses.
pub fn write_tables(ram: &GuestRam, vp_count: u32) -> Result<AcpiLayout, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT with three entries: 36 + 3 × 8.
    let fadt_addr = align(xsdt_addr + 36 + 3 * 8);
    let madt_addr = align(fadt_addr + FADT_LEN);
    let madt_bytes = madt(vp_count);
    let dsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let dsdt_bytes = dsdt();
    let end = dsdt_addr + dsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let fadt_bytes = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(dsdt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    ram.zero(ACPI_START, ACPI_END - ACPI_START)?;
    ram.write(rsdp_addr, &rsdp_bytes)?;
    ram.write(xsdt_addr, &xsdt_bytes)?;
    ram.write(fadt_addr, &fadt_bytes)?;
    ram.write(madt_addr, &madt_bytes)?;
    ram.write(dsdt_addr, &dsdt_bytes)?;
    Ok(AcpiLayout {
        rsdp: rsdp_addr,
        xsdt: xsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        dsdt: dsdt_addr,
    })
}

const FADT_LEN: u64 = 276;

/// Sum of all bytes (a valid ACPI table sums to 0).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests;
