//! storvsp: the storage VSP behind Linux `hv_storvsc` (reference §2).
//!
//! [`StorVsp`] is one synthetic SCSI (or IDE) controller. Every channel the guest opens (the
//! primary and each sub-channel) gets its own thread and queue: it answers the vstor init handshake,
//! runs SRBs with GPA-direct data against the LUNs' [`ScsiDisk`]s — reads, writes and flushes on
//! the LUN's per-channel io_uring queue when the backend has one, everything else on a worker pool —
//! and completes them as they finish, out of order, with many in flight.
//!
//! Hosting: in process through [`vmbus_core::device::VmbusDevice`] (a [`ChannelBinder`] maps each
//! channel's rings and provides its doorbells), or in a VSP process through
//! [`vmbus_core::oop::HostedDevice`]. Sub-channel requests (CREATE_SUB_CHANNELS) arrive on a channel
//! thread; they are handed to the bus the next time it lends the device a
//! [`ChannelControl`] ([`StorVsp::service_bus`], also called on every open) and announced through
//! [`StorVspConfig::on_subchannel_request`].

mod channel;
mod io;
mod journal;
pub mod protocol;
mod release;

#[cfg(test)]
mod tests;

use crate::backend::AsyncDisk;
use crate::block::BlockDevice;
use crate::scsi::{Identity, ScsiDisk, ScsiParams};
use channel::{ChannelHandle, Inbox};
use io::WorkerPool;
use protocol::SharedProtocol;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use vmbus_core::device::{
    ChannelControl, DeviceDescription, DeviceError, OpenChannelInfo, VmbusDevice,
};
use vmbus_core::devices::vstor::{Operation, ProtocolVersion, VstorPacket};
use vmbus_core::memory::GuestMemory;
use vmbus_core::wire::{Guid, class};

pub use channel::ChannelRings;
pub use io::{DataRange, GuestBuffer, SrbResult};
pub use protocol::ProtocolConfig;

/// SCSI address of a LUN on the controller.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LunAddr {
    pub path: u8,
    pub target: u8,
    pub lun: u8,
}

impl LunAddr {
    pub const fn new(path: u8, target: u8, lun: u8) -> Self {
        LunAddr { path, target, lun }
    }
}

/// One attached disk.
pub struct Lun {
    pub(crate) scsi: ScsiDisk,
    pub(crate) async_disk: Option<Arc<dyn AsyncDisk>>,
}

impl Lun {
    pub fn scsi(&self) -> &ScsiDisk {
        &self.scsi
    }
}

/// Callback for sub-channel requests (see [`StorVspConfig::on_subchannel_request`]).
pub type SubchannelHook = Arc<dyn Fn(u16) + Send + Sync>;

/// Device settings.
#[derive(Clone)]
pub struct StorVspConfig {
    /// The controller's instance GUID (stable across reboots).
    pub instance: Guid,
    pub protocol: ProtocolConfig,
    /// Worker threads for commands that do not go through an asynchronous queue.
    pub io_threads: usize,
    /// Requests in flight per channel before the channel stops reading its ring (back-pressure).
    /// Linux keeps up to 352 per channel outstanding.
    pub max_in_flight: usize,
    /// What INQUIRY reports for paths/targets/LUNs without a disk.
    pub identity: Identity,
    /// Called (on a channel thread) when the guest asks for more sub-channels; the bus still has
    /// to be told through [`StorVsp::service_bus`].
    pub on_subchannel_request: Option<SubchannelHook>,
}

impl StorVspConfig {
    pub fn new(instance: Guid) -> Self {
        StorVspConfig {
            instance,
            protocol: ProtocolConfig::default(),
            io_threads: 4,
            max_in_flight: 1024,
            identity: Identity::msft(&instance.to_string(), 0),
            on_subchannel_request: None,
        }
    }
}

/// Maps the rings of a channel the guest opened and provides its doorbells (in-process hosting).
pub trait ChannelBinder: Send + Sync {
    fn bind(&self, info: &OpenChannelInfo) -> Result<ChannelRings, DeviceError>;
}

/// Signals of one channel for [`GuestRamBinder`]: `(kick, call)`.
pub type DoorbellSource = Box<
    dyn Fn(
            &OpenChannelInfo,
        ) -> std::io::Result<(ringbuf::signal::Doorbell, ringbuf::signal::Doorbell)>
        + Send
        + Sync,
>;

/// A [`ChannelBinder`] for guest RAM in one file mapped at GPA 0 (a memfd): maps each ring page by
/// PFN, as a VSP process does from the GPADL.
pub struct GuestRamBinder {
    pub ram: Arc<File>,
    pub memory: Arc<dyn GuestMemory>,
    pub doorbells: DoorbellSource,
}

impl ChannelBinder for GuestRamBinder {
    fn bind(&self, info: &OpenChannelInfo) -> Result<ChannelRings, DeviceError> {
        let split = info.downstream_offset as usize;
        if split == 0 || split >= info.ring_pages.len() {
            return Err(DeviceError::RingMapping("bad downstream offset".into()));
        }
        let offsets = |pfns: &[u64]| -> Result<Vec<u64>, DeviceError> {
            pfns.iter()
                .map(|p| {
                    p.checked_mul(4096)
                        .ok_or_else(|| DeviceError::RingMapping("PFN overflow".into()))
                })
                .collect()
        };
        let (up, down) = info.ring_pages.split_at(split);
        let map = |p: &[u64]| {
            ringbuf::mmap::MappedRing::map_pages(self.ram.as_fd(), &offsets(p)?)
                .map_err(|e| DeviceError::RingMapping(e.to_string()))
        };
        let (kick, call) =
            (self.doorbells)(info).map_err(|e| DeviceError::RingMapping(e.to_string()))?;
        Ok(ChannelRings {
            incoming: map(up)?,
            outgoing: map(down)?,
            kick,
            call,
            memory: self.memory.clone(),
            inflight: None,
        })
    }
}

/// Counters of how requests were handled (all channels).
#[derive(Debug, Default)]
pub struct Stats {
    /// SRBs run on an asynchronous (io_uring) queue.
    pub async_io: AtomicU64,
    /// SRBs run on the worker pool.
    pub worker_io: AtomicU64,
    /// SRBs completed without reaching the disk (refused, emulated inline, no such LUN).
    pub inline: AtomicU64,
    /// Guest packets that could not be parsed or were not allowed (answered with an error).
    pub bad_packets: AtomicU64,
    /// Guest packets dropped unanswered (no completion requested, wrong packet type).
    pub dropped: AtomicU64,
    /// Packets re-read after a VSP restart that the in-flight journal showed answered already
    /// (consumed without executing them again).
    pub replays_skipped: AtomicU64,
}

/// State shared by the device and its channel threads.
pub(crate) struct DeviceShared {
    pub(crate) stats: Stats,
    pub(crate) config: StorVspConfig,
    pub(crate) protocol: SharedProtocol,
    luns: RwLock<BTreeMap<LunAddr, Arc<Lun>>>,
    pub(crate) pool: WorkerPool,
    /// Sub-channels asked for and not yet offered by the bus.
    pending_offers: Mutex<u16>,
    primary_inbox: Mutex<Option<Arc<Inbox>>>,
}

impl DeviceShared {
    pub(crate) fn lun(&self, addr: LunAddr) -> Option<Arc<Lun>> {
        self.luns.read().ok()?.get(&addr).cloned()
    }

    /// LUN numbers present at `path`/`target`, ascending.
    pub(crate) fn luns_of(&self, path: u8, target: u8) -> Vec<u8> {
        self.luns.read().map_or_else(
            |_| Vec::new(),
            |m| {
                m.keys()
                    .filter(|a| a.path == path && a.target == target)
                    .map(|a| a.lun)
                    .collect()
            },
        )
    }

    /// Whether `lun` is still attached (not removed or replaced).
    pub(crate) fn is_current(&self, lun: &Arc<Lun>) -> bool {
        self.luns
            .read()
            .is_ok_and(|m| m.values().any(|l| Arc::ptr_eq(l, lun)))
    }

    pub(crate) fn request_subchannels(&self, count: u16) {
        if let Ok(mut n) = self.pending_offers.lock() {
            *n = n.saturating_add(count);
        }
        tracing::info!(count, "storvsp: guest asked for sub-channels");
        if let Some(hook) = &self.config.on_subchannel_request {
            hook(count);
        }
    }
}

/// A synthetic SCSI controller.
pub struct StorVsp {
    shared: Arc<DeviceShared>,
    channels: BTreeMap<u32, (bool, ChannelHandle)>,
    binder: Option<Arc<dyn ChannelBinder>>,
    /// The next primary open continues a restored session instead of starting a new one.
    restored: bool,
}

/// Magic of [`StorVsp::save`] data.
const SAVE_MAGIC: &[u8; 4] = b"VST1";

impl StorVsp {
    /// A controller without disks. `binder` maps channels for in-process hosting (`None` when the
    /// device is only hosted through [`vmbus_core::oop::HostedDevice`]).
    pub fn new(
        config: StorVspConfig,
        binder: Option<Arc<dyn ChannelBinder>>,
    ) -> std::io::Result<Self> {
        let pool = WorkerPool::new(config.io_threads, "storvsp")?;
        Ok(StorVsp {
            shared: Arc::new(DeviceShared {
                config,
                stats: Stats::default(),
                protocol: SharedProtocol::default(),
                luns: RwLock::new(BTreeMap::new()),
                pool,
                pending_offers: Mutex::new(0),
                primary_inbox: Mutex::new(None),
            }),
            channels: BTreeMap::new(),
            binder,
            restored: false,
        })
    }

    /// How requests were handled so far.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The negotiated vstor version, once the guest picked one.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.shared.protocol.version()
    }

    /// Whether the guest finished the init handshake.
    pub fn ready(&self) -> bool {
        self.shared.protocol.ready()
    }

    /// Attaches a disk at `addr` (replacing any there) and tells the guest to rescan.
    /// `async_disk` is the same disk's asynchronous interface, if it has one.
    pub fn add_lun(
        &self,
        addr: LunAddr,
        disk: Arc<dyn BlockDevice>,
        async_disk: Option<Arc<dyn AsyncDisk>>,
        params: Option<ScsiParams>,
    ) {
        let params = params.unwrap_or_else(|| {
            let mut p = ScsiParams::new(self.lun_identity(addr));
            p.max_transfer_bytes = self.shared.config.protocol.max_transfer_bytes;
            p
        });
        let lun = Arc::new(Lun {
            scsi: ScsiDisk::new(disk, params),
            async_disk,
        });
        if let Ok(mut m) = self.shared.luns.write() {
            m.insert(addr, lun);
        }
        self.rescan();
    }

    /// Attaches a raw image, using its io_uring queues.
    pub fn add_raw_lun(&self, addr: LunAddr, disk: Arc<crate::backend::raw::RawDisk>) {
        let async_disk: Arc<dyn AsyncDisk> = disk.clone();
        self.add_lun(addr, disk, Some(async_disk), None);
    }

    /// Detaches the disk at `addr` (I/O in flight completes) and tells the guest to rescan.
    pub fn remove_lun(&self, addr: LunAddr) -> bool {
        let removed = self
            .shared
            .luns
            .write()
            .is_ok_and(|mut m| m.remove(&addr).is_some());
        if removed {
            self.rescan();
        }
        removed
    }

    /// The backend of `addr` changed size: the guest sees UNIT ATTENTION / CAPACITY DATA HAS
    /// CHANGED on its next command and re-reads the capacity.
    pub fn resized(&self, addr: LunAddr) -> bool {
        match self.shared.lun(addr) {
            Some(l) => {
                l.scsi.capacity_changed();
                true
            }
            None => false,
        }
    }

    /// The LUN at `addr`.
    pub fn lun(&self, addr: LunAddr) -> Option<Arc<Lun>> {
        self.shared.lun(addr)
    }

    /// Sends ENUMERATE_BUS on the primary channel (when the guest is initialised at WIN7 or later).
    pub fn rescan(&self) {
        let at_least_win7 = self
            .shared
            .protocol
            .version()
            .is_some_and(|v| v >= ProtocolVersion::Win7);
        if !self.shared.protocol.ready() || !at_least_win7 {
            return;
        }
        if let Some(inbox) = self
            .shared
            .primary_inbox
            .lock()
            .ok()
            .and_then(|g| g.clone())
        {
            inbox.notify(VstorPacket::new(Operation::EnumerateBus, 0, 0));
        }
    }

    /// Offers the sub-channels the guest asked for through `bus`. Returns how many were offered.
    pub fn service_bus(&mut self, bus: &mut dyn ChannelControl) -> u16 {
        let want = self
            .shared
            .pending_offers
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or(0);
        if want == 0 {
            return 0;
        }
        bus.offer_subchannels(want)
    }

    /// Sub-channel offers asked for and not yet handed to a bus.
    pub fn pending_subchannels(&self) -> u16 {
        self.shared.pending_offers.lock().map(|n| *n).unwrap_or(0)
    }

    fn lun_identity(&self, addr: LunAddr) -> Identity {
        let inst = self.shared.config.instance.to_string();
        let serial = format!(
            "{}-{}{}{:02x}",
            &inst[..inst.len().min(8)],
            addr.path,
            addr.target,
            addr.lun
        );
        // FNV-1a over the instance and the address: stable per disk, unique enough for NAA.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in inst.bytes().chain([addr.path, addr.target, addr.lun]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Identity::msft(&serial, h)
    }

    /// Starts serving an opened channel.
    pub fn open_rings(
        &mut self,
        relid: u32,
        subchannel_index: u16,
        rings: ChannelRings,
    ) -> Result<(), DeviceError> {
        if self.channels.contains_key(&relid) {
            return Err(DeviceError::NoResources);
        }
        let primary = subchannel_index == 0;
        if primary && !std::mem::take(&mut self.restored) {
            // A new session: the guest negotiates again.
            self.shared.protocol.reset();
        }
        let ready = primary && self.shared.protocol.ready();
        let handle = channel::spawn(
            relid,
            primary,
            ready,
            rings,
            subchannel_index,
            self.shared.clone(),
        )
        .map_err(DeviceError::RingMapping)?;
        if primary && let Ok(mut p) = self.shared.primary_inbox.lock() {
            *p = Some(handle.inbox.clone());
        }
        self.channels.insert(relid, (primary, handle));
        Ok(())
    }

    fn close_channel(&mut self, relid: u32) {
        if let Some((primary, h)) = self.channels.remove(&relid) {
            h.stop();
            if primary && let Ok(mut p) = self.shared.primary_inbox.lock() {
                *p = None;
            }
        }
    }

    fn saved(&self) -> Vec<u8> {
        let mut v = SAVE_MAGIC.to_vec();
        let p = &self.shared.protocol;
        v.extend_from_slice(&p.version().map_or(0, ProtocolVersion::raw).to_le_bytes());
        v.push(u8::from(p.ready()));
        v.extend_from_slice(&p.subchannels().to_le_bytes());
        v
    }

    fn restore_from(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        if state.is_empty() {
            return Ok(());
        }
        let bad = || DeviceError::BadSavedState("storvsp state".into());
        let (magic, rest) = state.split_at_checked(4).ok_or_else(bad)?;
        if magic != SAVE_MAGIC || rest.len() != 5 {
            return Err(bad());
        }
        let raw = u16::from_le_bytes([rest[0], rest[1]]);
        let version = match raw {
            0 => None,
            v => Some(ProtocolVersion::from_wire(v).ok_or_else(bad)?),
        };
        let ready = rest[2] != 0;
        self.shared.protocol.restore(
            version,
            ready && version.is_some(),
            u16::from_le_bytes([rest[3], rest[4]]),
        );
        self.restored = true;
        Ok(())
    }
}

impl Drop for StorVsp {
    fn drop(&mut self) {
        let relids: Vec<u32> = self.channels.keys().copied().collect();
        for r in relids {
            self.close_channel(r);
        }
    }
}

impl VmbusDevice for StorVsp {
    fn description(&self) -> DeviceDescription {
        let cfg = &self.shared.config;
        let class = if cfg.protocol.ide {
            class::IDE
        } else {
            class::SCSI
        };
        let mut d = DeviceDescription::new(class, cfg.instance);
        d.max_subchannels = if cfg.protocol.ide {
            0
        } else {
            cfg.protocol.max_subchannels
        };
        d
    }

    fn open(
        &mut self,
        channel: OpenChannelInfo,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        let binder = self
            .binder
            .clone()
            .ok_or_else(|| DeviceError::RingMapping("no channel binder".into()))?;
        let rings = binder.bind(&channel)?;
        self.open_rings(channel.relid, channel.subchannel_index, rings)?;
        self.service_bus(bus);
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.close_channel(relid);
    }

    fn save(&self) -> Vec<u8> {
        self.saved()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        self.restore_from(state)
    }
}

impl vmbus_core::oop::HostedDevice for StorVsp {
    fn open(
        &mut self,
        channel: vmbus_core::oop::ChannelResources,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        let rings = ChannelRings {
            incoming: channel.incoming,
            outgoing: channel.outgoing,
            kick: channel.kick,
            call: channel.call,
            memory: channel.memory,
            inflight: channel.inflight,
        };
        self.open_rings(channel.info.relid, channel.info.subchannel_index, rings)?;
        self.service_bus(bus);
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.close_channel(relid);
    }

    fn save(&self) -> Vec<u8> {
        self.saved()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        self.restore_from(state)
    }
}
