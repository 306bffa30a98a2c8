//! Byte-checked responses of the SCSI emulation, sense for bad commands, proptest over CDBs.

use super::*;
use crate::backend::mem::MemDisk;
use proptest::prelude::*;

const SECTORS: u64 = 2048; // 1 MiB of 512-byte sectors

fn disk_with(mem: Arc<MemDisk>) -> ScsiDisk {
    ScsiDisk::new(
        mem,
        ScsiParams::new(Identity::msft("SER-0001", 0x0001_2345_6789)),
    )
}

fn disk() -> (Arc<MemDisk>, ScsiDisk) {
    let mem = Arc::new(MemDisk::new((SECTORS * 512) as usize, 512));
    (mem.clone(), disk_with(mem))
}

/// Runs a data-in command with a `len`-byte buffer.
fn data_in(d: &ScsiDisk, cdb: &[u8], len: usize) -> (Outcome, Vec<u8>) {
    let mut b = MemBuffer::data_in(len);
    let o = d.execute(cdb, &mut b);
    (o, b.data)
}

fn good(o: &Outcome) -> usize {
    match o {
        Outcome::Good { transferred } => *transferred,
        other => panic!("expected GOOD, got {other:?}"),
    }
}

fn check(o: &Outcome) -> (u8, u8, u8) {
    let s = o
        .sense()
        .unwrap_or_else(|| panic!("expected CHECK CONDITION, got {o:?}"));
    (s.key, s.asc, s.ascq)
}

#[test]
fn standard_inquiry_bytes() {
    let (_, d) = disk();
    let (o, b) = data_in(&d, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(good(&o), 36);
    assert_eq!(b[0], 0x00, "direct-access, qualifier 0");
    assert_eq!(b[1], 0x00, "not removable");
    assert_eq!(b[2], 0x06, "SPC-4");
    assert_eq!(b[3], 0x02, "response data format 2");
    assert_eq!(b[4], 31, "additional length = 36 - 5");
    assert_eq!(b[7], 0x02, "CmdQue");
    assert_eq!(&b[8..16], b"Msft    ");
    assert_eq!(&b[16..32], b"Virtual Disk    ");
    assert_eq!(&b[32..36], b"1.0 ");
    // Allocation length caps the transfer.
    let (o, b) = data_in(&d, &[0x12, 0, 0, 0, 5, 0], 255);
    assert_eq!(good(&o), 5);
    assert_eq!(b[4], 31);
    assert!(b[5..].iter().all(|&x| x == 0));
    // Page code without EVPD, and CmdDt, are invalid.
    assert_eq!(
        check(&data_in(&d, &[0x12, 0, 0x80, 0, 36, 0], 36).0),
        (5, 0x24, 0)
    );
    assert_eq!(
        check(&data_in(&d, &[0x12, 2, 0, 0, 36, 0], 36).0),
        (5, 0x24, 0)
    );
}

#[test]
fn vpd_pages() {
    let (_, d) = disk();
    let (o, b) = data_in(&d, &[0x12, 1, 0x00, 0, 255, 0], 255);
    assert_eq!(good(&o), 10);
    assert_eq!(&b[..10], &[0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    // The 4-byte header probe Linux sends first.
    let (o, b) = data_in(&d, &[0x12, 1, 0x00, 0, 4, 0], 4);
    assert_eq!((good(&o), &b[..]), (4, &[0u8, 0, 0, 6][..]));

    let (o, b) = data_in(&d, &[0x12, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(good(&o), 12);
    assert_eq!(&b[..12], b"\x00\x80\x00\x08SER-0001");

    let (o, b) = data_in(&d, &[0x12, 1, 0x83, 0, 255, 0], 255);
    let n = good(&o);
    assert_eq!(&b[..4], &[0, 0x83, 0, (n - 4) as u8]);
    assert_eq!(
        &b[4..8],
        &[0x02, 0x01, 0x00, 16],
        "T10 vendor id designator"
    );
    assert_eq!(&b[8..24], b"Msft    SER-0001");
    assert_eq!(&b[24..28], &[0x01, 0x03, 0x00, 0x08], "NAA designator");
    assert_eq!(&b[28..36], &0x5001_55D1_2345_6789u64.to_be_bytes());
    assert_eq!(n, 36);

    let (o, b) = data_in(&d, &[0x12, 1, 0xB0, 0, 255, 0], 255);
    assert_eq!(good(&o), 64);
    assert_eq!(&b[..4], &[0, 0xB0, 0, 0x3C]);
    assert_eq!(b[4], 1, "WSNZ");
    assert_eq!(
        &b[8..12],
        &512u32.to_be_bytes(),
        "max transfer = 256 KiB / 512"
    );
    assert_eq!(
        &b[20..24],
        &0x0040_0000u32.to_be_bytes(),
        "max unmap LBA count"
    );
    assert_eq!(&b[24..28], &256u32.to_be_bytes(), "max unmap descriptors");
    assert_eq!(&b[28..32], &1u32.to_be_bytes(), "unmap granularity");
    assert_eq!(&b[32..36], &0x8000_0000u32.to_be_bytes());

    let (o, b) = data_in(&d, &[0x12, 1, 0xB1, 0, 255, 0], 255);
    assert_eq!(good(&o), 64);
    assert_eq!(&b[..6], &[0, 0xB1, 0, 0x3C, 0, 1], "non-rotating");

    let (o, b) = data_in(&d, &[0x12, 1, 0xB2, 0, 255, 0], 255);
    assert_eq!(good(&o), 8);
    assert_eq!(&b[..8], &[0, 0xB2, 0, 4, 0, 0xC0, 0x02, 0]);

    // A page we lack: ILLEGAL REQUEST, nothing transferred.
    let (o, b) = data_in(&d, &[0x12, 1, 0x89, 0, 255, 0], 255);
    assert_eq!(check(&o), (5, 0x24, 0));
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn read_capacity_values() {
    let (_, d) = disk();
    let (o, b) = data_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(good(&o), 8);
    assert_eq!(b, [0, 0, 0x07, 0xFF, 0, 0, 0x02, 0x00]);
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9E;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let (o, b) = data_in(&d, &rc16, 32);
    assert_eq!(good(&o), 32);
    assert_eq!(&b[..8], &2047u64.to_be_bytes());
    assert_eq!(&b[8..12], &512u32.to_be_bytes());
    assert_eq!(b[13], 0);
    assert_eq!(b[14], 0x80, "LBPME");
    // Other service actions of 0x9E are unknown.
    rc16[1] = 0x11;
    assert_eq!(check(&data_in(&d, &rc16, 32).0), (5, 0x20, 0));
}

#[test]
fn read_capacity_10_saturates() {
    struct Huge;
    impl BlockDevice for Huge {
        fn sector_size(&self) -> u32 {
            512
        }
        fn size(&self) -> u64 {
            (1u64 << 33) * 512
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> Result<(), BlockError> {
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8], _: bool) -> Result<(), BlockError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
    }
    let d = ScsiDisk::new(Arc::new(Huge), ScsiParams::new(Identity::msft("x", 1)));
    let (o, b) = data_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(good(&o), 8);
    assert_eq!(&b[..4], &[0xFF; 4]);
    // READ(16) at the very top works; one past fails.
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[2..10].copy_from_slice(&((1u64 << 33) - 1).to_be_bytes());
    r16[13] = 1;
    assert_eq!(good(&data_in(&d, &r16, 512).0), 512);
    r16[2..10].copy_from_slice(&(1u64 << 33).to_be_bytes());
    assert_eq!(check(&data_in(&d, &r16, 512).0), (5, 0x21, 0));
}

#[test]
fn read_write_all_sizes_round_trip() {
    let (mem, d) = disk();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    // WRITE(10) 8 blocks at LBA 16 with FUA.
    let w10 = [0x2A, 0x08, 0, 0, 0, 16, 0, 0, 8, 0];
    let o = d.execute(&w10, &mut MemBuffer::data_out(pattern.clone()));
    assert_eq!(good(&o), 4096);
    assert_eq!(&mem.contents()[16 * 512..24 * 512], &pattern[..]);
    // Read it back with each READ size.
    let reads: [&[u8]; 4] = [
        &[0x08, 0, 0, 16, 8, 0],
        &[0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0],
        &[0xA8, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0],
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0],
    ];
    for cdb in reads {
        let (o, b) = data_in(&d, cdb, 4096);
        assert_eq!(good(&o), 4096, "{cdb:02x?}");
        assert_eq!(b, pattern, "{cdb:02x?}");
    }
    // WRITE(6), (12), (16) land where they say.
    let one = vec![0xABu8; 512];
    for (cdb, lba) in [
        (vec![0x0A, 0, 0, 100, 1, 0], 100),
        (vec![0xAA, 0, 0, 0, 0, 101, 0, 0, 0, 1, 0, 0], 101),
        (
            vec![0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 102, 0, 0, 0, 1, 0, 0],
            102,
        ),
    ] {
        assert_eq!(
            good(&d.execute(&cdb, &mut MemBuffer::data_out(one.clone()))),
            512
        );
        assert_eq!(&mem.contents()[lba * 512..(lba + 1) * 512], &one[..]);
    }
    // READ(6) with transfer length 0 means 256 blocks.
    let (o, _) = data_in(&d, &[0x08, 0, 0, 0, 0, 0], 256 * 512);
    assert_eq!(good(&o), 256 * 512);
    // A zero-block READ(10) is a no-op.
    assert_eq!(
        good(&data_in(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).0),
        0
    );
}

#[test]
fn lba_range_checks() {
    let (_, d) = disk();
    // Last block OK, one past is LBA OUT OF RANGE.
    assert_eq!(
        good(&data_in(&d, &[0x28, 0, 0, 0, 0x07, 0xFF, 0, 0, 1, 0], 512).0),
        512
    );
    assert_eq!(
        check(&data_in(&d, &[0x28, 0, 0, 0, 0x07, 0xFF, 0, 0, 2, 0], 1024).0),
        (5, 0x21, 0)
    );
    assert_eq!(
        good(&data_in(&d, &[0x28, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0], 0).0),
        0
    );
    assert_eq!(
        check(&data_in(&d, &[0x28, 0, 0, 0, 0x08, 0x01, 0, 0, 0, 0], 0).0),
        (5, 0x21, 0)
    );
    // LBA + count overflowing u64.
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    r16[10..14].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(check(&data_in(&d, &r16, 1024).0), (5, 0x21, 0));
    let mut w16 = r16;
    w16[0] = 0x8A;
    assert_eq!(
        check(&d.execute(&w16, &mut MemBuffer::data_out(vec![0; 1024]))),
        (5, 0x21, 0)
    );
    // Longer than max transfer (256 KiB).
    assert_eq!(
        check(&data_in(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0x02, 0x01, 0], 1 << 20).0),
        (5, 0x24, 0)
    );
    // SYNCHRONIZE CACHE range.
    assert_eq!(
        check(&data_in(&d, &[0x35, 0, 0, 0, 0x08, 0, 0, 0, 1, 0], 0).0),
        (5, 0x21, 0)
    );
}

#[test]
fn bad_opcodes_and_cdb_lengths() {
    let (_, d) = disk();
    for cdb in [
        &[0xFF, 0, 0, 0, 0, 0][..],
        &[0xA1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // ATA(12)
        &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // REPORT SUPPORTED OPCODES
        &[0x15, 0, 0, 0, 0, 0],                   // MODE SELECT(6)
        &[0x24, 0, 0, 0, 0, 0, 0, 0, 0, 0],       // SET WINDOW
        &[0xC0, 0, 0, 0, 0, 0],                   // vendor group
    ] {
        let (o, b) = data_in(&d, cdb, 64);
        assert_eq!(check(&o), (5, 0x20, 0), "{cdb:02x?}");
        assert!(b.iter().all(|&x| x == 0));
    }
    assert_eq!(check(&data_in(&d, &[], 0).0), (5, 0x20, 0));
    // 17-byte CDB, and a READ(10) cut to 6 bytes.
    assert_eq!(check(&data_in(&d, &[0; 17], 0).0), (5, 0x24, 0));
    assert_eq!(
        check(&data_in(&d, &[0x28, 0, 0, 0, 0, 1], 512).0),
        (5, 0x24, 0)
    );
    // Fixed-format sense bytes.
    assert_eq!(
        Sense::INVALID_OPCODE.to_fixed(),
        [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]
    );
}

#[test]
fn mode_sense_pages() {
    let (_, d) = disk();
    // MODE SENSE(6), all pages: header + caching (20) + control (12).
    let (o, b) = data_in(&d, &[0x1A, 0, 0x3F, 0, 255, 0], 255);
    assert_eq!(good(&o), 36);
    assert_eq!(
        &b[..4],
        &[35, 0, 0x10, 0],
        "length, medium, DPOFUA, no block descriptors"
    );
    assert_eq!(&b[4..7], &[0x08, 0x12, 0x04], "caching page with WCE");
    assert_eq!(&b[24..26], &[0x0A, 0x0A]);
    // Linux's 4-byte probe.
    let (o, b) = data_in(&d, &[0x1A, 0, 0x3F, 0, 4, 0], 4);
    assert_eq!((good(&o), b[0]), (4, 35));
    // MODE SENSE(10), caching page.
    let (o, b) = data_in(&d, &[0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(good(&o), 28);
    assert_eq!(&b[..8], &[0, 26, 0, 0x10, 0, 0, 0, 0]);
    assert_eq!(&b[8..11], &[0x08, 0x12, 0x04]);
    // Control page alone; changeable values are zero.
    let (o, b) = data_in(&d, &[0x1A, 0, 0x0A, 0, 255, 0], 255);
    assert_eq!((good(&o), &b[4..6]), (16, &[0x0Au8, 0x0A][..]));
    let (o, b) = data_in(&d, &[0x1A, 0, 0x48, 0, 255, 0], 255);
    assert_eq!((good(&o), b[6]), (24, 0));
    // Unsupported page, saved values, odd subpage.
    assert_eq!(
        check(&data_in(&d, &[0x1A, 0, 0x1C, 0, 255, 0], 255).0),
        (5, 0x24, 0)
    );
    assert_eq!(
        check(&data_in(&d, &[0x1A, 0, 0xC8, 0, 255, 0], 255).0),
        (5, 0x39, 0)
    );
    assert_eq!(
        check(&data_in(&d, &[0x1A, 0, 0x08, 1, 255, 0], 255).0),
        (5, 0x24, 0)
    );
    // Read-only disks report WP.
    let ro = disk_with(Arc::new(MemDisk::new(4096, 512).read_only()));
    let (_, b) = data_in(&ro, &[0x1A, 0, 0x3F, 0, 255, 0], 255);
    assert_eq!(b[2], 0x90);
    let w = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    assert_eq!(
        check(&ro.execute(&w, &mut MemBuffer::data_out(vec![0; 512]))),
        (7, 0x27, 0)
    );
}

#[test]
fn simple_commands() {
    let (mem, d) = disk();
    assert_eq!(good(&data_in(&d, &[0, 0, 0, 0, 0, 0], 0).0), 0);
    assert_eq!(good(&data_in(&d, &[0x1B, 0, 0, 0, 1, 0], 0).0), 0);
    let (o, b) = data_in(&d, &[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(good(&o), 18);
    assert_eq!(&b[..18], &Sense::NONE.to_fixed());
    assert_eq!(
        check(&data_in(&d, &[0x03, 1, 0, 0, 252, 0], 252).0),
        (5, 0x24, 0)
    );
    let (o, b) = data_in(&d, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], 4096);
    assert_eq!(good(&o), 16);
    assert_eq!(&b[..16], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        good(&data_in(&d, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).0),
        0
    );
    let mut s16 = [0u8; 16];
    s16[0] = 0x91;
    assert_eq!(good(&data_in(&d, &s16, 0).0), 0);
    assert_eq!(mem.flushes(), 2);
}

#[test]
fn unmap_and_write_same() {
    let (mem, d) = disk();
    let ones = vec![0xFFu8; 8 * 512];
    d.execute(
        &[0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0],
        &mut MemBuffer::data_out(ones.clone()),
    );
    // UNMAP blocks 9..11.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&9u64.to_be_bytes());
    list.extend_from_slice(&2u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let o = d.execute(
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &mut MemBuffer::data_out(list.clone()),
    );
    assert_eq!(good(&o), 24);
    let c = mem.contents();
    assert!(c[8 * 512..9 * 512].iter().all(|&b| b == 0xFF));
    assert!(c[9 * 512..11 * 512].iter().all(|&b| b == 0));
    assert!(c[11 * 512..16 * 512].iter().all(|&b| b == 0xFF));
    // A descriptor past the end fails the whole command before anything is unmapped.
    let mut bad = list.clone();
    bad[8..16].copy_from_slice(&(SECTORS - 1).to_be_bytes());
    let o = d.execute(
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &mut MemBuffer::data_out(bad),
    );
    assert_eq!(check(&o), (5, 0x21, 0));
    // Inconsistent descriptor length, short list.
    let mut bad = list.clone();
    bad[3] = 32;
    let o = d.execute(
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &mut MemBuffer::data_out(bad),
    );
    assert_eq!(check(&o), (5, 0x1A, 0));
    let o = d.execute(
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0],
        &mut MemBuffer::data_out(vec![0; 4]),
    );
    assert_eq!(check(&o), (5, 0x1A, 0));
    // WRITE SAME(16) with UNMAP over blocks 12..16, and a plain one writing a pattern.
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[1] = 0x08;
    ws[2..10].copy_from_slice(&12u64.to_be_bytes());
    ws[10..14].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(
        good(&d.execute(&ws, &mut MemBuffer::data_out(vec![0; 512]))),
        512
    );
    assert!(mem.contents()[12 * 512..16 * 512].iter().all(|&b| b == 0));
    ws[1] = 0;
    assert_eq!(
        good(&d.execute(&ws, &mut MemBuffer::data_out(vec![0x5A; 512]))),
        512
    );
    assert!(
        mem.contents()[12 * 512..16 * 512]
            .iter()
            .all(|&b| b == 0x5A)
    );
    // WRITE SAME(10) over blocks 20..22.
    let ws10 = [0x41, 0, 0, 0, 0, 20, 0, 0, 2, 0];
    assert_eq!(
        good(&d.execute(&ws10, &mut MemBuffer::data_out(vec![0x77; 512]))),
        512
    );
    assert!(
        mem.contents()[20 * 512..22 * 512]
            .iter()
            .all(|&b| b == 0x77)
    );
    assert!(mem.contents()[22 * 512..23 * 512].iter().all(|&b| b == 0));
    ws[10..14].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        check(&d.execute(&ws, &mut MemBuffer::data_out(vec![0; 512]))),
        (5, 0x24, 0)
    );
}

#[test]
fn direction_and_buffer_rules() {
    let (mem, d) = disk();
    // A READ into a buffer the device may not write: ILLEGAL REQUEST, buffer untouched.
    let mut b = MemBuffer::data_out(vec![0x11; 512]);
    let o = d.execute(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &mut b);
    assert_eq!(check(&o), (5, 0x24, 0));
    assert!(b.data.iter().all(|&x| x == 0x11));
    // A WRITE with a short buffer writes nothing.
    let o = d.execute(
        &[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0],
        &mut MemBuffer::data_out(vec![9; 512]),
    );
    assert_eq!(check(&o), (5, 0x24, 0));
    assert!(mem.contents().iter().all(|&x| x == 0));
    // A READ into a smaller buffer moves what fits.
    let (o, _) = data_in(&d, &[0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0], 1000);
    assert_eq!(good(&o), 1000);
}

#[test]
fn unit_attention_after_resize() {
    let (mem, d) = disk();
    mem.resize(4096 * 512);
    d.capacity_changed();
    // INQUIRY is not affected; the next TUR reports the change once.
    assert!(data_in(&d, &[0x12, 0, 0, 0, 36, 0], 36).0.is_good());
    assert_eq!(
        check(&data_in(&d, &[0, 0, 0, 0, 0, 0], 0).0),
        (6, 0x2A, 0x09)
    );
    assert!(data_in(&d, &[0, 0, 0, 0, 0, 0], 0).0.is_good());
    let (_, b) = data_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(&b[..4], &4095u32.to_be_bytes());
}

#[test]
fn absent_luns() {
    let id = Identity::msft("x", 1);
    let mut b = MemBuffer::data_in(96);
    let o = absent_lun(&[0x12, 0, 0, 0, 96, 0], 3, &[], &id, &mut b).unwrap();
    assert_eq!(good(&o), 36);
    assert_eq!(b.data[0], 0x7F);
    assert!(b.data[8..36].iter().all(|&x| x == 0));
    let mut b = MemBuffer::data_in(4096);
    let o = absent_lun(
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
        0,
        &[1, 2],
        &id,
        &mut b,
    )
    .unwrap();
    assert_eq!(good(&o), 24);
    assert_eq!(
        &b.data[..24],
        &[
            0, 0, 0, 16, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0
        ]
    );
    assert!(absent_lun(&[0, 0, 0, 0, 0, 0], 0, &[], &id, &mut b).is_none());
    assert!(absent_lun(&[0x12, 1, 0x80, 0, 96, 0], 0, &[], &id, &mut b).is_none());
}

proptest! {
    #[test]
    fn any_cdb_is_handled(cdb in proptest::collection::vec(any::<u8>(), 0..20),
                          len in 0usize..70_000, dir: bool, fill: u8) {
        let (_, d) = disk();
        let mut buf = MemBuffer { data: vec![fill; len], device_may_write: dir };
        match d.execute(&cdb, &mut buf) {
            Outcome::Good { transferred } => prop_assert!(transferred <= len),
            Outcome::CheckCondition(s) => {
                prop_assert!(s.key != 0);
                if dir {
                    // Failed commands never transfer data in.
                    prop_assert!(buf.data.iter().all(|&b| b == fill) || cdb.first() == Some(&0x03));
                }
            }
            Outcome::DataFault(e) => prop_assert!(false, "in-memory buffer fault {e}"),
        }
        if cdb.len() > 16 {
            prop_assert!(!d.execute(&cdb, &mut MemBuffer::data_in(16)).is_good());
        }
    }

    #[test]
    fn rw_decoding_matches_bytes(lba: u32, blocks: u16) {
        let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        let rw = cdb::decode_rw(&Cdb::new(&c).unwrap()).unwrap();
        prop_assert_eq!((rw.lba, rw.blocks, rw.write), (u64::from(lba), u64::from(blocks), false));
        let (_, d) = disk();
        let o = d.execute(&c, &mut MemBuffer::data_in(usize::from(blocks) * 512));
        let fits = u64::from(lba) + u64::from(blocks) <= SECTORS;
        prop_assert_eq!(o.is_good(), fits && usize::from(blocks) * 512 <= 0x40000);
    }
}
