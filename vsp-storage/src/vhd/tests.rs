//! Image-level tests: allocation patterns, differencing reads, tools, corrupt images, proptest.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::header::BAT_UNALLOCATED;
use super::*;
use crate::block::{BlockDevice, BlockError};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn opts(size: u64, kind: DiskKind, block_size: u32) -> CreateOptions {
    CreateOptions {
        size,
        kind,
        block_size,
        exact_size: true,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(0, &mut v).unwrap();
    v
}

fn bat(v: &Vhd) -> Vec<u32> {
    v.sparse.as_ref().unwrap().meta_read().bat.clone()
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

#[test]
fn fixed_read_write_reopen() {
    let d = dir();
    let p = d.path().join("f.vhd");
    let v = create(&p, &opts(4 * MIB, DiskKind::Fixed, DEFAULT_BLOCK_SIZE)).unwrap();
    assert_eq!(v.size(), 4 * MIB);
    assert_eq!(file_len(&p), 4 * MIB + 512);
    let data = pattern(8192, 3);
    v.write_at(512 * 7, &data, true).unwrap();
    drop(v);
    let v = Vhd::open(&p, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; 8192];
    v.read_at(512 * 7, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(matches!(
        v.write_at(0, &data, false),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(
        v.read_at(4 * MIB, &mut back),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(1, &mut back),
        Err(BlockError::Unaligned { .. })
    ));
    assert!(!v.supports_unmap());
}

#[test]
fn dynamic_allocation_pattern() {
    let d = dir();
    let p = d.path().join("d.vhd");
    let bs = 64 * KIB;
    let v = create(&p, &opts(MIB, DiskKind::Dynamic, bs as u32)).unwrap();
    let empty_len = file_len(&p);
    // Header at 512, BAT at 1536 (16 entries → one sector), footer after the BAT.
    assert_eq!(empty_len, 512 + 1024 + 512 + 512);
    assert!(bat(&v).iter().all(|&e| e == BAT_UNALLOCATED));
    assert_eq!(read_all(&v), vec![0u8; MIB as usize]);

    // Zeros over an unallocated block allocate nothing.
    v.write_at(0, &vec![0u8; 4096], false).unwrap();
    assert_eq!(file_len(&p), empty_len);

    // Block 5 then block 2: allocated in write order, each bitmap + data, footer behind them.
    v.write_at(5 * bs + 512, &pattern(1024, 1), false).unwrap();
    v.write_at(2 * bs, &pattern(512, 2), false).unwrap();
    let b = bat(&v);
    let first = (empty_len - 512) / 512;
    assert_eq!(b[5] as u64, first);
    assert_eq!(b[2] as u64, first + (bs + 512) / 512);
    assert_eq!(b.iter().filter(|&&e| e != BAT_UNALLOCATED).count(), 2);
    assert_eq!(file_len(&p), empty_len + 2 * (bs + 512));
    // A write spanning blocks 2..4 allocates 3 and 4 only.
    v.write_at(2 * bs + 512, &pattern((2 * bs) as usize, 9), false)
        .unwrap();
    assert_eq!(v.allocated_blocks(), Some((4, 16)));
    v.flush().unwrap();
    drop(v);

    let v = Vhd::open(&p, &OpenOptions::read_only()).unwrap();
    let all = read_all(&v);
    let mut model = vec![0u8; MIB as usize];
    let put = |m: &mut Vec<u8>, off: u64, d: Vec<u8>| {
        m[off as usize..off as usize + d.len()].copy_from_slice(&d)
    };
    put(&mut model, 5 * bs + 512, pattern(1024, 1));
    put(&mut model, 2 * bs, pattern(512, 2));
    put(&mut model, 2 * bs + 512, pattern((2 * bs) as usize, 9));
    assert_eq!(all, model);
    // The bitmap of an allocated dynamic block is all ones, the footer copy matches.
    let raw = fs::read(&p).unwrap();
    let b5 = b_offset(&v, 5);
    assert!(raw[b5..b5 + 512].iter().all(|&x| x == 0xFF));
    assert_eq!(raw[..512], raw[raw.len() - 512..]);
}

fn b_offset(v: &Vhd, block: usize) -> usize {
    bat(v)[block] as usize * 512
}

#[test]
fn dynamic_unmap_deallocates_and_reuses() {
    let d = dir();
    let p = d.path().join("u.vhd");
    let bs = 32 * KIB;
    let v = create(&p, &opts(512 * KIB, DiskKind::Dynamic, bs as u32)).unwrap();
    assert!(v.supports_unmap());
    v.write_at(0, &pattern((4 * bs) as usize, 5), false)
        .unwrap();
    let len = file_len(&p);
    // Whole block 1 and half of block 2.
    v.unmap(bs, bs + bs / 2).unwrap();
    assert_eq!(bat(&v)[1], BAT_UNALLOCATED);
    assert_ne!(bat(&v)[2], BAT_UNALLOCATED);
    let mut buf = vec![0u8; (2 * bs) as usize];
    v.read_at(bs, &mut buf).unwrap();
    assert!(buf[..(bs + bs / 2) as usize].iter().all(|&b| b == 0));
    assert_eq!(
        buf[(bs + bs / 2) as usize..],
        pattern((4 * bs) as usize, 5)[(2 * bs + bs / 2) as usize..(3 * bs) as usize]
    );
    // The freed space is reused, the file does not grow, and the reused block reads zeros
    // outside what was written.
    v.write_at(10 * bs + 512, &pattern(512, 8), false).unwrap();
    assert_eq!(file_len(&p), len);
    let mut blk = vec![0u8; bs as usize];
    v.read_at(10 * bs, &mut blk).unwrap();
    assert!(blk[..512].iter().all(|&b| b == 0));
    assert_eq!(blk[512..1024], pattern(512, 8)[..]);
    assert!(blk[1024..].iter().all(|&b| b == 0));
}

fn make_chain(d: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = d.join("base.vhd");
    let child = d.join("child.vhd");
    let bs = 16 * KIB;
    let b = create(&base, &opts(256 * KIB, DiskKind::Dynamic, bs as u32)).unwrap();
    let base_data = pattern(256 * KIB as usize, 1);
    b.write_at(0, &base_data, false).unwrap();
    drop(b);
    let c = create(
        &child,
        &opts(
            0,
            DiskKind::Differencing {
                parent: base.clone(),
            },
            bs as u32,
        ),
    )
    .unwrap();
    assert_eq!(c.size(), 256 * KIB);
    assert!(c.parent().is_some());
    (base, child, base_data)
}

#[test]
fn differencing_reads_through_parent() {
    let d = dir();
    let (base, child, mut model) = make_chain(d.path());
    let c = Vhd::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&c), model);
    // Sector-granular overrides: sectors 3 and 5 of block 1, and a run over blocks 2..3.
    let bs = 16 * KIB;
    for (off, len, seed) in [
        (bs + 3 * 512, 512, 7u8),
        (bs + 5 * 512, 512, 8),
        (2 * bs + 4096, bs, 9),
    ] {
        let data = pattern(len as usize, seed);
        c.write_at(off, &data, false).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    assert_eq!(read_all(&c), model);
    assert!(c.is_sector_present(bs + 3 * 512).unwrap());
    assert!(!c.is_sector_present(bs + 4 * 512).unwrap());
    drop(c);
    let c = Vhd::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&c), model);
    // The bitmap of block 1 has exactly bits 3 and 5 set (MSB first).
    let raw = fs::read(&child).unwrap();
    let off = b_offset(&c, 1);
    assert_eq!(raw[off], 0b0001_0100);
    assert!(raw[off + 1..off + 512].iter().all(|&x| x == 0));
    // The parent is untouched.
    let b = Vhd::open(&base, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&b), pattern(256 * KIB as usize, 1));
    // Unmap is not offered on a differencing image.
    assert!(!c.supports_unmap());
    // Without the parent, absent sectors read as zeros.
    let lone = Vhd::open(
        &child,
        &OpenOptions {
            resolve_parent: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let mut s = vec![0u8; 512];
    lone.read_at(0, &mut s).unwrap();
    assert!(s.iter().all(|&b| b == 0));
}

#[test]
fn differencing_parent_resolution() {
    let d = dir();
    let (base, child, model) = make_chain(d.path());
    // Moving both files together keeps the relative locator working.
    let moved = d.path().join("moved");
    fs::create_dir(&moved).unwrap();
    fs::rename(&base, moved.join("base.vhd")).unwrap();
    fs::rename(&child, moved.join("child.vhd")).unwrap();
    let c = Vhd::open(moved.join("child.vhd"), &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&c), model);
    drop(c);
    // A different image under the parent's name: UUID mismatch.
    fs::remove_file(moved.join("base.vhd")).unwrap();
    create(
        moved.join("base.vhd"),
        &opts(256 * KIB, DiskKind::Dynamic, 16384),
    )
    .unwrap();
    let e = Vhd::open(moved.join("child.vhd"), &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdError::ParentMismatch { .. }), "{e}");
    fs::remove_file(moved.join("base.vhd")).unwrap();
    let e = Vhd::open(moved.join("child.vhd"), &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdError::ParentNotFound { .. }), "{e}");
}

#[test]
fn parent_cycle_is_an_error() {
    let d = dir();
    let (base, child, _) = make_chain(d.path());
    // Make the base a differencing image of the child: rewrite base as a differencing image
    // whose parent is `child`, keeping base's UUID.
    let base_uuid = Vhd::open(&base, &OpenOptions::read_only())
        .unwrap()
        .footer
        .unique_id;
    fs::remove_file(&base).unwrap();
    // Build a differencing "base" over the child... the child cannot be opened now (its parent is
    // gone), so give the new base its locators by hand through a temporary parent.
    let tmp = d.path().join("tmp.vhd");
    let t = create(&tmp, &opts(256 * KIB, DiskKind::Dynamic, 16384)).unwrap();
    let tmp_uuid = t.footer.unique_id;
    drop(t);
    create(
        &base,
        &opts(
            0,
            DiskKind::Differencing {
                parent: tmp.clone(),
            },
            16384,
        ),
    )
    .unwrap();
    // Point base's locators at child.vhd and its parent UUID at the child's UUID, and give base
    // its old UUID back.
    let child_uuid = {
        let raw = fs::read(&child).unwrap();
        let mut f = [0u8; 512];
        f.copy_from_slice(&raw[raw.len() - 512..]);
        Footer::parse(&f).unwrap().unique_id
    };
    rewrite_diff(&base, &child, child_uuid, Some(base_uuid));
    let _ = tmp_uuid;
    let e = Vhd::open(&child, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdError::ParentCycle(_)), "{e}");
    let e = Vhd::open(&base, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdError::ParentCycle(_)), "{e}");
    // inspect reports it as a failed check, not an error.
    let i = inspect(&child, true).unwrap();
    assert!(!i.ok);
}

/// Rewrites the differencing image `img` to point at `parent` (by file name in the same
/// directory) with parent UUID `puuid`, optionally replacing its own UUID.
fn rewrite_diff(img: &Path, parent: &Path, puuid: [u8; 16], own: Option<[u8; 16]>) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut fb = [0u8; 512];
    f.read_exact_at(&mut fb, len - 512).unwrap();
    let mut footer = Footer::parse(&fb).unwrap();
    if let Some(id) = own {
        footer.unique_id = id;
    }
    let fb = footer.to_bytes();
    f.write_all_at(&fb, len - 512).unwrap();
    f.write_all_at(&fb, 0).unwrap();
    let mut hb = [0u8; 1024];
    f.read_exact_at(&mut hb, 512).unwrap();
    let mut h = DynamicHeader::parse(&hb).unwrap();
    h.parent_uuid = puuid;
    let name = parent.file_name().unwrap().to_str().unwrap();
    h.parent_name = name.encode_utf16().collect();
    for l in h.locators.iter_mut() {
        *l = ParentLocator::EMPTY;
    }
    f.write_all_at(&h.to_bytes(), 512).unwrap();
}

#[test]
fn chain_depth_limit() {
    let d = dir();
    let mut prev = d.path().join("c0.vhd");
    create(&prev, &opts(64 * KIB, DiskKind::Dynamic, 4096)).unwrap();
    for i in 1..=MAX_CHAIN_DEPTH + 1 {
        let next = d.path().join(format!("c{i}.vhd"));
        // Create through the library while the chain is still short enough.
        match create(
            &next,
            &opts(
                0,
                DiskKind::Differencing {
                    parent: prev.clone(),
                },
                4096,
            ),
        ) {
            Ok(_) => {}
            Err(e) => {
                assert!(format!("{e}").contains("deeper"), "{e}");
                return;
            }
        }
        prev = next;
    }
    let e = Vhd::open(&prev, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdError::ChainTooDeep(_)), "{e}");
}

#[test]
fn compact_shrinks_and_preserves() {
    let d = dir();
    let p = d.path().join("c.vhd");
    let bs = 32 * KIB;
    let v = create(&p, &opts(MIB, DiskKind::Dynamic, bs as u32)).unwrap();
    let mut model = vec![0u8; MIB as usize];
    for (blk, seed) in [(0u64, 1u8), (3, 2), (7, 3), (8, 4), (20, 5), (31, 6)] {
        let data = pattern(bs as usize, seed);
        v.write_at(blk * bs, &data, false).unwrap();
        model[(blk * bs) as usize..((blk + 1) * bs) as usize].copy_from_slice(&data);
    }
    // Block 3 zeroed by a write, block 8 unmapped, block 20 zeroed by a partial unmap + write.
    v.write_at(3 * bs, &vec![0u8; bs as usize], false).unwrap();
    model[(3 * bs) as usize..(4 * bs) as usize].fill(0);
    v.unmap(8 * bs, bs).unwrap();
    model[(8 * bs) as usize..(9 * bs) as usize].fill(0);
    v.unmap(20 * bs, bs / 2).unwrap();
    v.write_at(20 * bs + bs / 2, &vec![0u8; (bs / 2) as usize], false)
        .unwrap();
    model[(20 * bs) as usize..(21 * bs) as usize].fill(0);
    drop(v);
    let before = file_len(&p);
    let mut calls = 0;
    let r = compact(&p, &mut |_, _| calls += 1).unwrap();
    assert!(calls > 0);
    assert_eq!(r.blocks_before, 5); // block 8 was already deallocated
    assert_eq!(r.blocks_dropped, 2);
    assert_eq!(r.file_size_before, before);
    assert_eq!(file_len(&p), r.file_size_after);
    let meta = 512 + 1024 + 512 + 512;
    assert_eq!(r.blocks_moved, 2);
    assert_eq!(r.file_size_after, meta + 3 * (bs + 512));
    let v = Vhd::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&v), model);
    assert!(inspect(&p, true).unwrap().ok);
    // Compacting again changes nothing.
    drop(v);
    let r2 = compact(&p, &mut |_, _| {}).unwrap();
    assert_eq!((r2.blocks_dropped, r2.blocks_moved), (0, 0));
    assert_eq!(r2.file_size_after, r.file_size_after);
}

#[test]
fn compact_differencing_drops_what_the_parent_has() {
    let d = dir();
    let (_, child, mut model) = make_chain(d.path());
    let bs = 16 * KIB as usize;
    let c = Vhd::open(&child, &OpenOptions::default()).unwrap();
    // Block 0: same data as the parent (redundant); block 1: zeros over parent data (kept).
    c.write_at(0, &model[..bs], false).unwrap();
    c.write_at(bs as u64, &vec![0u8; bs], false).unwrap();
    model[bs..2 * bs].fill(0);
    drop(c);
    let r = compact(&child, &mut |_, _| {}).unwrap();
    assert_eq!((r.blocks_before, r.blocks_dropped), (2, 1));
    assert!(r.file_size_after < r.file_size_before);
    let c = Vhd::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&c), model);
}

#[test]
fn expand_fixed_and_dynamic() {
    let d = dir();
    for kind in [DiskKind::Fixed, DiskKind::Dynamic] {
        let p = d.path().join(format!("{kind:?}.vhd"));
        let v = create(&p, &opts(256 * KIB, kind.clone(), 4096)).unwrap();
        let data = pattern(256 * KIB as usize, 4);
        v.write_at(0, &data, false).unwrap();
        drop(v);
        let new = expand(&p, 3 * MIB, true).unwrap();
        assert_eq!(new, 3 * MIB);
        let v = Vhd::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(v.size(), 3 * MIB);
        let all = read_all(&v);
        assert_eq!(all[..data.len()], data[..]);
        assert!(all[data.len()..].iter().all(|&b| b == 0));
        // The new space is writable.
        v.write_at(3 * MIB - 4096, &pattern(4096, 6), false)
            .unwrap();
        drop(v);
        let v = Vhd::open(&p, &OpenOptions::read_only()).unwrap();
        let all = read_all(&v);
        assert_eq!(all[..data.len()], data[..]);
        assert_eq!(all[(3 * MIB - 4096) as usize..], pattern(4096, 6)[..]);
        assert!(inspect(&p, true).unwrap().ok, "{kind:?}");
        assert!(matches!(
            expand(&p, MIB, true),
            Err(VhdError::InvalidArgument(_))
        ));
    }
}

#[test]
fn expand_differencing_moves_locators() {
    let d = dir();
    let (_, child, model) = make_chain(d.path());
    let c = Vhd::open(&child, &OpenOptions::default()).unwrap();
    c.write_at(0, &pattern(512, 9), false).unwrap();
    drop(c);
    // 256 KiB / 16 KiB = 16 entries; 16 MiB needs 1024 entries = 8 sectors of BAT, which covers
    // the locators and the first block.
    expand(&child, 16 * MIB, true).unwrap();
    let c = Vhd::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(c.size(), 16 * MIB);
    let all = read_all(&c);
    assert_eq!(all[..512], pattern(512, 9)[..]);
    assert_eq!(all[512..model.len()], model[512..]);
    assert!(all[model.len()..].iter().all(|&b| b == 0));
    assert!(inspect(&child, true).unwrap().ok);
}

#[test]
fn merge_into_parent() {
    let d = dir();
    let (base, child, mut model) = make_chain(d.path());
    let c = Vhd::open(&child, &OpenOptions::default()).unwrap();
    for (off, len, seed) in [(512u64, 1024usize, 3u8), (40 * KIB, 20 * KIB as usize, 4)] {
        let data = pattern(len, seed);
        c.write_at(off, &data, false).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    drop(c);
    let r = merge(&child, &mut |_, _| {}).unwrap();
    assert_eq!(r.sectors_merged, 2 + 40);
    let b = Vhd::open(&base, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&b), model);
    let c = Vhd::open(&child, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&c), model);
    assert!(matches!(
        merge(&base, &mut |_, _| {}),
        Err(VhdError::InvalidArgument(_))
    ));
}

#[test]
fn convert_round_trips() {
    let d = dir();
    let raw = d.path().join("in.raw");
    let mut data = pattern(3 * MIB as usize + 1000, 2);
    data[MIB as usize..2 * MIB as usize].fill(0);
    fs::write(&raw, &data).unwrap();
    data.resize((3 * MIB + 1024) as usize, 0);
    let to = |name: &str, src: &Path, f: Format| {
        let out = d.path().join(name);
        let o = ConvertOptions {
            exact_size: true,
            block_size: 64 * 1024,
            ..ConvertOptions::new(f)
        };
        convert(src, &out, &o, &mut |_, _| {}).unwrap();
        out
    };
    let fixed = to("f.vhd", &raw, Format::Fixed);
    let dynamic = to("d.vhd", &fixed, Format::Dynamic);
    let back = to("back.raw", &dynamic, Format::Raw);
    assert_eq!(fs::read(&back).unwrap(), data);
    let v = Vhd::open(&dynamic, &OpenOptions::read_only()).unwrap();
    assert_eq!(read_all(&v), data);
    // The zero MiB was not allocated: 49 blocks of 64 KiB minus 16.
    assert_eq!(v.allocated_blocks(), Some((49 - 16, 49)));
    assert!(
        convert(
            &raw,
            &back,
            &ConvertOptions::new(Format::Raw),
            &mut |_, _| {}
        )
        .is_err()
    );
}

#[test]
fn corrupt_images_are_errors() {
    let d = dir();
    let p = d.path().join("x.vhd");
    let v = create(&p, &opts(MIB, DiskKind::Dynamic, 65536)).unwrap();
    v.write_at(0, &pattern(200 * 1024, 1), false).unwrap();
    drop(v);
    let good = fs::read(&p).unwrap();
    let open = |bytes: &[u8]| {
        fs::write(&p, bytes).unwrap();
        Vhd::open(&p, &OpenOptions::read_only())
    };
    assert!(open(&good).is_ok());
    // Truncated: the last block and the footer are gone; the start copy is used and the BAT
    // points past the end.
    let e = open(&good[..good.len() - 4096]).unwrap_err();
    assert!(matches!(e, VhdError::Corrupt(_)), "{e}");
    // Tiny and foreign files.
    assert!(matches!(
        open(&good[..100]).unwrap_err(),
        VhdError::NotVhd(_)
    ));
    assert!(matches!(
        open(&vec![0x55; 4096]).unwrap_err(),
        VhdError::NotVhd(_)
    ));
    // Bad footer checksum at both ends.
    let mut b = good.clone();
    let n = b.len();
    b[n - 512 + 40] ^= 1;
    b[40] ^= 1;
    assert!(matches!(
        open(&b).unwrap_err(),
        VhdError::BadChecksum { .. }
    ));
    // Only the end footer damaged: the copy at the start is used.
    // (Also when the damaged footer claims another size: inspect must pick the same footer.)
    let mut b = good.clone();
    b[n - 512 + 50] ^= 4;
    let v = open(&b).unwrap();
    assert!(!v.footer_at_end());
    let i = inspect(&p, false).unwrap();
    assert_eq!((i.virtual_size, i.footer.location), (v.size(), "start"));
    assert!(!i.ok);
    drop(v);
    // Header: bad checksum, bad block size (fixed up checksum).
    let mut b = good.clone();
    b[512 + 100] ^= 1;
    assert!(matches!(
        open(&b).unwrap_err(),
        VhdError::BadChecksum { .. }
    ));
    let mut h = DynamicHeader::decode(good[512..1536].try_into().unwrap()).unwrap();
    h.block_size = 65536 + 512;
    let mut b = good.clone();
    b[512..1536].copy_from_slice(&h.to_bytes());
    assert!(matches!(open(&b).unwrap_err(), VhdError::Corrupt(_)));
    // BAT: entry past the end, entry overlapping another, entry over the header.
    let bat_at = |b: &mut Vec<u8>, i: usize, v: u32| {
        b[1536 + 4 * i..1536 + 4 * i + 4].copy_from_slice(&v.to_be_bytes())
    };
    for (i, v) in [
        (5usize, 0x00ff_ffffu32),
        (
            6,
            u32::from_be_bytes(good[1536..1540].try_into().unwrap()) + 1,
        ),
        (7, 1),
    ] {
        let mut b = good.clone();
        bat_at(&mut b, i, v);
        let e = open(&b).unwrap_err();
        assert!(matches!(e, VhdError::Corrupt(_)), "entry {i}: {e}");
    }
    // BAT too small for the disk.
    let mut h2 = h.clone();
    h2.block_size = 65536;
    h2.max_table_entries = 2;
    let mut b = good.clone();
    b[512..1536].copy_from_slice(&h2.to_bytes());
    assert!(matches!(open(&b).unwrap_err(), VhdError::Corrupt(_)));
    // Fixed image truncated.
    let f = d.path().join("f.vhd");
    create(&f, &opts(MIB, DiskKind::Fixed, 0)).unwrap();
    let mut fb = fs::read(&f).unwrap();
    let footer = fb[fb.len() - 512..].to_vec();
    fb.truncate(fb.len() - 4096);
    fb.extend_from_slice(&footer);
    fs::write(&f, &fb).unwrap();
    assert!(matches!(
        Vhd::open(&f, &OpenOptions::read_only()).unwrap_err(),
        VhdError::Corrupt(_)
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Read { sector: u64, sectors: u64 },
    Unmap { sector: u64, sectors: u64 },
    Reopen,
}

fn op_strategy(disk_sectors: u64) -> impl Strategy<Value = Op> {
    let range =
        (0..disk_sectors).prop_flat_map(move |s| (Just(s), 1..=(disk_sectors - s).min(300)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        3 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range.prop_map(|(sector, sectors)| Op::Unmap { sector, sectors }),
        1 => Just(Op::Reopen),
    ]
}

fn run_model(kind: DiskKind, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let d = dir();
    let p = d.path().join("m.vhd");
    let size = 600 * 512; // not a multiple of the 8 KiB block size
    let mut v = create(&p, &opts(size, kind, 8192)).unwrap();
    let mut model = vec![0u8; size as usize];
    for op in ops {
        match op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern((sectors * 512) as usize, seed);
                v.write_at(sector * 512, &data, false).unwrap();
                model[(sector * 512) as usize..((sector + sectors) * 512) as usize]
                    .copy_from_slice(&data);
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0u8; (sectors * 512) as usize];
                v.read_at(sector * 512, &mut buf).unwrap();
                prop_assert_eq!(
                    &buf[..],
                    &model[(sector * 512) as usize..((sector + sectors) * 512) as usize]
                );
            }
            Op::Unmap { sector, sectors } => match v.unmap(sector * 512, sectors * 512) {
                Ok(()) => {
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0)
                }
                Err(BlockError::Unsupported) => prop_assert!(!v.supports_unmap()),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            },
            Op::Reopen => {
                drop(v);
                v = Vhd::open(&p, &OpenOptions::default()).unwrap();
            }
        }
    }
    prop_assert_eq!(read_all(&v), model);
    drop(v);
    prop_assert!(inspect(&p, true).unwrap().ok);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn model_fixed(ops in proptest::collection::vec(op_strategy(600), 1..40)) {
        run_model(DiskKind::Fixed, ops)?;
    }

    #[test]
    fn model_dynamic(ops in proptest::collection::vec(op_strategy(600), 1..40)) {
        run_model(DiskKind::Dynamic, ops)?;
    }
}

#[test]
fn concurrent_writers_and_readers() {
    use std::sync::Arc;
    for differencing in [false, true] {
        let d = dir();
        let (path, before) = if differencing {
            let (_, child, base) = make_chain(d.path());
            (child, base)
        } else {
            let p = d.path().join("d.vhd");
            create(&p, &opts(256 * KIB, DiskKind::Dynamic, 16384)).unwrap();
            (p, vec![0u8; 256 * KIB as usize])
        };
        let v = Arc::new(Vhd::open(&path, &OpenOptions::default()).unwrap());
        let sectors = v.size() / 512;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let v = Arc::clone(&v);
                let before = before.clone();
                std::thread::spawn(move || {
                    let data = pattern(512, t as u8 + 100);
                    // Each writer takes every 4th sector, walking the disk in a scattered order so
                    // that allocations and bitmap updates of the same blocks race.
                    for k in 0..sectors / 4 {
                        let s = (k * 37 % (sectors / 4)) * 4 + t;
                        v.write_at(s * 512, &data, false).unwrap();
                        // Read a neighbour another writer owns: old or new data, never torn.
                        let n = (s + 1) % sectors;
                        let mut buf = vec![0u8; 512];
                        v.read_at(n * 512, &mut buf).unwrap();
                        let old = &before[(n * 512) as usize..(n * 512 + 512) as usize];
                        let new = pattern(512, (n % 4) as u8 + 100);
                        assert!(buf == old || buf == new, "sector {n}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut expected = Vec::new();
        for s in 0..sectors {
            expected.extend(pattern(512, (s % 4) as u8 + 100));
        }
        assert_eq!(read_all(&*v), expected);
        drop(v);
        let v = Vhd::open(&path, &OpenOptions::read_only()).unwrap();
        assert_eq!(read_all(&v), expected, "differencing={differencing}");
        assert!(inspect(&path, true).unwrap().ok);
    }
}
