//! The synthetic interrupt controller, in userspace (vmbus-protocol.md §6.1–6.4).
//!
//! Per VP: SCONTROL, SIMP, SIEFP, SINT0–15 and a bounded FIFO of host→guest messages per SINT.
//! Messages go into the guest's message page slot with the pending / EOM protocol, events into its
//! event-flag page — both through vmbus-core's page code ([`SlotWriter`], [`EventFlags`]) over the
//! guest RAM page itself ([`GuestRam::page_words`]). The SINT vector is raised on the VP's local
//! APIC through an [`InterruptSink`] (KVM_SIGNAL_MSI in a partition).
//!
//! The host side speaks vmbus-core's SynIC port traits, so the VMBus server drives a KVM partition
//! exactly as it drives the in-process and cross-process ports:
//! - [`HostPort`]: `post_to_guest`, `signal_guest`, `register_port`, `unregister_port`;
//! - [`HostInbox`]: what the guest posted / signalled on registered ports (`recv_message`,
//!   `take_events`, `wait`) — used when no [`SynicHandler`] is installed;
//! - [`SynicHandler`]: alternatively, a synchronous hook called on the vCPU thread of the hypercall.
//!
//! Guest→host traffic is validated by the hypercall layer first (control word, GPA, sizes); here
//! it is checked against the registered ports (unknown ⇒ `HV_STATUS_INVALID_CONNECTION_ID`).
//! Everything may be called from any thread; each VP's state sits behind its own lock.

mod inbox;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use vmbus_core::synic::{
    CONNECTION_ID_MASK, EventFlags, HVMSG_CHANNEL_MESSAGE, HvMessage, SlotWriter,
};
pub use vmbus_core::synic::{
    Delivery, HostInbox, HostPort, HvStatus as PortStatus, PortKind, PostedMessage, Sint,
    SynicError,
};

use crate::hyperv::{MsrError, msr};
use crate::memory::{GuestRam, PAGE_SIZE};
use inbox::Inbox;

/// Synthetic interrupt sources per VP.
pub const SINT_COUNT: usize = 16;
/// SINT register: masked (reset value).
pub const SINT_MASKED: u64 = 1 << 16;
/// SINT register: auto-EOI requested (ignored: we advertise "deprecate auto-EOI").
pub const SINT_AUTO_EOI: u64 = 1 << 17;
/// SINT register: polling (no interrupt is raised).
pub const SINT_POLLING: u64 = 1 << 18;
const SINT_VALID_BITS: u64 = 0xFF | SINT_MASKED | SINT_AUTO_EOI | SINT_POLLING;
/// SynIC version reported by SVERSION.
pub const SYNIC_VERSION: u64 = 1;
/// Default bound of each (VP, SINT) host→guest queue.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;
/// Default bound of the guest→host inbox.
pub const DEFAULT_INBOX_DEPTH: usize = 64;

/// Raises a fixed, edge-triggered interrupt `vector` on VP `vp`'s local APIC.
pub trait InterruptSink: Send + Sync {
    fn raise(&self, vp: u32, vector: u8);
}

/// A synchronous hook for guest→host SynIC traffic on registered ports (instead of the inbox).
///
/// Called on the vCPU thread of the VP that made the hypercall, after the hypercall was validated
/// and the connection id found registered with the right [`PortKind`]. No SynIC lock is held: the
/// handler may call back into `synic` (e.g. [`HostPort::post_to_guest`] for a reply).
pub trait SynicHandler: Send + Sync {
    /// `HvPostMessage` from VP `vp` to message port `connection_id`. Return
    /// `Err(PortStatus::InsufficientBuffers)` when the host cannot take more (the guest retries).
    fn post_message(
        &self,
        synic: &Synic,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), PortStatus>;

    /// VP `vp` changed SCONTROL, SIEFP or a SINT register (called on its vCPU thread, after the
    /// change took effect).
    fn synic_changed(&self, _vp: u32) {}

    /// `HvSignalEvent` from VP `vp` on event port `connection_id` with flag number `flag`.
    fn signal_event(
        &self,
        synic: &Synic,
        vp: u32,
        connection_id: u32,
        flag: u16,
    ) -> Result<(), PortStatus>;
}

/// Lets a guest's fast `HvSignalEvent` on a connection id reach an eventfd without a VMM exit
/// (a KVM ioeventfd on [`crate::hyperv::FAST_SIGNAL_PORT`] with datamatch = connection id).
pub trait SignalAccel: Send + Sync {
    /// From now on, fast signals on `connection_id` ring `kick` in the kernel.
    fn attach(&self, connection_id: u32, kick: &ringbuf::signal::Doorbell) -> std::io::Result<()>;
    /// Undo [`Self::attach`]; later signals on `connection_id` exit to the VMM again.
    fn detach(&self, connection_id: u32);
    /// From now on, writing `call` raises `vector` on VP `vp` in the kernel (an irqfd on an MSI
    /// route); returns the route's handle for [`Self::detach_irq`].
    fn attach_irq(
        &self,
        _call: &ringbuf::signal::Doorbell,
        _vp: u32,
        _vector: u8,
    ) -> std::io::Result<u32> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Undo [`Self::attach_irq`]; when this returns the kernel no longer consumes `call`.
    fn detach_irq(&self, _handle: u32) {}
}

/// Where a device may set a channel's event flag itself: the guest's SynIC state allows it
/// (SCONTROL and SIEFP enabled, the SINT unmasked and not polling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTarget {
    /// GPA of the 32-bit word holding the flag.
    pub word_gpa: u64,
    /// The flag's bit in that word.
    pub bit: u32,
    /// The SINT's vector.
    pub vector: u8,
}

#[derive(Debug)]
struct VpSynic {
    scontrol: u64,
    simp: u64,
    siefp: u64,
    sint: [u64; SINT_COUNT],
    queues: [VecDeque<HvMessage>; SINT_COUNT],
}

impl VpSynic {
    fn new() -> Self {
        VpSynic {
            scontrol: 0,
            simp: 0,
            siefp: 0,
            sint: [SINT_MASKED; SINT_COUNT],
            queues: std::array::from_fn(|_| VecDeque::new()),
        }
    }

    fn sint_reg(&self, sint: Sint) -> u64 {
        self.sint.get(sint.index()).copied().unwrap_or(SINT_MASKED)
    }

    /// §6.2: SCONTROL enabled, SIMP enabled, SINT unmasked.
    fn messages_deliverable(&self, sint: Sint) -> bool {
        self.scontrol & 1 != 0 && self.simp & 1 != 0 && self.sint_reg(sint) & SINT_MASKED == 0
    }
}

/// The partition's SynIC: one state block per VP, the registered host ports, the guest→host inbox.
pub struct Synic {
    ram: Arc<GuestRam>,
    irq: Arc<dyn InterruptSink>,
    vps: Vec<Mutex<VpSynic>>,
    ports: RwLock<HashMap<u32, PortKind>>,
    handler: RwLock<Option<Arc<dyn SynicHandler>>>,
    accel: RwLock<Option<Arc<dyn SignalAccel>>>,
    inbox: Inbox,
    queue_depth: usize,
}

impl std::fmt::Debug for Synic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synic")
            .field("vps", &self.vps.len())
            .field("queue_depth", &self.queue_depth)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Synic {
    /// A SynIC for `vp_count` VPs over `ram`, raising interrupts through `irq`; each (VP, SINT)
    /// queue holds up to `queue_depth` messages behind its slot.
    pub fn new(
        ram: Arc<GuestRam>,
        vp_count: u32,
        irq: Arc<dyn InterruptSink>,
        queue_depth: usize,
    ) -> Synic {
        Synic {
            ram,
            irq,
            vps: (0..vp_count).map(|_| Mutex::new(VpSynic::new())).collect(),
            ports: RwLock::new(HashMap::new()),
            handler: RwLock::new(None),
            accel: RwLock::new(None),
            inbox: Inbox::new(DEFAULT_INBOX_DEPTH),
            queue_depth: queue_depth.max(1),
        }
    }

    /// Number of VPs.
    pub fn vp_count(&self) -> u32 {
        self.vps.len() as u32
    }

    /// Installs a synchronous handler for guest→host traffic (replacing the inbox).
    pub fn set_handler(&self, handler: Arc<dyn SynicHandler>) {
        *self.handler.write().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Removes the handler: guest→host traffic goes to the inbox again.
    pub fn clear_handler(&self) {
        *self.handler.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Installs the in-kernel fast path for guest signals (the partition does, with its VM fd).
    pub fn set_signal_accel(&self, accel: Arc<dyn SignalAccel>) {
        *self.accel.write().unwrap_or_else(PoisonError::into_inner) = Some(accel);
    }

    /// Fast signals on the registered event port `connection_id` ring `kick` without a VMM exit,
    /// when the partition has a fast path. `false`: they keep going through the VMM.
    pub fn attach_fast_signal(&self, connection_id: u32, kick: &ringbuf::signal::Doorbell) -> bool {
        let accel = self
            .accel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(a) = accel else {
            return false;
        };
        match a.attach(connection_id & CONNECTION_ID_MASK, kick) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(connection_id, "fast signal path not attached: {e}");
                false
            }
        }
    }

    /// Makes `call` an in-kernel interrupt source for `vector` on `vp` when the partition can;
    /// `None`: the VMM keeps delivering.
    pub fn attach_irq(&self, call: &ringbuf::signal::Doorbell, vp: u32, vector: u8) -> Option<u32> {
        let accel = self
            .accel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        match accel.attach_irq(call, vp, vector) {
            Ok(h) => Some(h),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => None,
            Err(e) => {
                tracing::warn!(vp, vector, "irqfd not attached: {e}");
                None
            }
        }
    }

    /// Undo [`Self::attach_irq`].
    pub fn detach_irq(&self, handle: u32) {
        let accel = self
            .accel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(a) = accel {
            a.detach_irq(handle);
        }
    }

    /// Where event `flag` of `sint` on VP `vp` may be set by a device directly, if the guest's
    /// SynIC state allows it now.
    pub fn event_target(&self, vp: u32, sint: Sint, flag: u32) -> Option<EventTarget> {
        if flag >= vmbus_core::synic::EVENT_FLAGS_PER_SINT {
            return None;
        }
        let st = self.vp(vp).ok()?;
        let reg = st.sint_reg(sint);
        if st.scontrol & 1 == 0 || st.siefp & 1 == 0 || reg & (SINT_MASKED | SINT_POLLING) != 0 {
            return None;
        }
        let word_gpa = (st.siefp & !0xFFF)
            + (sint.index() as u64) * vmbus_core::synic::SLOT_SIZE as u64
            + u64::from(flag / 32) * 4;
        Some(EventTarget {
            word_gpa,
            bit: flag % 32,
            vector: (reg & 0xFF) as u8,
        })
    }

    /// Raises `sint`'s interrupt on `vp` if it is unmasked (a conservative extra interrupt: the
    /// guest scans its flags and finds nothing new, or what a switch of paths left behind).
    pub fn raise_sint(&self, vp: u32, sint: Sint) {
        if let Ok(st) = self.vp(vp) {
            let reg = st.sint_reg(sint);
            if reg & SINT_MASKED == 0 {
                self.raise(vp, reg);
            }
        }
    }

    /// Stops the fast path of `connection_id` (before its port goes away).
    pub fn detach_fast_signal(&self, connection_id: u32) {
        let accel = self
            .accel
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(a) = accel {
            a.detach(connection_id & CONNECTION_ID_MASK);
        }
    }

    fn handler(&self) -> Option<Arc<dyn SynicHandler>> {
        self.handler
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn port(&self, connection_id: u32) -> Option<PortKind> {
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(connection_id & CONNECTION_ID_MASK))
            .copied()
    }

    fn vp(&self, vp: u32) -> Result<MutexGuard<'_, VpSynic>, SynicError> {
        let m = self.vps.get(vp as usize).ok_or(SynicError::InvalidVp {
            vp,
            vps: self.vp_count(),
        })?;
        Ok(lock(m))
    }

    fn page(&self, reg: u64) -> Option<&[AtomicU32; 1024]> {
        self.ram.page_words(reg & !0xFFF).ok()
    }

    /// Sends a message of `message_type` (VMBus channel messages: 1) to SINT `sint` of VP `vp`:
    /// into the slot if it is free and nothing waits before it, else behind the queued ones.
    /// Messages to one (VP, SINT) arrive in order; a SynIC the guest has not enabled yet (or a
    /// masked SINT) keeps them queued until it is.
    pub fn send_message(
        &self,
        vp: u32,
        sint: Sint,
        message_type: u32,
        payload: &[u8],
    ) -> Result<Delivery, SynicError> {
        if message_type == 0 {
            return Err(SynicError::NoneMessageType);
        }
        let msg = HvMessage::new(message_type, payload)
            .ok_or(SynicError::PayloadTooLarge(payload.len()))?;
        let mut st = self.vp(vp)?;
        let queued = st.queues.get(sint.index()).map_or(0, VecDeque::len);
        if queued == 0
            && st.messages_deliverable(sint)
            && let Some(words) = self.page(st.simp)
        {
            if SlotWriter::new(words).deliver(sint, &msg, false)? == Delivery::Delivered {
                self.raise(vp, st.sint_reg(sint));
                return Ok(Delivery::Delivered);
            }
        } else if queued >= self.queue_depth {
            return Err(SynicError::QueueFull {
                vp,
                sint: sint.get(),
                depth: self.queue_depth,
            });
        }
        if let Some(q) = st.queues.get_mut(sint.index()) {
            q.push_back(msg);
        }
        // A slot freed without EOM (or a queue built while the SynIC was off) moves now.
        self.pump(vp, &mut st);
        let still = st.queues.get(sint.index()).is_some_and(|q| !q.is_empty());
        Ok(if still {
            Delivery::SlotBusy
        } else {
            Delivery::Delivered
        })
    }

    /// Messages waiting in the host queue of (VP, SINT).
    pub fn queued(&self, vp: u32, sint: Sint) -> usize {
        self.vp(vp)
            .ok()
            .and_then(|st| st.queues.get(sint.index()).map(VecDeque::len))
            .unwrap_or(0)
    }

    /// Drops every queued message of every VP (partition reset / VMBus unload).
    pub fn clear_queues(&self) {
        for m in &self.vps {
            lock(m).queues.iter_mut().for_each(VecDeque::clear);
        }
    }

    fn raise(&self, vp: u32, sint_reg: u64) {
        if sint_reg & SINT_POLLING == 0 {
            self.irq.raise(vp, (sint_reg & 0xFF) as u8);
        }
    }

    /// Offers queued messages of every deliverable SINT of `vp` to its slot (§6.3 step 3).
    fn pump(&self, vp: u32, st: &mut VpSynic) {
        let Some(words) = self.page(st.simp) else {
            return;
        };
        let slots = SlotWriter::new(words);
        for sint in Sint::all() {
            if !st.messages_deliverable(sint) {
                continue;
            }
            let reg = st.sint_reg(sint);
            let Some(q) = st.queues.get_mut(sint.index()) else {
                continue;
            };
            let mut delivered = false;
            while let Some(head) = q.front() {
                match slots.deliver(sint, head, q.len() > 1) {
                    Ok(Delivery::Delivered) => {
                        q.pop_front();
                        delivered = true;
                    }
                    Ok(Delivery::SlotBusy) => break,
                    Err(e) => {
                        // Unreachable: HvMessage::new validated it.
                        tracing::error!(vp, error = %e, "dropping undeliverable SynIC message");
                        q.pop_front();
                    }
                }
            }
            if delivered {
                self.raise(vp, reg);
            }
        }
    }

    /// A validated `HvPostMessage` from the hypercall layer.
    pub(crate) fn guest_post(
        &self,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), PortStatus> {
        let connection_id = connection_id & CONNECTION_ID_MASK;
        if self.port(connection_id) != Some(PortKind::Message) {
            return Err(PortStatus::InvalidConnectionId);
        }
        match self.handler() {
            Some(h) => h.post_message(self, vp, connection_id, message_type, payload),
            None => self.inbox.post(connection_id, payload),
        }
    }

    /// A validated `HvSignalEvent` from the hypercall layer.
    pub(crate) fn guest_signal(
        &self,
        vp: u32,
        connection_id: u32,
        flag: u16,
    ) -> Result<(), PortStatus> {
        let connection_id = connection_id & CONNECTION_ID_MASK;
        if self.port(connection_id) != Some(PortKind::Event) {
            return Err(PortStatus::InvalidConnectionId);
        }
        match self.handler() {
            Some(h) => h.signal_event(self, vp, connection_id, flag),
            None => {
                self.inbox.signal(connection_id);
                Ok(())
            }
        }
    }

    /// RDMSR of a SynIC MSR.
    pub(crate) fn read_msr(&self, vp: u32, index: u32) -> Result<u64, MsrError> {
        let st = self.vp(vp).map_err(|_| MsrError::Unknown(index))?;
        Ok(match index {
            msr::SCONTROL => st.scontrol,
            msr::SVERSION => SYNIC_VERSION,
            msr::SIEFP => st.siefp,
            msr::SIMP => st.simp,
            msr::EOM => 0,
            msr::SINT0..=msr::SINT15 => st
                .sint
                .get((index - msr::SINT0) as usize)
                .copied()
                .unwrap_or(0),
            _ => return Err(MsrError::Unknown(index)),
        })
    }

    /// WRMSR of a SynIC MSR. Bad values are refused with #GP and change nothing.
    pub(crate) fn write_msr(&self, vp: u32, index: u32, value: u64) -> Result<(), MsrError> {
        let mut st = self.vp(vp).map_err(|_| MsrError::Unknown(index))?;
        match index {
            msr::SCONTROL => {
                if value & !1 != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                st.scontrol = value;
            }
            msr::SVERSION => return Err(MsrError::ReadOnly(index)),
            msr::SIEFP | msr::SIMP => {
                if value & 0xFFE != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                let gpa = value & !0xFFF;
                let enabled = value & 1 != 0;
                if enabled && !self.ram.contains(gpa, PAGE_SIZE) {
                    return Err(MsrError::OutsideRam { index, gpa });
                }
                let old = if index == msr::SIMP {
                    st.simp
                } else {
                    st.siefp
                };
                if enabled && (old & 1 == 0 || old & !0xFFF != gpa) {
                    // An overlay page starts empty (KVM's SynIC does the same).
                    self.ram
                        .zero(gpa, PAGE_SIZE)
                        .map_err(|_| MsrError::OutsideRam { index, gpa })?;
                }
                if index == msr::SIMP {
                    st.simp = value;
                } else {
                    st.siefp = value;
                }
            }
            msr::EOM => {}
            msr::SINT0..=msr::SINT15 => {
                if value & !SINT_VALID_BITS != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                if value & SINT_MASKED == 0 && value & 0xFF < 16 {
                    return Err(MsrError::BadVector { index, value });
                }
                if let Some(r) = st.sint.get_mut((index - msr::SINT0) as usize) {
                    *r = value;
                }
            }
            _ => return Err(MsrError::Unknown(index)),
        }
        // EOM and every change of the delivery preconditions re-offer queued messages.
        self.pump(vp, &mut st);
        drop(st);
        if matches!(index, msr::SCONTROL | msr::SIEFP | msr::SINT0..=msr::SINT15)
            && let Some(h) = self.handler()
        {
            h.synic_changed(vp);
        }
        Ok(())
    }
}

impl HostPort for Synic {
    fn post_to_guest(&self, vp: u32, sint: Sint, payload: &[u8]) -> Result<Delivery, SynicError> {
        self.send_message(vp, sint, HVMSG_CHANNEL_MESSAGE, payload)
    }

    /// Sets `flag` in SINT `sint`'s area of VP `vp`'s event-flag page, raising the SINT interrupt
    /// only if the flag was clear and the SINT is unmasked. A VP without an enabled SIEFP (or
    /// SCONTROL) cannot receive events: `GuestFault` (the signal is lost, as on Hyper-V).
    fn signal_guest(&self, vp: u32, sint: Sint, flag: u32) -> Result<bool, SynicError> {
        let st = self.vp(vp)?;
        let words = (st.scontrol & 1 != 0 && st.siefp & 1 != 0)
            .then(|| self.page(st.siefp))
            .flatten()
            .ok_or_else(|| SynicError::GuestFault {
                what: "SIEFP",
                detail: format!("VP {vp} has no enabled event-flag page"),
            })?;
        let was_clear = EventFlags::new(words).set(sint, flag)?;
        let reg = st.sint_reg(sint);
        if was_clear && reg & SINT_MASKED == 0 {
            self.raise(vp, reg);
        }
        Ok(was_clear)
    }

    fn register_port(&self, connection_id: u32, kind: PortKind) -> Result<(), SynicError> {
        if connection_id == 0 || connection_id > CONNECTION_ID_MASK {
            return Err(SynicError::InvalidConnectionId(connection_id));
        }
        let mut ports = self.ports.write().unwrap_or_else(PoisonError::into_inner);
        if ports.contains_key(&connection_id) {
            return Err(SynicError::PortExists(connection_id));
        }
        ports.insert(connection_id, kind);
        Ok(())
    }

    fn unregister_port(&self, connection_id: u32) -> bool {
        self.ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(connection_id & CONNECTION_ID_MASK))
            .is_some()
    }
}

#[cfg(test)]
mod tests;
