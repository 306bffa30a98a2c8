//! SCSI data parsers: byte layouts and Linux's rules for odd values.

use crate::storvsc::parse::*;

#[test]
fn inquiry() {
    let mut d = [0u8; 36];
    d[0] = 0x00;
    d[1] = 0x80;
    d[2] = 0x06;
    d[3] = 0x02;
    d[4] = 31;
    d[7] = 0x02;
    d[8..16].copy_from_slice(b"Msft    ");
    d[16..32].copy_from_slice(b"Virtual Disk    ");
    d[32..36].copy_from_slice(b"1.0 ");
    let i = InquiryData::parse(&d).unwrap();
    assert!(i.is_present() && i.removable && i.cmd_que);
    assert_eq!((i.version, i.scsi_level(), i.response_len()), (6, 7, 36));
    assert_eq!(&i.revision, b"1.0 ");
    // Qualifier 3 / type 0x1F: no LUN.
    d[0] = 0x7F;
    assert!(!InquiryData::parse(&d).unwrap().is_present());
    // 255 + 5 would overflow a u8 allocation: Linux falls back to 36.
    d[4] = 255;
    assert_eq!(InquiryData::parse(&d).unwrap().response_len(), 36);
    d[4] = 100;
    assert_eq!(InquiryData::parse(&d).unwrap().response_len(), 105);
    // Short data is zero-padded; below the header it is refused.
    assert_eq!(InquiryData::parse(&d[..5]).unwrap().vendor, [0; 8]);
    assert!(InquiryData::parse(&d[..4]).is_err());
    // SCSI levels as Linux computes them.
    let lvl = |v: u8, f: u8| InquiryData::parse(&[0, 0, v, f, 0]).unwrap().scsi_level();
    assert_eq!(
        (lvl(0, 0), lvl(1, 1), lvl(1, 0), lvl(2, 2), lvl(5, 2)),
        (0, 2, 1, 3, 6)
    );
}

#[test]
fn vpd_pages() {
    assert_eq!(vpd_len(&[0, 0x80, 0, 5, b'a'], 0x80), Ok(9));
    assert_eq!(
        vpd_len(&[0, 0x83, 0, 5], 0x80),
        Err(ParseError::WrongPage {
            expected: 0x80,
            got: 0x83
        })
    );
    assert!(vpd_len(&[0, 0x80, 0], 0x80).is_err());
    // Body bounded by the page length, and by the data.
    assert_eq!(
        vpd_body(&[0, 0, 0, 2, 0, 0x80, 0x83], 0),
        Ok(&[0u8, 0x80][..])
    );
    assert_eq!(vpd_body(&[0, 0, 0, 200, 0, 0x80], 0), Ok(&[0u8, 0x80][..]));

    let mut b0 = vec![0u8; 64];
    b0[1] = 0xB0;
    b0[3] = 0x3C;
    b0[8..12].copy_from_slice(&512u32.to_be_bytes());
    b0[12..16].copy_from_slice(&128u32.to_be_bytes());
    b0[20..24].copy_from_slice(&0x40_0000u32.to_be_bytes());
    b0[24..28].copy_from_slice(&256u32.to_be_bytes());
    b0[28..32].copy_from_slice(&8u32.to_be_bytes());
    b0[32..36].copy_from_slice(&0x8000_0003u32.to_be_bytes());
    b0[36..44].copy_from_slice(&0x1_0000_0000u64.to_be_bytes());
    let l = BlockLimits::parse(&b0).unwrap();
    assert_eq!(
        l,
        BlockLimits {
            max_transfer_blocks: 512,
            optimal_transfer_blocks: 128,
            max_unmap_blocks: 0x40_0000,
            max_unmap_descriptors: 256,
            unmap_granularity: 8,
            unmap_alignment: Some(3),
            max_write_same_blocks: 0x1_0000_0000,
            extended: true,
        }
    );
    // A short page (length 0x0C): only the first fields.
    b0[3] = 0x0C;
    let l = BlockLimits::parse(&b0).unwrap();
    assert!(!l.extended);
    assert_eq!((l.max_transfer_blocks, l.max_unmap_blocks), (512, 0));
    b0[3] = 0x08;
    assert!(BlockLimits::parse(&b0).is_err());

    assert_eq!(rotation_rate(&[0, 0xB1, 0, 0x3C, 0, 1]), Ok(1));
    let p = Provisioning::parse(&[0, 0xB2, 0, 4, 0, 0xC0, 2, 0]).unwrap();
    assert!(p.lbpu && p.lbpws && !p.lbpws10);

    let d83 = [
        0, 0x83, 0, 0x14, 0x02, 0x01, 0x00, 0x04, b'M', b's', b'f', b't', 0x01, 0x03, 0x00, 0x08,
        0x50, 1, 2, 3, 4, 5, 6, 7,
    ];
    let ds = designators(&d83).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(
        (ds[0].code_set, ds[0].designator_type, &ds[0].value[..]),
        (2, 1, &b"Msft"[..])
    );
    assert_eq!((ds[1].designator_type, ds[1].value.len()), (3, 8));
    // Truncated designator dropped.
    assert_eq!(designators(&d83[..20]).unwrap().len(), 1);
}

#[test]
fn capacity() {
    let mut rc16 = [0u8; 32];
    rc16[0..8].copy_from_slice(&0x1_0000_0000u64.to_be_bytes());
    rc16[8..12].copy_from_slice(&4096u32.to_be_bytes());
    rc16[13] = 0x03;
    rc16[14] = 0xC0;
    let c = Capacity::parse_16(&rc16).unwrap();
    assert_eq!(c.blocks(), 0x1_0000_0001);
    assert_eq!(
        (c.block_size, c.physical_exponent, c.lbpme, c.lbprz),
        (4096, 3, true, true)
    );
    assert_eq!(c.bytes(), 0x1_0000_0001 * 4096);
    // Block size 0 → 512 (Linux), odd sizes refused.
    rc16[8..12].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(Capacity::parse_16(&rc16).unwrap().block_size, 512);
    rc16[8..12].copy_from_slice(&520u32.to_be_bytes());
    assert_eq!(Capacity::parse_16(&rc16), Err(ParseError::BlockSize(520)));
    let c = Capacity::parse_10(&[0, 0, 0x3F, 0xFF, 0, 0, 2, 0]).unwrap();
    assert_eq!((c.blocks(), c.block_size), (0x4000, 512));
    assert!(Capacity::parse_10(&[0; 7]).is_err());
    // u64::MAX last LBA saturates instead of wrapping.
    let mut m = [0xFFu8; 12];
    m[8..12].copy_from_slice(&512u32.to_be_bytes());
    assert_eq!(Capacity::parse_16(&m).unwrap().blocks(), u64::MAX);
}

#[test]
fn mode_sense() {
    // Header (length 23+1, WP + DPOFUA), an 8-byte block descriptor, control page, caching page.
    let mut d = vec![0u8; 4];
    d[2] = 0x90;
    d[3] = 8;
    d.extend_from_slice(&[0; 8]);
    d.extend_from_slice(&[0x0A, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut cache = vec![0u8; 20];
    cache[0] = 0x08;
    cache[1] = 0x12;
    cache[2] = 0x05;
    d.extend_from_slice(&cache);
    d[0] = (d.len() - 1) as u8;
    let h = ModeHeader::parse_6(&d).unwrap();
    assert!(h.write_protected() && h.dpofua());
    assert_eq!(h.length, d.len());
    assert_eq!(
        caching(&d).unwrap(),
        Some(Caching {
            wce: true,
            rcd: true
        })
    );
    // Only the first 4 bytes: no page.
    assert_eq!(caching(&d[..4]).unwrap(), None);
    // Truncated caching page (cut inside).
    assert_eq!(caching(&d[..d.len() - 18]).unwrap(), None);
    assert!(ModeHeader::parse_6(&d[..3]).is_err());
    // A page length that runs far past the data ends the walk.
    let bad = [0x20, 0, 0, 0, 0x0A, 0xFF, 0, 0];
    assert_eq!(caching(&bad).unwrap(), None);
}

#[test]
fn report_luns() {
    let d = [
        0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x40, 0x12, 0, 0,
        0, 0, 0, 0,
    ];
    let l = LunList::parse(&d).unwrap();
    assert_eq!(l.luns, [0, 7, 0x4012]);
    assert_eq!(l.needed_alloc(), 32);
    // The header says more than was received: only whole entries present count.
    let l = LunList::parse(&d[..20]).unwrap();
    assert_eq!((l.list_len, l.luns.len()), (24, 1));
    assert!(LunList::parse(&d[..7]).is_err());
    assert_eq!(scsilun_to_int(&[0, 1, 0, 2, 0, 0, 0, 0]), 0x0002_0001);
}
