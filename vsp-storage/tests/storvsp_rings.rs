//! storvsp over real rings in a memfd "guest RAM", driven by a storvsc-like guest: the Linux init
//! handshake, SCSI scan commands, read/write/flush/unmap through GPA ranges against a raw temp file,
//! queue depth 128 with out-of-order completion, sub-channels, hot add/remove/resize, and a
//! pre-Win8 guest.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmbus_core::device::{ChannelControl, VmbusDevice};
use vmbus_core::devices::vstor::{self, HostPacket, Operation, ProtocolVersion, property_flags};
use vmbus_core::memory::GuestMemory;
use vmbus_core::wire::Guid;
use vsp_storage::backend::mem::MemDisk;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::block::{BlockDevice, BlockError};
use vsp_storage::storvsp::{GuestRamBinder, LunAddr, StorVsp, StorVspConfig};

const LUN0: (u8, u8, u8) = (0, 0, 0);

/// Doorbells per relid, shared by the guest side and the binder.
type Bells = Arc<Mutex<Vec<(u32, ringbuf::signal::Doorbell, ringbuf::signal::Doorbell)>>>;

struct Rig {
    ram: Ram,
    vsp: StorVsp,
    bells: Bells,
}

struct Bus(u16);

impl ChannelControl for Bus {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        self.0 += count;
        count
    }
}

impl Rig {
    fn new(config: StorVspConfig) -> Self {
        let ram = Ram::new();
        let bells: Bells = Arc::new(Mutex::new(Vec::new()));
        let b = bells.clone();
        let binder = GuestRamBinder {
            ram: ram.file.clone(),
            memory: ram.mem.clone(),
            doorbells: Box::new(move |info| {
                let g = b.lock().unwrap();
                let (_, kick, call) = g.iter().find(|(r, _, _)| *r == info.relid).unwrap();
                Ok((kick.try_clone()?, call.try_clone()?))
            }),
        };
        let vsp = StorVsp::new(config, Some(Arc::new(binder))).unwrap();
        Rig { ram, vsp, bells }
    }

    /// Opens a channel through the VmbusDevice interface; rings from `first_pfn`.
    fn open(&mut self, relid: u32, sub: u16, first_pfn: u64) -> GuestChannel {
        let ch = GuestChannel::new(&self.ram, relid, sub, first_pfn);
        self.bells.lock().unwrap().push((
            relid,
            ch.kick.try_clone().unwrap(),
            ch.call.try_clone().unwrap(),
        ));
        VmbusDevice::open(&mut self.vsp, ch.info.clone(), &mut Bus(0)).unwrap();
        ch
    }
}

fn config() -> StorVspConfig {
    StorVspConfig::new(Guid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788))
}

fn raw_disk(blocks: u64) -> (tempfile::TempDir, std::path::PathBuf, Arc<RawDisk>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let disk = Arc::new(RawDisk::create(&path, blocks * 512, &RawOptions::default()).unwrap());
    (dir, path, disk)
}

/// Sends an SRB and waits for it.
fn run(
    ch: &mut GuestChannel,
    id: u64,
    lun: (u8, u8, u8),
    cdb: &[u8],
    data_in: u8,
    buf: Option<&Buf>,
) -> Reply {
    let len = buf.map_or(0, |b| b.len);
    ch.send(
        id,
        &srb(lun, cdb, data_in, len),
        64,
        buf.and_then(Buf::range),
    );
    let r = ch.wait(id);
    assert_eq!(r.packet_type, ringbuf::PacketType::Completion);
    assert_eq!(r.len, 64);
    assert_eq!(r.operation(), Operation::CompleteIo.raw());
    r
}

fn ok(r: &Reply) -> u32 {
    let s = r.srb();
    assert_eq!(
        (s.srb_status, s.scsi_status, r.status()),
        (1, 0, 0),
        "{s:?}"
    );
    s.data_transfer_length
}

/// (srb status, scsi status, sense key, asc, ascq, data_transfer_length)
fn failure(r: &Reply) -> (u8, u8, u8, u8, u8, u32) {
    let s = r.srb();
    let sense = s.cdb_or_sense;
    (
        s.srb_status,
        s.scsi_status,
        sense[2],
        sense[12],
        sense[13],
        s.data_transfer_length,
    )
}

#[test]
fn linux_handshake_scan_and_io_against_a_raw_file() {
    let mut cfg = config();
    cfg.protocol.max_subchannels = 3;
    let mut rig = Rig::new(cfg);
    let (_dir, path, disk) = raw_disk(16384);
    rig.vsp.add_raw_lun(LunAddr::new(0, 0, 0), disk);
    let mut ch = rig.open(1, 0, 64);
    let (v, props) = ch.linux_init();
    assert_eq!(v, ProtocolVersion::Win10);
    assert_eq!(rig.vsp.version(), Some(ProtocolVersion::Win10));
    assert!(rig.vsp.ready());
    assert_eq!(
        ({ props.max_channel_cnt }, { props.flags }),
        (3, property_flags::SUPPORTS_MULTI_CHANNEL)
    );
    assert_eq!({ props.max_transfer_bytes }, 0x40000);

    // The scan: INQUIRY on LUN 0 and on an empty target, REPORT LUNS, READ CAPACITY(16).
    let buf = Buf::new(1024, 0, 255);
    let r = run(&mut ch, 1, LUN0, &[0x12, 0, 0, 0, 36, 0], 1, Some(&buf));
    assert_eq!(ok(&r), 36);
    let d = buf.read(rig.ram.mem.as_ref());
    assert_eq!((d[0], d[2], d[7]), (0, 6, 2));
    assert_eq!(&d[8..16], b"Msft    ");
    let r = run(
        &mut ch,
        2,
        (0, 1, 0),
        &[0x12, 0, 0, 0, 36, 0],
        1,
        Some(&buf),
    );
    assert_eq!(ok(&r), 36);
    assert_eq!(buf.read(rig.ram.mem.as_ref())[0], 0x7F);
    let r = run(&mut ch, 3, (0, 1, 0), &[0, 0, 0, 0, 0, 0], 2, None);
    assert_eq!(r.srb().srb_status, vstor::srb_status::INVALID_LUN);
    let rl = Buf::new(1030, 0, 4096);
    let r = run(
        &mut ch,
        4,
        LUN0,
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
        1,
        Some(&rl),
    );
    assert_eq!(ok(&r), 16);
    assert_eq!(
        &rl.read(rig.ram.mem.as_ref())[..16],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9E;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let cap = Buf::new(1040, 100, 32);
    assert_eq!(ok(&run(&mut ch, 5, LUN0, &rc16, 1, Some(&cap))), 32);
    let c = cap.read(rig.ram.mem.as_ref());
    assert_eq!(&c[..12], &[0, 0, 0, 0, 0, 0, 0x3F, 0xFF, 0, 0, 2, 0]);
    assert_eq!(c[14], 0x80, "LBPME: the raw file punches holes");

    // WRITE(10) 64 KiB at a non-zero page offset, READ(10) it back, flush, check the file.
    let data = pattern(100, 1, 65536);
    let wbuf = Buf::new(2000, 512, 65536);
    wbuf.write(rig.ram.mem.as_ref(), &data);
    assert_eq!(
        ok(&run(
            &mut ch,
            6,
            LUN0,
            &write10(100, 128, false),
            0,
            Some(&wbuf)
        )),
        65536
    );
    let rbuf = Buf::new(2100, 3000, 65536);
    assert_eq!(
        ok(&run(&mut ch, 7, LUN0, &read10(100, 128), 1, Some(&rbuf))),
        65536
    );
    assert_eq!(rbuf.read(rig.ram.mem.as_ref()), data);
    assert_eq!(
        ok(&run(
            &mut ch,
            8,
            LUN0,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            2,
            None
        )),
        0
    );
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 65536], &data[..]);

    // UNMAP 16 blocks in the middle: zeros on the guest side and in the file.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&108u64.to_be_bytes());
    list.extend_from_slice(&16u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let ubuf = Buf::new(2200, 0, 24);
    ubuf.write(rig.ram.mem.as_ref(), &list);
    assert_eq!(
        ok(&run(
            &mut ch,
            9,
            LUN0,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
            0,
            Some(&ubuf)
        )),
        24
    );
    assert_eq!(
        ok(&run(&mut ch, 10, LUN0, &read10(100, 128), 1, Some(&rbuf))),
        65536
    );
    let back = rbuf.read(rig.ram.mem.as_ref());
    assert!(back[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert_eq!(&back[..8 * 512], &data[..8 * 512]);
    assert_eq!(&back[24 * 512..], &data[24 * 512..]);
    let file = std::fs::read(&path).unwrap();
    assert!(file[108 * 512..124 * 512].iter().all(|&b| b == 0));

    // Sub-channels: the request is completed, then handed to the bus.
    let mut p = vstor::VstorPacket::new(Operation::CreateSubChannels, 1, 0);
    p.set_sub_channel_count(2);
    assert_eq!(ch.init_op(&p).status(), 0);
    assert_eq!(rig.vsp.pending_subchannels(), 2);
    let mut bus = Bus(0);
    assert_eq!(rig.vsp.service_bus(&mut bus), 2);
    assert_eq!(bus.0, 2);
    // The guest opens a sub-channel and uses it without any init of its own.
    let mut sub = rig.open(2, 1, 400);
    let r2 = Buf::new(2300, 0, 4096);
    assert_eq!(
        ok(&run(&mut sub, 11, LUN0, &read10(100, 8), 1, Some(&r2))),
        4096
    );
    assert_eq!(r2.read(rig.ram.mem.as_ref()), &data[..4096]);
    // Init requests are refused on it.
    let r = sub.init_op(&vstor::VstorPacket::new(
        Operation::BeginInitialization,
        1,
        0,
    ));
    assert_eq!(r.status(), vstor::status::INVALID_DEVICE_STATE);
    VmbusDevice::close(&mut rig.vsp, 2);
    VmbusDevice::close(&mut rig.vsp, 1);
}

/// A disk that delays some requests, so completions overtake each other.
struct SlowDisk {
    inner: MemDisk,
    active: AtomicUsize,
    peak: AtomicUsize,
}

impl BlockDevice for SlowDisk {
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        // Every 16th block (by LBA) is slow.
        if (offset / 4096).is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(30));
        }
        let r = self.inner.read_at(offset, buf);
        self.active.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError> {
        self.inner.write_at(offset, buf, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }
}

/// Submits `n` 4 KiB reads of blocks 0.. without waiting, then collects every completion.
fn burst(ch: &mut GuestChannel, mem: &dyn GuestMemory, n: u64, first_id: u64) {
    let bufs: Vec<Buf> = (0..n).map(|i| Buf::new(3000 + 2 * i, 0, 4096)).collect();
    for i in 0..n {
        let cdb = read10((i * 8) as u32, 8);
        ch.send(
            first_id + i,
            &srb(LUN0, &cdb, 1, 4096),
            64,
            bufs[i as usize].range(),
        );
    }
    for i in 0..n {
        let r = ch.wait(first_id + i);
        assert_eq!(ok(&r), 4096);
        assert_eq!(bufs[i as usize].read(mem), pattern(i, 7, 4096), "block {i}");
    }
}

fn fill(ch: &mut GuestChannel, mem: &dyn GuestMemory, blocks: u64) {
    for i in 0..blocks {
        let b = Buf::new(3000 + 2 * i, 0, 4096);
        b.write(mem, &pattern(i, 7, 4096));
        ch.send(
            50_000 + i,
            &srb(LUN0, &write10((i * 8) as u32, 8, false), 0, 4096),
            64,
            b.range(),
        );
    }
    for i in 0..blocks {
        assert_eq!(ok(&ch.wait(50_000 + i)), 4096);
    }
}

#[test]
fn queue_depth_128_completes_out_of_order() {
    let mut rig = Rig::new(config());
    let slow = Arc::new(SlowDisk {
        inner: MemDisk::new(1 << 20, 512),
        active: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    rig.vsp
        .add_lun(LunAddr::new(0, 0, 0), slow.clone(), None, None);
    let mut ch = rig.open(1, 0, 64);
    ch.linux_init();
    let mem = rig.ram.mem.clone();
    fill(&mut ch, mem.as_ref(), 128);
    ch.arrival.clear();
    burst(&mut ch, mem.as_ref(), 128, 1);
    let order = ch.arrival.clone();
    assert_eq!(order.len(), 128);
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(
        inversions > 0,
        "completions came back in submission order: {order:?}"
    );
    assert!(
        slow.peak.load(Ordering::SeqCst) > 1,
        "requests ran concurrently"
    );
    VmbusDevice::close(&mut rig.vsp, 1);
}

#[test]
fn queue_depth_128_on_io_uring() {
    let mut rig = Rig::new(config());
    let (_dir, path, disk) = raw_disk(2048);
    let uring = disk.uses_io_uring();
    rig.vsp.add_raw_lun(LunAddr::new(0, 0, 0), disk);
    let mut ch = rig.open(1, 0, 64);
    ch.linux_init();
    let mem = rig.ram.mem.clone();
    for round in 0..4 {
        fill(&mut ch, mem.as_ref(), 128);
        burst(&mut ch, mem.as_ref(), 128, 1000 * (round + 1));
    }
    assert_eq!(
        ok(&run(
            &mut ch,
            9,
            LUN0,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            2,
            None
        )),
        0
    );
    let file = std::fs::read(&path).unwrap();
    for i in 0..128u64 {
        assert_eq!(
            &file[(i * 4096) as usize..((i + 1) * 4096) as usize],
            &pattern(i, 7, 4096)[..]
        );
    }
    let stats = rig.vsp.stats();
    if uring {
        assert!(
            stats.async_io.load(Ordering::Relaxed) >= 8 * 128,
            "{stats:?}"
        );
        assert_eq!(stats.worker_io.load(Ordering::Relaxed), 0, "{stats:?}");
    } else {
        eprintln!("io_uring unavailable: the worker pool ran the I/O");
    }
    VmbusDevice::close(&mut rig.vsp, 1);
}

#[test]
fn hot_add_remove_and_resize() {
    let mut rig = Rig::new(config());
    let mem0 = Arc::new(MemDisk::new(1 << 20, 512));
    rig.vsp
        .add_lun(LunAddr::new(0, 0, 0), mem0.clone(), None, None);
    let mut ch = rig.open(1, 0, 64);
    ch.linux_init();
    assert!(ch.unsolicited.is_empty());

    rig.vsp.add_lun(
        LunAddr::new(0, 0, 1),
        Arc::new(MemDisk::new(1 << 20, 512)),
        None,
        None,
    );
    ch.poll(Duration::from_secs(5));
    let note = ch.unsolicited.pop().expect("ENUMERATE_BUS");
    assert_eq!(note.packet_type, ringbuf::PacketType::InBand);
    assert_eq!(note.len, 64);
    assert_eq!(parse(&note), HostPacket::EnumerateBus);
    let rl = Buf::new(1030, 0, 4096);
    let r = run(
        &mut ch,
        1,
        LUN0,
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
        1,
        Some(&rl),
    );
    assert_eq!(ok(&r), 24);
    assert_eq!(rl.read(rig.ram.mem.as_ref())[17], 1, "LUN 1 listed");
    assert_eq!(
        ok(&run(&mut ch, 2, (0, 0, 1), &[0, 0, 0, 0, 0, 0], 2, None)),
        0
    );

    assert!(rig.vsp.remove_lun(LunAddr::new(0, 0, 1)));
    ch.poll(Duration::from_secs(5));
    assert_eq!(
        parse(&ch.unsolicited.pop().expect("ENUMERATE_BUS")),
        HostPacket::EnumerateBus
    );
    let r = run(&mut ch, 3, (0, 0, 1), &[0, 0, 0, 0, 0, 0], 2, None);
    assert_eq!(r.srb().srb_status, vstor::srb_status::INVALID_LUN);
    assert_eq!(r.status(), vstor::status::DEVICE_DOES_NOT_EXIST);

    // Resize: the next command gets UNIT ATTENTION 2A/09 with autosense, then the new capacity.
    mem0.resize(2 << 20);
    assert!(rig.vsp.resized(LunAddr::new(0, 0, 0)));
    let b = Buf::new(1100, 0, 4096);
    let r = run(&mut ch, 4, LUN0, &read10(0, 8), 1, Some(&b));
    assert_eq!(failure(&r), (0x84, 2, 6, 0x2A, 0x09, 0));
    assert_eq!(r.srb().sense_info_length, 18);
    let cap = Buf::new(1110, 0, 8);
    assert_eq!(
        ok(&run(
            &mut ch,
            5,
            LUN0,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            1,
            Some(&cap)
        )),
        8
    );
    assert_eq!(&cap.read(rig.ram.mem.as_ref())[..4], &4095u32.to_be_bytes());
    VmbusDevice::close(&mut rig.vsp, 1);
}

#[test]
fn pre_win8_guest_gets_48_byte_completions() {
    let mut cfg = config();
    cfg.protocol.versions = vec![ProtocolVersion::Win6, ProtocolVersion::Win7];
    let mut rig = Rig::new(cfg);
    rig.vsp.add_lun(
        LunAddr::new(0, 0, 0),
        Arc::new(MemDisk::new(1 << 20, 512)),
        None,
        None,
    );
    let mut ch = rig.open(1, 0, 64);
    // An old guest: 48-byte packets throughout, versions newest first down to WIN6.
    let flag = vstor::FLAG_REQUEST_COMPLETION;
    let op = |ch: &mut GuestChannel, p: vstor::VstorPacket| {
        ch.send(7, &p, 48, None);
        let r = ch.wait(7);
        assert_eq!(r.len, 48);
        r
    };
    assert_eq!(
        op(
            &mut ch,
            vstor::VstorPacket::new(Operation::BeginInitialization, flag, 0)
        )
        .status(),
        0
    );
    let mut accepted = None;
    for v in ProtocolVersion::LEGACY_ORDER {
        let mut p = vstor::VstorPacket::new(Operation::QueryProtocolVersion, flag, 0);
        p.set_version(&vstor::ProtocolVersionBody {
            major_minor: v.raw(),
            revision: 0,
        });
        if op(&mut ch, p).status() == 0 {
            accepted = Some(v);
            break;
        }
    }
    assert_eq!(accepted, Some(ProtocolVersion::Win7));
    let r = op(
        &mut ch,
        vstor::VstorPacket::new(Operation::QueryProperties, flag, 0),
    );
    assert_eq!({ r.packet.properties().max_channel_cnt }, 0);
    op(
        &mut ch,
        vstor::VstorPacket::new(Operation::EndInitialization, flag, 0),
    );
    let b = Buf::new(1200, 0, 36);
    ch.send(9, &srb(LUN0, &[0x12, 0, 0, 0, 36, 0], 1, 36), 48, b.range());
    let r = ch.wait(9);
    assert_eq!(r.len, 48);
    assert_eq!((r.srb().srb_status, r.srb().data_transfer_length), (1, 36));
    assert_eq!(b.read(rig.ram.mem.as_ref())[0], 0);
    VmbusDevice::close(&mut rig.vsp, 1);
}

#[test]
fn saved_session_resumes_on_a_new_device() {
    let mut rig = Rig::new(config());
    let disk = Arc::new(MemDisk::new(1 << 20, 512));
    rig.vsp
        .add_lun(LunAddr::new(0, 0, 0), disk.clone(), None, None);
    let mut ch = rig.open(1, 0, 64);
    ch.linux_init();
    let b = Buf::new(1100, 0, 4096);
    b.write(rig.ram.mem.as_ref(), &pattern(1, 1, 4096));
    assert_eq!(
        ok(&run(&mut ch, 1, LUN0, &write10(8, 8, true), 0, Some(&b))),
        4096
    );
    let state = VmbusDevice::save(&rig.vsp);
    VmbusDevice::close(&mut rig.vsp, 1);

    // A new device (a restarted VSP) takes the state and the same rings: no new handshake.
    let bells = rig.bells.clone();
    let binder = GuestRamBinder {
        ram: rig.ram.file.clone(),
        memory: rig.ram.mem.clone(),
        doorbells: Box::new(move |info| {
            let g = bells.lock().unwrap();
            let (_, kick, call) = g.iter().find(|(r, _, _)| *r == info.relid).unwrap();
            Ok((kick.try_clone()?, call.try_clone()?))
        }),
    };
    let mut again = StorVsp::new(config(), Some(Arc::new(binder))).unwrap();
    again.add_lun(LunAddr::new(0, 0, 0), disk, None, None);
    VmbusDevice::restore(&mut again, &state).unwrap();
    assert!(VmbusDevice::restore(&mut again, b"junk").is_err());
    VmbusDevice::open(&mut again, ch.info.clone(), &mut Bus(0)).unwrap();
    assert_eq!(again.version(), Some(ProtocolVersion::Win10));
    assert!(again.ready());
    let r = Buf::new(1200, 0, 4096);
    assert_eq!(ok(&run(&mut ch, 2, LUN0, &read10(8, 8), 1, Some(&r))), 4096);
    assert_eq!(r.read(rig.ram.mem.as_ref()), pattern(1, 1, 4096));
    VmbusDevice::close(&mut again, 1);
}
