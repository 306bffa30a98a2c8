//! Hostile guests (reference §5.2): every bad request gets an error completion of its own, nothing
//! panics, guest memory outside the request is never touched, and good requests keep working.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vmbus_core::device::{ChannelControl, VmbusDevice};
use vmbus_core::devices::vstor::{self, Operation, VstorPacket, srb_status, status};
use vmbus_core::memory::GuestMemory;
use vmbus_core::wire::Guid;
use vsp_storage::backend::mem::MemDisk;
use vsp_storage::block::{BlockDevice, BlockError};
use vsp_storage::storvsp::{GuestRamBinder, LunAddr, StorVsp, StorVspConfig};

const LUN0: (u8, u8, u8) = (0, 0, 0);

struct NoBus;
impl ChannelControl for NoBus {
    fn offer_subchannels(&mut self, _: u16) -> u16 {
        0
    }
}

fn device(ram: &Ram, ch: &GuestChannel, disk: Arc<dyn BlockDevice>) -> StorVsp {
    let (kick, call) = (ch.kick.try_clone().unwrap(), ch.call.try_clone().unwrap());
    let binder = GuestRamBinder {
        ram: ram.file.clone(),
        memory: ram.mem.clone(),
        doorbells: Box::new(move |_| Ok((kick.try_clone()?, call.try_clone()?))),
    };
    let mut vsp = StorVsp::new(
        StorVspConfig::new(Guid::from_u128(7)),
        Some(Arc::new(binder)),
    )
    .unwrap();
    vsp.add_lun(LunAddr::new(0, 0, 0), disk, None, None);
    VmbusDevice::open(&mut vsp, ch.info.clone(), &mut NoBus).unwrap();
    vsp
}

fn setup() -> (Ram, GuestChannel, StorVsp, Arc<MemDisk>) {
    let ram = Ram::new();
    let mut ch = GuestChannel::new(&ram, 1, 0, 64);
    let disk = Arc::new(MemDisk::new(1 << 20, 512));
    let vsp = device(&ram, &ch, disk.clone());
    ch.linux_init();
    (ram, ch, vsp, disk)
}

/// (srb status, scsi status, sense key, asc, data_transfer_length, vstor status)
fn outcome(r: &Reply) -> (u8, u8, u8, u8, u32, u32) {
    let s = r.srb();
    let sense = s.cdb_or_sense;
    (
        s.srb_status,
        s.scsi_status,
        sense[2],
        sense[12],
        s.data_transfer_length,
        r.status(),
    )
}

/// A good 4 KiB read of LBA 0 still works.
fn still_works(ch: &mut GuestChannel, mem: &dyn GuestMemory, id: u64) {
    let b = Buf::new(5000, 0, 4096);
    ch.send(id, &srb(LUN0, &read10(0, 8), 1, 4096), 64, b.range());
    let r = ch.wait(id);
    assert_eq!(outcome(&r), (1, 0, 0, 0, 4096, 0));
    assert_eq!(b.read(mem), vec![0u8; 4096]);
}

#[test]
fn malformed_vstor_packets_get_error_completions() {
    let (ram, mut ch, vsp, _) = setup();
    // Shorter than the 12-byte header (the ring pads it to 8).
    ch.send_raw(10, &[3, 0, 0, 0], None, true);
    let r = ch.wait(10);
    assert_eq!((r.len, r.status()), (64, status::INVALID_PARAMETER));
    // Unknown operations, and host-only ones.
    for (id, op) in [
        (11u64, 99u32),
        (12, 0),
        (13, 1),
        (14, 11),
        (15, 14),
        (16, u32::MAX),
    ] {
        let mut p = VstorPacket::new(Operation::ExecuteSrb, 1, 0);
        p.header.operation = op;
        ch.send(id, &p, 64, None);
        assert_eq!(
            ch.wait(id).status(),
            status::INVALID_DEVICE_REQUEST,
            "op {op}"
        );
    }
    // An SRB cut short: the missing tail reads as zero (cdb_length 0 -> ILLEGAL REQUEST).
    let p = srb(LUN0, &[0, 0, 0, 0, 0, 0], 2, 0);
    ch.send(17, &p, 20, None);
    let r = ch.wait(17);
    assert_eq!(r.len, 64);
    assert_eq!(outcome(&r), (0x84, 2, 5, 0x20, 0, status::IO_DEVICE_ERROR));
    // Longer than 64 bytes: the rest is ignored.
    let mut long = p.wire_bytes(64).to_vec();
    long[20] = 6; // cdb_length
    long.extend_from_slice(&[0xEE; 200]);
    ch.send_raw(18, &long, None, true);
    assert_eq!(outcome(&ch.wait(18)), (1, 0, 0, 0, 0, 0));
    assert!(vsp.stats().bad_packets.load(Ordering::Relaxed) >= 7);
    still_works(&mut ch, ram.mem.as_ref(), 19);
}

#[test]
fn bad_srbs_fail_alone() {
    let (ram, mut ch, _vsp, disk) = setup();
    let mem = ram.mem.as_ref();
    let buf = Buf::new(1024, 0, 4096);
    let big = Buf::new(1100, 0, 8192);
    // CDB length above 16, and 0.
    for (id, len) in [(20u64, 17u8), (21, 255)] {
        let mut p = srb(LUN0, &read10(0, 8), 1, 4096);
        let mut s = p.srb();
        s.cdb_length = len;
        p.set_srb(&s);
        ch.send(id, &p, 64, buf.range());
        assert_eq!(
            outcome(&ch.wait(id)),
            (0x84, 2, 5, 0x24, 0, status::IO_DEVICE_ERROR)
        );
    }
    // Transfer length past the GPA range.
    ch.send(22, &srb(LUN0, &read10(0, 16), 1, 8192), 64, buf.range());
    assert_eq!(
        outcome(&ch.wait(22)),
        (
            srb_status::INVALID_REQUEST,
            0,
            0,
            0,
            0,
            status::INVALID_PARAMETER
        )
    );
    // Two ranges.
    let two = gpa_header(&[(0, 4096, &[1024]), (0, 4096, &[1025])]);
    ch.send_raw(
        23,
        srb(LUN0, &read10(0, 8), 1, 4096).wire_bytes(64),
        Some(two),
        true,
    );
    assert_eq!(outcome(&ch.wait(23)).0, srb_status::INVALID_REQUEST);
    // Data length with no range at all.
    ch.send(24, &srb(LUN0, &read10(0, 8), 1, 4096), 64, None);
    assert_eq!(outcome(&ch.wait(24)).0, srb_status::INVALID_REQUEST);
    // GPAs outside guest RAM (and one whose GPA overflows): an SRB error, nothing written.
    for (id, pfn) in [
        (25u64, RAM_PAGES + 10),
        (26, u64::MAX / 4096 + 1),
        (27, u64::MAX),
    ] {
        let pfns = [1200, pfn];
        ch.send(
            id,
            &srb(LUN0, &read10(0, 16), 1, 8192),
            64,
            Some((0, 8192, &pfns)),
        );
        assert_eq!(
            outcome(&ch.wait(id)),
            (srb_status::ERROR, 0, 0, 0, 0, status::IO_DEVICE_ERROR),
            "{pfn:#x}"
        );
    }
    // LBA + count overflowing, and beyond the end.
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    r16[13] = 8;
    ch.send(28, &srb(LUN0, &r16, 1, 4096), 64, buf.range());
    assert_eq!(
        outcome(&ch.wait(28)),
        (0x84, 2, 5, 0x21, 0, status::IO_DEVICE_ERROR)
    );
    ch.send(29, &srb(LUN0, &read10(2047, 8), 1, 4096), 64, buf.range());
    assert_eq!(
        outcome(&ch.wait(29)),
        (0x84, 2, 5, 0x21, 0, status::IO_DEVICE_ERROR)
    );
    // A READ whose SRB says "write" (data_in 0): guest memory untouched.
    disk.write_at(0, &[0xAB; 4096], false).unwrap();
    buf.write(mem, &[0x5A; 4096]);
    ch.send(30, &srb(LUN0, &read10(0, 8), 0, 4096), 64, buf.range());
    assert_eq!(
        outcome(&ch.wait(30)),
        (0x84, 2, 5, 0x24, 0, status::IO_DEVICE_ERROR)
    );
    assert_eq!(buf.read(mem), vec![0x5A; 4096]);
    // An undefined data_in value.
    ch.send(31, &srb(LUN0, &read10(0, 8), 7, 4096), 64, buf.range());
    assert_eq!(outcome(&ch.wait(31)).0, srb_status::INVALID_REQUEST);
    // More than max_transfer_bytes (256 KiB), with a range that covers it.
    let huge = Buf::new(3000, 0, 1 << 20);
    ch.send(
        32,
        &srb(LUN0, &read10(0, 2048), 1, 1 << 20),
        64,
        huge.range(),
    );
    assert_eq!(outcome(&ch.wait(32)).0, srb_status::INVALID_REQUEST);
    // A WRITE with a transfer length shorter than the CDB's: nothing written.
    big.write(mem, &[0x11; 8192]);
    ch.send(
        33,
        &srb(LUN0, &write10(0, 16, false), 0, 4096),
        64,
        big.range(),
    );
    assert_eq!(
        outcome(&ch.wait(33)),
        (0x84, 2, 5, 0x24, 0, status::IO_DEVICE_ERROR)
    );
    let mut first = [0u8; 512];
    disk.read_at(0, &mut first).unwrap();
    assert_eq!(first, [0xAB; 512]);
    // No disk there: TUR -> INVALID LUN, VPD INQUIRY -> INVALID LUN, standard INQUIRY -> 0x7F.
    ch.send(34, &srb((0, 0, 9), &[0, 0, 0, 0, 0, 0], 2, 0), 64, None);
    assert_eq!(outcome(&ch.wait(34)).0, srb_status::INVALID_LUN);
    ch.send(
        35,
        &srb((7, 1, 0), &[0x12, 1, 0x80, 0, 64, 0], 1, 64),
        64,
        buf.range(),
    );
    assert_eq!(outcome(&ch.wait(35)).0, srb_status::INVALID_LUN);
    ch.send(
        36,
        &srb((7, 1, 3), &[0x12, 0, 0, 0, 36, 0], 1, 36),
        64,
        buf.range(),
    );
    assert_eq!(outcome(&ch.wait(36)), (1, 0, 0, 0, 36, 0));
    assert_eq!(buf.read(mem)[0], 0x7F);
    // Unknown opcode on a real disk.
    ch.send(
        37,
        &srb(LUN0, &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 1, 64),
        64,
        buf.range(),
    );
    assert_eq!(
        outcome(&ch.wait(37)),
        (0x84, 2, 5, 0x20, 0, status::IO_DEVICE_ERROR)
    );
    let mut b = [0u8; 512];
    disk.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0xAB; 512]);
    disk.write_at(0, &[0; 4096], false).unwrap();
    still_works(&mut ch, mem, 38);
}

#[test]
fn requests_without_completion_are_not_executed() {
    let (ram, mut ch, vsp, disk) = setup();
    let b = Buf::new(1024, 0, 512);
    b.write(ram.mem.as_ref(), &[0x77; 512]);
    let p = srb(LUN0, &write10(0, 1, false), 0, 512);
    ch.send_raw(
        40,
        p.wire_bytes(64),
        Some(gpa_header(&[(0, 512, &b.pfns)])),
        false,
    );
    assert!(!ch.arrives(40, Duration::from_millis(300)));
    assert_eq!(vsp.stats().dropped.load(Ordering::Relaxed), 1);
    let mut first = [0u8; 512];
    disk.read_at(0, &mut first).unwrap();
    assert_eq!(first, [0; 512]);
    still_works(&mut ch, ram.mem.as_ref(), 41);
}

#[test]
fn io_before_init_is_refused() {
    let ram = Ram::new();
    let mut ch = GuestChannel::new(&ram, 1, 0, 64);
    let _vsp = device(&ram, &ch, Arc::new(MemDisk::new(1 << 20, 512)));
    ch.send(1, &srb(LUN0, &[0, 0, 0, 0, 0, 0], 2, 0), 64, None);
    let r = ch.wait(1);
    assert_eq!((r.len, r.status()), (64, status::INVALID_DEVICE_STATE));
    ch.linux_init();
    ch.send(2, &srb(LUN0, &[0, 0, 0, 0, 0, 0], 2, 0), 64, None);
    assert_eq!(outcome(&ch.wait(2)), (1, 0, 0, 0, 0, 0));
}

/// Reads take 100 ms each.
struct Sluggish(MemDisk);
impl BlockDevice for Sluggish {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        std::thread::sleep(Duration::from_millis(100));
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError> {
        self.0.write_at(offset, buf, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
}

#[test]
fn reset_bus_completes_after_io_in_flight() {
    let ram = Ram::new();
    let mut ch = GuestChannel::new(&ram, 1, 0, 64);
    let _vsp = device(&ram, &ch, Arc::new(Sluggish(MemDisk::new(1 << 20, 512))));
    ch.linux_init();
    let bufs: Vec<Buf> = (0..4).map(|i| Buf::new(1024 + 2 * i, 0, 4096)).collect();
    for (i, b) in bufs.iter().enumerate() {
        ch.send(
            100 + i as u64,
            &srb(LUN0, &read10(0, 8), 1, 4096),
            64,
            b.range(),
        );
    }
    let mut reset = VstorPacket::new(Operation::ResetBus, 1, 0);
    reset.set_srb(&vstor::VmscsiRequest::default());
    ch.send(vstor::LINUX_RESET_TRANS_ID, &reset, 64, None);
    let r = ch.wait(vstor::LINUX_RESET_TRANS_ID);
    assert_eq!(r.status(), 0);
    for i in 0..4u64 {
        assert!(
            ch.early.contains_key(&(100 + i)),
            "read {i} completed before the reset"
        );
    }
    let pos = |id: u64| ch.arrival.iter().position(|&x| x == id).unwrap();
    assert!((0..4).all(|i| pos(100 + i) < pos(vstor::LINUX_RESET_TRANS_ID)));
}

#[test]
fn random_packets_never_break_the_device() {
    let (ram, mut ch, vsp, _) = setup();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ids = Vec::new();
    for id in 1000..3000u64 {
        let len = (next() % 72) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Keep most packets plausible: a real operation, an SRB-ish body.
        if len >= 4 && next() % 4 != 0 {
            let op = (next() % 15) as u32;
            bytes[..4].copy_from_slice(&op.to_le_bytes());
        }
        let header = (next() % 3 == 0).then(|| {
            let offset = (next() % 4096) as u32;
            let count = (next() % 70_000) as u32 + 1;
            let pages = (u64::from(offset) + u64::from(count)).div_ceil(4096);
            let pfns: Vec<u64> = (0..pages)
                .map(|_| {
                    if next() % 8 == 0 {
                        next()
                    } else {
                        next() % RAM_PAGES
                    }
                })
                .filter(|p| !(64..200).contains(p)) // never the rings themselves
                .collect();
            if pfns.len() as u64 == pages {
                gpa_header(&[(offset, count, &pfns)])
            } else {
                gpa_header(&[(offset, count.min(4096 - offset), &[300])])
            }
        });
        ch.send_raw(id, &bytes, header, true);
        ids.push(id);
        if id % 64 == 0 {
            ch.poll(Duration::from_millis(1));
        }
    }
    for id in ids {
        ch.wait(id);
    }
    assert!(vsp.stats().bad_packets.load(Ordering::Relaxed) > 0);
    still_works(&mut ch, ram.mem.as_ref(), 5000);
}

#[test]
fn broken_ring_framing_stops_the_channel_cleanly() {
    let (_ram, mut ch, mut vsp, _) = setup();
    // A GPA range with byte_offset past the first page: the ring layer refuses the packet.
    let bad = gpa_header(&[(5000, 10, &[300, 301])]);
    ch.send_raw(
        1,
        srb(LUN0, &read10(0, 1), 1, 10).wire_bytes(64),
        Some(bad),
        true,
    );
    assert!(!ch.arrives(1, Duration::from_millis(300)));
    let t = Instant::now();
    VmbusDevice::close(&mut vsp, 1);
    assert!(t.elapsed() < Duration::from_secs(5));
}
