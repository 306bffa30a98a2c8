//! The contract between netvsp (the NVSP/RNDIS device) and whatever moves Ethernet frames for it
//! (TAP, the virtual switch, an in-memory loopback for tests).
//!
//! Frames cross this boundary without FCS, starting at the destination MAC. Offload work the guest
//! deferred travels as [`TxMeta`]; a backend that cannot do that work says so in
//! [`BackendCaps`] and netvsp finishes it (checksums, segmentation, VLAN tag insertion) before
//! calling [`NetBackend::send`] with an empty [`TxMeta`].

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// Errors a backend reports. None of them is fatal for the device: netvsp counts them and goes on.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend cannot take this frame now (queue full); netvsp drops it and counts a drop.
    #[error("backend queue full")]
    WouldBlock,
    /// The frame is larger than the backend accepts.
    #[error("frame of {len} bytes exceeds the backend limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    /// The metadata asks for an offload the backend did not advertise.
    #[error("offload not supported by backend: {0}")]
    Unsupported(&'static str),
    /// The backend is gone (peer closed, interface removed).
    #[error("backend disconnected")]
    Disconnected,
    /// Operating-system error.
    #[error("backend I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Checksum work the guest left to the host on transmit (RNDIS PPI type 0, TX form).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxChecksum {
    /// The frame carries IPv4.
    pub ipv4: bool,
    /// The frame carries IPv6.
    pub ipv6: bool,
    /// Fill in the TCP checksum.
    pub tcp: bool,
    /// Fill in the UDP checksum.
    pub udp: bool,
    /// Fill in the IPv4 header checksum.
    pub ip_header: bool,
    /// Offset of the transport header from the frame start (already validated by netvsp:
    /// `>= 14`, inside the frame).
    pub transport_offset: u16,
}

/// Large send (LSO v2) request: the frame is one big TCP segment to be cut into `mss`-byte
/// segments. IPv4 total length / checksum are zero and the TCP checksum holds the pseudo-header
/// sum without length, as Linux prepares it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxGso {
    /// Maximum segment size (TCP payload bytes per segment), > 0.
    pub mss: u32,
    /// Offset of the TCP header from the frame start.
    pub tcp_offset: u16,
    /// IPv6 (true) or IPv4 (false).
    pub ipv6: bool,
}

/// Per-frame transmit metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// Checksums to complete, if any.
    pub csum: Option<TxChecksum>,
    /// Segmentation to perform, if any (implies TCP checksum completion of every segment).
    pub gso: Option<TxGso>,
    /// 802.1Q tag control information to insert (priority << 13 | CFI << 12 | VLAN id).
    pub vlan_tci: Option<u16>,
    /// RSS hash the guest computed (informational).
    pub hash: Option<u32>,
}

/// Checksum state of a received frame as the backend knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxChecksum {
    /// IPv4 header checksum verified good.
    pub ip_ok: bool,
    /// TCP checksum verified good.
    pub tcp_ok: bool,
    /// UDP checksum verified good.
    pub udp_ok: bool,
}

/// Per-frame receive metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// Checksums the backend (or the peer that produced the frame) already verified.
    pub csum: RxChecksum,
    /// 802.1Q tag that was stripped from the frame, if any.
    pub vlan_tci: Option<u16>,
    /// RSS hash, if the backend computed one (netvsp computes it otherwise).
    pub hash: Option<u32>,
}

/// What a backend can do with [`TxMeta`]. Anything not advertised is done by netvsp in software.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCaps {
    /// Accepts `TxMeta::csum` and completes the checksums itself (e.g. TAP with a vnet header).
    pub tx_csum: bool,
    /// Accepts `TxMeta::gso` frames up to `max_gso_size` bytes.
    pub tx_gso: bool,
    /// Largest GSO frame accepted when `tx_gso` is set.
    pub max_gso_size: usize,
    /// Accepts `TxMeta::vlan_tci` (otherwise netvsp inserts the tag into the frame).
    pub tx_vlan: bool,
}

/// A source and sink of Ethernet frames for one netvsp device.
pub trait NetBackend: Send {
    /// Transmits one frame. Returning `Err(NetError::WouldBlock)` drops the frame (counted).
    fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), NetError>;

    /// Delivers at most `budget` received frames to `out` and returns how many were delivered.
    /// Frames beyond the budget stay queued in the backend (bounded by the backend); a backend
    /// with nothing to deliver returns `Ok(0)` without blocking.
    fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &RxMeta),
    ) -> Result<usize, NetError>;

    /// Current carrier state.
    fn link_up(&self) -> bool;

    /// The MAC address the guest should use as its permanent address.
    fn mac(&self) -> [u8; 6];

    /// Offloads the backend performs itself.
    fn caps(&self) -> BackendCaps {
        BackendCaps::default()
    }

    /// A file descriptor that becomes readable when frames (or a link change) are pending, for
    /// epoll-driven loops; `None` means "poll periodically".
    fn rx_fd(&self) -> Option<RawFd> {
        None
    }
}

impl<B: NetBackend + ?Sized> NetBackend for Box<B> {
    fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), NetError> {
        (**self).send(frame, meta)
    }
    fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &RxMeta),
    ) -> Result<usize, NetError> {
        (**self).poll_recv(budget, out)
    }
    fn link_up(&self) -> bool {
        (**self).link_up()
    }
    fn mac(&self) -> [u8; 6] {
        (**self).mac()
    }
    fn caps(&self) -> BackendCaps {
        (**self).caps()
    }
    fn rx_fd(&self) -> Option<RawFd> {
        (**self).rx_fd()
    }
}

/// A frame captured by [`MemoryBackend`] together with the metadata it was sent with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentFrame {
    /// Frame bytes.
    pub frame: Vec<u8>,
    /// Metadata passed to `send`.
    pub meta: TxMeta,
}

#[derive(Debug)]
struct MemoryState {
    tx: VecDeque<SentFrame>,
    rx: VecDeque<(Vec<u8>, RxMeta)>,
    capacity: usize,
    link_up: bool,
    echo: bool,
    tx_dropped: u64,
    rx_dropped: u64,
}

/// In-memory backend for tests and demos: frames sent by the device are captured (and, in echo
/// mode, looped back as received frames); a [`MemoryHandle`] injects frames, reads captured ones
/// and flips the link. Both queues are bounded by `capacity`; overflow is counted, never queued.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    mac: [u8; 6],
    caps: BackendCaps,
    state: Arc<Mutex<MemoryState>>,
}

/// The test side of a [`MemoryBackend`].
#[derive(Debug, Clone)]
pub struct MemoryHandle {
    state: Arc<Mutex<MemoryState>>,
}

fn lock(state: &Mutex<MemoryState>) -> MutexGuard<'_, MemoryState> {
    // A poisoned lock only means a test thread panicked; the queues are still consistent.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryBackend {
    /// Creates a backend with the given MAC and per-direction queue capacity (frames).
    pub fn new(mac: [u8; 6], capacity: usize) -> (MemoryBackend, MemoryHandle) {
        let state = Arc::new(Mutex::new(MemoryState {
            tx: VecDeque::new(),
            rx: VecDeque::new(),
            capacity,
            link_up: true,
            echo: false,
            tx_dropped: 0,
            rx_dropped: 0,
        }));
        (
            MemoryBackend {
                mac,
                caps: BackendCaps::default(),
                state: state.clone(),
            },
            MemoryHandle { state },
        )
    }

    /// A backend that reflects every sent frame back as a received frame.
    pub fn loopback(mac: [u8; 6], capacity: usize) -> (MemoryBackend, MemoryHandle) {
        let (b, h) = Self::new(mac, capacity);
        lock(&h.state).echo = true;
        (b, h)
    }

    /// Advertises offload capabilities (to test the pass-through path).
    pub fn with_caps(mut self, caps: BackendCaps) -> Self {
        self.caps = caps;
        self
    }
}

impl NetBackend for MemoryBackend {
    fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), NetError> {
        if meta.gso.is_some() && !self.caps.tx_gso {
            return Err(NetError::Unsupported("gso"));
        }
        if meta.csum.is_some() && !self.caps.tx_csum {
            return Err(NetError::Unsupported("checksum"));
        }
        let mut s = lock(&self.state);
        if s.echo {
            if s.rx.len() >= s.capacity {
                s.rx_dropped += 1;
                return Err(NetError::WouldBlock);
            }
            let rx_meta = RxMeta {
                vlan_tci: meta.vlan_tci,
                ..RxMeta::default()
            };
            s.rx.push_back((frame.to_vec(), rx_meta));
            return Ok(());
        }
        if s.tx.len() >= s.capacity {
            s.tx_dropped += 1;
            return Err(NetError::WouldBlock);
        }
        s.tx.push_back(SentFrame {
            frame: frame.to_vec(),
            meta: *meta,
        });
        Ok(())
    }

    fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &RxMeta),
    ) -> Result<usize, NetError> {
        let mut n = 0;
        while n < budget {
            // Take one frame at a time so the callback runs without the lock held.
            let Some((frame, meta)) = lock(&self.state).rx.pop_front() else {
                break;
            };
            out(&frame, &meta);
            n += 1;
        }
        Ok(n)
    }

    fn link_up(&self) -> bool {
        lock(&self.state).link_up
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn caps(&self) -> BackendCaps {
        self.caps
    }
}

impl MemoryHandle {
    /// Queues a frame for the device to receive; returns false (and counts a drop) when full.
    pub fn inject(&self, frame: &[u8], meta: RxMeta) -> bool {
        let mut s = lock(&self.state);
        if s.rx.len() >= s.capacity {
            s.rx_dropped += 1;
            return false;
        }
        s.rx.push_back((frame.to_vec(), meta));
        true
    }

    /// Removes and returns every frame the device sent so far.
    pub fn take_sent(&self) -> Vec<SentFrame> {
        lock(&self.state).tx.drain(..).collect()
    }

    /// Frames still waiting to be received by the device.
    pub fn pending_rx(&self) -> usize {
        lock(&self.state).rx.len()
    }

    /// Sets the carrier state the device observes.
    pub fn set_link(&self, up: bool) {
        lock(&self.state).link_up = up;
    }

    /// (tx drops, rx drops) caused by full queues.
    pub fn drops(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.tx_dropped, s.rx_dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_captures_and_injects() {
        let (mut b, h) = MemoryBackend::new([2, 0, 0, 0, 0, 1], 2);
        assert!(b.link_up());
        b.send(&[1, 2, 3], &TxMeta::default()).unwrap();
        b.send(&[4], &TxMeta::default()).unwrap();
        assert!(matches!(
            b.send(&[5], &TxMeta::default()),
            Err(NetError::WouldBlock)
        ));
        assert_eq!(h.take_sent().len(), 2);
        assert!(h.inject(&[9; 60], RxMeta::default()));
        assert!(h.inject(&[8; 60], RxMeta::default()));
        assert!(!h.inject(&[7; 60], RxMeta::default()));
        let mut got = Vec::new();
        assert_eq!(b.poll_recv(1, &mut |f, _| got.push(f[0])).unwrap(), 1);
        assert_eq!(b.poll_recv(8, &mut |f, _| got.push(f[0])).unwrap(), 1);
        assert_eq!(got, vec![9, 8]);
        assert_eq!(h.drops(), (1, 1));
        h.set_link(false);
        assert!(!b.link_up());
    }

    #[test]
    fn memory_backend_refuses_unadvertised_offloads() {
        let (mut b, _h) = MemoryBackend::new([2, 0, 0, 0, 0, 1], 2);
        let meta = TxMeta {
            gso: Some(TxGso {
                mss: 1448,
                tcp_offset: 34,
                ipv6: false,
            }),
            ..TxMeta::default()
        };
        assert!(matches!(
            b.send(&[0; 60], &meta),
            Err(NetError::Unsupported(_))
        ));
    }

    #[test]
    fn loopback_echoes() {
        let (mut b, _h) = MemoryBackend::loopback([2, 0, 0, 0, 0, 1], 4);
        b.send(&[1, 2, 3], &TxMeta::default()).unwrap();
        let mut got = Vec::new();
        b.poll_recv(4, &mut |f, _| got.push(f.to_vec())).unwrap();
        assert_eq!(got, vec![vec![1, 2, 3]]);
    }
}
