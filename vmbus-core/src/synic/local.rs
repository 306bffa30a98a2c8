//! In-process SynIC port pair (tests, embedding): a host end and one guest end per VP, sharing real
//! message and event-flag pages in memory.
//!
//! Host → guest messages go through each VP's message page with full slot semantics (busy slot →
//! bounded host queue, pending flag, delivery on EOM); events through its SIEF page. Guest → host
//! messages go into a bounded FIFO (full ⇒ `HV_STATUS_INSUFFICIENT_BUFFERS`), events into a
//! coalescing set. A guest's EOM is handled synchronously, as a hypervisor handles the MSR write.
//! Interrupts are latches over eventfds, so both ends can also be driven from an epoll loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use super::latch::OwnedLatch;
use super::message::{
    HVMSG_CHANNEL_MESSAGE, HvMessage, MessageError, Payload, PostedMessage, SynicMessage,
};
use super::page::{Delivery, EventFlags, HeapPage, SlotReader, SlotWriter};
use super::queue::VpMessageQueues;
use super::{
    CONNECTION_ID_MASK, GuestPort, HostInbox, HostPort, HvStatus, PortKind, Sint, SynicError,
    check_post_payload,
};

/// Sizes of an in-process pair.
#[derive(Copy, Clone, Debug)]
pub struct LocalConfig {
    /// Number of VPs (guest ends), at least 1.
    pub vps: u32,
    /// Host → guest messages queued per (VP, SINT) behind a busy slot.
    pub host_queue_depth: usize,
    /// Guest → host messages the host holds before posts fail with 0x13.
    pub guest_queue_depth: usize,
    /// Polls of the interrupt latch before a waiter sleeps.
    pub spins: u32,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            vps: 1,
            host_queue_depth: 256,
            guest_queue_depth: 64,
            spins: 0,
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Vp {
    simp: HeapPage,
    sief: HeapPage,
    queues: Mutex<VpMessageQueues>,
    irq: OwnedLatch,
}

#[derive(Default)]
struct Inbox {
    messages: VecDeque<PostedMessage>,
    events: Vec<u32>,
    pending_events: HashSet<u32>,
}

struct Inner {
    cfg: LocalConfig,
    vps: Vec<Vp>,
    ports: RwLock<HashMap<u32, PortKind>>,
    inbox: Mutex<Inbox>,
    host_irq: OwnedLatch,
}

impl Inner {
    fn vp(&self, vp: u32) -> Result<&Vp, SynicError> {
        self.vps.get(vp as usize).ok_or(SynicError::InvalidVp {
            vp,
            vps: self.cfg.vps,
        })
    }

    fn port(&self, connection_id: u32) -> Option<PortKind> {
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(connection_id & CONNECTION_ID_MASK))
            .copied()
    }
}

/// Creates a host end and `cfg.vps` guest ends (index = VP).
pub fn pair(cfg: LocalConfig) -> Result<(LocalHost, Vec<LocalGuest>), SynicError> {
    if cfg.vps == 0 {
        return Err(SynicError::InvalidVp { vp: 0, vps: 0 });
    }
    let vps = (0..cfg.vps)
        .map(|vp| {
            Ok(Vp {
                simp: HeapPage::new(),
                sief: HeapPage::new(),
                queues: Mutex::new(VpMessageQueues::new(vp, cfg.host_queue_depth)),
                irq: OwnedLatch::new()?,
            })
        })
        .collect::<Result<Vec<_>, SynicError>>()?;
    let inner = Arc::new(Inner {
        cfg,
        vps,
        ports: RwLock::new(HashMap::new()),
        inbox: Mutex::new(Inbox::default()),
        host_irq: OwnedLatch::new()?,
    });
    let guests = (0..cfg.vps)
        .map(|vp| LocalGuest {
            inner: inner.clone(),
            vp,
        })
        .collect();
    Ok((LocalHost { inner }, guests))
}

/// The host end of an in-process pair.
#[derive(Clone)]
pub struct LocalHost {
    inner: Arc<Inner>,
}

impl LocalHost {
    /// VP `vp`'s message page (tests inspect or corrupt it as a hostile guest would).
    pub fn message_page(&self, vp: u32) -> Result<&HeapPage, SynicError> {
        Ok(&self.inner.vp(vp)?.simp)
    }

    /// VP `vp`'s event-flag page.
    pub fn event_page(&self, vp: u32) -> Result<&HeapPage, SynicError> {
        Ok(&self.inner.vp(vp)?.sief)
    }

    /// Messages waiting behind busy slots for (vp, sint).
    pub fn queued(&self, vp: u32, sint: Sint) -> Result<usize, SynicError> {
        Ok(lock(&self.inner.vp(vp)?.queues).queued(sint))
    }

    /// The eventfd rung when the host is armed and the guest posts or signals (for epoll loops; the
    /// latch semantics still apply: call [`HostInbox::wait`] or drain after it fires).
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.inner.host_irq.bell().as_fd()
    }
}

impl HostPort for LocalHost {
    fn post_to_guest(&self, vp: u32, sint: Sint, payload: &[u8]) -> Result<Delivery, SynicError> {
        let v = self.inner.vp(vp)?;
        let msg = HvMessage::new(HVMSG_CHANNEL_MESSAGE, payload)
            .ok_or(SynicError::PayloadTooLarge(payload.len()))?;
        let outcome = lock(&v.queues).post(&SlotWriter::new(&v.simp), sint, msg)?;
        if outcome.interrupt {
            v.irq.get().raise()?;
        }
        Ok(outcome.delivery)
    }

    fn signal_guest(&self, vp: u32, sint: Sint, flag: u32) -> Result<bool, SynicError> {
        let v = self.inner.vp(vp)?;
        let newly = EventFlags::new(&v.sief).set(sint, flag)?;
        if newly {
            v.irq.get().raise()?;
        }
        Ok(newly)
    }

    fn register_port(&self, connection_id: u32, kind: PortKind) -> Result<(), SynicError> {
        if connection_id == 0 || connection_id > CONNECTION_ID_MASK {
            return Err(SynicError::InvalidConnectionId(connection_id));
        }
        let mut ports = self
            .inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if ports.contains_key(&connection_id) {
            return Err(SynicError::PortExists(connection_id));
        }
        ports.insert(connection_id, kind);
        Ok(())
    }

    fn unregister_port(&self, connection_id: u32) -> bool {
        self.inner
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&connection_id)
            .is_some()
    }
}

impl HostInbox for LocalHost {
    fn recv_message(&self) -> Result<Option<PostedMessage>, SynicError> {
        Ok(lock(&self.inner.inbox).messages.pop_front())
    }

    fn take_events(&self, f: &mut dyn FnMut(u32)) -> Result<usize, SynicError> {
        let events = {
            let mut inbox = lock(&self.inner.inbox);
            inbox.pending_events.clear();
            core::mem::take(&mut inbox.events)
        };
        events.iter().for_each(|&id| f(id));
        Ok(events.len())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError> {
        Ok(self
            .inner
            .host_irq
            .get()
            .wait(self.inner.cfg.spins, timeout)?)
    }
}

/// One VP of the guest end of an in-process pair.
#[derive(Clone)]
pub struct LocalGuest {
    inner: Arc<Inner>,
    vp: u32,
}

impl LocalGuest {
    fn me(&self) -> &Vp {
        // The index was < vps when this end was made and the vector never shrinks.
        &self.inner.vps[self.vp as usize]
    }

    /// The eventfd rung when this VP sleeps and a SINT interrupt is raised.
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.me().irq.bell().as_fd()
    }

    /// The guest's EOM write: the host re-offers queued messages at once.
    fn eom(&self) {
        let v = self.me();
        let delivered = lock(&v.queues).on_eom(&SlotWriter::new(&v.simp));
        if delivered > 0
            && let Err(e) = v.irq.get().raise()
        {
            tracing::warn!(vp = self.vp, error = %e, "raising SINT after EOM failed");
        }
    }
}

impl GuestPort for LocalGuest {
    fn vp(&self) -> u32 {
        self.vp
    }

    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
        check_post_payload(payload)?;
        let connection_id = connection_id & CONNECTION_ID_MASK;
        if self.inner.port(connection_id) != Some(PortKind::Message) {
            return Err(HvStatus::InvalidConnectionId);
        }
        let payload = Payload::new(payload).ok_or(HvStatus::InvalidParameter)?;
        {
            let mut inbox = lock(&self.inner.inbox);
            if inbox.messages.len() >= self.inner.cfg.guest_queue_depth {
                return Err(HvStatus::InsufficientBuffers);
            }
            inbox.messages.push_back(PostedMessage {
                connection_id,
                payload,
            });
        }
        self.inner
            .host_irq
            .get()
            .raise()
            .map_err(|_| HvStatus::InvalidSynicState)
    }

    fn signal_event(&self, connection_id: u32, _flag: u16) -> Result<(), HvStatus> {
        let connection_id = connection_id & CONNECTION_ID_MASK;
        if self.inner.port(connection_id) != Some(PortKind::Event) {
            return Err(HvStatus::InvalidConnectionId);
        }
        let newly = {
            let mut inbox = lock(&self.inner.inbox);
            let newly = inbox.pending_events.insert(connection_id);
            if newly {
                inbox.events.push(connection_id);
            }
            newly
        };
        if newly {
            self.inner
                .host_irq
                .get()
                .raise()
                .map_err(|_| HvStatus::InvalidSynicState)?;
        }
        Ok(())
    }

    fn next_message(&self, sint: Sint) -> Option<Result<SynicMessage, MessageError>> {
        let taken = SlotReader::new(&self.me().simp).take(sint)?;
        if taken.eom_needed {
            self.eom();
        }
        Some(taken.message)
    }

    fn take_events(&self, sint: Sint, f: &mut dyn FnMut(u32)) -> usize {
        EventFlags::new(&self.me().sief).take_all(sint, f)
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError> {
        Ok(self.me().irq.get().wait(self.inner.cfg.spins, timeout)?)
    }
}
