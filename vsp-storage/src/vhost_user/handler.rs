//! The vhost-user protocol side of one connection: features, memory table, vring set-up, config
//! space and the inflight region. The message framing is the `vhost` crate's
//! [`vhost::vhost_user::BackendReqHandler`]; this type answers its requests.
//!
//! (vhost-user-backend 0.24's own handler refuses GET/SET_INFLIGHT_FD, which QEMU's
//! vhost-user-blk reconnect relies on, so the requests are answered here directly.)

use super::device::{BlkDevice, CONFIG_LEN, MAX_QUEUE_SIZE, VHOST_USER_F_PROTOCOL_FEATURES};
use super::inflight::InflightRegion;
use super::worker::{Mem, QueueSetup, WorkerHandle};
use std::fs::File;
use std::io;
use std::sync::Arc;
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Default)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    worker: Option<WorkerHandle>,
}

struct Mapping {
    va: u64,
    size: u64,
    gpa: u64,
}

/// Protocol state of one frontend connection.
pub struct BlkBackend {
    dev: Arc<BlkDevice>,
    acked: u64,
    protocol: u64,
    mem: Mem,
    maps: Vec<Mapping>,
    rings: Vec<Ring>,
    inflight: Option<Arc<InflightRegion>>,
}

fn err(msg: &'static str) -> VuError {
    tracing::warn!(reason = msg, "vhost-user request refused");
    VuError::InvalidOperation(msg)
}

fn io_err(e: io::Error) -> VuError {
    tracing::warn!(error = %e, "vhost-user request failed");
    VuError::ReqHandlerError(e)
}

impl BlkBackend {
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        let rings = (0..dev.num_queues()).map(|_| Ring::default()).collect();
        BlkBackend {
            dev,
            acked: 0,
            protocol: 0,
            mem: Mem::new(GuestMemoryMmap::new()),
            maps: Vec::new(),
            rings,
            inflight: None,
        }
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut Ring> {
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| err("vring index out of range"))
    }

    fn va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.maps
            .iter()
            .find(|m| va >= m.va && va - m.va < m.size)
            .map(|m| va - m.va + m.gpa)
            .ok_or_else(|| err("vring address not in any memory region"))
    }

    /// Stops every queue worker (disconnect, reset).
    pub fn stop_all(&mut self) {
        for i in 0..self.rings.len() {
            self.stop_ring(i);
        }
    }

    fn stop_ring(&mut self, i: usize) -> Option<u16> {
        let ring = self.rings.get_mut(i)?;
        let base = ring.worker.take()?.stop()?;
        ring.base = base;
        Some(base)
    }

    /// Starts ring `i` when it has everything it needs and is enabled.
    fn maybe_start(&mut self, i: usize) -> VuResult<()> {
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let limits = self.dev.limits(self.acked);
        let inflight = self.inflight.clone();
        let (mem, dev) = (self.mem.clone(), Arc::clone(&self.dev));
        let Some(ring) = self.rings.get_mut(i) else {
            return Ok(());
        };
        if ring.worker.is_some() || !ring.enabled || !ring.addr_set || ring.size == 0 {
            return Ok(());
        }
        let Some(kick) = ring.kick.as_ref() else {
            return Ok(());
        };
        let dup = |f: &File| -> VuResult<EventFd> {
            let f = f.try_clone().map_err(io_err)?;
            // SAFETY: `f` is a fresh duplicate owned by nobody else; EventFd takes ownership.
            Ok(unsafe {
                <EventFd as std::os::fd::FromRawFd>::from_raw_fd(
                    std::os::fd::IntoRawFd::into_raw_fd(f),
                )
            })
        };
        let setup = QueueSetup {
            index: i as u16,
            size: ring.size,
            desc: ring.desc,
            avail: ring.avail,
            used: ring.used,
            next_avail: ring.base,
            event_idx,
            kick: dup(kick)?,
            call: ring.call.as_ref().map(dup).transpose()?,
            mem,
            dev,
            limits,
            inflight: inflight.and_then(|r| r.queue(i as u16, ring.size)),
        };
        ring.worker = Some(WorkerHandle::spawn(setup).map_err(io_err)?);
        tracing::debug!(queue = i, "vring started");
        Ok(())
    }

    /// Applies a change to a ring that may be running: stop, change, start again.
    fn restart_with(&mut self, index: u32, f: impl FnOnce(&mut Ring)) -> VuResult<()> {
        let i = index as usize;
        self.ring(index)?;
        self.stop_ring(i);
        f(self.ring(index)?);
        self.maybe_start(i)
    }
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        Err(err("RESET_DEVICE not supported"))
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.dev.features() != 0 {
            return Err(err("frontend acked features that were not offered"));
        }
        self.acked = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(err("postcopy not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut maps = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let m = r.mmap_region::<()>(file)?;
            let g = GuestRegionMmap::new(m, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| err("memory region wraps the address space"))?;
            regions.push(g);
            maps.push(Mapping {
                va: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| io_err(io::Error::other(e)))?;
        // Running workers pick the new table up on their next batch.
        self.mem
            .lock()
            .map_err(|_| err("memory lock poisoned"))?
            .replace(mem);
        self.maps = maps;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(err("vring size must be a power of two up to 1024"));
        }
        self.restart_with(index, |r| r.size = num as u16)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(err("dirty logging not supported"));
        }
        let (d, u, a) = (
            self.va_to_gpa(descriptor)?,
            self.va_to_gpa(used)?,
            self.va_to_gpa(available)?,
        );
        self.restart_with(index, |r| {
            r.desc = d;
            r.used = u;
            r.avail = a;
            r.addr_set = true;
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| err("vring base above 65535"))?;
        self.restart_with(index, |r| r.base = base)
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = index as usize;
        self.ring(index)?;
        self.stop_ring(i);
        let r = self.ring(index)?;
        // The ring is stopped now (vhost-user: GET_VRING_BASE stops it).
        r.kick = None;
        r.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(r.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let protocol = self.acked & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0;
        self.restart_with(u32::from(index), |r| {
            r.kick = fd;
            // Without PROTOCOL_FEATURES a ring is enabled as soon as it is kicked.
            if !protocol {
                r.enabled = true;
            }
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.restart_with(u32::from(index), |r| r.call = fd)
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.dev.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.restart_with(index, |r| r.enabled = enable)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let cfg = self.dev.config();
        let (offset, size) = (offset as usize, size as usize);
        if offset.checked_add(size).is_none_or(|end| end > 256) {
            return Err(err("config read beyond the config space"));
        }
        // Fields past `struct virtio_blk_config` read as zero.
        let mut out = vec![0u8; size];
        if offset < CONFIG_LEN {
            let n = size.min(CONFIG_LEN - offset);
            out[..n].copy_from_slice(&cfg[offset..offset + n]);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(err("the config space is read-only (no CONFIG_WCE)"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(err("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(err("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues == 0
            || inflight.num_queues > self.dev.num_queues()
            || inflight.queue_size == 0
            || inflight.queue_size > MAX_QUEUE_SIZE
        {
            return Err(err("inflight request for impossible queues"));
        }
        let (region, file, size) =
            InflightRegion::create(inflight.num_queues, inflight.queue_size).map_err(io_err)?;
        self.inflight = Some(region);
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if inflight.num_queues > self.dev.num_queues() || inflight.queue_size > MAX_QUEUE_SIZE {
            return Err(err("inflight region for impossible queues"));
        }
        let region = InflightRegion::map(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(io_err)?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(err("CONFIGURE_MEM_SLOTS not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(err("CONFIGURE_MEM_SLOTS not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(err("CONFIGURE_MEM_SLOTS not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(err("device state transfer not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(err("device state transfer not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(err("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(err("dirty logging not supported"))
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        self.stop_all();
    }
}
