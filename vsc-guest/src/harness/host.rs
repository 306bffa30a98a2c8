//! Where the storage VSP runs and what it is handed when the guest opens a channel:
//!
//! - [`Vsp::InProcess`]: a [`HostedDevice`] in this process (its channel threads are the VSP),
//!   handed the same [`ChannelResources`] a VSP process gets from `vmbus_core::oop::serve`;
//! - [`Vsp::InProcessVmbus`]: a [`VmbusDevice`] that maps its own rings, built from
//!   [`DeviceResources`] (guest RAM, ring mapping, the channels' doorbells);
//! - [`Vsp::Child`]: a child process running `vmbus_core::oop::serve`, started and restarted by a
//!   [`Supervisor`].

use super::HarnessError;
use super::memory::{GuestRam, map_ring};
use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vmbus_core::device::{ChannelControl, DeviceError, OpenChannelInfo, VmbusDevice};
use vmbus_core::memory::{GuestMemory, MappedMemory};
use vmbus_core::oop::{ChannelResources, GuestRegions, HostedDevice, Region, Supervisor};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds an in-process [`VmbusDevice`] from the harness's resources.
pub type VmbusFactory =
    Box<dyn FnOnce(&DeviceResources) -> Result<Box<dyn VmbusDevice + Send>, HarnessError>>;

/// The VSP behind the harness.
pub enum Vsp {
    /// A device hosted in this process through the VSP-process trait.
    InProcess(Box<dyn HostedDevice + Send>),
    /// A device hosted in this process through the bus trait (it maps its own rings).
    InProcessVmbus(VmbusFactory),
    /// A child process: the command must end in `vmbus_core::oop::serve` with the device.
    Child(Box<dyn FnMut() -> Command + Send>),
}

/// Sub-channel offers a device asked for (its [`ChannelControl`]). The harness offers what the
/// guest's CREATE_SUB_CHANNELS was granted; these requests are only counted.
#[derive(Clone, Default)]
pub struct SubchannelRequests(Arc<Mutex<Vec<u16>>>);

impl SubchannelRequests {
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.0))
    }
}

impl ChannelControl for SubchannelRequests {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        lock(&self.0).push(count);
        count
    }
}

/// What an in-process [`VmbusDevice`] gets from the harness.
#[derive(Clone)]
pub struct DeviceResources {
    ram: Arc<File>,
    memory: Arc<MappedMemory>,
    doorbells: Arc<Mutex<HashMap<u32, (Doorbell, Doorbell)>>>,
}

impl DeviceResources {
    /// The guest RAM file (GPA = offset).
    pub fn ram_file(&self) -> Arc<File> {
        self.ram.clone()
    }

    /// Guest RAM, mapped.
    pub fn memory(&self) -> Arc<dyn GuestMemory> {
        self.memory.clone()
    }

    /// `(kick, call)` of an opened channel: the device waits on `kick`, rings `call`.
    pub fn doorbells(&self, info: &OpenChannelInfo) -> std::io::Result<(Doorbell, Doorbell)> {
        let bells = lock(&self.doorbells);
        let (k, c) = bells.get(&info.relid).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no doorbells for relid {}", info.relid),
            )
        })?;
        Ok((k.try_clone()?, c.try_clone()?))
    }

    /// [`Self::doorbells`] as a `'static` closure (storvsp's `DoorbellSource`).
    pub fn doorbell_source(
        &self,
    ) -> impl Fn(&OpenChannelInfo) -> std::io::Result<(Doorbell, Doorbell)> + Send + Sync + 'static
    {
        let me = self.clone();
        move |info| me.doorbells(info)
    }

    /// The channel's rings mapped from guest RAM: `(guest→host, host→guest)`.
    pub fn map_rings(
        &self,
        info: &OpenChannelInfo,
    ) -> Result<(MappedRing, MappedRing), DeviceError> {
        let err = |e: String| DeviceError::RingMapping(e);
        let (up, down) = info
            .ring_pages
            .split_at_checked(info.downstream_offset as usize)
            .ok_or_else(|| err("downstream offset beyond the ring pages".into()))?;
        Ok((
            map_ring(&self.ram, up).map_err(|e| err(e.to_string()))?,
            map_ring(&self.ram, down).map_err(|e| err(e.to_string()))?,
        ))
    }
}

/// What the harness asks of whoever hosts the VSP.
pub(crate) trait DeviceHost: Send {
    /// The guest opened a channel: start serving it (`kick` is rung by the guest, `call` rings it).
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError>;
    fn close(&mut self, relid: u32);
    /// Sub-channel requests the device made since the last call.
    fn take_subchannel_requests(&mut self) -> Vec<u16>;
    fn supervisor(&mut self) -> Option<&mut Supervisor> {
        None
    }
}

/// A [`HostedDevice`] in this process.
pub(crate) struct HostedInProcess {
    device: Box<dyn HostedDevice + Send>,
    ram: Arc<File>,
    regions: Arc<GuestRegions>,
    requests: SubchannelRequests,
}

impl HostedInProcess {
    pub(crate) fn new(
        device: Box<dyn HostedDevice + Send>,
        ram: &GuestRam,
    ) -> Result<Self, HarnessError> {
        let region = Region {
            gpa: 0,
            size: ram.pages() * 4096,
            fd_offset: 0,
        };
        let fd: OwnedFd = ram.fd().try_clone_to_owned()?;
        let regions = GuestRegions::map(&[region], vec![fd])
            .map_err(|e| HarnessError::Device(e.to_string()))?;
        Ok(HostedInProcess {
            device,
            ram: ram.file(),
            regions: Arc::new(regions),
            requests: SubchannelRequests::default(),
        })
    }
}

impl DeviceHost for HostedInProcess {
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError> {
        let (up, down) = info
            .ring_pages
            .split_at_checked(info.downstream_offset as usize)
            .ok_or_else(|| HarnessError::Device("bad downstream offset".into()))?;
        let ch = ChannelResources {
            incoming: map_ring(&self.ram, up)?,
            outgoing: map_ring(&self.ram, down)?,
            memory: self.regions.clone(),
            kick: kick.try_clone()?,
            call: call.try_clone()?,
            info,
            gpadls: Default::default(),
            inflight: None,
        };
        let mut bus = self.requests.clone();
        self.device
            .open(ch, &mut bus)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    fn close(&mut self, relid: u32) {
        self.device.close(relid);
    }

    fn take_subchannel_requests(&mut self) -> Vec<u16> {
        self.requests.take()
    }
}

/// A [`VmbusDevice`] in this process.
pub(crate) struct VmbusInProcess {
    device: Box<dyn VmbusDevice + Send>,
    res: DeviceResources,
    requests: SubchannelRequests,
}

impl VmbusInProcess {
    pub(crate) fn new(make: VmbusFactory, ram: &GuestRam) -> Result<Self, HarnessError> {
        let res = DeviceResources {
            ram: ram.file(),
            memory: ram.memory(),
            doorbells: Arc::default(),
        };
        let device = make(&res)?;
        Ok(VmbusInProcess {
            device,
            res,
            requests: SubchannelRequests::default(),
        })
    }

    pub(crate) fn description(&self) -> vmbus_core::device::DeviceDescription {
        self.device.description()
    }
}

impl DeviceHost for VmbusInProcess {
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError> {
        lock(&self.res.doorbells).insert(info.relid, (kick.try_clone()?, call.try_clone()?));
        let mut bus = self.requests.clone();
        self.device
            .open(info, &mut bus)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    fn close(&mut self, relid: u32) {
        self.device.close(relid);
        lock(&self.res.doorbells).remove(&relid);
    }

    fn take_subchannel_requests(&mut self) -> Vec<u16> {
        self.requests.take()
    }
}

/// The VSP in a supervised child process.
pub(crate) struct ChildProcess {
    sup: Supervisor,
}

impl ChildProcess {
    pub(crate) fn start(
        command: Box<dyn FnMut() -> Command + Send>,
        ram: &GuestRam,
        timeout: Duration,
    ) -> Result<Self, HarnessError> {
        let region = Region {
            gpa: 0,
            size: ram.pages() * 4096,
            fd_offset: 0,
        };
        let fd: OwnedFd = ram.fd().try_clone_to_owned()?;
        let sup = Supervisor::start(command, vec![(region, fd)], timeout)
            .map_err(|e| HarnessError::Device(e.to_string()))?;
        Ok(ChildProcess { sup })
    }
}

impl DeviceHost for ChildProcess {
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError> {
        let k = kick.as_fd().try_clone_to_owned()?;
        let c = call.as_fd().try_clone_to_owned()?;
        self.sup
            .open(info, k, c)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    fn close(&mut self, relid: u32) {
        if let Err(e) = self.sup.close(relid) {
            tracing::warn!(relid, error = %e, "harness: VSP close failed");
        }
    }

    fn take_subchannel_requests(&mut self) -> Vec<u16> {
        Vec::new()
    }

    fn supervisor(&mut self) -> Option<&mut Supervisor> {
        Some(&mut self.sup)
    }
}
