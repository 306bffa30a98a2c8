//! [`Netvsp`]: the device behind [`VmbusDevice`], and its worker thread.
//!
//! The device state lives behind one mutex. `open` maps the channel's rings (through the
//! embedder's [`RingMapper`]) and adds the channel; `close` removes it under the same lock, so once
//! `close` returns nothing touches that channel's rings again. Work happens in [`Netvsp::poll`]:
//! called by the worker thread ([`Netvsp::spawn_worker`]) after a guest signal, a backend fd
//! wake-up or a short timeout, or directly by an embedder or a test that drives the device
//! deterministically.

use super::core::{Channel, Core};
use super::{NetvspConfig, NetvspStats};
use crate::backend::NetBackend;
use ringbuf::signal::Doorbell;
use ringbuf::{RingMem, RingReader, RingWriter};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vmbus_core::device::{
    ChannelControl, DeviceDescription, DeviceError, OpenChannelInfo, VmbusDevice,
};
use vmbus_core::gpadl::Gpadl;
use vmbus_core::memory::GuestMemory;
use vmbus_core::wire::class;

/// Where the device finds the GPADLs the guest names in SEND_RECV_BUF / SEND_SEND_BUF (the VMBus
/// server's table: `Server::gpadl(handle)`, or a copy of it in a VSP process).
pub trait GpadlSource: Send + Sync {
    fn gpadl(&self, handle: u32) -> Option<Gpadl>;
}

impl<F: Fn(u32) -> Option<Gpadl> + Send + Sync> GpadlSource for F {
    fn gpadl(&self, handle: u32) -> Option<Gpadl> {
        self(handle)
    }
}

/// An opened channel's rings and signals, as the embedder maps them.
pub struct ChannelRings<R> {
    /// Guest → host ring (the first part of the ring GPADL).
    pub inbound: R,
    /// Host → guest ring.
    pub outbound: R,
    /// Becomes readable when the guest signals the channel; `None`: the device polls.
    pub kick: Option<Doorbell>,
    /// Rung to interrupt the guest for this channel; `None`: the guest polls.
    pub call: Option<Doorbell>,
}

/// Maps an opened channel's rings.
pub type RingMapper<R> =
    Box<dyn FnMut(&OpenChannelInfo) -> Result<ChannelRings<R>, DeviceError> + Send>;

/// What the device needs from its embedder.
pub struct NetvspResources<R> {
    /// Guest RAM (receive/send buffers and GPA-direct pages).
    pub memory: Arc<dyn GuestMemory>,
    pub gpadls: Arc<dyn GpadlSource>,
    pub map_rings: RingMapper<R>,
    /// Offers sub-channels when the guest asks for them (NVSP SUBCHANNEL).
    pub subchannels: Box<dyn ChannelControl + Send>,
}

struct Shared<R: RingMem> {
    core: Mutex<Core<R>>,
    stop: AtomicBool,
    wake: Doorbell,
}

impl<R: RingMem> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, Core<R>> {
        // A panic while holding the lock would be a bug; the state is still the best we have.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The synthetic network device.
pub struct Netvsp<R: RingMem + Send + 'static> {
    desc: DeviceDescription,
    shared: Arc<Shared<R>>,
    map_rings: RingMapper<R>,
    worker: Option<JoinHandle<()>>,
}

impl<R: RingMem + Send + 'static> Netvsp<R> {
    pub fn new(
        cfg: NetvspConfig,
        backend: Box<dyn NetBackend>,
        res: NetvspResources<R>,
    ) -> std::io::Result<Self> {
        let mut desc = DeviceDescription::new(class::NETWORK, cfg.instance);
        desc.max_subchannels = cfg.max_queues.clamp(1, 64) - 1;
        let core = Core::new(cfg, backend, res.memory, res.gpadls, res.subchannels);
        Ok(Netvsp {
            desc,
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                stop: AtomicBool::new(false),
                wake: Doorbell::new()?,
            }),
            map_rings: res.map_rings,
            worker: None,
        })
    }

    /// One round of work: guest rings, backend frames, link state. True when more work is
    /// waiting that no signal will announce (call again soon).
    pub fn poll(&self) -> bool {
        self.shared.lock().poll()
    }

    /// Runs `f` on the device state under its lock.
    pub(crate) fn with_core<T>(&self, f: impl FnOnce(&mut Core<R>) -> T) -> T {
        f(&mut self.shared.lock())
    }

    /// Counters.
    pub fn stats(&self) -> NetvspStats {
        self.shared.lock().stats
    }

    /// The negotiated NVSP version, if any.
    pub fn nvsp_version(&self) -> Option<u32> {
        self.shared.lock().session.version
    }

    /// Free receive sections and outstanding receive packets (for tests and diagnostics).
    pub fn receive_buffer_state(&self) -> Option<(usize, usize)> {
        self.shared
            .lock()
            .rx
            .as_ref()
            .map(|rx| (rx.free_sections(), rx.outstanding_packets()))
    }

    /// Runs [`Self::poll`] on a thread that sleeps on the channels' kick eventfds and the
    /// backend's fd. Stopped by [`Self::stop_worker`] or on drop.
    pub fn spawn_worker(&mut self) -> std::io::Result<()> {
        if self.worker.is_some() {
            return Ok(());
        }
        self.shared.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("netvsp".into())
            .spawn(move || worker(&shared))?;
        self.worker = Some(handle);
        Ok(())
    }

    pub fn stop_worker(&mut self) {
        if let Some(h) = self.worker.take() {
            self.shared.stop.store(true, Ordering::Release);
            let _ = self.shared.wake.ring();
            if h.join().is_err() {
                tracing::error!("netvsp: worker thread panicked");
            }
        }
    }

    fn wake(&self) {
        if self.worker.is_some() {
            let _ = self.shared.wake.ring();
        }
    }
}

impl<R: RingMem + Send + 'static> Drop for Netvsp<R> {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn worker<R: RingMem>(shared: &Shared<R>) {
    while !shared.stop.load(Ordering::Acquire) {
        let (busy, fds, polled) = {
            let mut core = shared.lock();
            let busy = core.poll();
            let mut fds: Vec<RawFd> = vec![shared.wake.as_fd().as_raw_fd()];
            fds.extend(
                core.channels
                    .values()
                    .filter_map(|c| c.kick.as_ref())
                    .map(|k| k.as_fd().as_raw_fd()),
            );
            let backend_fd = core.backend.rx_fd();
            fds.extend(backend_fd);
            // Sleep long only when every source can wake us.
            let polled = backend_fd.is_none() || core.channels.values().any(|c| c.kick.is_none());
            (busy, fds, polled)
        };
        let timeout = if busy {
            Duration::ZERO
        } else if polled {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(100)
        };
        wait_any(&fds, timeout);
        let core = shared.lock();
        let _ = shared.wake.clear();
        for k in core.channels.values().filter_map(|c| c.kick.as_ref()) {
            let _ = k.clear();
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes.
fn wait_any(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the whole call; the fds
    // are owned by doorbells/backends that outlive it (a closed fd only makes poll report POLLNVAL).
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl<R: RingMem + Send + 'static> VmbusDevice for Netvsp<R> {
    fn description(&self) -> DeviceDescription {
        self.desc.clone()
    }

    fn open(
        &mut self,
        channel: OpenChannelInfo,
        _bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        let rings = (self.map_rings)(&channel)?;
        let reader = RingReader::new(rings.inbound).map_err(DeviceError::BadRing)?;
        let writer = RingWriter::new(rings.outbound).map_err(DeviceError::BadRing)?;
        let index = channel.subchannel_index;
        {
            let mut core = self.shared.lock();
            if core.channels.contains_key(&index) {
                return Err(DeviceError::NoResources);
            }
            core.add_channel(
                index,
                Channel::new(channel.relid, reader, writer, rings.kick, rings.call),
            );
        }
        tracing::debug!(relid = channel.relid, index, "netvsp: channel open");
        self.wake();
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        let removed = self.shared.lock().remove_channel(relid);
        tracing::debug!(relid, removed, "netvsp: channel closed");
        self.wake();
    }
}
