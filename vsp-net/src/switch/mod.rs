//! In-process learning L2 virtual switch.
//!
//! * Ports: guest NICs ([`PortKind::Nic`]) and uplinks ([`PortKind::Uplink`], e.g. a TAP through
//!   [`uplink::TapUplink`]). Each port is driven by its owner through a [`PortHandle`]: the owner's
//!   thread forwards what it sends ([`PortHandle::send`], no switch-wide lock) and drains its own
//!   bounded egress queue ([`PortHandle::recv`], [`PortHandle::poll_recv`]); an eventfd
//!   ([`PortHandle::notify_fd`]) becomes readable when frames are queued.
//! * MAC learning per VLAN with aging ([`fdb`]); NIC MACs are pinned; broadcast, multicast and
//!   unknown unicast are flooded within the VLAN; known unicast goes to one port.
//! * Per-port RNDIS packet filter ([`port::filter`]) and multicast list on NIC ports.
//! * VLANs ([`vlan`]): access and trunk ports; frames are stored untagged with the tag in
//!   [`FrameMeta::vlan`]; in-band tags arriving on a port are moved there.
//! * Offload metadata is carried through (checksum, GSO); NDIS-style requests are normalised at
//!   ingress ([`crate::tap::offload::finalize_tx`]); a consumer that cannot take super-frames or
//!   pending checksums uses [`PortHandle::poll_recv_with`] to segment/complete in its own thread.
//! * Counters per port ([`PortStats`]) with drops by [`DropReason`]; queues are bounded in frames
//!   and bytes, overflow is dropped and counted, never buffered.

pub mod fdb;
pub mod net_backend;
pub mod port;
pub mod uplink;
pub mod vlan;

#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tracing::{debug, info, trace};

use crate::tap::offload::{self, ETH_HLEN, ETH_P_8021Q};
use crate::tap::{Checksum, EventFd, FrameMeta};
pub use fdb::{Fdb, FdbEntry, Learn};
pub use port::{DropReason, PortConfig, PortKind, PortStats, SwitchFrame, filter};
use port::{MAX_MULTICAST_LIST, PortShared};
pub use vlan::{VlanMode, VlanSet};

/// A MAC address.
pub type MacAddr = [u8; 6];
/// Port identifier (unique for the switch's lifetime).
pub type PortId = u32;
/// The broadcast address.
pub const BROADCAST: MacAddr = [0xff; 6];

/// Group (multicast or broadcast) address.
pub fn is_multicast(mac: &MacAddr) -> bool {
    mac[0] & 1 != 0
}

/// Switch errors (configuration; forwarding never fails, it drops and counts).
#[derive(Debug, Error)]
pub enum SwitchError {
    /// `max_ports` reached.
    #[error("switch has reached its limit of {0} ports")]
    TooManyPorts(usize),
    /// VLAN id outside 1..=4094.
    #[error("invalid VLAN configuration {0:?}")]
    BadVlan(VlanMode),
    /// Another NIC port already owns this MAC on an overlapping VLAN.
    #[error("MAC {mac:02x?} is already used by port {port}")]
    DuplicateMac {
        /// The MAC.
        mac: MacAddr,
        /// Port owning it.
        port: PortId,
    },
    /// Multicast list longer than the port keeps.
    #[error("multicast list of {0} entries exceeds {MAX_MULTICAST_LIST}")]
    TooManyMulticast(usize),
    /// Creating the port's eventfd failed.
    #[error("port notification eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

/// Millisecond clock used for aging (replaceable in tests).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since an arbitrary fixed origin.
    fn now_ms(&self) -> u64;
}

/// [`Clock`] over [`Instant`].
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Switch-wide settings.
#[derive(Clone, Debug)]
pub struct SwitchConfig {
    /// Name for logs.
    pub name: String,
    /// Dynamic MAC entries expire after this long without traffic.
    pub aging: Duration,
    /// MAC table size limit (learning stops when full).
    pub max_fdb_entries: usize,
    /// Port limit.
    pub max_ports: usize,
    /// Largest frame accepted (a 64 KiB super-frame plus Ethernet and VLAN headers by default).
    pub max_frame: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            name: "vswitch".into(),
            aging: Duration::from_secs(300),
            max_fdb_entries: 8192,
            max_ports: 256,
            max_frame: 65535 + ETH_HLEN + 8,
        }
    }
}

/// Switch-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames flooded (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Addresses that moved between ports.
    pub mac_moves: u64,
    /// Frames whose source is pinned to another port (forwarded, not learned).
    pub mac_conflicts: u64,
    /// Addresses not learned because the table was full.
    pub fdb_full: u64,
    /// Dynamic entries removed by aging.
    pub aged_out: u64,
}

#[derive(Debug, Default)]
struct StatCounters {
    flooded: AtomicU64,
    mac_moves: AtomicU64,
    mac_conflicts: AtomicU64,
    fdb_full: AtomicU64,
    aged_out: AtomicU64,
}

type Snapshot = Arc<Vec<Arc<PortShared>>>;

#[derive(Debug)]
struct Inner {
    cfg: SwitchConfig,
    clock: Arc<dyn Clock>,
    fdb: Fdb,
    /// Ports sorted by id; replaced (copy on write) when a port is added or removed.
    ports: Mutex<Snapshot>,
    generation: AtomicU64,
    next_id: AtomicU32,
    next_sweep: AtomicU64,
    stats: StatCounters,
}

impl Inner {
    fn snapshot(&self) -> Snapshot {
        self.ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn sweep_interval(&self) -> u64 {
        (u64::try_from(self.cfg.aging.as_millis()).unwrap_or(u64::MAX) / 4).max(1)
    }

    fn maybe_sweep(&self, now: u64) {
        let next = self.next_sweep.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_sweep
                .compare_exchange(
                    next,
                    now.saturating_add(self.sweep_interval()),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let n = self.fdb.sweep(now);
            self.stats.aged_out.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn remove_port(&self, id: PortId) {
        {
            let mut g = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
            let mut v: Vec<_> = g.iter().filter(|p| p.id != id).cloned().collect();
            v.shrink_to_fit();
            *g = Arc::new(v);
            self.generation.fetch_add(1, Ordering::Release);
        }
        let n = self.fdb.flush_port(id);
        debug!(switch = %self.cfg.name, port = id, flushed = n, "port removed");
    }
}

/// The switch. Cloning gives another reference to the same switch.
#[derive(Clone, Debug)]
pub struct Switch {
    inner: Arc<Inner>,
}

impl Default for Switch {
    fn default() -> Self {
        Self::new(SwitchConfig::default())
    }
}

impl Switch {
    /// A switch on the system clock.
    pub fn new(cfg: SwitchConfig) -> Self {
        Self::with_clock(cfg, Arc::new(SystemClock::default()))
    }

    /// A switch on the given clock.
    pub fn with_clock(cfg: SwitchConfig, clock: Arc<dyn Clock>) -> Self {
        let aging = u64::try_from(cfg.aging.as_millis()).unwrap_or(u64::MAX);
        let inner = Inner {
            fdb: Fdb::new(cfg.max_fdb_entries, aging),
            clock,
            ports: Mutex::new(Arc::new(Vec::new())),
            generation: AtomicU64::new(0),
            next_id: AtomicU32::new(1),
            next_sweep: AtomicU64::new(0),
            stats: StatCounters::default(),
            cfg,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Adds a port; the handle removes it when dropped.
    pub fn add_port(&self, cfg: PortConfig) -> Result<PortHandle, SwitchError> {
        if !cfg.vlan.is_valid() {
            return Err(SwitchError::BadVlan(cfg.vlan));
        }
        let notify = EventFd::new()?;
        let inner = &self.inner;
        let mut g = inner.ports.lock().unwrap_or_else(PoisonError::into_inner);
        if g.len() >= inner.cfg.max_ports {
            return Err(SwitchError::TooManyPorts(inner.cfg.max_ports));
        }
        if let PortKind::Nic { mac } = cfg.kind
            && let Some(other) = g.iter().find(|p| {
                p.mac() == Some(mac) && {
                    let v = p.vlan();
                    vlans_overlap(&v, &cfg.vlan)
                }
            })
        {
            return Err(SwitchError::DuplicateMac {
                mac,
                port: other.id,
            });
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(PortShared::new(id, &cfg, notify));
        if let (PortKind::Nic { mac }, VlanMode::Access(vid)) = (cfg.kind, &cfg.vlan) {
            inner.fdb.add_static(*vid, &mac, id);
        }
        let mut v: Vec<_> = g.iter().cloned().collect();
        v.push(shared.clone());
        *g = Arc::new(v);
        let generation = inner.generation.fetch_add(1, Ordering::Release) + 1;
        let snapshot = g.clone();
        drop(g);
        info!(switch = %inner.cfg.name, port = id, name = %cfg.name, kind = ?cfg.kind, vlan = ?cfg.vlan, "port added");
        Ok(PortHandle {
            shared,
            sw: inner.clone(),
            cache: (generation, snapshot),
        })
    }

    /// Counters of a port.
    pub fn port_stats(&self, id: PortId) -> Option<PortStats> {
        self.inner
            .snapshot()
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.stats())
    }

    /// (id, name) of every port.
    pub fn ports(&self) -> Vec<(PortId, String)> {
        self.inner
            .snapshot()
            .iter()
            .map(|p| (p.id, p.name.clone()))
            .collect()
    }

    /// Live MAC table entries.
    pub fn fdb_entries(&self) -> Vec<FdbEntry> {
        self.inner.fdb.entries(self.inner.clock.now_ms())
    }

    /// Port `mac` is learned on in `vid`.
    pub fn lookup(&self, vid: u16, mac: &MacAddr) -> Option<PortId> {
        self.inner.fdb.lookup(vid, mac, self.inner.clock.now_ms())
    }

    /// Removes expired MAC entries now (also done automatically every aging/4 while forwarding).
    pub fn age(&self) -> usize {
        let n = self.inner.fdb.sweep(self.inner.clock.now_ms());
        self.inner
            .stats
            .aged_out
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Forgets all learned addresses.
    pub fn flush(&self) -> usize {
        self.inner.fdb.flush_dynamic()
    }

    /// Switch-wide counters.
    pub fn stats(&self) -> SwitchStats {
        let s = &self.inner.stats;
        SwitchStats {
            flooded: s.flooded.load(Ordering::Relaxed),
            mac_moves: s.mac_moves.load(Ordering::Relaxed),
            mac_conflicts: s.mac_conflicts.load(Ordering::Relaxed),
            fdb_full: s.fdb_full.load(Ordering::Relaxed),
            aged_out: s.aged_out.load(Ordering::Relaxed),
        }
    }
}

fn vlans_overlap(a: &VlanMode, b: &VlanMode) -> bool {
    match (a, b) {
        (VlanMode::Access(x), m) | (m, VlanMode::Access(x)) => m.is_member(*x),
        (VlanMode::Trunk { .. }, VlanMode::Trunk { .. }) => true,
    }
}

/// What happened to one frame given to [`PortHandle::send`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Ports the frame was queued on.
    pub delivered: u32,
    /// Destination ports that dropped it (filter, queue full, disabled).
    pub dropped: u32,
    /// Of `dropped`, how many because the destination queue was full (back-pressure signal).
    pub queue_full: u32,
    /// The frame was dropped on ingress, before forwarding.
    pub ingress_drop: Option<DropReason>,
    /// Flooded rather than sent to one learned port.
    pub flooded: bool,
}

/// The owner's end of a port. Not shareable: one thread sends and receives through it (the
/// switch itself is safe to use from all port threads at once).
#[derive(Debug)]
pub struct PortHandle {
    shared: Arc<PortShared>,
    sw: Arc<Inner>,
    cache: (u64, Snapshot),
}

impl Drop for PortHandle {
    fn drop(&mut self) {
        self.sw.remove_port(self.shared.id);
    }
}

impl PortHandle {
    /// Port id.
    pub fn id(&self) -> PortId {
        self.shared.id
    }

    /// Port name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Port kind.
    pub fn kind(&self) -> PortKind {
        self.shared.kind
    }

    /// Counters.
    pub fn stats(&self) -> PortStats {
        self.shared.stats()
    }

    /// Frames and bytes waiting in the egress queue.
    pub fn queued(&self) -> (usize, usize) {
        self.shared.queued()
    }

    /// Sets the RNDIS packet filter (NIC ports).
    pub fn set_packet_filter(&self, f: u32) {
        debug!(
            port = self.shared.id,
            filter = format_args!("{f:#x}"),
            "packet filter"
        );
        self.shared.set_filter(f);
    }

    /// Current packet filter.
    pub fn packet_filter(&self) -> u32 {
        self.shared.filter()
    }

    /// Sets the multicast list used with [`filter::MULTICAST`] (`OID_802_3_MULTICAST_LIST`).
    pub fn set_multicast_list(&self, list: &[MacAddr]) -> Result<(), SwitchError> {
        if list.len() > MAX_MULTICAST_LIST {
            return Err(SwitchError::TooManyMulticast(list.len()));
        }
        self.shared.set_multicast_list(list);
        Ok(())
    }

    /// Current multicast list.
    pub fn multicast_list(&self) -> Vec<MacAddr> {
        self.shared.multicast_list()
    }

    /// Enables or disables the port (a disabled port neither sends nor receives; frames are
    /// counted as [`DropReason::PortDisabled`]).
    pub fn set_enabled(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether the port is enabled.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    /// Changes the VLAN mode (NIC MAC pinning is not changed; learned entries are kept).
    pub fn set_vlan(&self, mode: VlanMode) -> Result<(), SwitchError> {
        if !mode.is_valid() {
            return Err(SwitchError::BadVlan(mode));
        }
        if let (Some(mac), VlanMode::Access(vid)) = (self.shared.mac(), &mode) {
            self.sw.fdb.add_static(*vid, &mac, self.shared.id);
        }
        self.shared.set_vlan(mode);
        Ok(())
    }

    /// Readable when frames are queued for this port (for epoll/poll loops). After it fires, call
    /// [`PortHandle::poll_recv`] (which re-arms it).
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.shared.notify().as_fd()
    }

    /// Blocks until a frame is queued or `timeout` passes; returns whether frames are waiting.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        if self.shared.queued().0 > 0 {
            return true;
        }
        self.shared.rearm();
        if self.shared.queued().0 > 0 {
            return true;
        }
        let _ = self.shared.notify().wait(timeout);
        self.shared.notify().drain();
        self.shared.queued().0 > 0
    }

    /// Takes one queued frame.
    pub fn recv(&mut self) -> Option<SwitchFrame> {
        self.shared.dequeue()
    }

    /// Hands up to `budget` queued frames to `out`, as queued (super-frames and partial checksums
    /// included). Returns how many.
    pub fn poll_recv(&mut self, budget: usize, out: &mut dyn FnMut(&[u8], &FrameMeta)) -> usize {
        self.shared.notify().drain();
        let mut n = 0;
        while n < budget {
            let Some(f) = self.shared.dequeue() else {
                break;
            };
            out(&f.data, &f.meta);
            n += 1;
        }
        self.shared.rearm();
        n
    }

    /// Like [`PortHandle::poll_recv`] for a consumer that cannot take super-frames (`segment`)
    /// or pending checksums (`complete_csum`): the work is done here, in the owner's thread.
    /// Frames whose metadata does not fit are dropped and counted as [`DropReason::BadOffload`].
    /// Returns the number of queued frames consumed (segments of one super-frame count once).
    pub fn poll_recv_with(
        &mut self,
        budget: usize,
        segment: bool,
        complete_csum: bool,
        out: &mut dyn FnMut(&[u8], &FrameMeta),
    ) -> usize {
        self.shared.notify().drain();
        let mut n = 0;
        while n < budget {
            let Some(f) = self.shared.dequeue() else {
                break;
            };
            n += 1;
            let pending = matches!(
                f.meta.csum,
                Checksum::Partial { .. } | Checksum::Offload { .. }
            );
            let r = if segment && f.meta.gso.is_some() {
                offload::segment(&f.data, &f.meta, complete_csum, out).map(drop)
            } else if complete_csum && pending {
                let mut copy = f.data.to_vec();
                let mut m = f.meta;
                if let Some(g) = m.gso {
                    // Kept as a super-frame: the receiver completes per segment.
                    trace!(?g, "super-frame passed with pending checksum");
                    out(&copy, &m);
                    Ok(())
                } else {
                    offload::complete_checksum(&mut copy, &mut m).map(|()| out(&copy, &m))
                }
            } else {
                out(&f.data, &f.meta);
                Ok(())
            };
            if let Err(e) = r {
                debug!(port = self.shared.id, error = %e, "dropping frame on egress");
                self.shared.count_drop(DropReason::BadOffload);
            }
        }
        self.shared.rearm();
        n
    }

    fn refresh(&mut self) {
        let g = self.sw.generation.load(Ordering::Acquire);
        if g != self.cache.0 {
            self.cache = (g, self.sw.snapshot());
        }
    }

    /// Forwards one frame from this port's owner into the switch. Never blocks; every outcome is
    /// counted and reported.
    pub fn send(&mut self, frame: &[u8], meta: &FrameMeta) -> SendReport {
        self.refresh();
        let (me, sw, ports) = (&*self.shared, &*self.sw, &*self.cache.1);
        let drop_in = |r: DropReason| {
            me.count_drop(r);
            SendReport {
                ingress_drop: Some(r),
                ..SendReport::default()
            }
        };
        if !me.enabled.load(Ordering::Relaxed) {
            return drop_in(DropReason::PortDisabled);
        }
        if frame.len() < ETH_HLEN {
            return drop_in(DropReason::Runt);
        }
        if frame.len() > sw.cfg.max_frame {
            return drop_in(DropReason::Oversize);
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        src.copy_from_slice(&frame[6..12]);
        if is_multicast(&src) || src == [0; 6] {
            return drop_in(DropReason::InvalidSource);
        }
        if !me.allow_spoof && me.mac() != Some(src) {
            return drop_in(DropReason::Spoofed);
        }
        let Some((data, meta)) = normalize(frame, meta) else {
            return drop_in(DropReason::BadOffload);
        };
        let Some(vid) = me.vlan().ingress_vid(meta.vlan) else {
            return drop_in(DropReason::VlanIngress);
        };
        let pcp = meta.vlan.map_or(0, |t| t.pcp);
        me.count_tx(frame.len());

        let now = sw.clock.now_ms();
        sw.maybe_sweep(now);
        match sw.fdb.learn(vid, &src, me.id, now) {
            Learn::Refreshed | Learn::Learned => {}
            Learn::Moved(from) => {
                sw.stats.mac_moves.fetch_add(1, Ordering::Relaxed);
                debug!(vid, mac = ?src, from, to = me.id, "MAC moved");
            }
            Learn::Full => {
                sw.stats.fdb_full.fetch_add(1, Ordering::Relaxed);
            }
            Learn::StaticConflict(owner) => {
                sw.stats.mac_conflicts.fetch_add(1, Ordering::Relaxed);
                trace!(vid, mac = ?src, owner, "source pinned to another port");
            }
        }
        let unicast = if is_multicast(&dst) {
            None
        } else {
            sw.fdb.lookup(vid, &dst, now)
        };
        let mut report = SendReport::default();
        let deliver = |p: &PortShared, report: &mut SendReport| {
            let Some(tag) = p.vlan().egress_tag(vid, pcp) else {
                return;
            };
            if !p.enabled.load(Ordering::Relaxed) {
                p.count_drop(DropReason::PortDisabled);
                report.dropped += 1;
                return;
            }
            if !p.accepts(&dst) {
                p.count_drop(DropReason::Filtered);
                report.dropped += 1;
                return;
            }
            let f = SwitchFrame {
                data: data.clone(),
                meta: FrameMeta { vlan: tag, ..meta },
            };
            if p.enqueue(f) {
                report.delivered += 1;
            } else {
                report.dropped += 1;
                report.queue_full += 1;
            }
        };
        match unicast {
            Some(id) if id == me.id => return drop_in(DropReason::Hairpin),
            Some(id) => match ports.binary_search_by_key(&id, |p| p.id) {
                Ok(i) => deliver(&ports[i], &mut report),
                Err(_) => {
                    // Stale entry of a port being removed: flood instead.
                    report.flooded = true;
                }
            },
            None => report.flooded = true,
        }
        if report.flooded {
            sw.stats.flooded.fetch_add(1, Ordering::Relaxed);
            for p in ports.iter().filter(|p| p.id != me.id) {
                deliver(p, &mut report);
            }
        }
        report
    }
}

/// Copies the frame into a shared buffer, moving an in-band 802.1Q tag into the metadata and
/// finishing NDIS-style offload requests. `None` if the metadata does not fit the frame.
fn normalize(frame: &[u8], meta: &FrameMeta) -> Option<(Bytes, FrameMeta)> {
    let mut meta = *meta;
    let mut buf = BytesMut::with_capacity(frame.len());
    let tagged = meta.vlan.is_none()
        && frame.len() >= ETH_HLEN + 4
        && frame[12..14] == ETH_P_8021Q.to_be_bytes();
    if tagged {
        meta.vlan = Some(crate::tap::VlanTag::from_tci(u16::from_be_bytes([
            frame[14], frame[15],
        ])));
        buf.extend_from_slice(&frame[..12]);
        buf.extend_from_slice(&frame[16..]);
        offload::shift_offsets(&mut meta, -4);
    } else {
        buf.extend_from_slice(frame);
    }
    if meta.gso.is_some() || matches!(meta.csum, Checksum::Offload { .. }) {
        let len = buf.len();
        let n = len.min(offload::MAX_HEADERS);
        if let Err(e) = offload::finalize_tx(&mut buf[..n], len, &mut meta) {
            debug!(error = %e, "switch: bad offload metadata");
            return None;
        }
    }
    if let Checksum::Partial { start, offset } = meta.csum
        && usize::from(start) + usize::from(offset) + 2 > buf.len()
    {
        return None;
    }
    Some((buf.freeze(), meta))
}
