#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::PathBuf;

use super::*;
use crate::memory::{HIGH_RAM_START, LOW_RAM_MAX};

const SETUP_SECTS: u8 = 4;
const INIT_SIZE: u32 = 0x40_0000;
const PREF_ADDRESS: u64 = 0x100_0000;

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A minimal file shaped like a bzImage: boot sector + setup sectors with a 2.15 setup header, then
/// a protected-mode payload of `payload` bytes (a recognisable pattern).
fn synthetic_bzimage(payload: usize) -> (Vec<u8>, Vec<u8>) {
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut f = vec![0u8; setup_len];
    f[0x1F1] = SETUP_SECTS;
    put(&mut f, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &0x020Fu16.to_le_bytes());
    f[0x211] = 0x01; // LOADED_HIGH
    put(&mut f, 0x214, &0x10_0000u32.to_le_bytes());
    put(&mut f, 0x22C, &0x7FFF_FFFFu32.to_le_bytes());
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes());
    f[0x234] = 1;
    put(&mut f, 0x236, &0x0003u16.to_le_bytes()); // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    put(&mut f, 0x238, &255u32.to_le_bytes());
    put(&mut f, 0x258, &PREF_ADDRESS.to_le_bytes());
    put(&mut f, 0x260, &INIT_SIZE.to_le_bytes());
    let body: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
    f.extend_from_slice(&body);
    (f, body)
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> TempFile {
        let p =
            std::env::temp_dir().join(format!("kvm-host-linux-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn u16_at(p: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(p[o..o + 2].try_into().unwrap())
}
fn u32_at(p: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(p[o..o + 4].try_into().unwrap())
}
fn u64_at(p: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(p[o..o + 8].try_into().unwrap())
}

fn zero_page(ram: &GuestRam) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    ram.read(ZERO_PAGE_ADDR, &mut p).unwrap();
    p
}

fn e820(p: &[u8]) -> Vec<(u64, u64, u32)> {
    (0..usize::from(p[0x1E8]))
        .map(|i| {
            let o = 0x2D0 + 20 * i;
            (u64_at(p, o), u64_at(p, o + 8), u32_at(p, o + 16))
        })
        .collect()
}

#[test]
fn synthetic_bzimage_kernel_initrd_cmdline_and_zero_page() {
    let (image, body) = synthetic_bzimage(64 << 10);
    let kfile = TempFile::new("bz", &image);
    let initrd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let ifile = TempFile::new("initrd", &initrd_bytes);
    let ram = GuestRam::new(64 << 20).unwrap();

    assert_eq!(detect(&kfile.0).unwrap(), KernelFormat::BzImage);
    let k = load_kernel(&ram, &kfile.0).unwrap();
    let hdr = k.header.unwrap();
    assert_eq!(({ hdr.version }, { hdr.init_size }), (0x020F, INIT_SIZE));
    assert_eq!(k.image.entry, 0x10_0200, "startup_64 = 1 MiB + 0x200");
    assert_eq!(k.image.end, 0x10_0000 + body.len() as u64);
    assert_eq!(k.footprint_end, PREF_ADDRESS + u64::from(INIT_SIZE));
    let mut placed = vec![0u8; body.len()];
    ram.read(KERNEL_START, &mut placed).unwrap();
    assert!(placed == body, "payload copied to 1 MiB");

    let initrd = load_initrd(&ram, &k, &ifile.0).unwrap();
    assert_eq!(initrd.size, initrd_bytes.len() as u64);
    assert_eq!(initrd.gpa % PAGE_SIZE, 0);
    assert!(initrd.gpa >= k.footprint_end);
    assert!(initrd.gpa + initrd.size <= 64 << 20);
    assert_eq!(initrd.gpa, ((64 << 20) - initrd.size) & !(PAGE_SIZE - 1));
    let mut back = vec![0u8; initrd_bytes.len()];
    ram.read(initrd.gpa, &mut back).unwrap();
    assert!(back == initrd_bytes, "initrd bytes exact");

    let cmdline = "console=ttyS0 vtest=hv";
    write_boot_params(&ram, &k, cmdline, Some(initrd), 0xE_0000).unwrap();
    let p = zero_page(&ram);
    assert_eq!(p[0x1F1], SETUP_SECTS, "setup header copied");
    assert_eq!(u16_at(&p, 0x1FE), 0xAA55);
    assert_eq!(&p[0x202..0x206], b"HdrS");
    assert_eq!(u16_at(&p, 0x206), 0x020F);
    assert_eq!(p[0x210], 0xFF, "type_of_loader");
    assert_eq!(p[0x211] & 1, 1, "loadflags LOADED_HIGH kept");
    assert_eq!(u32_at(&p, 0x214), 0x10_0000, "code32_start");
    assert_eq!(u32_at(&p, 0x218), initrd.gpa as u32, "ramdisk_image");
    assert_eq!(u32_at(&p, 0x21C), initrd.size as u32, "ramdisk_size");
    assert_eq!(u32_at(&p, 0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
    assert_eq!(u32_at(&p, 0x22C), 0x7FFF_FFFF, "initrd_addr_max");
    assert_eq!(u32_at(&p, 0x238), 255, "cmdline_size is the kernel's");
    assert_eq!(u64_at(&p, 0x70), 0xE_0000, "acpi_rsdp_addr");
    let mut c = vec![0u8; cmdline.len() + 1];
    ram.read(CMDLINE_ADDR, &mut c).unwrap();
    assert_eq!(&c[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(c[cmdline.len()], 0, "NUL-terminated");
    assert_eq!(
        e820(&p),
        vec![
            (0, boot::LOW_MEM_END, 1),
            (boot::ACPI_START, boot::ACPI_END - boot::ACPI_START, 2),
            (KERNEL_START, (64 << 20) - KERNEL_START, 1),
        ]
    );

    // The kernel's cmdline_size (255) bounds the command line, NUL excluded.
    assert!(write_boot_params(&ram, &k, &"x".repeat(255), None, 0).is_ok());
    assert!(matches!(
        write_boot_params(&ram, &k, &"x".repeat(256), None, 0),
        Err(BootError::CmdlineTooLong(_))
    ));
    assert!(write_boot_params(&ram, &k, "a\0b", None, 0).is_err());
}

#[test]
fn initrd_respects_initrd_addr_max_kernel_footprint_and_the_hole() {
    let (image, _) = synthetic_bzimage(4096);
    let kfile = TempFile::new("bz-hole", &image);
    // 3.5 GiB: RAM below the hole up to LOW_RAM_MAX and 512 MiB above 4 GiB (memfds are sparse).
    let ram = GuestRam::new(LOW_RAM_MAX + (512 << 20)).unwrap();
    let mut k = load_kernel(&ram, &kfile.0).unwrap();
    assert_eq!(
        place_initrd(&ram, &k, 8192).unwrap(),
        0x8000_0000 - 8192,
        "below initrd_addr_max + 1"
    );
    write_boot_params(&ram, &k, "", None, 0).unwrap();
    let map = e820(&zero_page(&ram));
    assert_eq!(
        map[2..],
        [
            (KERNEL_START, LOW_RAM_MAX - KERNEL_START, 1),
            (HIGH_RAM_START, 512 << 20, 1)
        ],
        "no RAM in the hole"
    );
    // An initrd that would have to overlap the kernel's footprint is refused.
    k.footprint_end = 0x7FFF_0000;
    assert!(place_initrd(&ram, &k, 0x2_0000).is_err());
    // ELF kernels (no header) get the pre-2.03 limit.
    k.header = None;
    k.footprint_end = 0x100_0000;
    assert_eq!(
        place_initrd(&ram, &k, 4096).unwrap(),
        u64::from(DEFAULT_INITRD_ADDR_MAX) + 1 - 4096
    );
}

#[test]
fn rejects_what_is_not_a_64_bit_bzimage() {
    let (mut image, _) = synthetic_bzimage(4096);
    put(&mut image, 0x236, &0u16.to_le_bytes());
    let f = TempFile::new("bz-32", &image);
    let ram = GuestRam::new(64 << 20).unwrap();
    assert!(matches!(
        load_kernel(&ram, &f.0),
        Err(BootError::Kernel(m)) if m.contains("64-bit")
    ));
    let junk = TempFile::new("junk", &[0u8; 1024]);
    assert!(detect(&junk.0).is_err());
    // init_size beyond RAM: the decompressor would run off the end.
    let (mut big, _) = synthetic_bzimage(4096);
    put(&mut big, 0x260, &(64u32 << 20).to_le_bytes());
    let f = TempFile::new("bz-big", &big);
    assert!(load_kernel(&ram, &f.0).is_err());
}

/// The real kernel from scripts/build-guest-kernel.sh, when VMBUS_GUEST_KERNEL_DIR points at it.
#[test]
fn real_bzimage_when_present() {
    let Some(dir) = std::env::var_os("VMBUS_GUEST_KERNEL_DIR") else {
        eprintln!("skipping: VMBUS_GUEST_KERNEL_DIR is not set");
        return;
    };
    let dir = PathBuf::from(dir);
    let bz = dir.join("bzImage");
    if !bz.exists() {
        eprintln!("skipping: no {}", bz.display());
        return;
    }
    let ram = GuestRam::new(256 << 20).unwrap();
    let k = load_kernel(&ram, &bz).unwrap();
    let h = k.header.unwrap();
    assert!({ h.version } >= 0x020C);
    assert_eq!(k.image.entry, KERNEL_START + STARTUP_64_OFFSET);
    assert!(k.footprint_end > k.image.end);
    let initrd = dir.join("initramfs.cpio.gz");
    let i = initrd
        .exists()
        .then(|| load_initrd(&ram, &k, &initrd).unwrap());
    write_boot_params(&ram, &k, "console=ttyS0", i, 0xE_0000).unwrap();
    let p = zero_page(&ram);
    assert_eq!(&p[0x202..0x206], b"HdrS");
    assert_eq!(p[0x210], 0xFF);
    if let Some(i) = i {
        assert_eq!(u32_at(&p, 0x218), i.gpa as u32);
        let mut magic = [0u8; 2];
        ram.read(i.gpa, &mut magic).unwrap();
        assert_eq!(magic, [0x1F, 0x8B], "gzip initramfs in place");
    }
    let vmlinux = dir.join("vmlinux");
    if vmlinux.exists() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let k = load_kernel(&ram, &vmlinux).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert!(k.image.entry >= KERNEL_START);
    }
}
