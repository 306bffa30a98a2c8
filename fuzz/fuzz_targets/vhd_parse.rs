//! Fuzzes opening arbitrary bytes as a VHD image (`vsp_storage::vhd`), reading from it, writing
//! to it and inspecting it.
//!
//! Input: one flag byte, then the file contents. The flags let the fuzzer get past the
//! checksums: bit 0 fixes the checksum of the footer at the end, bit 1 copies that footer to
//! offset 0, bit 2 fixes the checksum of the dynamic header the footer points to, bit 3 also
//! writes to the image. Parent locators are never followed (no file system access beyond the one
//! temporary file).
//!
//! Properties (the harness itself never panics otherwise):
//! - open / read / write / inspect never panic, and never allocate much more than the file size;
//! - reads inside the disk succeed on an image that opened (the BAT was validated);
//! - a write that succeeded reads back, also after reopening;
//! - an image that opened is reported by `inspect`.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vsp_storage::block::BlockDevice;
use vsp_storage::vhd::{OpenOptions, Vhd, checksum, inspect};

const MAX_FILE: usize = 1 << 20;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("vhd_fuzz_{}.vhd", std::process::id())))
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

fn fix_ups(flags: u8, f: &mut [u8]) {
    let n = f.len();
    if n < 512 {
        return;
    }
    if flags & 1 != 0 {
        let c = checksum(&f[n - 512..], 64);
        f[n - 512 + 64..n - 512 + 68].copy_from_slice(&c.to_be_bytes());
    }
    if flags & 2 != 0 && n >= 1024 {
        let (head, tail) = f.split_at_mut(n - 512);
        head[..512].copy_from_slice(tail);
    }
    if flags & 4 != 0 {
        let off = be64(&f[n - 512..], 16);
        if let Ok(off) = usize::try_from(off)
            && off.checked_add(1024).is_some_and(|e| e <= n)
        {
            let c = checksum(&f[off..off + 1024], 36);
            f[off + 36..off + 40].copy_from_slice(&c.to_be_bytes());
        }
    }
}

/// Byte offsets to read/write at, derived from the input: disk start and end, block starts,
/// and a few input-chosen sectors.
fn offsets(v: &Vhd, data: &[u8]) -> Vec<u64> {
    let size = v.size();
    let sectors = size / 512;
    if sectors == 0 {
        return Vec::new();
    }
    let mut out = vec![0, (sectors - 1) * 512];
    if let Some(bs) = v.block_size() {
        out.extend((1..16u64).map(|i| i * bs).filter(|&o| o < size));
    }
    for c in data.chunks_exact(4).take(8) {
        out.push(u64::from(be32(c, 0)) % sectors * 512);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, data)) = input.split_first() else {
        return;
    };
    if data.len() > MAX_FILE {
        return;
    }
    let mut file = data.to_vec();
    fix_ups(flags, &mut file);
    let p = path();
    std::fs::write(p, &file).unwrap();

    let opts = OpenOptions::read_only().with_parent(false);
    let opened = Vhd::open(p, &opts);
    let report = inspect(p, false);
    let Ok(v) = opened else {
        return;
    };
    let report = report.expect("an image that opens can be inspected");
    assert_eq!(report.virtual_size, v.size());
    let mut buf = vec![0u8; 64 * 1024];
    for off in offsets(&v, data) {
        let len = (v.size() - off).min(buf.len() as u64) as usize;
        v.read_at(off, &mut buf[..len])
            .expect("read inside a validated image");
    }
    drop(v);

    if flags & 8 == 0 {
        return;
    }
    let rw = OpenOptions::default().with_parent(false);
    let Ok(v) = Vhd::open(p, &rw) else {
        return;
    };
    let mut written = Vec::new();
    for (i, off) in offsets(&v, data).into_iter().enumerate().take(6) {
        let len = (v.size() - off).min(4096) as usize;
        let pattern: Vec<u8> = (0..len).map(|k| (k as u8) ^ (i as u8) ^ 0x5a).collect();
        if v.write_at(off, &pattern, false).is_ok() {
            written.retain(|(o, d): &(u64, Vec<u8>)| {
                o + d.len() as u64 <= off || off + len as u64 <= *o
            });
            written.push((off, pattern));
        }
    }
    let check = |v: &Vhd| {
        for (off, d) in &written {
            let mut back = vec![0u8; d.len()];
            v.read_at(*off, &mut back).expect("read back");
            assert_eq!(&back, d, "write at {off:#x} did not read back");
        }
    };
    check(&v);
    drop(v);
    let v = Vhd::open(p, &opts).expect("an image still opens after our writes");
    check(&v);
});
