//! Shared by the vhost-user-blk test binaries: the daemon in a thread, a connected frontend
//! session, request layout in guest RAM, and the image-file helpers.
#![allow(dead_code, unused_imports)]

#[path = "../../../tests/src/virtio_driver.rs"]
pub mod virtio_driver;

pub use std::fs::File;
pub use std::os::unix::fs::FileExt;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command};
pub use std::sync::Arc;
pub use std::thread::JoinHandle;
pub use std::time::Duration;
pub use vhost::VhostBackend;
pub use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
pub use vhost::vhost_user::{Frontend, VhostUserFrontend};
pub use virtio_driver::{GuestRam, SplitQueue, blk, connect, negotiate};
pub use vm_memory::GuestAddress;
pub use vsp_storage::backend::raw::{RawDisk, RawOptions};
pub use vsp_storage::vhost_user::{BlkDevice, BlkOptions, BlkServer, StopHandle};

pub const T: Duration = Duration::from_secs(10);
pub const DISK: u64 = 8 << 20;
pub const ALL: u64 = u64::MAX;

pub fn proto() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// An image file whose byte `i` is `pattern(i)`.
pub fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let data: Vec<u8> = (0..DISK).map(pattern).collect();
    std::fs::write(&p, data).expect("write image");
    p
}

pub fn pattern(i: u64) -> u8 {
    (i / 512 * 7 + i % 251) as u8
}

pub fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(p)
        .expect("open")
        .read_exact_at(&mut v, off)
        .expect("read");
    v
}

pub struct InProcess {
    pub stop: StopHandle,
    pub thread: Option<JoinHandle<()>>,
    pub socket: PathBuf,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn in_process(dir: &Path, disk: &Path, opts: BlkOptions) -> InProcess {
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
pub struct Session {
    pub fe: Frontend,
    pub ram: GuestRam,
    pub qs: Vec<SplitQueue>,
    pub features: u64,
}

impl Session {
    pub fn open(socket: &Path, queues: usize, size: u16) -> Session {
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
pub struct Req {
    pub hdr: GuestAddress,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

pub fn alloc_req(ram: &mut GuestRam, segs: &[u32]) -> Req {
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
pub fn submit(
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

pub fn fill(ram: &GuestRam, req: &Req, seed: u8) -> Vec<u8> {
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

pub fn gather(ram: &GuestRam, req: &Req) -> Vec<u8> {
    req.data
        .iter()
        .flat_map(|&(a, l)| ram.read(a, l as usize).expect("read"))
        .collect()
}
