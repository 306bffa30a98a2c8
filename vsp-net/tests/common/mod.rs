//! A virtio-net driver on top of the shared split-virtqueue test driver (`tests/src/virtio_driver.rs`),
//! playing the vhost-user frontend against the vhost-user-net device: RX buffers posted per
//! queue, frames sent with a virtio-net header, mergeable frames reassembled, control commands.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../tests/src/virtio_driver.rs"]
pub mod virtio_driver;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::GuestAddress;
use vsp_net::vhost_user::config::feat;
use vsp_net::vhost_user::{FramePort, NetDeviceConfig, NetServer, NetStats};

pub use virtio_driver::{GuestRam, SplitQueue, connect, negotiate, wait_fd};

pub const T: Duration = Duration::from_secs(5);

/// Compares two frames, reporting lengths and the first difference instead of both dumps.
#[track_caller]
pub fn same(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "frames differ: got {} bytes, want {}, first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// A received frame: its virtio-net header bytes, the frame, and how many buffers it took.
#[derive(Clone, Debug)]
pub struct Rx {
    pub hdr: Vec<u8>,
    pub frame: Vec<u8>,
    pub bufs: u16,
}

impl Rx {
    pub fn flags(&self) -> u8 {
        self.hdr[0]
    }
    pub fn gso_type(&self) -> u8 {
        self.hdr[1]
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.hdr[off], self.hdr[off + 1]])
    }
}

/// The daemon side, served in this process on a socket in a temp dir.
pub struct Daemon {
    pub socket: PathBuf,
    pub stats: Arc<NetStats>,
    _dir: tempfile::TempDir,
    thread: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Serves `conns` frontends one after another on a fresh socket.
    pub fn start(cfg: NetDeviceConfig, port: Box<dyn FramePort>, conns: usize) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let server = NetServer::new(cfg, port);
        let stats = server.stats();
        let mut listener = NetServer::listen(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            for _ in 0..conns {
                server.serve_one(&mut listener).unwrap();
            }
        });
        Daemon {
            socket,
            stats,
            _dir: dir,
            thread: Some(thread),
        }
    }

    /// Waits for the serving thread (after the frontends are gone).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Driver options.
#[derive(Clone, Debug)]
pub struct DrvCfg {
    pub features: u64,
    pub pairs: usize,
    pub queue_size: u16,
    /// Bytes per RX buffer (header included).
    pub rx_buf: u32,
    /// RX buffers posted per queue at start (and re-posted as used).
    pub rx_count: usize,
}

impl Default for DrvCfg {
    fn default() -> Self {
        DrvCfg {
            features: feat::VERSION_1
                | feat::MAC
                | feat::STATUS
                | feat::EVENT_IDX
                | feat::CSUM
                | feat::GUEST_CSUM
                | feat::HOST_TSO4
                | feat::HOST_TSO6
                | feat::MRG_RXBUF
                | feat::CTRL_VQ
                | feat::CTRL_RX
                | feat::CTRL_RX_EXTRA
                | feat::CTRL_MAC_ADDR
                | feat::MQ,
            pairs: 1,
            queue_size: 256,
            rx_buf: 2048,
            rx_count: 64,
        }
    }
}

pub struct NetDrv {
    pub fe: Frontend,
    pub ram: GuestRam,
    pub acked: u64,
    pub cfg: DrvCfg,
    pub rx: Vec<SplitQueue>,
    pub tx: Vec<SplitQueue>,
    pub ctrl: Option<SplitQueue>,
    rx_bufs: Vec<HashMap<u16, GuestAddress>>,
    rx_used: Vec<VecDeque<(GuestAddress, u32)>>,
    free_bufs: Vec<GuestAddress>,
    tx_area: GuestAddress,
    ctrl_area: GuestAddress,
}

impl NetDrv {
    pub fn hdr_len(&self) -> usize {
        if self.acked & (feat::VERSION_1 | feat::MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    /// Connects, negotiates, sets memory and every queue up, posts RX buffers.
    pub fn start(socket: &Path, cfg: DrvCfg) -> NetDrv {
        let nq = 2 * cfg.pairs as u64 + 1;
        let fe = connect(socket, nq, T).unwrap();
        Self::with_frontend(fe, cfg)
    }

    /// Like [`Self::start`] on an already connected frontend.
    pub fn with_frontend(mut fe: Frontend, cfg: DrvCfg) -> NetDrv {
        let (acked, _proto) = negotiate(
            &mut fe,
            cfg.features,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
        )
        .unwrap();
        let mut ram = GuestRam::new(64 << 20).unwrap();
        fe.set_mem_table(&[ram.region().unwrap()]).unwrap();
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..cfg.pairs {
            rx.push(SplitQueue::new(&mut ram, 2 * p, cfg.queue_size).unwrap());
            tx.push(SplitQueue::new(&mut ram, 2 * p + 1, cfg.queue_size).unwrap());
        }
        let ctrl = (acked & feat::CTRL_VQ != 0).then(|| {
            // The control queue follows the data queues of max_virtqueue_pairs (as Linux).
            SplitQueue::new(&mut ram, 2 * cfg.pairs, 64).unwrap()
        });
        let tx_area = ram.alloc(128 * 1024, 4096).unwrap();
        let ctrl_area = ram.alloc(16 * 1024, 4096).unwrap();
        let total = cfg.pairs * cfg.queue_size as usize;
        let mut free_bufs = Vec::new();
        for _ in 0..total {
            free_bufs.push(ram.alloc(u64::from(cfg.rx_buf), 64).unwrap());
        }
        let mut d = NetDrv {
            fe,
            ram,
            acked,
            rx_bufs: (0..cfg.pairs).map(|_| HashMap::new()).collect(),
            rx_used: (0..cfg.pairs).map(|_| VecDeque::new()).collect(),
            cfg,
            rx,
            tx,
            ctrl,
            free_bufs,
            tx_area,
            ctrl_area,
        };
        for q in d.rx.iter().chain(d.tx.iter()).chain(d.ctrl.iter()) {
            q.setup(&mut d.fe, &d.ram, true).unwrap();
        }
        for p in 0..d.cfg.pairs {
            let n = d.cfg.rx_count;
            d.post_rx(p, n);
        }
        d
    }

    /// Posts `n` RX buffers on pair `p` and kicks.
    pub fn post_rx(&mut self, p: usize, n: usize) {
        for _ in 0..n {
            self.post_one(p);
        }
        self.rx[p].kick().unwrap();
    }

    fn post_one(&mut self, p: usize) {
        if let Some(b) = self.free_bufs.pop() {
            let head = self.rx[p]
                .add(&self.ram, &[(b, self.cfg.rx_buf, true)])
                .unwrap();
            let old = self.rx_bufs[p].insert(head, b);
            assert!(old.is_none(), "descriptor {head} reused while in flight");
        }
    }

    /// Sends one frame with header `hdr` (its first `hdr_len` bytes are used) on pair `p` and
    /// waits for the device to use the chain.
    pub fn send_hdr(&mut self, p: usize, hdr: &[u8; 12], frame: &[u8]) {
        let hl = self.hdr_len();
        let mut buf = hdr[..hl].to_vec();
        buf.extend_from_slice(frame);
        self.ram.write(self.tx_area, &buf).unwrap();
        // Header and frame in separate descriptors, as Linux does without ANY_LAYOUT tricks.
        let h = self.tx_area;
        let f = GuestAddress(self.tx_area.0 + hl as u64);
        self.tx[p]
            .add(
                &self.ram,
                &[(h, hl as u32, false), (f, frame.len() as u32, false)],
            )
            .unwrap();
        self.tx[p].kick().unwrap();
        let used = self.tx[p].wait_used(&self.ram, 1, T).unwrap();
        assert_eq!(used.len(), 1);
    }

    pub fn send(&mut self, p: usize, frame: &[u8]) {
        self.send_hdr(p, &[0; 12], frame);
    }

    /// Collects used RX entries of pair `p`.
    fn poll_rx(&mut self, p: usize) {
        // Map heads to buffers now: the descriptors are free again from here on.
        for (h, l) in self.rx[p].poll_used(&self.ram).unwrap() {
            let b = self.rx_bufs[p].remove(&h).expect("used head not posted");
            self.rx_used[p].push_back((b, l));
        }
    }

    /// The next received frame on pair `p` (mergeable buffers reassembled; buffers re-posted).
    pub fn recv(&mut self, p: usize, timeout: Duration) -> Option<Rx> {
        let deadline = Instant::now() + timeout;
        let hl = self.hdr_len();
        loop {
            self.poll_rx(p);
            if let Some(&(b, len)) = self.rx_used[p].front() {
                let first = self.ram.read(b, len as usize).unwrap();
                assert!(first.len() >= hl, "used RX buffer shorter than the header");
                let bufs = if hl == 12 {
                    u16::from_le_bytes([first[10], first[11]])
                } else {
                    1
                };
                let mrg = self.acked & feat::MRG_RXBUF != 0;
                let need = if mrg { usize::from(bufs) } else { 1 };
                assert!(need >= 1, "num_buffers 0");
                if self.rx_used[p].len() >= need {
                    // Read every buffer before re-posting any: a re-post may reuse the
                    // descriptor index of a buffer not read yet.
                    let parts: Vec<(GuestAddress, u32)> = self.rx_used[p].drain(..need).collect();
                    let mut data = Vec::new();
                    for &(b, l) in &parts {
                        data.extend_from_slice(&self.ram.read(b, l as usize).unwrap());
                    }
                    let _ = first;
                    for &(b, _) in &parts {
                        self.free_bufs.push(b);
                        self.post_one(p);
                    }
                    self.rx[p].kick().unwrap();
                    let frame = data.split_off(hl);
                    return Some(Rx {
                        hdr: data,
                        frame,
                        bufs,
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            wait_fd(&self.rx[p].call, left.min(Duration::from_millis(20)));
            let _ = self.rx[p].call.read();
        }
    }

    /// Receives until `want` matches (others are discarded), or panics after `timeout`.
    pub fn recv_until(
        &mut self,
        p: usize,
        timeout: Duration,
        mut want: impl FnMut(&Rx) -> bool,
    ) -> Rx {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.recv(p, left).expect("timed out waiting for a frame");
            if want(&r) {
                return r;
            }
        }
    }

    /// Like [`Self::recv_until`] over every queue pair.
    pub fn recv_until_any(&mut self, timeout: Duration, mut want: impl FnMut(&Rx) -> bool) -> Rx {
        let deadline = Instant::now() + timeout;
        loop {
            assert!(Instant::now() < deadline, "timed out waiting for a frame");
            for p in 0..self.rx.len() {
                while let Some(r) = self.recv(p, Duration::from_millis(5)) {
                    if want(&r) {
                        return r;
                    }
                }
            }
        }
    }

    /// Sends a control command; returns the ack byte.
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let mut buf = vec![class, cmd];
        buf.extend_from_slice(data);
        let a = self.ctrl_area;
        let ack = GuestAddress(a.0 + 8192);
        self.ram.write(a, &buf).unwrap();
        self.ram.write(ack, &[0xee]).unwrap();
        let q = self.ctrl.as_mut().expect("no control queue");
        q.add(
            &self.ram,
            &[
                (a, 2, false),
                (GuestAddress(a.0 + 2), data.len() as u32, false),
                (ack, 1, true),
            ],
        )
        .unwrap();
        q.kick().unwrap();
        let used = q.wait_used(&self.ram, 1, T).unwrap();
        assert_eq!(used[0].1, 1, "ack written");
        self.ram.read(ack, 1).unwrap()[0]
    }

    /// The device config space (GET_CONFIG).
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .fe
            .get_config(
                offset,
                size,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &buf,
            )
            .unwrap();
        payload
    }
}
