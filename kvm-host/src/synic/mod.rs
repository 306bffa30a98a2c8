//! The synthetic interrupt controller, in userspace (vmbus-protocol.md §6.1–6.4).
//!
//! Per VP: SCONTROL, SIMP, SIEFP, SINT0–15 and a bounded FIFO of host→guest messages per SINT.
//! Messages go into the guest's message page slot with the pending / EOM protocol; event flags are
//! set in the guest's event-flag page; the SINT vector is raised on the VP's local APIC through an
//! [`InterruptSink`] (KVM_SIGNAL_MSI in a partition).
//!
//! Guest→host traffic (`HvPostMessage`, `HvSignalEvent`) is validated by the hypercall layer and
//! handed to a [`SynicHandler`]: the hook the VMBus host server plugs into. With no handler every
//! connection id is unknown (`HV_STATUS_INVALID_CONNECTION_ID`).
//!
//! Everything here may be called from any thread: vCPU threads (MSR writes, hypercalls) and the
//! VMBus server's threads (`post_to_guest`, `signal_guest`). Each VP's state sits behind its own
//! lock, and the page protocol itself is safe against the running guest.

pub mod page;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::hyperv::{HvStatus, MsrError, msr};
use crate::memory::{GuestRam, PAGE_SIZE};
use page::{Offer, SlotMessage};

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

/// Raises a fixed, edge-triggered interrupt `vector` on VP `vp`'s local APIC.
pub trait InterruptSink: Send + Sync {
    fn raise(&self, vp: u32, vector: u8);
}

/// Where guest→host SynIC traffic goes: the hook the VMBus host server plugs into.
///
/// Called on the vCPU thread of the VP that made the hypercall, after the hypercall layer checked
/// the control word, the input GPA and the payload size. The handler may call back into `synic`
/// (e.g. [`Synic::post_to_guest`] for a reply) — no SynIC lock is held during the call.
pub trait SynicHandler: Send + Sync {
    /// `HvPostMessage` from VP `vp` to `connection_id` (bits 23:0). Return
    /// `Err(HvStatus::InvalidConnectionId)` for a connection id that is not a message port and
    /// `Err(HvStatus::InsufficientBuffers)` when the host cannot take more (the guest retries).
    fn post_message(
        &self,
        synic: &Synic,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvStatus>;

    /// `HvSignalEvent` from VP `vp` on `connection_id` with flag number `flag`. Return
    /// `Err(HvStatus::InvalidConnectionId)` for a connection id that is not an event port.
    fn signal_event(
        &self,
        synic: &Synic,
        vp: u32,
        connection_id: u32,
        flag: u16,
    ) -> Result<(), HvStatus>;
}

/// Host-side errors of SynIC delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SynicError {
    #[error("VP {vp} does not exist (partition has {vps})")]
    InvalidVp { vp: u32, vps: u32 },
    #[error("SINT {0} does not exist")]
    InvalidSint(u8),
    #[error("message payload of {0} bytes exceeds the 240-byte SynIC payload")]
    PayloadTooLarge(usize),
    #[error("message type 0 (HVMSG_NONE) cannot be delivered")]
    NoneMessageType,
    #[error("queue for VP {vp} SINT {sint} is full ({depth} messages): the guest is not consuming")]
    QueueFull { vp: u32, sint: u8, depth: usize },
    #[error("event flag {0} is outside the 2048 flags of a SINT")]
    InvalidFlag(u32),
    #[error("VP {vp} has SynIC events disabled (SCONTROL or SIEFP)")]
    EventsDisabled { vp: u32 },
}

/// What happened to a host→guest message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's slot now; the SINT interrupt was raised (unless polling).
    Delivered,
    /// Queued behind earlier messages, a busy slot, or a SynIC that is not enabled yet; delivered
    /// on a later EOM or SynIC MSR write.
    Queued,
}

#[derive(Debug)]
struct VpSynic {
    scontrol: u64,
    simp: u64,
    siefp: u64,
    sint: [u64; SINT_COUNT],
    queues: [VecDeque<SlotMessage>; SINT_COUNT],
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

    fn sint_reg(&self, sint: u8) -> u64 {
        self.sint
            .get(usize::from(sint))
            .copied()
            .unwrap_or(SINT_MASKED)
    }

    fn messages_deliverable(&self, sint: u8) -> bool {
        self.scontrol & 1 != 0 && self.simp & 1 != 0 && self.sint_reg(sint) & SINT_MASKED == 0
    }
}

/// The partition's SynIC: one state block per VP.
pub struct Synic {
    ram: Arc<GuestRam>,
    irq: Arc<dyn InterruptSink>,
    vps: Vec<Mutex<VpSynic>>,
    handler: RwLock<Option<Arc<dyn SynicHandler>>>,
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

impl Synic {
    /// A SynIC for `vp_count` VPs over `ram`, raising interrupts through `irq`.
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
            handler: RwLock::new(None),
            queue_depth: queue_depth.max(1),
        }
    }

    /// Number of VPs.
    pub fn vp_count(&self) -> u32 {
        self.vps.len() as u32
    }

    /// Installs the guest→host handler (replacing any earlier one).
    pub fn set_handler(&self, handler: Arc<dyn SynicHandler>) {
        if let Ok(mut h) = self.handler.write() {
            *h = Some(handler);
        }
    }

    /// Removes the handler: every connection id becomes unknown again.
    pub fn clear_handler(&self) {
        if let Ok(mut h) = self.handler.write() {
            *h = None;
        }
    }

    pub(crate) fn handler(&self) -> Option<Arc<dyn SynicHandler>> {
        self.handler.read().ok().and_then(|h| h.clone())
    }

    fn vp(&self, vp: u32) -> Result<MutexGuard<'_, VpSynic>, SynicError> {
        let m = self.vps.get(vp as usize).ok_or(SynicError::InvalidVp {
            vp,
            vps: self.vp_count(),
        })?;
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        Ok(m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Sends a message of `message_type` (VMBus channel messages: 1) to SINT `sint` of VP `vp`.
    /// Messages to one (VP, SINT) arrive in order.
    pub fn post_to_guest(
        &self,
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: &[u8],
    ) -> Result<Delivery, SynicError> {
        if usize::from(sint) >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if payload.len() > page::MAX_PAYLOAD {
            return Err(SynicError::PayloadTooLarge(payload.len()));
        }
        if message_type == page::HVMSG_NONE {
            return Err(SynicError::NoneMessageType);
        }
        let mut st = self.vp(vp)?;
        let msg = SlotMessage {
            message_type,
            sender: 0,
            payload: payload.to_vec(),
        };
        let queue_len = st.queues.get(usize::from(sint)).map_or(0, VecDeque::len);
        if queue_len == 0 && st.messages_deliverable(sint) {
            if let Ok(words) = self.ram.page_words(st.simp & !0xFFF)
                && page::offer(words, sint, &msg, false) == Offer::Delivered
            {
                self.raise(vp, st.sint_reg(sint));
                return Ok(Delivery::Delivered);
            }
        } else if queue_len >= self.queue_depth {
            return Err(SynicError::QueueFull {
                vp,
                sint,
                depth: self.queue_depth,
            });
        }
        if let Some(q) = st.queues.get_mut(usize::from(sint)) {
            q.push_back(msg);
        }
        // A slot freed without EOM (or a queue built while the SynIC was off) moves now.
        self.pump(vp, &mut st);
        let still_queued = st
            .queues
            .get(usize::from(sint))
            .is_some_and(|q| !q.is_empty());
        Ok(if still_queued {
            Delivery::Queued
        } else {
            Delivery::Delivered
        })
    }

    /// Sets event flag `flag` of SINT `sint` in VP `vp`'s event-flag page, raising the SINT
    /// interrupt only if the flag was clear. `Ok(true)` = it was clear.
    pub fn signal_guest(&self, vp: u32, sint: u8, flag: u32) -> Result<bool, SynicError> {
        if usize::from(sint) >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if flag >= page::FLAGS_PER_SINT {
            return Err(SynicError::InvalidFlag(flag));
        }
        let st = self.vp(vp)?;
        if st.scontrol & 1 == 0 || st.siefp & 1 == 0 {
            return Err(SynicError::EventsDisabled { vp });
        }
        let words = self
            .ram
            .page_words(st.siefp & !0xFFF)
            .map_err(|_| SynicError::EventsDisabled { vp })?;
        let was_clear = page::set_flag(words, sint, flag).ok_or(SynicError::InvalidFlag(flag))?;
        let reg = st.sint_reg(sint);
        if was_clear && reg & SINT_MASKED == 0 {
            self.raise(vp, reg);
        }
        Ok(was_clear)
    }

    /// Messages waiting in the host queue of (VP, SINT).
    pub fn queued(&self, vp: u32, sint: u8) -> usize {
        self.vp(vp)
            .ok()
            .and_then(|st| st.queues.get(usize::from(sint)).map(VecDeque::len))
            .unwrap_or(0)
    }

    /// Drops every queued message of every VP (partition reset / VMBus unload).
    pub fn clear_queues(&self) {
        for vp in 0..self.vp_count() {
            if let Ok(mut st) = self.vp(vp) {
                st.queues.iter_mut().for_each(VecDeque::clear);
            }
        }
    }

    fn raise(&self, vp: u32, sint_reg: u64) {
        if sint_reg & SINT_POLLING == 0 {
            self.irq.raise(vp, (sint_reg & 0xFF) as u8);
        }
    }

    /// Offers the head of every deliverable queue of `vp` to its slot (§6.3 step 3).
    fn pump(&self, vp: u32, st: &mut VpSynic) {
        let Ok(words) = self.ram.page_words(st.simp & !0xFFF) else {
            return;
        };
        for sint in 0..SINT_COUNT as u8 {
            if !st.messages_deliverable(sint) {
                continue;
            }
            let reg = st.sint_reg(sint);
            let Some(q) = st.queues.get_mut(usize::from(sint)) else {
                continue;
            };
            let more = q.len() > 1;
            let Some(head) = q.front() else {
                continue;
            };
            if page::offer(words, sint, head, more) == Offer::Delivered {
                q.pop_front();
                self.raise(vp, reg);
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
            msr::SINT0..=msr::SINT15 => st.sint_reg((index - msr::SINT0) as u8),
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
        Ok(())
    }
}

#[cfg(test)]
mod tests;
