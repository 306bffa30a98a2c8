//! storvsc against storvsp over shared rings in one process: the whole Linux bring-up (VMBus,
//! ring GPADL, vstor handshake, sub-channels, SCSI probe), then read / write / flush / unmap
//! round trips on a raw file and a dynamic VHD, QD32 asynchronous I/O, multi-queue, hot add and
//! resize.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmbus_core::device::{ChannelControl, DeviceError};
use vmbus_core::devices::vstor::ProtocolVersion;
use vmbus_core::oop::{ChannelResources, HostedDevice};
use vmbus_core::wire::Guid;
use vsc_guest::harness::{HarnessConfig, HarnessError, IoOp, StorHarness, Vsp};
use vsc_guest::storvsc::{DiscardMode, IoError, ScsiAddress, cdb};
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::storvsp::{GuestRamBinder, LunAddr, StorVsp, StorVspConfig};

const INSTANCE: Guid = Guid::from_u128(0x5c5c_0001_0000_4000_8000_0000_0000_0001);

fn vsp_config(max_subchannels: u16) -> StorVspConfig {
    let mut c = StorVspConfig::new(INSTANCE);
    c.protocol.max_subchannels = max_subchannels;
    c.io_threads = 2;
    c
}

fn harness_config(queues: u16) -> HarnessConfig {
    let mut h = HarnessConfig {
        queues,
        ram_pages: 16384,
        timeout: Duration::from_secs(20),
        ..HarnessConfig::default()
    };
    h.description.instance = INSTANCE;
    h.description.max_subchannels = queues.saturating_sub(1).max(1);
    h
}

fn raw_disk(path: &Path, blocks: u64) -> Arc<RawDisk> {
    Arc::new(RawDisk::create(path, blocks * 512, &RawOptions::default()).unwrap())
}

/// Bytes that differ by LBA and seed.
fn pattern(lba: u64, seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (lba * 512 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            (x >> 29) as u8
        })
        .collect()
}

/// A storvsp shared with the test (to hot add or resize while the harness owns the device).
#[derive(Clone)]
struct Shared(Arc<Mutex<StorVsp>>);

impl HostedDevice for Shared {
    fn open(
        &mut self,
        ch: ChannelResources,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        HostedDevice::open(&mut *self.0.lock().unwrap(), ch, bus)
    }
    fn close(&mut self, relid: u32) {
        HostedDevice::close(&mut *self.0.lock().unwrap(), relid)
    }
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    (dir, path)
}

#[test]
fn linux_bring_up_and_round_trips_on_a_raw_file() {
    let (_dir, path) = tempdir();
    let vsp = StorVsp::new(vsp_config(0), None).unwrap();
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), raw_disk(&path, 16384));
    let mut h = StorHarness::start(harness_config(1), Vsp::InProcess(Box::new(vsp))).unwrap();

    // Handshake and probe as Linux does them (storvsp accepts WIN10; Linux's scan of 8 × 2).
    let n = *h.driver().negotiated().unwrap();
    assert_eq!(n.version, ProtocolVersion::Win10);
    assert_eq!(n.max_transfer_bytes, 0x40000);
    assert_eq!(h.luns().len(), 1);
    let lun = &h.luns()[0];
    assert_eq!(&lun.inquiry.vendor, b"Msft    ");
    assert_eq!(lun.vpd_pages, [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    assert!(lun.warnings.is_empty(), "{:?}", lun.warnings);
    let d = h.disk().unwrap().clone();
    assert_eq!((d.blocks, d.block_size), (16384, 512));
    assert!(d.write_cache && d.tagged);
    assert_eq!(d.discard, DiscardMode::Unmap, "a raw file punches holes");
    assert_eq!(d.max_blocks, 512);

    // 64 KiB write + read back, then 1 MiB (split into four 256 KiB commands).
    let small = pattern(100, 1, 65536);
    h.write(100, &small).unwrap();
    let mut back = vec![0u8; small.len()];
    h.read(100, &mut back).unwrap();
    assert_eq!(back, small);
    let big = pattern(2048, 2, 1 << 20);
    h.write_with(2048, &big, true).unwrap();
    let mut back = vec![0u8; big.len()];
    h.read(2048, &mut back).unwrap();
    assert_eq!(back, big);
    h.flush().unwrap();
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 65536], &small[..]);
    assert_eq!(&file[2048 * 512..2048 * 512 + (1 << 20)], &big[..]);

    // Discard reads back as zeros.
    h.unmap(2048, 256).unwrap();
    let mut back = vec![0xAAu8; 256 * 512];
    h.read(2048, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    let mut rest = vec![0u8; 512];
    h.read(2048 + 256, &mut rest).unwrap();
    assert_eq!(rest, big[256 * 512..257 * 512]);

    // Errors: the harness refuses out-of-range I/O itself; a raw READ past the end comes back
    // as ILLEGAL REQUEST / LBA OUT OF RANGE.
    assert!(matches!(
        h.read(16383, &mut [0u8; 1024]),
        Err(HarnessError::Disk(_))
    ));
    let buf = h.ram().alloc(512).unwrap();
    let c = h
        .scsi(
            ScsiAddress::default(),
            cdb::rw10(false, 16384, 1, false),
            Some((vsc_guest::storvsc::Direction::In, &buf)),
        )
        .unwrap();
    assert_eq!(c.result(), Err(IoError::LbaOutOfRange));
    // A LUN that does not exist.
    let c = h
        .scsi(ScsiAddress::new(0, 0, 9), cdb::test_unit_ready(), None)
        .unwrap();
    assert_eq!(c.result(), Err(IoError::InvalidLun));
    h.ram().free(buf);

    let st = h.driver().stats();
    assert_eq!((st.duplicates, st.unknown, st.malformed), (0, 0, 0));
    assert!(h.refused.is_empty());
    assert_eq!(h.in_flight(), 0);
}

#[test]
fn qd32_random_io_matches_a_model() {
    let (_dir, path) = tempdir();
    let vsp = StorVsp::new(vsp_config(0), None).unwrap();
    const BLOCKS: u64 = 32 * 256;
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), raw_disk(&path, BLOCKS));
    let mut cfg = harness_config(1);
    cfg.targets = Some(vec![(0, 0)]);
    let mut h = StorHarness::start(cfg, Vsp::InProcess(Box::new(vsp))).unwrap();
    let mut model = vec![0u8; (BLOCKS * 512) as usize];

    // 32 slots, each owning a 128 KiB region: write, then read back and check, alternately.
    struct Slot {
        buf: vsc_guest::harness::DmaBuffer,
        lba: u64,
        writing: bool,
        tag: u64,
    }
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut slots = Vec::new();
    let mut by_tag = std::collections::HashMap::new();
    let issue = |h: &mut StorHarness, s: usize, slot: &mut Slot, model: &mut [u8], r: u64| {
        let blocks = 1 + r % 128;
        slot.lba = s as u64 * 256 + (r >> 8) % (256 - blocks + 1);
        let len = blocks * 512;
        if slot.buf.len() != len {
            let old = std::mem::replace(&mut slot.buf, h.ram().alloc(len).unwrap());
            h.ram().free(old);
        }
        slot.writing = (r >> 20).is_multiple_of(2);
        if slot.writing {
            let data = pattern(slot.lba, r, len as usize);
            h.ram().write(&slot.buf, 0, &data).unwrap();
            let at = (slot.lba * 512) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
            slot.tag = h
                .submit(IoOp::Write {
                    lba: slot.lba,
                    buf: slot.buf.clone(),
                    fua: false,
                })
                .unwrap();
        } else {
            slot.tag = h
                .submit(IoOp::Read {
                    lba: slot.lba,
                    buf: slot.buf.clone(),
                })
                .unwrap();
        }
    };
    for s in 0..32 {
        let buf = h.ram().alloc(512).unwrap();
        let mut slot = Slot {
            buf,
            lba: 0,
            writing: false,
            tag: 0,
        };
        issue(&mut h, s, &mut slot, &mut model, rnd());
        by_tag.insert(slot.tag, s);
        slots.push(slot);
    }
    let mut done = 0;
    let mut max_in_flight = 0;
    while done < 3000 {
        max_in_flight = max_in_flight.max(h.in_flight());
        for d in h.poll(Duration::from_secs(10)).unwrap() {
            let s = by_tag.remove(&d.tag).unwrap();
            let slot = &mut slots[s];
            assert_eq!(d.result, Ok(slot.buf.len()), "slot {s}");
            if !slot.writing {
                let mut got = vec![0u8; slot.buf.len() as usize];
                h.ram().read(&slot.buf, 0, &mut got).unwrap();
                let at = (slot.lba * 512) as usize;
                assert!(
                    got == model[at..at + got.len()],
                    "slot {s} lba {}",
                    slot.lba
                );
            }
            done += 1;
            issue(&mut h, s, slot, &mut model, rnd());
            by_tag.insert(slot.tag, s);
        }
    }
    assert_eq!(max_in_flight, 32);
    while h.in_flight() > 0 {
        h.poll(Duration::from_secs(10)).unwrap();
    }
    h.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
}

#[test]
fn multi_queue_over_sub_channels() {
    let (_dir, path) = tempdir();
    let vsp = StorVsp::new(vsp_config(3), None).unwrap();
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), raw_disk(&path, 8192));
    let mut cfg = harness_config(4);
    cfg.targets = Some(vec![(0, 0)]);
    let mut h = StorHarness::start(cfg, Vsp::InProcess(Box::new(vsp))).unwrap();
    assert_eq!(h.driver().negotiated().unwrap().subchannels, 3);
    assert_eq!(h.channel_relids().len(), 4);
    // 64 requests at once spread over the four channels; all complete.
    let bufs: Vec<_> = (0..64).map(|_| h.ram().alloc(4096).unwrap()).collect();
    for (i, b) in bufs.iter().enumerate() {
        h.ram()
            .write(b, 0, &pattern(i as u64 * 8, 5, 4096))
            .unwrap();
        h.submit(IoOp::Write {
            lba: i as u64 * 8,
            buf: b.clone(),
            fua: false,
        })
        .unwrap();
    }
    let per_channel: Vec<u32> = (0..4).map(|c| h.driver().outstanding(c)).collect();
    assert!(per_channel.iter().all(|&n| n > 0), "{per_channel:?}");
    let mut done = 0;
    while done < 64 {
        done += h.poll(Duration::from_secs(10)).unwrap().len();
    }
    let per_channel = h.completions_per_channel();
    assert_eq!(per_channel.len(), 4);
    assert!(per_channel.iter().all(|&n| n >= 8), "{per_channel:?}");
    let mut back = vec![0u8; 4096];
    h.read(63 * 8, &mut back).unwrap();
    assert_eq!(back, pattern(63 * 8, 5, 4096));
}

#[test]
fn vmbus_device_path_with_a_dynamic_vhd() {
    use vsp_storage::vhd::{CreateOptions, DiskKind, create};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhd");
    let mut opts = CreateOptions::new(64 << 20, DiskKind::Dynamic);
    opts.exact_size = true;
    let vhd = Arc::new(create(&path, &opts).unwrap());
    let cfg = harness_config(2);
    let mut h = StorHarness::start(
        cfg,
        Vsp::InProcessVmbus(Box::new(move |res| {
            let binder = GuestRamBinder {
                ram: res.ram_file(),
                memory: res.memory(),
                doorbells: Box::new(res.doorbell_source()),
            };
            let vsp =
                StorVsp::new(vsp_config(1), Some(Arc::new(binder))).map_err(HarnessError::Io)?;
            vsp.add_lun(LunAddr::new(0, 1, 2), vhd, None, None);
            Ok(Box::new(vsp))
        })),
    )
    .unwrap();
    assert_eq!(h.channel_relids().len(), 2);
    let d = h.disk().unwrap().clone();
    assert_eq!(d.addr, ScsiAddress::new(0, 1, 2));
    assert_eq!(d.blocks * 512, 64 << 20);
    let data = pattern(4096, 9, 3 << 20);
    h.write(4096, &data).unwrap();
    h.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    h.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    if d.discard != DiscardMode::Disabled {
        // A whole VHD block (2 MiB) deallocated reads as zeros.
        h.unmap(4096, 4096).unwrap();
        let mut z = vec![1u8; 4096 * 512];
        h.read(4096, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
    }
    // Untouched space reads as zeros.
    let mut z = vec![1u8; 8192];
    h.read(100_000, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
}

#[test]
fn hot_add_and_resize_are_seen_by_the_guest() {
    let (_dir, path) = tempdir();
    let vsp = Shared(Arc::new(Mutex::new(
        StorVsp::new(vsp_config(0), None).unwrap(),
    )));
    let disk0 = raw_disk(&path, 4096);
    vsp.0
        .lock()
        .unwrap()
        .add_raw_lun(LunAddr::new(0, 0, 0), disk0);
    let mut cfg = harness_config(1);
    cfg.targets = Some(vec![(0, 0)]);
    let mut h = StorHarness::start(cfg, Vsp::InProcess(Box::new(vsp.clone()))).unwrap();
    assert_eq!(h.luns().len(), 1);

    // Hot add: ENUMERATE_BUS reaches the driver as a rescan; a new probe finds LUN 1.
    let path1 = path.with_extension("1");
    vsp.0
        .lock()
        .unwrap()
        .add_raw_lun(LunAddr::new(0, 0, 1), raw_disk(&path1, 2048));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !h
        .events
        .iter()
        .any(|e| matches!(e, vsc_guest::storvsc::StorvscEvent::Rescan))
    {
        assert!(std::time::Instant::now() < deadline, "no rescan event");
        h.service().unwrap();
        h.wait(Duration::from_millis(5)).unwrap();
    }
    h.probe().unwrap();
    assert_eq!(h.luns().len(), 2);
    let d1 = h.select(ScsiAddress::new(0, 0, 1)).unwrap().clone();
    assert_eq!(d1.blocks, 2048);
    h.write(7, &pattern(7, 3, 4096)).unwrap();

    // Resize: the next command fails with CAPACITY DATA HAS CHANGED, the retry works.
    h.select(ScsiAddress::new(0, 0, 0)).unwrap();
    assert!(vsp.0.lock().unwrap().resized(LunAddr::new(0, 0, 0)));
    let mut b = vec![0u8; 512];
    match h.read(0, &mut b) {
        Err(HarnessError::Scsi(IoError::CapacityChanged)) => {}
        other => panic!("{other:?}"),
    }
    h.read(0, &mut b).unwrap();
}
