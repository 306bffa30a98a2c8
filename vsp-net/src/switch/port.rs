//! Per-port state shared between the switch and the port's owner: configuration, RNDIS packet
//! filter, bounded egress queue with its readiness eventfd, and counters.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{PoisonError, RwLock};

use bytes::Bytes;
use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

use super::vlan::VlanMode;
use super::{MacAddr, PortId};
use crate::tap::{EventFd, FrameMeta};

/// NDIS packet-filter bits (`OID_GEN_CURRENT_PACKET_FILTER`, reference §3.9).
pub mod filter {
    /// Unicast frames to the port's own MAC.
    pub const DIRECTED: u32 = 0x1;
    /// Multicast frames to addresses in the port's multicast list.
    pub const MULTICAST: u32 = 0x2;
    /// Every multicast frame.
    pub const ALL_MULTICAST: u32 = 0x4;
    /// Broadcast frames.
    pub const BROADCAST: u32 = 0x8;
    /// Everything forwarded to the port (including unknown unicast for other MACs).
    pub const PROMISCUOUS: u32 = 0x20;
    /// What Linux netvsc sets on `ifup` (directed + all-multicast + broadcast).
    pub const LINUX_DEFAULT: u32 = DIRECTED | ALL_MULTICAST | BROADCAST;
}

/// Largest multicast list a port keeps (`OID_802_3_MAXIMUM_LIST_SIZE`).
pub const MAX_MULTICAST_LIST: usize = 32;

/// What is attached to a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A guest NIC with a fixed MAC: its address is pinned in the MAC table (access ports), the
    /// packet filter applies to what it receives, and frames with another source MAC are dropped
    /// unless spoofing is allowed.
    Nic {
        /// The NIC's MAC.
        mac: MacAddr,
    },
    /// An uplink (TAP, another switch): any source MAC (learned), no packet filter.
    Uplink,
}

/// Configuration of a new port.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Name for logs and statistics.
    pub name: String,
    /// NIC or uplink.
    pub kind: PortKind,
    /// VLAN membership.
    pub vlan: VlanMode,
    /// Egress queue capacity in frames (≥ 1).
    pub queue_frames: usize,
    /// Egress queue capacity in bytes (frames are dropped when it would be exceeded).
    pub queue_bytes: usize,
    /// Initial packet filter (NIC ports; see [`filter`]). An RNDIS device should start with 0 and
    /// follow the guest's `OID_GEN_CURRENT_PACKET_FILTER`.
    pub packet_filter: u32,
    /// Accept frames whose source MAC is not the NIC's.
    pub allow_mac_spoofing: bool,
}

impl PortConfig {
    /// A guest NIC port on the default VLAN with the Linux default filter.
    pub fn nic(name: &str, mac: MacAddr) -> Self {
        Self {
            name: name.to_owned(),
            kind: PortKind::Nic { mac },
            vlan: VlanMode::default(),
            queue_frames: 1024,
            queue_bytes: 4 << 20,
            packet_filter: filter::LINUX_DEFAULT,
            allow_mac_spoofing: false,
        }
    }

    /// An uplink port on the default VLAN.
    pub fn uplink(name: &str) -> Self {
        Self {
            kind: PortKind::Uplink,
            packet_filter: filter::PROMISCUOUS,
            allow_mac_spoofing: true,
            ..Self::nic(name, [0; 6])
        }
    }

    /// Sets the VLAN mode.
    pub fn with_vlan(mut self, vlan: VlanMode) -> Self {
        self.vlan = vlan;
        self
    }

    /// Sets the queue bounds.
    pub fn with_queue(mut self, frames: usize, bytes: usize) -> Self {
        self.queue_frames = frames;
        self.queue_bytes = bytes;
        self
    }
}

/// Why a frame was dropped. Ingress reasons are counted on the sending port, egress reasons on the
/// port that would have received the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Ingress: shorter than an Ethernet header.
    Runt,
    /// Ingress: longer than the switch's maximum frame.
    Oversize,
    /// Ingress: offload metadata that does not fit the frame.
    BadOffload,
    /// Ingress: multicast or all-zero source MAC.
    InvalidSource,
    /// Ingress: NIC frame with a source MAC other than the NIC's.
    Spoofed,
    /// Ingress: VLAN tag not allowed on the port (or untagged on a trunk without native VLAN).
    VlanIngress,
    /// Ingress: unicast to an address learned on the sending port itself.
    Hairpin,
    /// Ingress or egress: port disabled (link down).
    PortDisabled,
    /// Egress: refused by the port's packet filter.
    Filtered,
    /// Egress: queue full (frames or bytes).
    QueueFull,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 10] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::BadOffload,
        DropReason::InvalidSource,
        DropReason::Spoofed,
        DropReason::VlanIngress,
        DropReason::Hairpin,
        DropReason::PortDisabled,
        DropReason::Filtered,
        DropReason::QueueFull,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one port. "tx" is what the port's owner sent into the switch, "rx" what the switch
/// queued for the owner to receive (the NIC's point of view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames accepted from the owner.
    pub tx_packets: u64,
    /// Bytes accepted from the owner.
    pub tx_bytes: u64,
    /// Frames queued for the owner.
    pub rx_packets: u64,
    /// Bytes queued for the owner.
    pub rx_bytes: u64,
    /// Drops per [`DropReason`], indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl PortStats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

#[derive(Debug, Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

/// A frame queued on a port: shared bytes (floods share one buffer) and per-port metadata.
#[derive(Clone, Debug)]
pub struct SwitchFrame {
    /// Frame without in-band VLAN tag.
    pub data: Bytes,
    /// Offload metadata; `vlan` is the tag this port should see (trunk ports), else `None`.
    pub meta: FrameMeta,
}

/// State of one port shared by the switch and the port owner.
#[derive(Debug)]
pub(crate) struct PortShared {
    pub(crate) id: PortId,
    pub(crate) name: String,
    pub(crate) kind: PortKind,
    pub(crate) allow_spoof: bool,
    pub(crate) vlan: RwLock<VlanMode>,
    filter: AtomicU32,
    mcast: RwLock<Vec<MacAddr>>,
    pub(crate) enabled: AtomicBool,
    queue: ArrayQueue<SwitchFrame>,
    queued_bytes: CachePadded<AtomicUsize>,
    max_bytes: usize,
    notify: EventFd,
    armed: CachePadded<AtomicBool>,
    counters: CachePadded<Counters>,
}

impl PortShared {
    pub(crate) fn new(id: PortId, cfg: &PortConfig, notify: EventFd) -> Self {
        Self {
            id,
            name: cfg.name.clone(),
            kind: cfg.kind,
            allow_spoof: cfg.allow_mac_spoofing || cfg.kind == PortKind::Uplink,
            vlan: RwLock::new(cfg.vlan.clone()),
            filter: AtomicU32::new(cfg.packet_filter),
            mcast: RwLock::new(Vec::new()),
            enabled: AtomicBool::new(true),
            queue: ArrayQueue::new(cfg.queue_frames.max(1)),
            queued_bytes: CachePadded::new(AtomicUsize::new(0)),
            max_bytes: cfg.queue_bytes,
            notify,
            armed: CachePadded::new(AtomicBool::new(true)),
            counters: CachePadded::new(Counters::default()),
        }
    }

    pub(crate) fn vlan(&self) -> std::sync::RwLockReadGuard<'_, VlanMode> {
        self.vlan.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_vlan(&self, mode: VlanMode) {
        *self.vlan.write().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    pub(crate) fn filter(&self) -> u32 {
        self.filter.load(Ordering::Relaxed)
    }

    pub(crate) fn set_filter(&self, f: u32) {
        self.filter.store(f, Ordering::Relaxed);
    }

    pub(crate) fn set_multicast_list(&self, list: &[MacAddr]) {
        *self.mcast.write().unwrap_or_else(PoisonError::into_inner) = list.to_vec();
    }

    pub(crate) fn multicast_list(&self) -> Vec<MacAddr> {
        self.mcast
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn mac(&self) -> Option<MacAddr> {
        match self.kind {
            PortKind::Nic { mac } => Some(mac),
            PortKind::Uplink => None,
        }
    }

    /// Whether the packet filter lets a frame to `dst` through.
    pub(crate) fn accepts(&self, dst: &MacAddr) -> bool {
        let PortKind::Nic { mac } = self.kind else {
            return true;
        };
        let f = self.filter();
        if f & filter::PROMISCUOUS != 0 {
            return true;
        }
        if *dst == super::BROADCAST {
            return f & filter::BROADCAST != 0;
        }
        if super::is_multicast(dst) {
            return f & filter::ALL_MULTICAST != 0
                || (f & filter::MULTICAST != 0
                    && self
                        .mcast
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .contains(dst));
        }
        f & filter::DIRECTED != 0 && *dst == mac
    }

    pub(crate) fn count_drop(&self, r: DropReason) {
        self.counters.drops[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_tx(&self, bytes: usize) {
        self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .tx_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Queues a frame for the owner; counts and returns `false` when the queue is full.
    pub(crate) fn enqueue(&self, frame: SwitchFrame) -> bool {
        let len = frame.data.len();
        let prev = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if prev + len > self.max_bytes && prev != 0 {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.count_drop(DropReason::QueueFull);
            return false;
        }
        if self.queue.push(frame).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.count_drop(DropReason::QueueFull);
            return false;
        }
        self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        // Pairs with the fence in `rearm`: either the owner sees the frame or we see `armed`.
        fence(Ordering::SeqCst);
        if self.armed.swap(false, Ordering::SeqCst) {
            self.notify.signal();
        }
        true
    }

    /// Takes the next queued frame.
    pub(crate) fn dequeue(&self) -> Option<SwitchFrame> {
        let f = self.queue.pop()?;
        self.queued_bytes.fetch_sub(f.data.len(), Ordering::AcqRel);
        Some(f)
    }

    /// Called by the owner after draining: re-arms the notification when the queue is empty, or
    /// keeps the eventfd readable when frames remain (level-triggered behaviour for epoll users).
    pub(crate) fn rearm(&self) {
        if !self.queue.is_empty() {
            self.notify.signal();
            return;
        }
        self.armed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.queue.is_empty() && self.armed.swap(false, Ordering::SeqCst) {
            self.notify.signal();
        }
    }

    pub(crate) fn notify(&self) -> &EventFd {
        &self.notify
    }

    pub(crate) fn queued(&self) -> (usize, usize) {
        (self.queue.len(), self.queued_bytes.load(Ordering::Relaxed))
    }

    pub(crate) fn stats(&self) -> PortStats {
        let c = &self.counters;
        PortStats {
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            drops: std::array::from_fn(|i| c.drops[i].load(Ordering::Relaxed)),
        }
    }
}
