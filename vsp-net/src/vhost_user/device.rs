//! The vhost-user-net device: one instance per frontend connection (vhost-user-backend's
//! workers and their exit events live as long as one connection), over a [`SharedPort`] and
//! [`NetStats`] that outlive connections.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::chain::{Mem, WritableBuf};
use super::config::{self, feat};
use super::ctrl::RxFilter;
use super::port::{GuestOffloads, SharedPort};
use crate::switch::MacAddr;
use crate::tap::FrameMeta;

/// Settings of one virtio NIC.
#[derive(Clone, Debug)]
pub struct NetDeviceConfig {
    /// MAC in the config space (and the switch port's).
    pub mac: MacAddr,
    /// Queue pairs (`max_virtqueue_pairs`), 1..=16.
    pub pairs: u16,
    /// MTU to advertise (`VIRTIO_NET_F_MTU`), if any.
    pub mtu: Option<u16>,
    /// Largest queue size the frontend may set.
    pub queue_size: u16,
}

impl Default for NetDeviceConfig {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            pairs: 1,
            mtu: None,
            queue_size: 1024,
        }
    }
}

/// Device counters (kept across frontend connections).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames the driver transmitted and the port took.
    pub tx_frames: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Transmitted frames the port refused (queue full, TAP error).
    pub tx_dropped: AtomicU64,
    /// TX chains refused (bad descriptors or header).
    pub tx_bad: AtomicU64,
    /// Frames delivered to the driver.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Frames for the driver dropped (no buffer could ever hold it, offload it did not accept).
    pub rx_dropped: AtomicU64,
    /// RX chains refused (bad descriptors).
    pub rx_bad: AtomicU64,
    /// Times RX stopped reading the port because the driver had no buffers (back-pressure).
    pub rx_stalls: AtomicU64,
    /// Control commands answered OK.
    pub ctrl_ok: AtomicU64,
    /// Control commands refused, and bad control chains.
    pub ctrl_err: AtomicU64,
}

/// A copy of [`NetStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct NetStatsSnapshot {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_bad: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_bad: u64,
    pub rx_stalls: u64,
    pub ctrl_ok: u64,
    pub ctrl_err: u64,
}

impl NetStats {
    /// Current values.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            tx_bad: l(&self.tx_bad),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_bad: l(&self.rx_bad),
            rx_stalls: l(&self.rx_stalls),
            ctrl_ok: l(&self.ctrl_ok),
            ctrl_err: l(&self.ctrl_err),
        }
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

/// Per queue-pair worker state.
#[derive(Debug, Default)]
pub(crate) struct PairState {
    /// Frames read from the port that no RX buffer took yet (held, not dropped): normally at
    /// most one; the segments of one super-frame the driver cannot take whole.
    pub backlog: VecDeque<(Vec<u8>, FrameMeta)>,
    /// RX chains popped but not yet used (a merged frame needs several).
    pub staged: Vec<WritableBuf>,
    /// Scratch for TX chains.
    pub scratch: Vec<u8>,
}

/// Driver-controlled state.
#[derive(Debug, Default)]
pub(crate) struct DevState {
    pub acked: u64,
    pub mac: MacAddr,
    pub filter: RxFilter,
    pub active_pairs: u16,
}

type Handlers = Vec<Arc<VringEpollHandler<Arc<VhostUserNet>>>>;

/// The device as vhost-user-backend sees it.
pub struct VhostUserNet {
    pub(crate) cfg: NetDeviceConfig,
    pub(crate) port: SharedPort,
    pub(crate) stats: Arc<NetStats>,
    pub(crate) state: Mutex<DevState>,
    pub(crate) mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    pub(crate) pairs: Vec<Mutex<PairState>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    handlers: Mutex<Handlers>,
}

impl std::fmt::Debug for VhostUserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNet")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// epoll data of the port's descriptor in every worker (ids up to `num_queues` are reserved).
pub(crate) fn port_event(num_queues: usize) -> u16 {
    (num_queues + 1) as u16
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VhostUserNet {
    /// A device for one connection.
    pub fn new(cfg: NetDeviceConfig, port: SharedPort, stats: Arc<NetStats>) -> io::Result<Self> {
        let pairs = usize::from(cfg.pairs.clamp(1, 16));
        let exits = (0..pairs)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let mac = {
            let mut p = port.lock();
            // A new driver starts from the spec's default filter.
            p.set_rx_filter(&RxFilter::default());
            p.mac().unwrap_or(cfg.mac)
        };
        Ok(Self {
            port,
            stats,
            state: Mutex::new(DevState {
                mac,
                active_pairs: 1,
                ..DevState::default()
            }),
            mem: RwLock::new(None),
            pairs: (0..pairs)
                .map(|_| Mutex::new(PairState::default()))
                .collect(),
            exits,
            handlers: Mutex::new(Vec::new()),
            cfg: NetDeviceConfig {
                pairs: pairs as u16,
                ..cfg
            },
        })
    }

    /// Hooks the port's descriptor into every worker's epoll (edge-triggered: a worker reads
    /// until the port is empty or the driver has no buffers; a stalled worker resumes on the RX
    /// kick).
    pub(crate) fn attach(&self, handlers: Handlers) -> io::Result<()> {
        let fd = self.port.lock().rx_fd();
        for h in &handlers {
            register(h, fd, self.num_queues())?;
        }
        *lock(&self.handlers) = handlers;
        Ok(())
    }

    /// After the port was re-created (MAC change): watch its new descriptor.
    pub(crate) fn reattach(&self, fd: RawFd) {
        for h in lock(&self.handlers).iter() {
            if let Err(e) = register(h, fd, self.num_queues()) {
                warn!(error = %e, "vhost-user-net: cannot watch the new port descriptor");
            }
        }
    }

    /// Stops the workers and drops the handlers (they hold this device: a cycle).
    pub(crate) fn detach(&self) {
        for (_, n) in &self.exits {
            let _ = n.notify();
        }
        lock(&self.handlers).clear();
    }

    pub(crate) fn memory(&self) -> Option<GuestMemoryAtomic<Mem>> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn acked(&self) -> u64 {
        lock(&self.state).acked
    }
}

fn register(
    h: &VringEpollHandler<Arc<VhostUserNet>>,
    fd: RawFd,
    num_queues: usize,
) -> io::Result<()> {
    h.register_listener(
        fd,
        EventSet::IN | EventSet::EDGE_TRIGGERED,
        u64::from(port_event(num_queues)),
    )
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len() + 1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        config::offered(self.cfg.mtu)
    }

    fn acked_features(&self, features: u64) {
        lock(&self.state).acked = features;
        let o = GuestOffloads {
            csum: features & feat::GUEST_CSUM != 0,
            tso4: features & feat::GUEST_TSO4 != 0,
            tso6: features & feat::GUEST_TSO6 != 0,
            ecn: features & feat::GUEST_ECN != 0,
        };
        if let Err(e) = self.port.lock().set_guest_offloads(o) {
            warn!(error = %e, "vhost-user-net: cannot apply the guest's receive offloads");
        }
        debug!(
            features = format_args!("{features:#x}"),
            "vhost-user-net features acked"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mac = lock(&self.state).mac;
        let link = self.port.lock().link_up();
        let c = config::config_bytes(mac, link, self.cfg.pairs, self.cfg.mtu);
        config::config_window(&c, offset, size.min(256))
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!(enabled, "vhost-user-net EVENT_IDX");
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        // Staged RX buffers point into the old table.
        for p in &self.pairs {
            lock(p).staged.clear();
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Worker i serves pair i (RX 2i, TX 2i+1); worker 0 also the control queue (last).
        let ctrl = 1u64 << (2 * self.pairs.len());
        (0..self.pairs.len())
            .map(|i| (0b11u64 << (2 * i)) | if i == 0 { ctrl } else { 0 })
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        self.dispatch(device_event, vrings, thread_id);
        Ok(())
    }
}
