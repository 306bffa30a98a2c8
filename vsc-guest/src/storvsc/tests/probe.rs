//! The SCSI probe against scripted targets: vsp-storage's SCSI disk emulation (the same answers
//! storvsp gives) and hand-made oddities.

use super::*;
use crate::storvsc::parse::InquiryData;
use std::sync::Arc;
use vsp_storage::backend::mem::MemDisk;
use vsp_storage::scsi::{self, Identity, MemBuffer, Outcome, ScsiDisk, ScsiParams};

/// Runs a probe to the end against `target`, returning the LUNs and every command sent.
fn run_probe(
    cfg: ProbeConfig,
    mut target: impl FnMut(&ProbeCommand) -> Result<Vec<u8>, IoError>,
) -> (Vec<LunInfo>, Vec<ProbeCommand>) {
    let mut p = Prober::new(cfg);
    let mut log = Vec::new();
    for _ in 0..10_000 {
        match p.next_step() {
            ProbeStep::Done => return (p.into_luns(), log),
            ProbeStep::Run(cmd) => {
                log.push(cmd);
                match target(&cmd) {
                    Ok(mut d) => {
                        d.truncate(cmd.alloc as usize);
                        p.complete(Ok(&d));
                    }
                    Err(e) => p.complete(Err(e)),
                }
            }
        }
    }
    panic!("probe did not finish: {log:?}");
}

fn sense_err(s: scsi::Sense) -> IoError {
    IoError::from_sense(Sense::new(SenseKey::from_nibble(s.key), s.asc, s.ascq))
}

/// A storvsp-like target: disks at the given LUNs of path 0 target 0, nothing elsewhere.
fn emulated(
    disks: Vec<(u8, Arc<ScsiDisk>)>,
) -> impl FnMut(&ProbeCommand) -> Result<Vec<u8>, IoError> {
    let id = Identity::msft("absent", 0);
    move |cmd: &ProbeCommand| {
        let mut buf = MemBuffer::data_in(cmd.alloc as usize);
        let here = (cmd.addr.path_id, cmd.addr.target_id) == (0, 0);
        let luns: Vec<u8> = if here {
            disks.iter().map(|d| d.0).collect()
        } else {
            vec![]
        };
        let outcome = match disks.iter().find(|d| here && d.0 == cmd.addr.lun) {
            // REPORT LUNS is the controller's business (storvsp answers it for the target).
            Some(_) if cmd.cdb.opcode() == 0xA0 => {
                let c = scsi::cdb::Cdb::new(cmd.cdb.as_bytes()).unwrap();
                let d = scsi::report_luns(&c, &luns).unwrap();
                let n = d.len().min(cmd.alloc as usize);
                buf.data[..n].copy_from_slice(&d[..n]);
                Outcome::Good { transferred: n }
            }
            Some((_, disk)) => disk.execute(cmd.cdb.as_bytes(), &mut buf),
            None => {
                match scsi::absent_lun(cmd.cdb.as_bytes(), cmd.addr.lun, &luns, &id, &mut buf) {
                    Some(o) => o,
                    None => return Err(IoError::InvalidLun),
                }
            }
        };
        match outcome {
            Outcome::Good { transferred } => Ok(buf.data[..transferred].to_vec()),
            Outcome::CheckCondition(s) => Err(sense_err(s)),
            Outcome::DataFault(_) => Err(IoError::Host {
                srb_status: 4,
                scsi_status: 0,
                nt_status: 0,
            }),
        }
    }
}

fn disk(blocks: usize, sector: u32, serial: &str) -> Arc<ScsiDisk> {
    let mem: Arc<dyn vsp_storage::block::BlockDevice> =
        Arc::new(MemDisk::new(blocks * sector as usize, sector));
    Arc::new(ScsiDisk::new(
        mem,
        ScsiParams::new(Identity::msft(serial, 7)),
    ))
}

#[test]
fn linux_scan_of_a_storvsp_controller() {
    let target = emulated(vec![
        (0, disk(2048, 512, "disk0")),
        (3, disk(64, 4096, "disk3")),
    ]);
    let (luns, log) = run_probe(ProbeConfig::linux(ProtocolVersion::Win10), target);
    assert_eq!(luns.len(), 2);
    let l0 = &luns[0];
    assert_eq!(l0.addr, ScsiAddress::new(0, 0, 0));
    assert_eq!(&l0.inquiry.vendor, b"Msft    ");
    assert_eq!(&l0.inquiry.product, b"Virtual Disk    ");
    assert!(l0.tagged());
    assert_eq!(l0.vpd_pages, [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    assert_eq!(l0.serial.as_deref(), Some(&b"disk0"[..]));
    assert_eq!(l0.designators.len(), 2);
    assert_eq!(l0.designators[1].designator_type, 3); // NAA
    assert_eq!(l0.rotation_rate, Some(1));
    assert!(l0.provisioning.unwrap().lbpu);
    let cap = l0.capacity.unwrap();
    assert_eq!((cap.blocks(), cap.block_size, cap.lbpme), (2048, 512, true));
    assert!(l0.caching.unwrap().wce);
    assert!(l0.dpofua && !l0.write_protected && l0.media_present);
    assert!(l0.warnings.is_empty(), "{:?}", l0.warnings);
    let l3 = &luns[1];
    assert_eq!(l3.addr.lun, 3);
    assert_eq!(l3.capacity.unwrap().block_size, 4096);

    // The command sequence for LUN 0, as Linux 6.1 sends it.
    let lun0: Vec<(u8, Vec<u8>, u32)> = log
        .iter()
        .filter(|c| c.addr == ScsiAddress::new(0, 0, 0))
        .map(|c| (c.cdb.opcode(), c.cdb.as_bytes().to_vec(), c.alloc))
        .collect();
    let mut want: Vec<Vec<u8>> = vec![vec![0x12, 0, 0, 0, 36, 0]];
    // VPD 0: header, page; then each listed page (0 again first).
    let vpd = |page: u8, len: u16| {
        let l = len.to_be_bytes();
        vec![
            vec![0x12, 1, page, 0, 4, 0],
            vec![0x12, 1, page, l[0], l[1], 0],
        ]
    };
    want.extend(vpd(0, 10));
    want.extend(vpd(0, 10));
    want.extend(vpd(0x80, 9));
    let dev_id_len = 4 + 4 + 8 + 5 + 4 + 8;
    want.extend(vpd(0x83, dev_id_len));
    want.extend(vpd(0xB0, 64));
    want.extend(vpd(0xB1, 64));
    want.extend(vpd(0xB2, 8));
    want.push(vec![0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]);
    // sd: TEST UNIT READY, READ CAPACITY(16), MODE SENSE 0x3F (4), caching (4, then all).
    want.push(vec![0; 6]);
    want.push(vec![0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]);
    want.push(vec![0x1A, 0, 0x3F, 0, 4, 0]);
    want.push(vec![0x1A, 0, 0x08, 0, 4, 0]);
    want.push(vec![0x1A, 0, 0x08, 0, 24, 0]);
    let got: Vec<Vec<u8>> = lun0.iter().map(|c| c.1.clone()).collect();
    assert_eq!(got, want);
    // Every empty path/target got exactly one INQUIRY and one REPORT LUNS.
    let others = log
        .iter()
        .filter(|c| (c.addr.path_id, c.addr.target_id) != (0, 0));
    assert_eq!(others.count(), 15 * 2);
    // Scan commands before the LUN is known are untagged; the rest tagged.
    assert!(!log[0].tagged && log[1].tagged);

    // The disk Linux would set up.
    let d = Disk::from_lun(l0, 0x40000, ProtocolVersion::Win10).unwrap();
    assert_eq!((d.blocks, d.block_size, d.use_16), (2048, 512, false));
    assert_eq!(d.max_blocks, 512);
    assert!(d.write_cache && d.fua);
    assert_eq!(d.discard, DiscardMode::Unmap);
    assert_eq!(d.flush().unwrap().opcode(), 0x35);
}

#[test]
fn inquiry_second_pass_and_old_devices() {
    // A device that claims 96 bytes of INQUIRY data, SPC-2, no VPD, no REPORT LUNS.
    let (luns, log) = run_probe(ProbeConfig::single(0, 0, ProtocolVersion::Win10), |c| {
        match c.cdb.opcode() {
            0x12 if c.cdb.byte(1) == 0 => {
                let mut d = vec![0u8; 96];
                d[2] = 4; // SPC-2
                d[3] = 2;
                d[4] = 91;
                d[8..16].copy_from_slice(b"OLDVNDR ");
                Ok(d)
            }
            0x25 => Ok(vec![0, 0, 0x0F, 0xFF, 0, 0, 2, 0]),
            0x1A => Ok(vec![3, 0, 0x80, 0]),
            _ => Err(IoError::InvalidOpcode),
        }
    });
    assert_eq!(log[0].cdb.as_bytes(), &[0x12, 0, 0, 0, 36, 0]);
    assert_eq!(log[1].cdb.as_bytes(), &[0x12, 0, 0, 0, 96, 0]);
    let l = &luns[0];
    assert!(l.vpd_pages.is_empty());
    // SPC-2: READ CAPACITY(10) first, no RC16.
    assert!(log.iter().any(|c| c.cdb.opcode() == 0x25));
    assert!(!log.iter().any(|c| c.cdb.opcode() == 0x9E));
    assert_eq!(l.capacity.unwrap().blocks(), 0x1000);
    assert!(l.write_protected);
    // Caching page missing (short data) → write through.
    assert_eq!(l.caching, None);
    let d = Disk::from_lun(l, 0x20000, ProtocolVersion::Win10).unwrap();
    assert!(!d.write_cache);
    assert!(d.flush().is_none());
    assert_eq!(d.discard, DiscardMode::Disabled);
    // "Msft" on WIN8.1 is treated as SPC-3: RC16 first.
    let mut inq = InquiryData::parse(&[0, 0, 4, 2, 31]).unwrap();
    inq.vendor = *b"Msft    ";
    let mut li = l.clone();
    li.inquiry = inq;
    assert_eq!(li.effective_scsi_level(ProtocolVersion::Win8_1), 6);
    assert_eq!(li.effective_scsi_level(ProtocolVersion::Win10), 5);
}

#[test]
fn big_disk_unit_attention_and_no_medium() {
    let mut ua = 2;
    let (luns, log) = run_probe(ProbeConfig::single(0, 0, ProtocolVersion::Win10), |c| {
        let mut d = vec![0u8; 36];
        d[2] = 5;
        d[3] = 2;
        d[4] = 31;
        match c.cdb.opcode() {
            0x12 if c.cdb.byte(1) == 0 => Ok(d),
            0xA0 => Ok(vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            0x00 if ua > 0 => {
                ua -= 1;
                Err(IoError::UnitAttention { asc: 0x29, ascq: 0 })
            }
            0x00 => Ok(vec![]),
            // RC16 refused → RC10 says "too big" → RC16 again refused: keep RC10's answer.
            0x9E => Err(IoError::InvalidOpcode),
            0x25 => Ok(vec![0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x10, 0]),
            _ => Err(IoError::InvalidFieldInCdb),
        }
    });
    let tur = log.iter().filter(|c| c.cdb.opcode() == 0).count();
    assert_eq!(tur, 3, "two UNIT ATTENTIONs retried");
    let ops: Vec<u8> = log.iter().map(|c| c.cdb.opcode()).collect();
    let rc: Vec<u8> = ops
        .iter()
        .copied()
        .filter(|o| matches!(o, 0x9E | 0x25))
        .collect();
    assert_eq!(rc, [0x9E, 0x25, 0x9E]);
    let l = &luns[0];
    let cap = l.capacity.unwrap();
    assert_eq!((cap.blocks(), cap.block_size), (1 << 32, 4096));
    // Write-protect probes: 0x3F, page 0, 0x3F/255; then caching page fails.
    let ms: Vec<&[u8]> = log
        .iter()
        .filter(|c| c.cdb.opcode() == 0x1A)
        .map(|c| c.cdb.as_bytes())
        .collect();
    assert_eq!(
        ms,
        [
            &[0x1A, 0, 0x3F, 0, 4, 0][..],
            &[0x1A, 0, 0, 0, 4, 0],
            &[0x1A, 0, 0x3F, 0, 255, 0],
            &[0x1A, 0, 0x08, 0, 4, 0]
        ]
    );
    assert!(l.warnings.len() >= 2);
    let d = Disk::from_lun(l, 0x40000, ProtocolVersion::Win10).unwrap();
    assert!(d.use_16);
    assert_eq!(d.read(5, 1).unwrap().opcode(), 0x88);

    // No medium: nothing read after TEST UNIT READY.
    let (luns, log) = run_probe(
        ProbeConfig::single(0, 0, ProtocolVersion::Win10),
        |c| match c.cdb.opcode() {
            0x12 if c.cdb.byte(1) == 0 => Ok(vec![0, 0x80, 5, 2, 31]),
            0x00 => Err(IoError::NoMedium { ascq: 0 }),
            _ => Err(IoError::InvalidFieldInCdb),
        },
    );
    assert!(!luns[0].media_present);
    assert!(luns[0].inquiry.removable);
    assert_eq!(log.last().unwrap().cdb.opcode(), 0x00);
    assert_eq!(
        Disk::from_lun(&luns[0], 0x40000, ProtocolVersion::Win10),
        Err(DiskError::NoCapacity)
    );
}

#[test]
fn hostile_target_data_never_panics() {
    // Random (deterministic) answers of random lengths to every command.
    for seed in 1..200u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (luns, log) = run_probe(ProbeConfig::single(0, 0, ProtocolVersion::Win10), |c| {
            let r = rnd();
            if r % 7 == 0 {
                return Err(IoError::UnitAttention { asc: 0x29, ascq: 0 });
            }
            let len = (r >> 8) as usize % (c.alloc as usize + 8);
            let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // Keep the standard INQUIRY plausible so the probe goes deeper.
            if c.cdb.opcode() == 0x12 && c.cdb.byte(1) == 0 && d.len() >= 5 {
                d[0] = 0;
            }
            if c.cdb.opcode() == 0x12 && c.cdb.byte(1) == 1 && d.len() >= 2 {
                d[1] = c.cdb.byte(2);
            }
            Ok(d)
        });
        assert!(log.len() < 2000);
        for l in &luns {
            let _ = Disk::from_lun(l, 0x40000, ProtocolVersion::Win10);
        }
    }
}

#[test]
fn report_luns_longer_than_the_first_allocation() {
    let many: Vec<u8> = (0..=255u8).collect();
    let (luns, log) = run_probe(ProbeConfig::single(0, 1, ProtocolVersion::Win10), |c| {
        match c.cdb.opcode() {
            0x12 if c.cdb.byte(1) == 0 => {
                // LUN 0 absent (0x7F), LUNs 1.. present.
                let mut d = vec![0u8; 36];
                d[0] = if c.addr.lun == 0 { 0x7F } else { 0 };
                d[4] = 31;
                Ok(d)
            }
            0xA0 => {
                // 600 entries (longer than 4096 bytes): the driver asks again with more room;
                // duplicates and LUNs above 255 (flat addressing) are skipped.
                let mut d = vec![0u8; 8];
                d[0..4].copy_from_slice(&(600u32 * 8).to_be_bytes());
                for i in 0..600u32 {
                    let lun = many[(i % 256) as usize];
                    d.extend_from_slice(&if i == 599 {
                        [0x40, 1, 0, 0, 0, 0, 0, 0]
                    } else {
                        [0, lun, 0, 0, 0, 0, 0, 0]
                    });
                }
                Ok(d)
            }
            _ => Err(IoError::InvalidOpcode),
        }
    });
    let rl: Vec<u32> = log
        .iter()
        .filter(|c| c.cdb.opcode() == 0xA0)
        .map(|c| c.alloc)
        .collect();
    assert_eq!(rl, [4096, 4808]);
    assert_eq!(luns.len(), 255);
    assert!(
        luns.iter()
            .all(|l| l.addr.target_id == 1 && l.addr.lun != 0)
    );
}
