//! 64-bit direct boot: ELF loading, GDT, identity page tables, long-mode registers, and the Linux
//! zero page (boot_params with E820) for the Linux 64-bit boot protocol.
//!
//! Guest physical layout below 1 MiB:
//!
//! | GPA | what |
//! |---|---|
//! | 0x0500 | GDT: null, null, code64 (0x10), data (0x18), TSS (0x20) |
//! | 0x7000 | Linux zero page (boot_params); RSI points here |
//! | 0x9000 | PML4; 0xA000 PDPT; 0xB000–0xEFFF four page directories (identity map of 4 GiB, 2 MiB pages) |
//! | 0x20000 | kernel command line |
//! | 0xE0000–0xFFFFF | ACPI tables (RSDP at 0xE0000), reserved in E820 |
//! | 0x100000 | kernel / test guest image |

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use vm_memory::{ByteValued, GuestAddress};

use crate::memory::{GuestRam, HIGH_RAM_START};

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xA000;
pub const PD_ADDR: u64 = 0xB000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
pub const ACPI_START: u64 = 0xE_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const KERNEL_START: u64 = 0x10_0000;
/// End of the low conventional memory Linux may use (below the EBDA convention).
pub const LOW_MEM_END: u64 = 0x9_FC00;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("loading ELF: {0}")]
    Elf(String),
    #[error("guest RAM too small for the boot structures: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("command line of {0} bytes is too long")]
    CmdlineTooLong(usize),
    #[error("the image entry {0:#x} is not in guest RAM")]
    BadEntry(u64),
    #[error("Linux kernel: {0}")]
    Kernel(String),
}

/// A loaded image.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: u64,
    pub end: u64,
}

/// Loads an ELF (the test guest, or a Linux vmlinux) at its physical addresses.
pub fn load_elf(ram: &GuestRam, path: &Path) -> Result<LoadedImage, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let r = Elf::load(
        ram.vm_memory(),
        None,
        &mut file,
        Some(GuestAddress(KERNEL_START)),
    )
    .map_err(|e| BootError::Elf(e.to_string()))?;
    let entry = r.kernel_load.0;
    if !ram.contains(entry, 1) {
        return Err(BootError::BadEntry(entry));
    }
    Ok(LoadedImage {
        entry,
        end: r.kernel_end,
    })
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xFF00_0000) << 32)
        | (u64::from(flags & 0xF0FF) << 40)
        | (u64::from(limit & 0x000F_0000) << 32)
        | (u64::from(base & 0x00FF_FFFF) << 16)
        | u64::from(limit & 0x0000_FFFF)
}

/// The boot GDT (Linux's __BOOT_CS = 0x10, __BOOT_DS = 0x18 layout).
pub fn gdt() -> [u64; 6] {
    [
        0,
        0,
        gdt_entry(0xA09B, 0, 0xF_FFFF), // code: 64-bit, present, exec/read, accessed
        gdt_entry(0xC093, 0, 0xF_FFFF), // data: 32-bit, present, read/write, accessed
        gdt_entry(0x808B, 0, 0xF_FFFF), // TSS (busy), low half
        0,                              // TSS high half
    ]
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    let flags = (entry >> 40) as u16;
    kvm_segment {
        base: ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24),
        limit: {
            let raw = ((entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)) as u32;
            // Granularity: 4 KiB units.
            if flags & 0x8000 != 0 {
                (raw << 12) | 0xFFF
            } else {
                raw
            }
        },
        selector,
        type_: (flags & 0xF) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and the identity page tables (first 4 GiB, 2 MiB pages) into guest RAM.
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), BootError> {
    for (i, e) in gdt().iter().enumerate() {
        ram.write_u64(GDT_ADDR + 8 * i as u64, *e)?;
    }
    ram.zero(PML4_ADDR, 0x6000)?;
    ram.write_u64(PML4_ADDR, PDPT_ADDR | 3)?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        ram.write_u64(PDPT_ADDR + i * 8, pd | 3)?;
        let mut table = vec![0u8; 4096];
        for (j, chunk) in table.chunks_exact_mut(8).enumerate() {
            let addr = ((i << 9) + j as u64) << 21;
            // present | writable | 2 MiB page
            chunk.copy_from_slice(&(addr | 0x83).to_le_bytes());
        }
        ram.write(pd, &table)?;
    }
    Ok(())
}

/// Long-mode special registers: paging on with the identity map, flat segments from [`gdt`].
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let g = gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (g.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(CODE_SELECTOR, g[2]);
    let data = segment(DATA_SELECTOR, g[3]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, g[4]);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the entry point. `args` go to RDI, RDX, RCX (RSI = zero page, as the Linux
/// 64-bit boot protocol wants).
pub fn entry_regs(entry: u64, args: [u64; 3]) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rsi: ZERO_PAGE_ADDR,
        rdi: args[0],
        rdx: args[1],
        rcx: args[2],
        ..Default::default()
    }
}

/// The E820 map for `ram`: low memory, the ACPI area (reserved), RAM from 1 MiB, RAM above 4 GiB.
pub fn e820_map(ram: &GuestRam) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: LOW_MEM_END,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            r#type: E820_RESERVED,
        },
    ];
    for (gpa, len) in ram.ranges() {
        let end = gpa + len;
        let start = gpa.max(KERNEL_START);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    debug_assert!(
        map.iter()
            .all(|e| e.addr < HIGH_RAM_START || e.r#type == E820_RAM)
    );
    map
}

/// Writes the Linux zero page (with E820 and the ACPI RSDP address) and the command line.
pub fn write_linux_zero_page(ram: &GuestRam, cmdline: &str, rsdp: u64) -> Result<(), BootError> {
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    if cmd.len() > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmd.len()));
    }
    ram.write(CMDLINE_ADDR, &cmd)?;
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xFF;
    params.hdr.boot_flag = 0xAA55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (cmd.len() - 1) as u32;
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(ram);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    ram.write(ZERO_PAGE_ADDR, params.as_slice())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_to_flat_long_mode() {
        let g = gdt();
        assert_eq!(g[2], 0x00AF_9B00_0000_FFFF);
        assert_eq!(g[3], 0x00CF_9300_0000_FFFF);
        let cs = segment(CODE_SELECTOR, g[2]);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.s, cs.g),
            (1, 0, 1, 0xB, 1, 1)
        );
        assert_eq!(cs.limit, 0xFFFF_FFFF);
        let ds = segment(DATA_SELECTOR, g[3]);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment(TSS_SELECTOR, g[4]);
        assert_eq!((tr.s, tr.type_), (0, 0xB));
    }

    #[test]
    fn identity_map_and_zero_page() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_boot_tables(&ram).unwrap();
        assert_eq!(ram.read_u64(PML4_ADDR).unwrap(), PDPT_ADDR | 3);
        assert_eq!(
            ram.read_u64(PDPT_ADDR + 24).unwrap(),
            (PD_ADDR + 0x3000) | 3
        );
        // The last 2 MiB page of the 4th GiB maps the LAPIC area identically.
        assert_eq!(
            ram.read_u64(PD_ADDR + 0x3000 + 511 * 8).unwrap(),
            0xFFE0_0000 | 0x83
        );
        write_linux_zero_page(&ram, "console=ttyS0", 0xE0000).unwrap();
        let mut p = [0u8; 4096];
        ram.read(ZERO_PAGE_ADDR, &mut p).unwrap();
        assert_eq!(&p[0x202..0x206], b"HdrS");
        assert_eq!(p[0x1e8], 3, "low RAM, ACPI reserved, RAM from 1 MiB");
        assert_eq!(
            u64::from_le_bytes(p[0x70..0x78].try_into().unwrap()),
            0xE0000
        );
        let e2 = &p[0x2d0 + 2 * 20..0x2d0 + 3 * 20];
        assert_eq!(
            u64::from_le_bytes(e2[0..8].try_into().unwrap()),
            KERNEL_START
        );
        assert_eq!(
            u64::from_le_bytes(e2[8..16].try_into().unwrap()),
            (64 << 20) - KERNEL_START
        );
        let mut c = [0u8; 14];
        ram.read(CMDLINE_ADDR, &mut c).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
        assert!(write_linux_zero_page(&ram, &"x".repeat(5000), 0).is_err());
    }
}
