//! VMBus in a partition: vmbus-core's host [`Server`] driven through the partition's SynIC, and the
//! devices (VSPs) behind its channels.
//!
//! - Guest → host messages: `HvPostMessage` to connection id 1 or 4 reaches the bus's
//!   [`SynicHandler`] on the vCPU thread, which queues it (bounded: a full queue answers
//!   `HV_STATUS_INSUFFICIENT_BUFFERS`, the guest retries) and wakes the bus thread.
//! - The bus thread: message → [`Server::handle_message`] → [`Server::poll_action`]:
//!   `Send` goes to [`HostPort::post_to_guest`] (held and retried while the (VP, SINT) queue is
//!   full), `Open` maps the ring GPADL from guest RAM and hands the channel to its device
//!   ([`BusDevice`]), `Close` / `Reset` close it in the device.
//! - Guest → device signals: a fast `HvSignalEvent` on an open channel's connection id completes
//!   in the kernel: the hypercall page writes the id to [`crate::hyperv::FAST_SIGNAL_PORT`], where
//!   a KVM ioeventfd per channel (datamatch = connection id) rings the channel's *kick* eventfd
//!   without a vCPU exit. Other forms (slow, non-zero flag) exit and ring it from the vCPU thread.
//! - Device → guest interrupts complete without the VMM while the guest's SynIC allows it (SCONTROL
//!   and SIEFP enabled, SINT 2 unmasked and not polling, protocol ≥ WIN8): the bus gives the
//!   device the GPA and bit of the channel's event flag ([`BusDevice::signal_target`]; a hook on
//!   its call `Doorbell` sets the flag with an atomic OR — [`vmbus_core::oop::irqflag`]) and makes
//!   the *call* eventfd a KVM irqfd on an MSI route to the target VP's SINT vector. Otherwise (and
//!   for devices that cannot) the bus thread polls *call* and turns each ring into
//!   [`HostPort::signal_guest`] (SINT 2, event flag = relid). SynIC register writes, retargets
//!   and opens re-decide; a switch loses no interrupt: to the bus, the irqfd goes first, then the
//!   device's target, and the bus re-checks *call*; to the kernel, the target goes first, the bus
//!   drains *call* itself, registers the irqfd, then sets the flag and raises the SINT once.
//!   The switch follows a register write by the bus thread's next round (the vCPU thread only
//!   wakes it), so a device may still set a flag in the old page / raise the old vector for that
//!   long; guests retarget or close channels before they move or disable the SIEFP or a SINT.
//!
//! Devices run in process ([`device::Hosted`] for any [`vmbus_core::oop::HostedDevice`],
//! [`device::NetvspDevice`]) or in a VSP process ([`device::OutOfProcess`], through
//! [`vmbus_core::oop::Supervisor`]).

pub mod device;
pub mod netpeer;
mod server;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use ringbuf::signal::Doorbell;
use vmbus_core::gpadl::RamRanges;
use vmbus_core::host::{Server, ServerConfig};
use vmbus_core::wire::{MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4};

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::synic::{HostPort, PortKind, PortStatus, Synic, SynicError, SynicHandler};
pub use device::{BusDevice, ChannelSetup};

/// Guest messages the bus queues before `HvPostMessage` answers "insufficient buffers".
pub const MESSAGE_QUEUE_DEPTH: usize = 64;

/// VMBus errors.
#[derive(Debug, thiserror::Error)]
pub enum VmbusError {
    #[error("SynIC: {0}")]
    Synic(#[from] SynicError),
    #[error("offering device: {0}")]
    Host(#[from] vmbus_core::host::HostError),
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    #[error("the bus is already running")]
    Running,
}

/// Counters of the bus (all since start).
#[derive(Debug, Default)]
pub struct BusStats {
    /// Channel messages the guest posted.
    pub messages_in: AtomicU64,
    /// Channel messages delivered to the guest.
    pub messages_out: AtomicU64,
    /// Guest messages the server refused (logged).
    pub refused: AtomicU64,
    /// Posts answered "insufficient buffers" because the queue was full.
    pub busy: AtomicU64,
    /// `HvSignalEvent`s forwarded to a channel's kick eventfd.
    pub kicks: AtomicU64,
    /// Device interrupts forwarded to the guest by the bus thread.
    pub interrupts: AtomicU64,
    /// Switches of a channel's device interrupts to the in-kernel path (irqfd).
    pub irqfds: AtomicU64,
    /// Channels opened / closed in devices.
    pub opens: AtomicU64,
    pub closes: AtomicU64,
    /// Opens the device refused.
    pub open_failures: AtomicU64,
}

/// A snapshot of [`BusStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusCounters {
    pub messages_in: u64,
    pub messages_out: u64,
    pub refused: u64,
    pub busy: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub irqfds: u64,
    pub opens: u64,
    pub closes: u64,
    pub open_failures: u64,
}

impl BusStats {
    pub fn snapshot(&self) -> BusCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BusCounters {
            messages_in: l(&self.messages_in),
            messages_out: l(&self.messages_out),
            refused: l(&self.refused),
            busy: l(&self.busy),
            kicks: l(&self.kicks),
            interrupts: l(&self.interrupts),
            irqfds: l(&self.irqfds),
            opens: l(&self.opens),
            closes: l(&self.closes),
            open_failures: l(&self.open_failures),
        }
    }
}

/// Guest→host SynIC traffic of the bus, taken on the vCPU threads.
#[derive(Debug)]
pub(crate) struct BusHandler {
    messages: Mutex<VecDeque<(u32, Vec<u8>)>>,
    /// Kick eventfd of every open channel, by event connection id.
    kicks: RwLock<HashMap<u32, Doorbell>>,
    /// Wakes the bus thread.
    wake: Doorbell,
    /// A VP changed its SynIC registers: the bus re-decides the interrupt paths.
    synic_changed: AtomicBool,
    stats: Arc<BusStats>,
}

impl BusHandler {
    pub(crate) fn take_message(&self) -> Option<(u32, Vec<u8>)> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    pub(crate) fn set_kick(&self, connection_id: u32, kick: Option<Doorbell>) {
        let mut k = self.kicks.write().unwrap_or_else(PoisonError::into_inner);
        match kick {
            Some(d) => k.insert(connection_id, d),
            None => k.remove(&connection_id),
        };
    }
}

impl SynicHandler for BusHandler {
    fn synic_changed(&self, _vp: u32) {
        self.synic_changed.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.ring() {
            tracing::warn!("vmbus: waking the bus thread: {e}");
        }
    }

    fn post_message(
        &self,
        _synic: &Synic,
        _vp: u32,
        connection_id: u32,
        _message_type: u32,
        payload: &[u8],
    ) -> Result<(), PortStatus> {
        {
            let mut q = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
            if q.len() >= MESSAGE_QUEUE_DEPTH {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                return Err(PortStatus::InsufficientBuffers);
            }
            q.push_back((connection_id, payload.to_vec()));
        }
        self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.wake.ring() {
            tracing::warn!("vmbus: waking the bus thread: {e}");
        }
        Ok(())
    }

    fn signal_event(
        &self,
        _synic: &Synic,
        _vp: u32,
        connection_id: u32,
        _flag: u16,
    ) -> Result<(), PortStatus> {
        let kicks = self.kicks.read().unwrap_or_else(PoisonError::into_inner);
        // A port whose channel is closing has no kick any more: the signal is dropped, as Hyper-V
        // drops signals on a closed channel.
        if let Some(k) = kicks.get(&connection_id) {
            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = k.ring() {
                tracing::warn!(connection_id, "vmbus: kick eventfd: {e}");
            }
        }
        Ok(())
    }
}

/// An offered device, as the bus remembers it.
struct Slot {
    relid: u32,
    name: String,
    device: Box<dyn BusDevice>,
}

/// The VMBus of one partition: configure devices, then [`VmbusHost::start`] it.
pub struct VmbusHost {
    synic: Arc<Synic>,
    ram: Arc<GuestRam>,
    server: Arc<Mutex<Server>>,
    handler: Arc<BusHandler>,
    slots: Vec<Slot>,
    stats: Arc<BusStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VmbusHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmbusHost")
            .field(
                "devices",
                &self.slots.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

/// Guest RAM as the server's GPADL checks see it (`[first_pfn, end_pfn)` ranges).
fn ram_ranges(ram: &GuestRam) -> RamRanges {
    RamRanges(
        ram.ranges()
            .iter()
            .map(|&(gpa, len)| (gpa / PAGE_SIZE, (gpa + len) / PAGE_SIZE))
            .collect(),
    )
}

impl VmbusHost {
    /// A bus on `synic` over `ram` with `vp_count` VPs: registers the message ports 1 and 4 and
    /// takes over the SynIC's guest→host traffic.
    pub fn new(
        synic: Arc<Synic>,
        ram: Arc<GuestRam>,
        vp_count: u32,
    ) -> Result<VmbusHost, VmbusError> {
        let stats = Arc::new(BusStats::default());
        let handler = Arc::new(BusHandler {
            messages: Mutex::new(VecDeque::new()),
            kicks: RwLock::new(HashMap::new()),
            wake: Doorbell::new()?,
            synic_changed: AtomicBool::new(false),
            stats: stats.clone(),
        });
        synic.register_port(MESSAGE_CONNECTION_ID, PortKind::Message)?;
        synic.register_port(MESSAGE_CONNECTION_ID_4, PortKind::Message)?;
        synic.set_handler(handler.clone());
        let server = Server::new(
            ServerConfig {
                vp_count,
                ..ServerConfig::default()
            },
            ram_ranges(&ram),
        );
        Ok(VmbusHost {
            synic,
            ram,
            server: Arc::new(Mutex::new(server)),
            handler,
            slots: Vec::new(),
            stats,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        })
    }

    /// The server (devices that need its GPADL table, e.g. netvsp's buffers, read it through this).
    pub fn server(&self) -> &Arc<Mutex<Server>> {
        &self.server
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Offers `device` (named `name` in logs); returns its relid. Devices must be added before
    /// [`Self::start`].
    pub fn add_device(
        &mut self,
        name: &str,
        device: Box<dyn BusDevice>,
    ) -> Result<u32, VmbusError> {
        if self.thread.is_some() {
            return Err(VmbusError::Running);
        }
        let relid = lock(&self.server).add_device(device.description())?;
        tracing::info!(relid, name, "vmbus: device offered");
        self.slots.push(Slot {
            relid,
            name: name.to_string(),
            device,
        });
        Ok(relid)
    }

    /// Hot-removes the device whose primary channel is `relid`: an open channel is closed in its
    /// device first, then the guest gets RESCINDCHANNELOFFER. Works while the bus runs.
    pub fn rescind(&self, relid: u32) {
        lock(&self.server).rescind(relid);
        // The bus thread runs the resulting actions (close, message) on its next round.
        if let Err(e) = self.handler.wake.ring() {
            tracing::warn!("vmbus: waking the bus thread: {e}");
        }
    }

    /// Counters.
    pub fn stats(&self) -> BusCounters {
        self.stats.snapshot()
    }

    /// Starts the bus thread.
    pub fn start(&mut self) -> Result<(), VmbusError> {
        if self.thread.is_some() {
            return Err(VmbusError::Running);
        }
        let mut bus = server::BusLoop::new(
            self.synic.clone(),
            self.ram.clone(),
            self.server.clone(),
            self.handler.clone(),
            std::mem::take(&mut self.slots),
            self.stats.clone(),
            self.stop.clone(),
        );
        self.thread = Some(
            std::thread::Builder::new()
                .name("vmbus".into())
                .spawn(move || bus.run())?,
        );
        Ok(())
    }

    /// Stops the bus thread: every open channel is closed in its device and the devices are
    /// dropped (their threads joined).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handler.wake.ring();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("vmbus: the bus thread panicked");
        }
    }
}

impl Drop for VmbusHost {
    fn drop(&mut self) {
        self.stop();
        self.synic.clear_handler();
        self.synic.unregister_port(MESSAGE_CONNECTION_ID);
        self.synic.unregister_port(MESSAGE_CONNECTION_ID_4);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
