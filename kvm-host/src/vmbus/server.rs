//! The bus thread: guest messages through the server, server actions to the SynIC and the devices,
//! device interrupts to the guest.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringbuf::signal::Doorbell;
use vmbus_core::device::OpenChannelInfo;
use vmbus_core::host::{HostAction, Server};
use vmbus_core::wire::{MessageBuf, MessageType};

use super::device::ChannelSetup;
use super::{BusHandler, BusStats, Slot, lock};
use crate::memory::GuestRam;
use crate::synic::{EventTarget, HostPort, Sint, Synic, SynicError};

/// How often devices get [`super::BusDevice::service`].
const SERVICE_INTERVAL: Duration = Duration::from_millis(100);
/// Retry interval for messages held back by a full SynIC queue.
const RETRY_INTERVAL: Duration = Duration::from_millis(2);

/// An open channel as the bus thread tracks it.
struct OpenChannel {
    slot: usize,
    connection_id: u32,
    target_vp: u32,
    /// The bus's end of the device's call eventfd.
    call: Doorbell,
    /// Guest signals reach the kick eventfd in the kernel (ioeventfd).
    fast: bool,
    /// Device interrupts reach the guest in the kernel (irqfd handle, the flag target, the VP).
    irq: Option<(u32, EventTarget, u32)>,
}

pub(super) struct BusLoop {
    synic: Arc<Synic>,
    ram: Arc<GuestRam>,
    server: Arc<Mutex<Server>>,
    handler: Arc<BusHandler>,
    slots: Vec<Slot>,
    stats: Arc<BusStats>,
    stop: Arc<AtomicBool>,
    /// Open channels by relid.
    open: HashMap<u32, OpenChannel>,
    /// Messages for the guest the SynIC queue could not take yet, in order.
    backlog: VecDeque<(u32, u8, MessageBuf)>,
}

impl BusLoop {
    pub(super) fn new(
        synic: Arc<Synic>,
        ram: Arc<GuestRam>,
        server: Arc<Mutex<Server>>,
        handler: Arc<BusHandler>,
        slots: Vec<Slot>,
        stats: Arc<BusStats>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        BusLoop {
            synic,
            ram,
            server,
            handler,
            slots,
            stats,
            stop,
            open: HashMap::new(),
            backlog: VecDeque::new(),
        }
    }

    pub(super) fn run(&mut self) {
        let mut serviced = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.backlog.is_empty() {
                SERVICE_INTERVAL
            } else {
                RETRY_INTERVAL
            };
            self.wait(timeout);
            let _ = self.handler.wake.clear();
            if self.handler.synic_changed.swap(false, Ordering::SeqCst) {
                self.update_irq_paths();
            }
            self.forward_interrupts();
            self.handle_messages();
            self.deliver();
            if serviced.elapsed() >= SERVICE_INTERVAL {
                serviced = Instant::now();
                for s in &mut self.slots {
                    s.device.service();
                }
            }
        }
        let relids: Vec<u32> = self.open.keys().copied().collect();
        for relid in relids {
            self.close(relid);
        }
        // Dropping the devices joins their threads.
        self.slots.clear();
    }

    /// Sleeps until the guest posts, a device calls, or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.handler.wake.as_fd())
            .chain(
                self.open
                    .values()
                    .filter(|c| c.irq.is_none())
                    .map(|c| c.call.as_fd()),
            )
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call; every fd is
        // owned by a doorbell that outlives it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Every rung call eventfd becomes the channel's event flag + SINT 2 interrupt on its VP.
    fn forward_interrupts(&self) {
        for (&relid, ch) in &self.open {
            if ch.irq.is_some() || !matches!(ch.call.clear(), Ok(true)) {
                continue;
            }
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.synic.signal_guest(ch.target_vp, Sint::VMBUS, relid) {
                tracing::debug!(relid, "vmbus: interrupt for the guest lost: {e}");
            }
        }
    }

    fn handle_messages(&mut self) {
        while let Some((connection_id, payload)) = self.handler.take_message() {
            if let Err(e) = lock(&self.server).handle_message(connection_id, &payload) {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(connection_id, "vmbus: guest message refused: {e}");
            } else {
                self.forward_gpadls(&payload);
            }
            self.run_actions();
        }
        self.run_actions();
    }

    /// GPADL messages the server accepted reach the devices before the guest hears the answer
    /// (GPADL_CREATED / GPADL_TORNDOWN wait in the backlog): a completed GPADL goes to the device
    /// whose channel it names, a teardown to every device.
    fn forward_gpadls(&mut self, payload: &[u8]) {
        let word = |at: usize| {
            payload
                .get(at..at.saturating_add(4))
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let (Some(kind), Some(handle)) = (word(0), word(12)) else {
            return;
        };
        if kind == MessageType::GpadlTeardown as u32 {
            for s in &mut self.slots {
                s.device.gpadl_removed(handle);
            }
            return;
        }
        if kind != MessageType::GpadlHeader as u32 && kind != MessageType::GpadlBody as u32 {
            return;
        }
        let (gpadl, owner) = {
            let server = lock(&self.server);
            let Some(g) = server.gpadl(handle).cloned() else {
                return; // Bodies still to come.
            };
            let owner = self.slots.iter().position(|s| {
                s.relid == g.relid || server.device_channels(s.relid).any(|r| r == g.relid)
            });
            (g, owner)
        };
        if let Some(s) = owner.and_then(|i| self.slots.get_mut(i)) {
            s.device.gpadl_created(&gpadl);
        }
    }

    /// Runs the server's actions; device calls happen without the server lock (netvsp's worker
    /// reads GPADLs from the server while holding its own lock).
    fn run_actions(&mut self) {
        loop {
            let Some(action) = lock(&self.server).poll_action() else {
                return;
            };
            match action {
                HostAction::Send { vp, sint, msg } => self.backlog.push_back((vp, sint, msg)),
                HostAction::Open(info) => {
                    let relid = info.relid;
                    let ok = self.open_channel(info);
                    if let Err(e) = lock(&self.server).complete_open(relid, ok) {
                        tracing::info!(relid, "vmbus: open completed with: {e}");
                    }
                }
                HostAction::Close { relid } => self.close(relid),
                HostAction::Retarget { relid, target_vp } => {
                    if let Some(ch) = self.open.get_mut(&relid) {
                        ch.target_vp = target_vp;
                    }
                    self.update_irq_path(relid);
                }
                HostAction::Reset => {
                    for s in &mut self.slots {
                        s.device.bus_reset();
                    }
                    let relids: Vec<u32> = self.open.keys().copied().collect();
                    for relid in relids {
                        self.close(relid);
                    }
                    self.backlog.clear();
                    self.synic.clear_queues();
                }
            }
        }
    }

    fn open_channel(&mut self, info: OpenChannelInfo) -> bool {
        let relid = info.relid;
        let Some(slot) = self.slots.iter().position(|s| s.relid == relid) else {
            tracing::warn!(relid, "vmbus: open of a channel without a device");
            return false;
        };
        if self.open.contains_key(&relid) {
            return false;
        }
        let doorbells = Doorbell::new().and_then(|kick| {
            let call = Doorbell::new()?;
            Ok((kick.try_clone()?, kick, call.try_clone()?, call))
        });
        let (kick_bus, kick, call_bus, call) = match doorbells {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(relid, "vmbus: eventfds for channel: {e}");
                return false;
            }
        };
        let connection_id = info.connection_id;
        let target_vp = info.target_vp;
        let s = &mut self.slots[slot];
        let t = Instant::now();
        let setup = ChannelSetup {
            info,
            ram: &self.ram,
            kick,
            call,
        };
        if let Err(e) = s.device.open(setup) {
            self.stats.open_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(relid, device = %s.name, "vmbus: device refused the channel: {e}");
            return false;
        }
        if let Err(e) = self
            .synic
            .register_port(connection_id, crate::synic::PortKind::Event)
        {
            tracing::warn!(relid, connection_id, "vmbus: event port: {e}");
            s.device.close(relid);
            return false;
        }
        let fast = self.synic.attach_fast_signal(connection_id, &kick_bus);
        self.handler.set_kick(connection_id, Some(kick_bus));
        self.open.insert(
            relid,
            OpenChannel {
                slot,
                connection_id,
                target_vp,
                call: call_bus,
                fast,
                irq: None,
            },
        );
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(relid, device = %s.name, hosting = %s.device.hosting(), fast, elapsed = ?t.elapsed(), "vmbus: channel open");
        self.update_irq_path(relid);
        true
    }

    fn close(&mut self, relid: u32) {
        if let Some((handle, ..)) = self.open.get_mut(&relid).and_then(|c| c.irq.take()) {
            self.synic.detach_irq(handle);
        }
        let Some(ch) = self.open.remove(&relid) else {
            return;
        };
        // The in-kernel path goes first: later guest signals exit to the VMM, which drops them
        // (no kick) and, once the port is gone, answers HV_STATUS_INVALID_CONNECTION_ID.
        if ch.fast {
            self.synic.detach_fast_signal(ch.connection_id);
        }
        self.handler.set_kick(ch.connection_id, None);
        self.synic.unregister_port(ch.connection_id);
        if let Some(s) = self.slots.get_mut(ch.slot) {
            s.device.close(relid);
        }
        self.stats.closes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(relid, "vmbus: channel closed");
    }

    /// Re-decides every open channel's interrupt path (a VP changed its SynIC registers).
    fn update_irq_paths(&mut self) {
        let relids: Vec<u32> = self.open.keys().copied().collect();
        for relid in relids {
            self.update_irq_path(relid);
        }
    }

    /// Moves `relid`'s device interrupts to the kernel (irqfd, the device sets the event flag)
    /// when the guest's SynIC allows it, back to the bus thread when it no longer does.
    fn update_irq_path(&mut self, relid: u32) {
        // Before WIN8 the guest finds signalled channels in the interrupt page, not the SIEF page.
        let win8 = lock(&self.server)
            .version()
            .is_some_and(|v| v as u32 >= vmbus_core::wire::Version::Win8 as u32);
        let Some(ch) = self.open.get_mut(&relid) else {
            return;
        };
        let vp = ch.target_vp;
        let want = win8
            .then(|| self.synic.event_target(vp, Sint::VMBUS, relid))
            .flatten();
        if ch.irq.is_some_and(|(_, t, v)| Some(t) == want && v == vp) {
            return;
        }
        let Some(s) = self.slots.get_mut(ch.slot) else {
            return;
        };
        if let Some((handle, ..)) = ch.irq.take() {
            // To the bus: the kernel stops consuming *call* first, then the device stops setting
            // the flag; rings in between reach the bus thread, which re-checks *call* next round.
            self.synic.detach_irq(handle);
            s.device.signal_target(relid, None);
            let _ = self.handler.wake.ring();
        }
        let Some(t) = want else {
            return;
        };
        if !s.device.signal_target(relid, Some((t.word_gpa, t.bit))) {
            return;
        }
        // Rings from before the device had its target carry no flag: deliver them here.
        if matches!(ch.call.clear(), Ok(true)) {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            let _ = self.synic.signal_guest(vp, Sint::VMBUS, relid);
        }
        let Some(handle) = self.synic.attach_irq(&ch.call, vp, t.vector) else {
            s.device.signal_target(relid, None);
            return;
        };
        ch.irq = Some((handle, t, vp));
        self.stats.irqfds.fetch_add(1, Ordering::Relaxed);
        // A device that read "no target" just before it was set may ring now, into the irqfd,
        // without the flag: set it and raise the SINT once (the ring's data is already visible).
        if !matches!(self.synic.signal_guest(vp, Sint::VMBUS, relid), Ok(true)) {
            self.synic.raise_sint(vp, Sint::VMBUS);
        }
        tracing::debug!(
            relid,
            vp,
            handle,
            "vmbus: device interrupts through an irqfd"
        );
    }

    /// Posts held messages in order; stops at the first the SynIC queue cannot take.
    fn deliver(&mut self) {
        while let Some((vp, sint, msg)) = self.backlog.front() {
            let Some(s) = Sint::new(*sint) else {
                tracing::error!(sint, "vmbus: server chose an invalid SINT");
                self.backlog.pop_front();
                continue;
            };
            match self.synic.post_to_guest(*vp, s, msg) {
                Ok(_) => {
                    self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                    self.backlog.pop_front();
                }
                Err(SynicError::QueueFull { .. }) => return,
                Err(e) => {
                    tracing::warn!(vp, "vmbus: message for the guest dropped: {e}");
                    self.backlog.pop_front();
                }
            }
        }
    }
}
