//! Where the device runs: in this process ([`InProcessHost`]) or in a supervised child process
//! ([`ProcessHost`]), and what it is given.

use super::{HarnessError, map_ring};
use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vmbus_core::device::{ChannelControl, DeviceError, OpenChannelInfo, VmbusDevice};
use vmbus_core::gpadl::{Gpadl, GpadlRange};
use vmbus_core::memory::{GuestMemory, MappedMemory};
use vmbus_core::oop::{Region, Supervisor};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the VM asks of whoever hosts its device.
pub trait DeviceHost: Send {
    /// The guest opened a channel: start serving it. `kick` is rung by the guest, `call` rings the
    /// guest.
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError>;
    /// The guest closed a channel.
    fn close(&mut self, relid: u32);
    /// A GPADL was created; make it known to the device.
    fn gpadl_created(&mut self, gpadl: &Gpadl) -> Result<(), HarnessError>;
    /// Sub-channel counts the device asked the bus to offer since the last call.
    fn take_subchannel_requests(&mut self) -> Vec<u16>;
    /// The supervisor of a device in a child process (kill / restart / state tests).
    fn supervisor(&mut self) -> Option<&mut Supervisor> {
        None
    }
}

/// Sub-channel requests a device makes (its [`ChannelControl`]); the VM offers them.
#[derive(Clone, Default)]
pub struct SubchannelRequests(Arc<Mutex<Vec<u16>>>);

impl ChannelControl for SubchannelRequests {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        lock(&self.0).push(count);
        count
    }
}

/// An opened channel's rings and doorbells, mapped for the device.
pub struct MappedChannel {
    /// Guest → host ring.
    pub inbound: MappedRing,
    /// Host → guest ring.
    pub outbound: MappedRing,
    /// Readable when the guest signalled.
    pub kick: Doorbell,
    /// Ring to interrupt the guest.
    pub call: Doorbell,
}

/// Everything an in-process device needs, shared with the VM.
#[derive(Clone)]
pub struct DeviceResources {
    /// Guest RAM as the device sees it.
    pub memory: Arc<MappedMemory>,
    ram: Arc<File>,
    gpadls: Arc<Mutex<HashMap<u32, Gpadl>>>,
    doorbells: Arc<Mutex<HashMap<u32, (Doorbell, Doorbell)>>>,
    subchannels: SubchannelRequests,
}

impl DeviceResources {
    pub(super) fn new(memory: Arc<MappedMemory>, ram: Arc<File>) -> Self {
        DeviceResources {
            memory,
            ram,
            gpadls: Arc::default(),
            doorbells: Arc::default(),
            subchannels: SubchannelRequests::default(),
        }
    }

    /// A GPADL the guest created.
    pub fn gpadl(&self, handle: u32) -> Option<Gpadl> {
        lock(&self.gpadls).get(&handle).cloned()
    }

    /// [`Self::gpadl`] as a `'static` closure (netvsp's `GpadlSource`).
    pub fn gpadl_lookup(&self) -> impl Fn(u32) -> Option<Gpadl> + Send + Sync + 'static {
        let table = self.gpadls.clone();
        move |h| lock(&table).get(&h).cloned()
    }

    /// Maps an opened channel's rings from guest RAM, with its doorbells.
    pub fn map_channel(&self, info: &OpenChannelInfo) -> Result<MappedChannel, DeviceError> {
        let err = |e: String| DeviceError::RingMapping(e);
        let (up, down) = info
            .ring_pages
            .split_at_checked(info.downstream_offset as usize)
            .ok_or_else(|| err("downstream offset beyond the ring pages".into()))?;
        let (kick, call) = {
            let bells = lock(&self.doorbells);
            let (k, c) = bells
                .get(&info.relid)
                .ok_or_else(|| err(format!("no doorbells for relid {}", info.relid)))?;
            (
                k.try_clone().map_err(|e| err(e.to_string()))?,
                c.try_clone().map_err(|e| err(e.to_string()))?,
            )
        };
        Ok(MappedChannel {
            inbound: map_ring(&self.ram, up).map_err(|e| err(e.to_string()))?,
            outbound: map_ring(&self.ram, down).map_err(|e| err(e.to_string()))?,
            kick,
            call,
        })
    }

    /// The device's way to ask for sub-channel offers.
    pub fn subchannel_control(&self) -> SubchannelRequests {
        self.subchannels.clone()
    }
}

/// The device in this process.
pub struct InProcessHost {
    device: Box<dyn VmbusDevice + Send>,
    res: DeviceResources,
}

impl InProcessHost {
    pub fn new(device: Box<dyn VmbusDevice + Send>, res: DeviceResources) -> Self {
        InProcessHost { device, res }
    }
}

impl DeviceHost for InProcessHost {
    fn open(
        &mut self,
        info: OpenChannelInfo,
        kick: &Doorbell,
        call: &Doorbell,
    ) -> Result<(), HarnessError> {
        lock(&self.res.doorbells).insert(info.relid, (kick.try_clone()?, call.try_clone()?));
        let mut ctl = self.res.subchannels.clone();
        self.device
            .open(info, &mut ctl)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    fn close(&mut self, relid: u32) {
        self.device.close(relid);
        lock(&self.res.doorbells).remove(&relid);
    }

    fn gpadl_created(&mut self, gpadl: &Gpadl) -> Result<(), HarnessError> {
        lock(&self.res.gpadls).insert(gpadl.handle, gpadl.clone());
        Ok(())
    }

    fn take_subchannel_requests(&mut self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.res.subchannels.0))
    }
}

/// GPADLs published to a device in another process through reserved guest pages: a count, then
/// `{handle u32, pages u32, first_pfn u64}` per GPADL (contiguous pages only, which is all the
/// harness allocates).
pub struct GpadlSideTable {
    gpa: u64,
    count: u32,
}

impl GpadlSideTable {
    /// Pages reserved at the end of guest RAM.
    pub const PAGES: u64 = 1;
    const MAGIC: u32 = 0x4E56_4754; // "TGVN"
    const MAX: u32 = ((Self::PAGES * 4096 - 8) / 16) as u32;

    pub fn new(gpa: u64) -> Self {
        GpadlSideTable { gpa, count: 0 }
    }

    /// Appends `g` (written before the count, so a reader never sees a half entry).
    pub fn publish(&mut self, mem: &dyn GuestMemory, g: &Gpadl) -> Result<(), HarnessError> {
        let bad = |why: &str| HarnessError::Device(format!("GPADL {:#x}: {why}", g.handle));
        let first = *g.pfns.first().ok_or_else(|| bad("no pages"))?;
        if g.pfns
            .iter()
            .enumerate()
            .any(|(i, &p)| p != first + i as u64)
        {
            return Err(bad("pages are not contiguous"));
        }
        if self.count >= Self::MAX {
            return Err(bad("side table full"));
        }
        let mut e = [0u8; 16];
        e[..4].copy_from_slice(&g.handle.to_le_bytes());
        e[4..8].copy_from_slice(&(g.pfns.len() as u32).to_le_bytes());
        e[8..].copy_from_slice(&first.to_le_bytes());
        let at = self.gpa + 8 + u64::from(self.count) * 16;
        mem.write_at(at, &e)
            .map_err(|e| HarnessError::Device(e.to_string()))?;
        self.count += 1;
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&Self::MAGIC.to_le_bytes());
        h[4..].copy_from_slice(&self.count.to_le_bytes());
        mem.write_at(self.gpa, &h)
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    /// Looks `handle` up in the table at `gpa` (the device process side).
    pub fn lookup(mem: &dyn GuestMemory, gpa: u64, handle: u32) -> Option<Gpadl> {
        let mut h = [0u8; 8];
        mem.read_at(gpa, &mut h).ok()?;
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if word(&h[..4]) != Self::MAGIC {
            return None;
        }
        let count = word(&h[4..]).min(Self::MAX);
        (0..count).rev().find_map(|i| {
            let mut e = [0u8; 16];
            mem.read_at(gpa + 8 + u64::from(i) * 16, &mut e).ok()?;
            if word(&e[..4]) != handle {
                return None;
            }
            let pages = word(&e[4..8]);
            let first = u64::from_le_bytes(e[8..].try_into().ok()?);
            Some(Gpadl {
                handle,
                relid: 0,
                ranges: vec![GpadlRange {
                    byte_offset: 0,
                    byte_count: pages.checked_mul(4096)?,
                    first_pfn: 0,
                    pfn_count: pages as usize,
                }],
                pfns: (first..first + u64::from(pages)).collect(),
            })
        })
    }
}

/// The device in a child process started (and restarted) by a `Supervisor`.
pub struct ProcessHost {
    sup: Supervisor,
    table: GpadlSideTable,
    memory: Arc<MappedMemory>,
}

impl ProcessHost {
    /// Starts `command` (which must end up in `vmbus_core::oop::serve`) with guest RAM as its one
    /// memory region.
    pub fn start(
        command: impl FnMut() -> Command + Send + 'static,
        ram: &super::GuestRam,
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
        Ok(ProcessHost {
            sup,
            table: GpadlSideTable::new(ram.side_table_gpa()),
            memory: ram.memory(),
        })
    }

    /// The supervisor (kill / restart tests).
    pub fn supervisor(&mut self) -> &mut Supervisor {
        &mut self.sup
    }
}

impl DeviceHost for ProcessHost {
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

    fn gpadl_created(&mut self, gpadl: &Gpadl) -> Result<(), HarnessError> {
        self.table.publish(self.memory.as_ref(), gpadl)?;
        // Also through the protocol (what `vsp-net serve` looks buffers up in); kept by the
        // supervisor for restarts.
        self.sup
            .add_gpadl(gpadl.clone())
            .map_err(|e| HarnessError::Device(e.to_string()))
    }

    fn take_subchannel_requests(&mut self) -> Vec<u16> {
        self.sup.take_subchannel_requests()
    }

    fn supervisor(&mut self) -> Option<&mut Supervisor> {
        Some(&mut self.sup)
    }
}
