//! vhost-user-blk end to end: the `vhost` crate's frontend drives the daemon (in a thread, and
//! the real `vsp-storage vhost-user-blk` binary) with virtqueues laid out by hand in memfd guest
//! RAM (`tests/src/virtio_driver.rs`), and every effect is checked on the image file.

#[path = "../../tests/src/virtio_driver.rs"]
mod virtio_driver;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_driver::{GuestRam, SplitQueue, blk, connect, negotiate};
use vm_memory::GuestAddress;
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::vhost_user::{BlkDevice, BlkOptions, BlkServer, StopHandle};

const T: Duration = Duration::from_secs(10);
const DISK: u64 = 8 << 20;
const ALL: u64 = u64::MAX;

fn proto() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// An image file whose byte `i` is `pattern(i)`.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let data: Vec<u8> = (0..DISK).map(pattern).collect();
    std::fs::write(&p, data).expect("write image");
    p
}

fn pattern(i: u64) -> u8 {
    (i / 512 * 7 + i % 251) as u8
}

fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(p)
        .expect("open")
        .read_exact_at(&mut v, off)
        .expect("read");
    v
}

struct InProcess {
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn in_process(dir: &Path, disk: &Path, opts: BlkOptions) -> InProcess {
    let ro = RawOptions {
        read_only: opts.read_only,
        ..RawOptions::default()
    };
    let raw = Arc::new(RawDisk::open(disk, &ro).expect("open disk"));
    let dev = Arc::new(BlkDevice::new(raw.clone(), Some(raw), opts));
    let socket = dir.join("blk.sock");
    let mut server = BlkServer::bind(&socket, dev).expect("bind");
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve().expect("serve"));
    InProcess {
        stop,
        thread: Some(thread),
        socket,
    }
}

/// A connected frontend with its guest RAM and queues.
struct Session {
    fe: Frontend,
    ram: GuestRam,
    qs: Vec<SplitQueue>,
    features: u64,
}

impl Session {
    fn open(socket: &Path, queues: usize, size: u16) -> Session {
        let mut fe = connect(socket, queues as u64, T).expect("connect");
        let (features, _) = negotiate(&mut fe, ALL, proto()).expect("negotiate");
        let mut ram = GuestRam::new(32 << 20).expect("ram");
        fe.set_mem_table(&[ram.region().expect("region")])
            .expect("mem table");
        let qs: Vec<SplitQueue> = (0..queues)
            .map(|i| SplitQueue::new(&mut ram, i, size).expect("queue"))
            .collect();
        for q in &qs {
            q.setup(&mut fe, &ram, true).expect("setup");
        }
        Session {
            fe,
            ram,
            qs,
            features,
        }
    }
}

/// Where the pieces of one request live in guest RAM.
struct Req {
    hdr: GuestAddress,
    data: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
}

fn alloc_req(ram: &mut GuestRam, segs: &[u32]) -> Req {
    Req {
        hdr: ram.alloc(16, 16).expect("alloc"),
        data: segs
            .iter()
            .map(|&l| (ram.alloc(u64::from(l), 512).expect("alloc"), l))
            .collect(),
        status: ram.alloc(1, 1).expect("alloc"),
    }
}

/// Submits a request on queue `q` and waits for it; returns (status, used length).
fn submit(
    s: &mut Session,
    q: usize,
    req: &Req,
    ty: u32,
    sector: u64,
    device_writes: bool,
) -> (u8, u32) {
    blk::header(&s.ram, req.hdr, ty, sector).expect("header");
    s.ram.write(req.status, &[0xee]).expect("status");
    let mut chain = vec![(req.hdr, 16, false)];
    chain.extend(req.data.iter().map(|&(a, l)| (a, l, device_writes)));
    chain.push((req.status, 1, true));
    let head = s.qs[q].add(&s.ram, &chain).expect("add");
    s.qs[q].kick().expect("kick");
    let done = s.qs[q].wait_used(&s.ram, 1, T).expect("completion");
    assert_eq!(done[0].0, head);
    (s.ram.read(req.status, 1).expect("status")[0], done[0].1)
}

fn fill(ram: &GuestRam, req: &Req, seed: u8) -> Vec<u8> {
    let mut all = Vec::new();
    for (i, &(a, l)) in req.data.iter().enumerate() {
        let v: Vec<u8> = (0..l)
            .map(|j| (j as u8).wrapping_mul(31) ^ seed ^ i as u8)
            .collect();
        ram.write(a, &v).expect("fill");
        all.extend(v);
    }
    all
}

fn gather(ram: &GuestRam, req: &Req) -> Vec<u8> {
    req.data
        .iter()
        .flat_map(|&(a, l)| ram.read(a, l as usize).expect("read"))
        .collect()
}

#[test]
fn negotiation_and_config_space_are_byte_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(
        dir.path(),
        &disk,
        BlkOptions {
            num_queues: 2,
            ..BlkOptions::default()
        },
    );
    let mut fe = connect(&d.socket, 2, T).expect("connect");
    let (features, proto_acked) = negotiate(&mut fe, ALL, proto()).expect("negotiate");
    for bit in [1, 2, 6, 9, 10, 12, 13, 14, 28, 29, 30, 32] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(features & (1 << 5), 0, "not read-only");
    assert_eq!(proto_acked, proto());
    assert_eq!(fe.get_queue_num().expect("queue num"), 2);
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("config");
    let mut want = [0u8; 60];
    want[0..8].copy_from_slice(&(DISK / 512).to_le_bytes()); // capacity
    want[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes()); // size_max
    want[12..16].copy_from_slice(&126u32.to_le_bytes()); // seg_max
    want[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    want[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size
    want[32] = 1; // writeback
    want[34..36].copy_from_slice(&2u16.to_le_bytes()); // num_queues
    want[36..40].copy_from_slice(&(1u32 << 22).to_le_bytes()); // max_discard_sectors
    want[40..44].copy_from_slice(&16u32.to_le_bytes()); // max_discard_seg
    want[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    want[48..52].copy_from_slice(&(1u32 << 17).to_le_bytes()); // max_write_zeroes_sectors
    want[52..56].copy_from_slice(&16u32.to_le_bytes()); // max_write_zeroes_seg
    assert_eq!(cfg.as_slice(), &want[..]);
    // A partial read at an offset: num_queues alone.
    let (_, nq) = fe
        .get_config(34, 2, VhostUserConfigFlags::WRITABLE, &[0u8; 2])
        .expect("config");
    assert_eq!(nq.as_slice(), &2u16.to_le_bytes());
}

#[test]
fn write_read_flush_get_id_over_several_segments() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let opts = BlkOptions {
        serial: b"serial-0123456789abcdef".to_vec(),
        ..BlkOptions::default()
    };
    let d = in_process(dir.path(), &disk, opts);
    let mut s = Session::open(&d.socket, 1, 128);
    assert_ne!(s.features & (1 << 29), 0, "EVENT_IDX in use");
    for round in 0..20u64 {
        let sector = 100 + round * 40;
        let w = alloc_req(&mut s.ram, &[4096, 512, 8192, 1024]);
        let data = fill(&s.ram, &w, round as u8);
        assert_eq!(
            submit(&mut s, 0, &w, blk::T_OUT, sector, false),
            (blk::S_OK, 1)
        );
        assert_eq!(
            file_bytes(&disk, sector * 512, data.len()),
            data,
            "round {round} on disk"
        );
        let r = alloc_req(&mut s.ram, &[512, 12288, 1024]);
        let (st, len) = submit(&mut s, 0, &r, blk::T_IN, sector, true);
        assert_eq!((st, len), (blk::S_OK, data.len() as u32 + 1));
        assert_eq!(gather(&s.ram, &r), data, "round {round} read back");
    }
    // Untouched sectors still read the original pattern.
    let r = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(submit(&mut s, 0, &r, blk::T_IN, 8, true).0, blk::S_OK);
    assert_eq!(
        gather(&s.ram, &r),
        (4096..8192).map(pattern).collect::<Vec<_>>()
    );
    let f = alloc_req(&mut s.ram, &[]);
    assert_eq!(
        submit(&mut s, 0, &f, blk::T_FLUSH, 0, false),
        (blk::S_OK, 1)
    );
    let id = alloc_req(&mut s.ram, &[20]);
    assert_eq!(
        submit(&mut s, 0, &id, blk::T_GET_ID, 0, true),
        (blk::S_OK, 21)
    );
    assert_eq!(gather(&s.ram, &id), b"serial-0123456789abc");
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(dir.path(), &disk, BlkOptions::default());
    let mut s = Session::open(&d.socket, 1, 64);
    let req = alloc_req(&mut s.ram, &[32]);
    let mut list = blk::dwz(16, 8, 0).to_vec();
    list.extend(blk::dwz(64, 24, 0));
    s.ram.write(req.data[0].0, &list).expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_WRITE_ZEROES, 0, false).0,
        blk::S_OK
    );
    assert_eq!(file_bytes(&disk, 16 * 512, 8 * 512), vec![0u8; 8 * 512]);
    assert_eq!(file_bytes(&disk, 64 * 512, 24 * 512), vec![0u8; 24 * 512]);
    assert_eq!(
        file_bytes(&disk, 24 * 512, 512),
        (24 * 512..25 * 512).map(pattern).collect::<Vec<_>>()
    );
    // Discard punches a hole: reads back zero, neighbours intact.
    let req = alloc_req(&mut s.ram, &[16]);
    s.ram
        .write(req.data[0].0, &blk::dwz(1024, 2048, 0))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_DISCARD, 0, false).0,
        blk::S_OK
    );
    assert_eq!(
        file_bytes(&disk, 1024 * 512, 2048 * 512),
        vec![0u8; 2048 * 512]
    );
    assert_eq!(
        file_bytes(&disk, 1023 * 512, 512),
        (1023 * 512..1024 * 512).map(pattern).collect::<Vec<_>>()
    );
    // Reserved flag on a discard, and a segment past the end: IOERR, file untouched.
    s.ram
        .write(req.data[0].0, &blk::dwz(8, 8, 1))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_DISCARD, 0, false).0,
        blk::S_IOERR
    );
    s.ram
        .write(req.data[0].0, &blk::dwz(DISK / 512 - 4, 8, 0))
        .expect("list");
    assert_eq!(
        submit(&mut s, 0, &req, blk::T_WRITE_ZEROES, 0, false).0,
        blk::S_IOERR
    );
    assert_eq!(
        file_bytes(&disk, 8 * 512, 512),
        (8 * 512..9 * 512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let opts = BlkOptions {
        read_only: true,
        ..BlkOptions::default()
    };
    let d = in_process(dir.path(), &disk, opts);
    let mut s = Session::open(&d.socket, 1, 64);
    assert_ne!(s.features & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    assert_eq!(
        s.features & (1 << 13 | 1 << 14),
        0,
        "no discard/write-zeroes on RO"
    );
    let w = alloc_req(&mut s.ram, &[4096]);
    fill(&s.ram, &w, 9);
    assert_eq!(submit(&mut s, 0, &w, blk::T_OUT, 0, false).0, blk::S_IOERR);
    assert_eq!(
        file_bytes(&disk, 0, 4096),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
    let r = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(submit(&mut s, 0, &r, blk::T_IN, 0, true).0, blk::S_OK);
    assert_eq!(
        gather(&s.ram, &r),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
}

/// Publishes a hand-built chain (descriptors `(addr, len, flags)` linked in order) and returns
/// what came back for it.
fn hostile(s: &mut Session, descs: &[(u64, u32, u16)]) -> (u16, u32) {
    let ids = s.qs[0].reserve(descs.len()).expect("reserve");
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let (flags, next) = match ids.get(i + 1) {
            Some(&n) => (flags | virtio_driver::DESC_F_NEXT, n),
            None => (flags, 0),
        };
        s.qs[0]
            .write_desc(&s.ram, ids[i], addr, len, flags, next)
            .expect("desc");
    }
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0]
        .wait_used(&s.ram, 1, T)
        .expect("hostile request returned");
    assert_eq!(done[0].0, ids[0]);
    done[0]
}

#[test]
fn hostile_chains_fail_cleanly_and_the_daemon_lives_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(dir.path(), &disk, BlkOptions::default());
    let mut s = Session::open(&d.socket, 1, 256);
    let (w, r) = (virtio_driver::DESC_F_WRITE, 0u16);
    let req = alloc_req(&mut s.ram, &[4096]);
    let (hdr, buf, st) = (req.hdr.0, req.data[0].0.0, req.status.0);
    let status = |s: &Session| s.ram.read(req.status, 1).expect("status")[0];
    let set = |s: &Session, ty: u32, sector: u64| {
        blk::header(&s.ram, req.hdr, ty, sector).expect("hdr");
        s.ram.write(req.status, &[0xee]).expect("status");
    };
    let outside = s.ram.size() + 0x1000;

    // Status descriptor not writable: nothing to report into, returned with length 0.
    set(&s, blk::T_IN, 0);
    assert_eq!(
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, r)]).1,
        0
    );
    assert_eq!(status(&s), 0xee);
    // Header too short.
    set(&s, blk::T_IN, 0);
    assert_eq!(
        hostile(&mut s, &[(hdr, 8, r), (buf, 4096, w), (st, 1, w)]).1,
        1
    );
    assert_eq!(status(&s), blk::S_IOERR);
    // Sector range past the end of the disk, and one that overflows.
    for sector in [DISK / 512 - 7, u64::MAX / 4] {
        set(&s, blk::T_IN, sector);
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, w)]);
        assert_eq!(status(&s), blk::S_IOERR);
    }
    // Data descriptor outside guest memory (and straddling its end).
    for addr in [outside, s.ram.size() - 512] {
        set(&s, blk::T_IN, 0);
        hostile(&mut s, &[(hdr, 16, r), (addr, 4096, w), (st, 1, w)]);
        assert_eq!(status(&s), blk::S_IOERR);
    }
    // Direction mismatch: a write whose data descriptor is device-writable.
    set(&s, blk::T_OUT, 0);
    hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_IOERR);
    // Unknown request type.
    set(&s, 0x77, 0);
    hostile(&mut s, &[(hdr, 16, r), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_UNSUPP);
    // Header GPA outside memory.
    set(&s, blk::T_IN, 0);
    hostile(&mut s, &[(outside, 16, r), (buf, 4096, w), (st, 1, w)]);
    assert_eq!(status(&s), blk::S_IOERR);
    // Status byte outside memory: dropped with length 0.
    assert_eq!(
        hostile(&mut s, &[(hdr, 16, r), (buf, 4096, w), (outside, 1, w)]).1,
        0
    );
    // Over-long chain: 200 descriptors (the device takes at most seg_max + 2).
    set(&s, blk::T_IN, 0);
    let mut long = vec![(hdr, 16, r)];
    long.extend((0..198).map(|_| (buf, 512, w)));
    long.push((st, 1, w));
    assert_eq!(hostile(&mut s, &long).1, 0);
    // A loop: the last descriptor points back at the head.
    let ids = s.qs[0].reserve(2).expect("reserve");
    let q = &s.qs[0];
    q.write_desc(&s.ram, ids[0], hdr, 16, virtio_driver::DESC_F_NEXT, ids[1])
        .expect("d");
    q.write_desc(
        &s.ram,
        ids[1],
        buf,
        512,
        w | virtio_driver::DESC_F_NEXT,
        ids[0],
    )
    .expect("d");
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0].wait_used(&s.ram, 1, T).expect("loop returned");
    assert_eq!(done[0], (ids[0], 0));
    // `next` out of the table.
    let ids = s.qs[0].reserve(1).expect("reserve");
    s.qs[0]
        .write_desc(&s.ram, ids[0], hdr, 16, virtio_driver::DESC_F_NEXT, 4000)
        .expect("d");
    s.qs[0].push_avail(&s.ram, ids[0]).expect("avail");
    s.qs[0].kick().expect("kick");
    assert_eq!(
        s.qs[0].wait_used(&s.ram, 1, T).expect("returned")[0],
        (ids[0], 0)
    );

    // Still serving: a good read.
    let good = alloc_req(&mut s.ram, &[4096]);
    assert_eq!(
        submit(&mut s, 0, &good, blk::T_IN, 0, true),
        (blk::S_OK, 4097)
    );
    assert_eq!(
        gather(&s.ram, &good),
        (0..4096).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn two_queues_run_in_parallel() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let d = in_process(
        dir.path(),
        &disk,
        BlkOptions {
            num_queues: 2,
            // Also exercises the adaptive-polling loop.
            poll_us: 50,
            ..BlkOptions::default()
        },
    );
    let mut s = Session::open(&d.socket, 2, 128);
    // Per queue: 16 writes of 8 KiB in flight at once, then read them back.
    let per_q = 16usize;
    let mut reqs: Vec<Vec<Req>> = (0..2)
        .map(|_| (0..per_q).map(|_| alloc_req(&mut s.ram, &[8192])).collect())
        .collect();
    let ram = &s.ram;
    let disk = &disk;
    let mut qs = std::mem::take(&mut s.qs);
    std::thread::scope(|sc| {
        for (qi, (q, reqs)) in qs.iter_mut().zip(reqs.iter_mut()).enumerate() {
            sc.spawn(move || {
                for round in 0..10u64 {
                    let mut expect = Vec::new();
                    for (i, r) in reqs.iter().enumerate() {
                        let sector = ((qi * per_q + i) as u64) * 16 + round * 1024;
                        let data = fill(ram, r, (qi * 100 + i) as u8 ^ round as u8);
                        blk::header(ram, r.hdr, blk::T_OUT, sector).expect("hdr");
                        let c = [
                            (r.hdr, 16, false),
                            (r.data[0].0, 8192, false),
                            (r.status, 1, true),
                        ];
                        q.add(ram, &c).expect("add");
                        expect.push((sector, data));
                    }
                    q.kick().expect("kick");
                    let done = q.wait_used(ram, per_q, T).expect("writes");
                    assert_eq!(done.len(), per_q);
                    for r in reqs.iter() {
                        assert_eq!(ram.read(r.status, 1).expect("st")[0], blk::S_OK);
                    }
                    for (sector, data) in &expect {
                        assert_eq!(&file_bytes(disk, sector * 512, 8192), data);
                    }
                }
            });
        }
    });
    s.qs = qs;
}

// ---- the real binary ----

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(socket: &Path, disk: &Path, extra: &[&str]) -> Daemon {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_vsp-storage"))
        .arg("vhost-user-blk")
        .arg("--socket")
        .arg(socket)
        .arg("--disk")
        .arg(disk)
        .args(extra)
        .spawn()
        .expect("spawn vsp-storage");
    Daemon(child)
}

#[test]
fn binary_serves_reconnects_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let socket = dir.path().join("bin.sock");
    let mut d = spawn_daemon(&socket, &disk, &["--queues", "2", "--format", "raw"]);
    for round in 0..2u64 {
        let mut s = Session::open(&socket, 2, 64);
        let w = alloc_req(&mut s.ram, &[4096, 4096]);
        let data = fill(&s.ram, &w, round as u8 + 1);
        assert_eq!(
            submit(&mut s, 1, &w, blk::T_OUT, 256 + round * 16, false).0,
            blk::S_OK
        );
        assert_eq!(file_bytes(&disk, (256 + round * 16) * 512, 8192), data);
        // Dropping the session disconnects; the daemon listens again.
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) }, 0);
    let end = std::time::Instant::now() + T;
    let status = loop {
        if let Some(st) = d.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < end,
            "daemon still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "daemon ended: {status:?}"
    );
}

#[test]
fn inflight_requests_survive_a_daemon_kill() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let socket = dir.path().join("inflight.sock");
    let size = 64u16;
    let mut d = spawn_daemon(&socket, &disk, &["--test-hold-sector", "64"]);
    let mut s = Session::open(&socket, 1, size);
    // The queue is running; set up the inflight region the way QEMU does before the first start
    // (here: right after, which the daemon picks up on the next ring restart).
    let want = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: size,
    };
    let (info, region) = s.fe.get_inflight_fd(&want).expect("GET_INFLIGHT_FD");
    assert!(info.mmap_size >= 16 + 16 * u64::from(size));
    // Re-start the ring so it tracks into the region.
    s.qs[0].setup(&mut s.fe, &s.ram, true).expect("restart");

    let a = alloc_req(&mut s.ram, &[4096]);
    let b = alloc_req(&mut s.ram, &[8192]);
    let da = fill(&s.ram, &a, 0x11);
    let db = fill(&s.ram, &b, 0x22);
    blk::header(&s.ram, a.hdr, blk::T_OUT, 0).expect("hdr");
    blk::header(&s.ram, b.hdr, blk::T_OUT, 60).expect("hdr"); // covers the held sector 64
    let ha = s.qs[0]
        .add(
            &s.ram,
            &[
                (a.hdr, 16, false),
                (a.data[0].0, 4096, false),
                (a.status, 1, true),
            ],
        )
        .expect("add");
    let hb = s.qs[0]
        .add(
            &s.ram,
            &[
                (b.hdr, 16, false),
                (b.data[0].0, 8192, false),
                (b.status, 1, true),
            ],
        )
        .expect("add");
    s.qs[0].kick().expect("kick");
    let done = s.qs[0].wait_used(&s.ram, 1, T).expect("first write");
    assert_eq!(done, vec![(ha, 1)]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.qs[0].poll_used(&s.ram).expect("poll").is_empty(),
        "held request completed"
    );
    assert_eq!(
        file_bytes(&disk, 60 * 512, 8192),
        (60 * 512..60 * 512 + 8192).map(pattern).collect::<Vec<_>>()
    );

    // SIGKILL with `b` in flight, then a fresh daemon without the hold.
    d.0.kill().expect("kill");
    d.0.wait().expect("wait");
    let _d2 = spawn_daemon(&socket, &disk, &[]);
    let mut fe = connect(&socket, 1, T).expect("reconnect");
    negotiate(&mut fe, ALL, proto()).expect("negotiate");
    fe.set_mem_table(&[s.ram.region().expect("region")])
        .expect("mem table");
    use std::os::fd::AsRawFd;
    fe.set_inflight_fd(&info, region.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    // Like QEMU after a backend crash: the ring restarts at the used index.
    let used = s.qs[0].used_idx(&s.ram).expect("used idx");
    s.qs[0]
        .setup_at(&mut fe, &s.ram, true, used)
        .expect("setup");
    let done = s.qs[0]
        .wait_used(&s.ram, 1, T)
        .expect("re-run of the in-flight write");
    assert_eq!(done, vec![(hb, 1)]);
    assert_eq!(s.ram.read(b.status, 1).expect("st")[0], blk::S_OK);
    assert_eq!(file_bytes(&disk, 60 * 512, 8192), db);
    assert_eq!(file_bytes(&disk, 0, 4096), da);
    // And the ring goes on normally after recovery.
    let r = alloc_req(&mut s.ram, &[8192]);
    s.fe = fe;
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 60, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), db);
}

#[test]
fn vhd_image_through_the_binary_uses_the_synchronous_path() {
    use vsp_storage::block::BlockDevice;
    use vsp_storage::vhd::{CreateOptions, DiskKind, OpenOptions, Vhd};
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.vhd");
    let mut o = CreateOptions::new(DISK, DiskKind::Dynamic);
    o.exact_size = true;
    drop(vsp_storage::vhd::create(&path, &o).expect("create vhd"));
    let socket = dir.path().join("vhd.sock");
    let d = spawn_daemon(
        &socket,
        &path,
        &["--format", "auto", "--serial", "vhd-disk"],
    );
    let mut s = Session::open(&socket, 1, 64);
    let (_, cfg) =
        s.fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .expect("config");
    assert_eq!(cfg.as_slice(), &(DISK / 512).to_le_bytes());
    let w = alloc_req(&mut s.ram, &[512, 4096, 3584]);
    let data = fill(&s.ram, &w, 0x5c);
    assert_eq!(
        submit(&mut s, 0, &w, blk::T_OUT, 4000, false),
        (blk::S_OK, 1)
    );
    let f = alloc_req(&mut s.ram, &[]);
    assert_eq!(submit(&mut s, 0, &f, blk::T_FLUSH, 0, false).0, blk::S_OK);
    let r = alloc_req(&mut s.ram, &[8192]);
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 4000, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), data);
    let id = alloc_req(&mut s.ram, &[20]);
    assert_eq!(submit(&mut s, 0, &id, blk::T_GET_ID, 0, true).0, blk::S_OK);
    assert_eq!(&gather(&s.ram, &id)[..9], b"vhd-disk\0");
    drop(s);
    drop(d);
    // The image itself holds the data (read with the VHD code, not through the daemon).
    let vhd = Vhd::open(&path, &OpenOptions::default()).expect("reopen");
    let mut back = vec![0u8; data.len()];
    vhd.read_at(4000 * 512, &mut back).expect("read");
    assert_eq!(back, data);
}

#[test]
fn o_direct_with_unaligned_guest_buffers_bounces() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = image(dir.path());
    let ro = RawOptions {
        direct: true,
        ..RawOptions::default()
    };
    let raw = match RawDisk::open(&disk, &ro) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("skipping: O_DIRECT unavailable on this file system: {e}");
            return;
        }
    };
    let dev = Arc::new(BlkDevice::new(
        raw.clone(),
        Some(raw),
        BlkOptions::default(),
    ));
    let socket = dir.path().join("direct.sock");
    let mut server = BlkServer::bind(&socket, dev).expect("bind");
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve().expect("serve"));
    let _d = InProcess {
        stop,
        thread: Some(thread),
        socket: socket.clone(),
    };
    let mut s = Session::open(&socket, 1, 64);
    // Buffers 512 bytes off page alignment: O_DIRECT cannot take them as they are.
    let base = s.ram.alloc(3 * 8192, 4096).expect("alloc");
    let req = |s: &mut Session| Req {
        hdr: s.ram.alloc(16, 16).expect("alloc"),
        data: vec![
            (GuestAddress(base.0 + 512), 4096),
            (GuestAddress(base.0 + 8192 + 512), 4096),
        ],
        status: s.ram.alloc(1, 1).expect("alloc"),
    };
    let w = req(&mut s);
    let data = fill(&s.ram, &w, 0x77);
    assert_eq!(submit(&mut s, 0, &w, blk::T_OUT, 16, false), (blk::S_OK, 1));
    assert_eq!(file_bytes(&disk, 16 * 512, 8192), data);
    s.ram
        .write(GuestAddress(base.0 + 512), &[0u8; 4096])
        .expect("clear");
    s.ram
        .write(GuestAddress(base.0 + 8192 + 512), &[0u8; 4096])
        .expect("clear");
    let r = req(&mut s);
    assert_eq!(
        submit(&mut s, 0, &r, blk::T_IN, 16, true),
        (blk::S_OK, 8193)
    );
    assert_eq!(gather(&s.ram, &r), data);
}
