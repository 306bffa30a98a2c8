//! The devices behind the bus's channels, and adapters from the VSP crates' interfaces.
//!
//! [`BusDevice`] is what the bus thread calls: it gets each opened channel as a [`ChannelSetup`]
//! (the server's [`OpenChannelInfo`], guest RAM, and the channel's *kick* and *call* eventfds) and
//! maps the rings itself — or, out of process, passes the page list and the eventfds on.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use vmbus_core::device::{
    ChannelControl, DeviceDescription, DeviceError, OpenChannelInfo, VmbusDevice,
};
use vmbus_core::gpadl::Gpadl;
use vmbus_core::oop::{
    ChannelResources, FlagSetter, FlagTarget, GuestRegions, HostedDevice, Region, Supervisor,
};
use vsp_net::netvsp::{ChannelRings, Netvsp};

use crate::memory::{GuestRam, PAGE_SIZE};

/// An opened channel as the bus hands it to a device.
pub struct ChannelSetup<'a> {
    pub info: OpenChannelInfo,
    pub ram: &'a Arc<GuestRam>,
    /// Becomes readable when the guest signals the channel (`HvSignalEvent`).
    pub kick: Doorbell,
    /// Ring it to interrupt the guest for this channel.
    pub call: Doorbell,
}

impl ChannelSetup<'_> {
    /// Maps both rings from the ring GPADL's pages: (guest→host, host→guest). Every page must be
    /// guest RAM; the data pages are mapped twice so wrapping copies are linear.
    pub fn map_rings(&self) -> Result<(MappedRing, MappedRing), DeviceError> {
        map_rings(self.ram, &self.info)
    }
}

/// Maps the two rings of `info` from guest RAM.
pub fn map_rings(
    ram: &GuestRam,
    info: &OpenChannelInfo,
) -> Result<(MappedRing, MappedRing), DeviceError> {
    let split = info.downstream_offset as usize;
    if split < 2 || info.ring_pages.len().saturating_sub(split) < 2 {
        return Err(DeviceError::RingMapping(format!(
            "channel {}: downstream offset {split} of {} ring pages",
            info.relid,
            info.ring_pages.len()
        )));
    }
    let mut pages = Vec::with_capacity(info.ring_pages.len());
    for &pfn in &info.ring_pages {
        let gpa = pfn
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| DeviceError::RingMapping(format!("PFN {pfn:#x} overflows")))?;
        let (fd, off) = ram
            .fd_offset(gpa, PAGE_SIZE)
            .map_err(|e| DeviceError::RingMapping(e.to_string()))?;
        pages.push((fd, off));
    }
    let (up, down) = pages.split_at(split);
    let map = |p: &[(std::os::fd::BorrowedFd<'_>, u64)]| {
        MappedRing::map_page_list(p).map_err(|e| DeviceError::RingMapping(e.to_string()))
    };
    Ok((map(up)?, map(down)?))
}

/// A device on the bus.
pub trait BusDevice: Send {
    /// What to offer.
    fn description(&self) -> DeviceDescription;
    /// The guest opened a channel: start serving it. An error fails the guest's OPENCHANNEL.
    fn open(&mut self, channel: ChannelSetup<'_>) -> Result<(), DeviceError>;
    /// Stop touching the channel's rings before returning.
    fn close(&mut self, relid: u32);
    /// Called about every 100 ms on the bus thread (restart a dead VSP process, ...).
    fn service(&mut self) {}
    /// The guest completed a GPADL for one of this device's channels (before the guest hears of
    /// it): a VSP process that looks buffers up by handle gets it here.
    fn gpadl_created(&mut self, _gpadl: &Gpadl) {}
    /// The guest tore a GPADL down.
    fn gpadl_removed(&mut self, _handle: u32) {}
    /// The guest disconnected: every GPADL is gone.
    fn bus_reset(&mut self) {}
    /// Where the device sets the channel's SynIC event flag before ringing *call* — `(GPA of the
    /// 32-bit word, bit)` — or `None`: it only rings *call*. `true` once the device applied it
    /// (the bus may then make *call* an irqfd); `false`: unsupported or refused.
    fn signal_target(&mut self, _relid: u32, _target: Option<(u64, u32)>) -> bool {
        false
    }
    /// `in-process` or `VSP process <pid>`.
    fn hosting(&self) -> String {
        "in-process".into()
    }
}

/// The bus offers no sub-channels yet: every request is answered with 0.
pub struct NoSubchannels;

impl ChannelControl for NoSubchannels {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        tracing::info!(count, "vmbus: device asked for sub-channels; none offered");
        0
    }
}

/// The memory table of guest RAM for a VSP: one region per memfd.
pub fn memory_table(ram: &GuestRam) -> std::io::Result<Vec<(Region, OwnedFd)>> {
    ram.regions()
        .into_iter()
        .map(|r| {
            Ok((
                Region {
                    gpa: r.gpa,
                    size: r.len,
                    fd_offset: r.fd_offset,
                },
                r.fd.try_clone_to_owned()?,
            ))
        })
        .collect()
}

/// Any [`HostedDevice`] (the interface of a VSP process) hosted in this process: the rings are
/// mapped here and the device gets guest RAM as [`GuestRegions`] (a second mapping of the memfds,
/// made on the first open).
pub struct Hosted<D> {
    device: D,
    desc: DeviceDescription,
    regions: Option<Arc<GuestRegions>>,
    /// Event-flag target of every open channel (the device's call doorbell reads it).
    targets: std::collections::HashMap<u32, Arc<FlagTarget>>,
}

impl<D: HostedDevice + Send> Hosted<D> {
    pub fn new(device: D, desc: DeviceDescription) -> Self {
        Hosted {
            device,
            desc,
            regions: None,
            targets: Default::default(),
        }
    }

    fn regions(&mut self, ram: &GuestRam) -> Result<Arc<GuestRegions>, DeviceError> {
        if let Some(r) = &self.regions {
            return Ok(r.clone());
        }
        let table = memory_table(ram).map_err(|e| DeviceError::RingMapping(e.to_string()))?;
        let (regions, fds): (Vec<Region>, Vec<OwnedFd>) = table.into_iter().unzip();
        let mapped = Arc::new(
            GuestRegions::map(&regions, fds)
                .map_err(|e| DeviceError::RingMapping(e.to_string()))?,
        );
        self.regions = Some(mapped.clone());
        Ok(mapped)
    }
}

impl<D: HostedDevice + Send> BusDevice for Hosted<D> {
    fn description(&self) -> DeviceDescription {
        self.desc.clone()
    }

    fn open(&mut self, ch: ChannelSetup<'_>) -> Result<(), DeviceError> {
        let (incoming, outgoing) = ch.map_rings()?;
        let memory = self.regions(ch.ram)?;
        let relid = ch.info.relid;
        let target = Arc::new(FlagTarget::none());
        let call = ch.call.with_hook(Arc::new(FlagSetter {
            target: target.clone(),
            memory: memory.clone(),
        }));
        let res = ChannelResources {
            info: ch.info,
            memory,
            incoming,
            outgoing,
            kick: ch.kick,
            call,
            gpadls: Default::default(),
            inflight: None,
        };
        self.device.open(res, &mut NoSubchannels)?;
        self.targets.insert(relid, target);
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.targets.remove(&relid);
        self.device.close(relid);
    }

    fn signal_target(&mut self, relid: u32, target: Option<(u64, u32)>) -> bool {
        let in_memory = |(gpa, _): (u64, u32)| {
            self.regions
                .as_ref()
                .is_some_and(|r| r.atomic_u32(gpa).is_some())
        };
        match self.targets.get(&relid) {
            Some(t) if target.is_none_or(in_memory) => t.set(target) && target.is_some(),
            _ => false,
        }
    }
}

/// Rings mapped by the bus, waiting for netvsp's [`vsp_net::netvsp::RingMapper`] to take them.
pub type RingSlot = Arc<Mutex<Option<ChannelRings<MappedRing>>>>;

/// netvsp in process, driven through [`VmbusDevice`]: the bus maps the rings and leaves them in
/// `slot`, where the device's ring mapper (see [`netvsp_ring_mapper`]) picks them up. (As a VSP
/// process netvsp is `vsp_net::netvsp::HostedNetvsp` behind `kvm-host vsp net` or `vsp-net serve`,
/// an [`OutOfProcess`] device with its buffer GPADLs forwarded.)
pub struct NetvspDevice {
    pub device: Netvsp<MappedRing>,
    pub slot: RingSlot,
}

/// The ring mapper to build a [`Netvsp`] for [`NetvspDevice`] with.
pub fn netvsp_ring_mapper(slot: RingSlot) -> vsp_net::netvsp::RingMapper<MappedRing> {
    Box::new(move |info: &OpenChannelInfo| {
        slot.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                DeviceError::RingMapping(format!("channel {}: no rings prepared", info.relid))
            })
    })
}

impl BusDevice for NetvspDevice {
    fn description(&self) -> DeviceDescription {
        let mut d = self.device.description();
        // No sub-channels: NoSubchannels refuses them anyway.
        d.max_subchannels = 0;
        d
    }

    fn open(&mut self, ch: ChannelSetup<'_>) -> Result<(), DeviceError> {
        let (inbound, outbound) = ch.map_rings()?;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(ChannelRings {
            inbound,
            outbound,
            kick: Some(ch.kick),
            call: Some(ch.call),
        });
        let r = VmbusDevice::open(&mut self.device, ch.info, &mut NoSubchannels);
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        r
    }

    fn close(&mut self, relid: u32) {
        VmbusDevice::close(&mut self.device, relid);
    }
}

/// How often an out-of-process device's state is saved for restarts while it has open channels.
const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A device in a supervised VSP process ([`vmbus_core::oop`]): the process maps the rings from the
/// memfds itself and is restarted (channels re-opened from the rings' state) if it dies. GPADLs of
/// its channels are forwarded (netvsp's buffers); its state is saved every 500 ms while channels
/// are open, so a restarted process resumes the guest's session.
pub struct OutOfProcess {
    supervisor: Supervisor,
    desc: DeviceDescription,
    open: usize,
    refreshed: Option<std::time::Instant>,
    gpadls: std::collections::BTreeSet<u32>,
}

impl OutOfProcess {
    pub fn new(supervisor: Supervisor, desc: DeviceDescription) -> Self {
        OutOfProcess {
            supervisor,
            desc,
            open: 0,
            refreshed: None,
            gpadls: Default::default(),
        }
    }

    /// The VSP's process id.
    pub fn pid(&self) -> Option<u32> {
        self.supervisor.pid()
    }
}

impl BusDevice for OutOfProcess {
    fn description(&self) -> DeviceDescription {
        self.desc.clone()
    }

    fn open(&mut self, ch: ChannelSetup<'_>) -> Result<(), DeviceError> {
        let dup = |d: &Doorbell| {
            d.as_fd()
                .try_clone_to_owned()
                .map_err(|e| DeviceError::RingMapping(e.to_string()))
        };
        let (kick, call) = (dup(&ch.kick)?, dup(&ch.call)?);
        self.supervisor
            .open(ch.info, kick, call)
            .map_err(|e| DeviceError::RingMapping(format!("VSP process: {e}")))?;
        self.open += 1;
        self.refreshed = None;
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.open = self.open.saturating_sub(1);
        if let Err(e) = self.supervisor.close(relid) {
            tracing::warn!(relid, "VSP process close: {e}");
        }
    }

    fn service(&mut self) {
        match self.supervisor.ensure_running() {
            Ok(true) => tracing::warn!("VSP process died; restarted with its channels"),
            Ok(false) => {}
            Err(e) => tracing::error!("VSP process cannot be restarted: {e}"),
        }
        if self.open > 0
            && self
                .refreshed
                .is_none_or(|t| t.elapsed() >= REFRESH_INTERVAL)
        {
            self.refreshed = Some(std::time::Instant::now());
            if let Err(e) = self.supervisor.refresh_state() {
                tracing::warn!("VSP process state not saved: {e}");
            }
        }
        let asked = self.supervisor.take_subchannel_requests();
        if !asked.is_empty() {
            tracing::info!(?asked, "VSP process asked for sub-channels; none offered");
        }
    }

    fn gpadl_created(&mut self, gpadl: &Gpadl) {
        match self.supervisor.add_gpadl(gpadl.clone()) {
            Ok(()) => {
                self.gpadls.insert(gpadl.handle);
            }
            Err(e) => {
                tracing::warn!(
                    handle = gpadl.handle,
                    "VSP process: GPADL not forwarded: {e}"
                )
            }
        }
    }

    fn signal_target(&mut self, relid: u32, target: Option<(u64, u32)>) -> bool {
        match self.supervisor.signal_target(relid, target) {
            Ok(applied) => applied && target.is_some(),
            Err(e) => {
                tracing::warn!(relid, "VSP process: signal target: {e}");
                false
            }
        }
    }

    fn bus_reset(&mut self) {
        for h in std::mem::take(&mut self.gpadls) {
            self.gpadl_removed(h);
        }
    }

    fn gpadl_removed(&mut self, handle: u32) {
        self.gpadls.remove(&handle);
        if let Err(e) = self.supervisor.remove_gpadl(handle) {
            tracing::warn!(handle, "VSP process: GPADL not revoked: {e}");
        }
    }

    fn hosting(&self) -> String {
        match self.supervisor.pid() {
            Some(p) => format!("VSP process {p}"),
            None => "VSP process (not running)".into(),
        }
    }
}
