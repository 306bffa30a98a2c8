//! Command selection for a probed disk: READ/WRITE(10) vs (16), FUA, flush, discard modes.

use super::*;
use crate::storvsc::parse::{BlockLimits, Caching, Capacity, InquiryData, Provisioning};

fn lun(blocks: u64, block_size: u32) -> LunInfo {
    let mut inq = [0u8; 36];
    inq[2] = 6;
    inq[3] = 2;
    inq[4] = 31;
    inq[7] = 2;
    LunInfo {
        addr: ScsiAddress::new(0, 0, 1),
        inquiry: InquiryData::parse(&inq).unwrap(),
        vpd_pages: vec![],
        serial: None,
        designators: vec![],
        block_limits: None,
        rotation_rate: None,
        provisioning: None,
        media_present: true,
        capacity: Some(Capacity {
            last_lba: blocks - 1,
            block_size,
            ..Capacity::default()
        }),
        write_protected: false,
        caching: Some(Caching {
            wce: true,
            rcd: false,
        }),
        dpofua: true,
        warnings: vec![],
    }
}

fn limits(max_unmap: u32, desc: u32, max_ws: u64) -> BlockLimits {
    BlockLimits {
        max_transfer_blocks: 0,
        max_unmap_blocks: max_unmap,
        max_unmap_descriptors: desc,
        max_write_same_blocks: max_ws,
        extended: true,
        ..BlockLimits::default()
    }
}

#[test]
fn read_write_commands() {
    let d = Disk::from_lun(&lun(1 << 20, 512), 0x40000, ProtocolVersion::Win10).unwrap();
    assert!(!d.use_16);
    assert_eq!(d.max_blocks, 512);
    assert_eq!(d.max_io_bytes(), 0x40000);
    assert_eq!(
        d.read(7, 8).unwrap().as_bytes(),
        &[0x28, 0, 0, 0, 0, 7, 0, 0, 8, 0]
    );
    assert_eq!(
        d.write(7, 8, true).unwrap().as_bytes(),
        &[0x2A, 8, 0, 0, 0, 7, 0, 0, 8, 0]
    );
    assert_eq!(d.read((1 << 20) - 1, 1).unwrap().opcode(), 0x28);
    assert_eq!(
        d.read((1 << 20) - 1, 2),
        Err(DiskError::OutOfRange {
            lba: (1 << 20) - 1,
            blocks: 2,
            capacity: 1 << 20
        })
    );
    assert_eq!(
        d.read(u64::MAX, 2).unwrap_err(),
        DiskError::OutOfRange {
            lba: u64::MAX,
            blocks: 2,
            capacity: 1 << 20
        }
    );
    assert_eq!(
        d.read(0, 513),
        Err(DiskError::TooLarge {
            blocks: 513,
            max: 512
        })
    );
    assert_eq!(d.read(0, 0), Err(DiskError::Empty));
    assert_eq!(d.blocks_in(4096), Ok(8));
    assert!(d.blocks_in(4097).is_err());
    // No DPOFUA: FUA dropped.
    let mut l = lun(1 << 20, 512);
    l.dpofua = false;
    let d = Disk::from_lun(&l, 0x40000, ProtocolVersion::Win10).unwrap();
    assert_eq!(d.write(7, 8, true).unwrap().byte(1), 0);
    // Huge disk: 16-byte commands throughout; VPD max transfer limits the request.
    let mut l = lun(1 << 33, 4096);
    l.block_limits = Some(BlockLimits {
        max_transfer_blocks: 16,
        ..BlockLimits::default()
    });
    let d = Disk::from_lun(&l, 0x100000, ProtocolVersion::Win10).unwrap();
    assert!(d.use_16);
    assert_eq!(d.max_blocks, 16);
    assert_eq!(d.write(1 << 32, 16, false).unwrap().opcode(), 0x8A);
    assert_eq!(d.read(0, 1).unwrap().opcode(), 0x88);
}

#[test]
fn discard_mode_selection_follows_sd() {
    let v = ProtocolVersion::Win10;
    let mode = |l: &LunInfo| Disk::from_lun(l, 0x40000, v).unwrap();
    // No LBPME: disabled.
    let l = lun(1 << 20, 512);
    assert_eq!(mode(&l).discard, DiscardMode::Disabled);
    assert_eq!(mode(&l).discard(0, 1), Err(DiskError::DiscardUnsupported));
    // LBPME without VPD B0: WRITE SAME(16) with Linux's default maximum.
    let mut l = lun(1 << 20, 512);
    l.capacity.as_mut().unwrap().lbpme = true;
    let d = mode(&l);
    assert_eq!(
        (d.discard, d.max_discard_blocks),
        (DiscardMode::WriteSame16, SD_MAX_WS16)
    );
    // B0 with unmap limits and no B2: UNMAP.
    l.block_limits = Some(limits(1000, 1, 0));
    let d = mode(&l);
    assert_eq!(
        (d.discard, d.max_discard_blocks),
        (DiscardMode::Unmap, 1000)
    );
    // B2 without LBPU but LBPWS: WS16, limited by B0's WRITE SAME maximum.
    l.block_limits = Some(limits(1000, 1, 300));
    l.provisioning = Some(Provisioning {
        lbpu: false,
        lbpws: true,
        lbpws10: false,
    });
    let d = mode(&l);
    assert_eq!(
        (d.discard, d.max_discard_blocks),
        (DiscardMode::WriteSame16, 300)
    );
    // Only LBPWS10: WS10 on WIN10, disabled on WIN8 (storvsc refuses WRITE SAME(10) there).
    l.provisioning = Some(Provisioning {
        lbpu: false,
        lbpws: false,
        lbpws10: true,
    });
    assert_eq!(mode(&l).discard, DiscardMode::WriteSame10);
    assert_eq!(
        Disk::from_lun(&l, 0x40000, ProtocolVersion::Win8)
            .unwrap()
            .discard,
        DiscardMode::Disabled
    );
    // B2 with nothing: disabled. Unmap limits without descriptors do not count.
    l.provisioning = Some(Provisioning::default());
    assert_eq!(mode(&l).discard, DiscardMode::Disabled);
    l.provisioning = Some(Provisioning {
        lbpu: true,
        lbpws: false,
        lbpws10: false,
    });
    l.block_limits = Some(limits(1000, 0, 0));
    assert_eq!(mode(&l).discard, DiscardMode::Disabled);
}

#[test]
fn discard_commands_split_at_the_limit() {
    let mut l = lun(1 << 20, 512);
    l.capacity.as_mut().unwrap().lbpme = true;
    l.block_limits = Some(limits(1000, 1, 0));
    let d = Disk::from_lun(&l, 0x40000, ProtocolVersion::Win10).unwrap();
    let cmds = d.discard(100, 2500).unwrap();
    assert_eq!(cmds.len(), 3);
    assert_eq!(
        cmds.iter().map(|c| (c.lba, c.blocks)).collect::<Vec<_>>(),
        [(100, 1000), (1100, 1000), (2100, 500)]
    );
    assert_eq!(cmds[0].cdb.as_bytes(), &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
    let DiscardData::UnmapList(p) = &cmds[2].data else {
        panic!()
    };
    assert_eq!(p, &cdb::unmap_parameter_list(&[(2100, 500)]));
    assert!(d.discard((1 << 20) - 1, 2).is_err());
    // WRITE SAME(16): one zeroed block of data each.
    let mut l = lun(1 << 24, 512);
    l.capacity.as_mut().unwrap().lbpme = true;
    let d = Disk::from_lun(&l, 0x40000, ProtocolVersion::Win10).unwrap();
    let cmds = d.discard(0, u64::from(SD_MAX_WS16) + 1).unwrap();
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[1].data, DiscardData::ZeroBlock(512));
    assert_eq!(cmds[1].cdb.as_bytes()[..2], [0x93, 0x08]);
}

const SD_MAX_WS16: u32 = crate::storvsc::disk::SD_MAX_WS16_BLOCKS;
