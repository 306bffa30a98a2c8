//! Linux kernels for the 64-bit boot protocol (Documentation/arch/x86/boot.rst): a bzImage (setup
//! header + compressed payload, entered at `startup_64` = load address + 0x200) or an uncompressed
//! vmlinux ELF, an optional initrd, the command line and the zero page (boot_params with E820 and
//! the ACPI RSDP address). The GDT / identity page tables come from [`crate::boot`].
//!
//! Placement: the kernel at 1 MiB (bzImage, its `code32_start`) or its ELF physical addresses; the
//! initrd as high as possible below both `initrd_addr_max` and the end of low RAM, page aligned,
//! and never overlapping the kernel's footprint (for a bzImage the decompressor's working area:
//! `max(load address, pref_address) + init_size`).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::KernelLoader;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use vm_memory::{ByteValued, GuestAddress};

use crate::boot::{
    self, BootError, CMDLINE_ADDR, CMDLINE_MAX, KERNEL_START, LoadedImage, ZERO_PAGE_ADDR,
};
use crate::memory::{GuestRam, PAGE_SIZE};

/// "HdrS" at 0x202.
pub const SETUP_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header in a bzImage (and in boot_params).
pub const SETUP_HEADER_OFFSET: u64 = 0x1F1;
/// The 64-bit entry point's offset from the protected-mode kernel's load address.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// boot.rst: the loader identifies itself as "undefined" (0xFF).
pub const LOADER_UNDEFINED: u8 = 0xFF;
/// `initrd_addr_max` of boot protocols before 2.03.
pub const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37FF_FFFF;
/// COMMAND_LINE_SIZE - 1 on x86 for kernels whose header has no `cmdline_size` (ELF, < 2.06).
pub const DEFAULT_CMDLINE_SIZE: u32 = 2047;
/// xloadflags: the kernel has the legacy 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1;
/// loadflags: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1;

/// What kind of kernel file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A loaded Linux kernel.
#[derive(Copy, Clone, Debug)]
pub struct LinuxKernel {
    pub format: KernelFormat,
    /// 64-bit entry (RIP) and end of the loaded bytes.
    pub image: LoadedImage,
    /// First byte past what the kernel may use while it starts (decompression included).
    pub footprint_end: u64,
    /// The bzImage's setup header (with `code32_start` = where it was loaded).
    pub header: Option<setup_header>,
}

/// Where the initrd went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Initrd {
    pub gpa: u64,
    pub size: u64,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Tells a bzImage ("HdrS" at 0x202) from an ELF (`\x7fELF`).
pub fn detect(path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = Vec::with_capacity(0x206);
    open(path)?
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(|source| BootError::Open {
            path: path.display().to_string(),
            source,
        })?;
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(&SETUP_MAGIC.to_le_bytes()[..]) {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::Kernel(format!(
        "{} is neither an ELF nor a bzImage",
        path.display()
    )))
}

/// Loads a bzImage's protected-mode part at 1 MiB (its `code32_start`).
pub fn load_bzimage(ram: &GuestRam, path: &Path) -> Result<LinuxKernel, BootError> {
    let mut file = open(path)?;
    let r = BzImage::load(
        ram.vm_memory(),
        Some(GuestAddress(KERNEL_START)),
        &mut file,
        Some(GuestAddress(KERNEL_START)),
    )
    .map_err(|e| BootError::Kernel(format!("{}: {e}", path.display())))?;
    let hdr = r
        .setup_header
        .ok_or_else(|| BootError::Kernel("bzImage without a setup header".into()))?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < 0x020C || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Kernel(format!(
            "boot protocol {version:#x} / xloadflags {xloadflags:#x}: no 64-bit entry point"
        )));
    }
    let load = r.kernel_load.0;
    let entry = load + STARTUP_64_OFFSET;
    let run_at = load.max(hdr.pref_address);
    let footprint_end = r.kernel_end.max(run_at + u64::from(hdr.init_size));
    if !ram.contains(load, footprint_end - load) {
        return Err(BootError::Kernel(format!(
            "the kernel needs RAM up to {footprint_end:#x} (init_size {:#x})",
            { hdr.init_size }
        )));
    }
    Ok(LinuxKernel {
        format: KernelFormat::BzImage,
        image: LoadedImage {
            entry,
            end: r.kernel_end,
        },
        footprint_end,
        header: Some(hdr),
    })
}

/// Loads a bzImage or a vmlinux ELF.
pub fn load_kernel(ram: &GuestRam, path: &Path) -> Result<LinuxKernel, BootError> {
    match detect(path)? {
        KernelFormat::BzImage => load_bzimage(ram, path),
        KernelFormat::Elf => {
            let image = boot::load_elf(ram, path)?;
            Ok(LinuxKernel {
                format: KernelFormat::Elf,
                image,
                footprint_end: image.end,
                header: None,
            })
        }
    }
}

fn initrd_addr_max(kernel: &LinuxKernel) -> u64 {
    match kernel.header {
        Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
        _ => u64::from(DEFAULT_INITRD_ADDR_MAX),
    }
}

/// The initrd's address: the highest page below `initrd_addr_max` and the end of low RAM that
/// leaves the kernel's footprint alone.
pub fn place_initrd(ram: &GuestRam, kernel: &LinuxKernel, size: u64) -> Result<u64, BootError> {
    let low_end = ram
        .ranges()
        .first()
        .map_or(0, |&(gpa, len)| gpa.saturating_add(len));
    let limit = low_end.min(initrd_addr_max(kernel).saturating_add(1));
    let too_big = || BootError::Kernel(format!("initrd of {size} bytes does not fit"));
    let gpa = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if gpa < kernel.footprint_end.next_multiple_of(PAGE_SIZE) || u32::try_from(gpa).is_err() {
        return Err(too_big());
    }
    Ok(gpa)
}

/// Copies the initrd file into guest RAM at [`place_initrd`]'s address.
pub fn load_initrd(ram: &GuestRam, kernel: &LinuxKernel, path: &Path) -> Result<Initrd, BootError> {
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .map_err(|source| BootError::Open {
            path: path.display().to_string(),
            source,
        })?;
    let size = bytes.len() as u64;
    let gpa = place_initrd(ram, kernel, size)?;
    ram.write(gpa, &bytes)?;
    Ok(Initrd { gpa, size })
}

/// The zero page for `kernel`: its setup header (bzImage) or a minimal one (ELF), with the
/// loader's fields, the initrd, the command line at [`CMDLINE_ADDR`], E820 and the RSDP.
pub fn boot_params_for(
    ram: &GuestRam,
    kernel: &LinuxKernel,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<boot_params, BootError> {
    let mut p = boot_params::default();
    match kernel.header {
        Some(h) => p.hdr = h,
        None => {
            p.hdr.boot_flag = 0xAA55;
            p.hdr.header = SETUP_MAGIC;
            p.hdr.kernel_alignment = 0x100_0000;
            p.hdr.cmdline_size = DEFAULT_CMDLINE_SIZE;
            p.hdr.loadflags = LOADED_HIGH;
        }
    }
    let max_cmdline = if p.hdr.version >= 0x0206 || kernel.header.is_none() {
        p.hdr.cmdline_size as usize
    } else {
        255
    };
    if cmdline_len > max_cmdline || cmdline_len + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline_len + 1));
    }
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.gpa as u32;
        p.hdr.ramdisk_size = u32::try_from(i.size)
            .map_err(|_| BootError::Kernel("initrd larger than 4 GiB".into()))?;
    }
    p.acpi_rsdp_addr = rsdp;
    let map = boot::e820_map(ram);
    if map.len() > p.e820_table.len() {
        return Err(BootError::Kernel("too many E820 entries".into()));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = map.len() as u8;
    Ok(p)
}

/// Writes the command line and the zero page for `kernel`.
pub fn write_boot_params(
    ram: &GuestRam,
    kernel: &LinuxKernel,
    cmdline: &str,
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Kernel("NUL byte in the command line".into()));
    }
    let params = boot_params_for(ram, kernel, cmdline.len(), initrd, rsdp)?;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    ram.write(CMDLINE_ADDR, &cmd)?;
    ram.write(ZERO_PAGE_ADDR, params.as_slice())?;
    Ok(())
}

#[cfg(test)]
#[path = "linux_boot_tests.rs"]
mod tests;
