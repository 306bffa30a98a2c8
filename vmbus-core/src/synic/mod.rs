//! The SynIC port: how VMBus messages and events cross between a guest and the host, with the
//! semantics of a Hyper-V partition's synthetic interrupt controller (reference: vmbus-protocol.md §6).
//!
//! - Host → guest **messages** go through the guest's SynIC message page (SIMP): one 256-byte
//!   [`HvMessage`] slot per SINT. A slot is busy until the guest frees it; the host keeps later
//!   messages in a bounded per-(VP, SINT) FIFO ([`VpMessageQueues`]), sets the slot's *pending* flag,
//!   and delivers the next one when the guest writes EOM ([`SlotWriter`], [`SlotReader`]).
//! - Host → guest **events** set bit `relid` in the guest's SIEF page ([`EventFlags`]); the SINT
//!   interrupt is raised only when the bit was clear.
//! - Guest → host: `HvPostMessage` (connection id + payload of 8..=240 bytes) and `HvSignalEvent`
//!   (connection id), checked against the host's registered message / event ports.
//!
//! [`HostPort`] is what the VMBus server needs to reach a guest, [`HostInbox`] how a host that is not
//! a hypervisor (tests, the cross-process port) receives what the guest posted, and [`GuestPort`] is
//! the guest's view of its SynIC on one VP — the same calls a guest in a real partition makes.
//!
//! Implementations:
//! - the page logic in this module works over any [`PageMem`] (a heap page, a shared mapping, a
//!   guest RAM page), `no_std`;
//! - `local` (std): an in-process host/guest pair with real message and event-flag pages;
//! - `shared` (std): the same over a memfd shared by two processes, with eventfd doorbells standing
//!   in for the SINT interrupt and the hypercall trap;
//! - the KVM SynIC in `kvm-host` (guest RAM pages, MSR and hypercall exits).
//!
//! # Semantics every implementation keeps
//! - Messages to one (VP, SINT) are delivered in the order posted; a busy slot never lets a later
//!   message overtake an earlier one.
//! - A slot is written only while its message type is `HVMSG_NONE`; the type is stored last
//!   (release). If the slot is busy the host first sets the pending flag, then re-reads the type
//!   (§6.3 step 2), so an EOM is never lost.
//! - The guest copies the slot once, frees it by compare-and-swap of the type it saw to 0, then
//!   reads the pending flag and writes EOM if it is set (Linux `vmbus_signal_eom`), then validates
//!   its private copy.
//! - Guest → host messages: payload 8..=240 bytes else [`HvStatus::InvalidParameter`]; connection
//!   id (bits 23:0, bits 31:24 ignored) not a registered message port ⇒
//!   [`HvStatus::InvalidConnectionId`]; host queue full ⇒ [`HvStatus::InsufficientBuffers`] (the
//!   guest retries, as Linux does). Messages are received by the host in post order.
//! - Guest → host events coalesce: signalling a port that is already pending is one event. The
//!   flag number is accepted and ignored (VMBus dedicated channels use 0; reference §10).

mod message;
mod page;
mod queue;

#[cfg(feature = "std")]
mod latch;
#[cfg(feature = "std")]
pub mod local;
#[cfg(feature = "std")]
pub mod shared;

#[cfg(test)]
mod tests;

pub use message::{
    HV_MESSAGE_SIZE, HVMSG_CHANNEL_MESSAGE, HVMSG_NONE, HVMSG_TIMER_EXPIRED, HvMessage,
    HvMessageHeader, MAX_PAYLOAD, MESSAGE_FLAG_PENDING, MessageError, Payload, PostedMessage,
    SynicMessage,
};
pub use page::{
    Delivery, EVENT_FLAGS_PER_SINT, EventFlags, HeapPage, PAGE_SIZE, PAGE_WORDS, PageMem,
    SLOT_SIZE, SlotReader, SlotWriter, Taken, slot_offset,
};
pub use queue::{PostOutcome, VpMessageQueues};

use core::time::Duration;

/// Synthetic interrupt sources per VP.
pub const SINT_COUNT: usize = 16;
/// Connection ids are 24 bits wide (`HV_CONNECTION_ID`); bits 31:24 are reserved.
pub const CONNECTION_ID_MASK: u32 = 0x00FF_FFFF;
/// Smallest `HvPostMessage` payload accepted (a channel message header).
pub const MIN_POST_PAYLOAD: usize = 8;

/// A synthetic interrupt source number, 0..16.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sint(u8);

impl Sint {
    /// SINT 2, used by VMBus for control messages and channel events (`VMBUS_MESSAGE_SINT`).
    pub const VMBUS: Sint = Sint(crate::wire::MESSAGE_SINT);

    /// `None` unless `n < 16`.
    pub const fn new(n: u8) -> Option<Sint> {
        if (n as usize) < SINT_COUNT {
            Some(Sint(n))
        } else {
            None
        }
    }

    /// The SINT number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The SINT number as an index (always < 16).
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// All sixteen SINTs in order.
    pub fn all() -> impl Iterator<Item = Sint> {
        (0..SINT_COUNT as u8).map(Sint)
    }
}

/// What kind of host port a connection id names.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortKind {
    /// Target of `HvPostMessage` (VMBus: connection ids 1 and 4, or the id from VERSION_RESPONSE).
    Message,
    /// Target of `HvSignalEvent` (VMBus: the connection id of each offered channel).
    Event,
}

/// Hypercall failure statuses a guest sees from `HvPostMessage` / `HvSignalEvent` (reference §6.5).
/// `Ok(())` stands for `HV_STATUS_SUCCESS`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u16)]
pub enum HvStatus {
    /// `HV_STATUS_INVALID_PARAMETER` (0x5): payload size outside 8..=240.
    #[error("HV_STATUS_INVALID_PARAMETER")]
    InvalidParameter = 0x0005,
    /// `HV_STATUS_INSUFFICIENT_MEMORY` (0xB).
    #[error("HV_STATUS_INSUFFICIENT_MEMORY")]
    InsufficientMemory = 0x000B,
    /// `HV_STATUS_INVALID_CONNECTION_ID` (0x12): no such port of the right kind.
    #[error("HV_STATUS_INVALID_CONNECTION_ID")]
    InvalidConnectionId = 0x0012,
    /// `HV_STATUS_INSUFFICIENT_BUFFERS` (0x13): the host's queue for this guest is full; retry.
    #[error("HV_STATUS_INSUFFICIENT_BUFFERS")]
    InsufficientBuffers = 0x0013,
    /// `HV_STATUS_INVALID_SYNIC_STATE` (0x18): the port is not usable (here: the transport to the
    /// host is broken or gone).
    #[error("HV_STATUS_INVALID_SYNIC_STATE")]
    InvalidSynicState = 0x0018,
}

impl HvStatus {
    /// The 16-bit status code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The status for a code, `None` for success and codes not listed here.
    pub const fn from_code(code: u16) -> Option<HvStatus> {
        Some(match code {
            0x0005 => HvStatus::InvalidParameter,
            0x000B => HvStatus::InsufficientMemory,
            0x0012 => HvStatus::InvalidConnectionId,
            0x0013 => HvStatus::InsufficientBuffers,
            0x0018 => HvStatus::InvalidSynicState,
            _ => return None,
        })
    }

    /// Whether Linux retries a post that failed with this status (reference §6.6).
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            HvStatus::InsufficientBuffers | HvStatus::InsufficientMemory
        )
    }
}

/// Checks an `HvPostMessage` payload size.
pub fn check_post_payload(payload: &[u8]) -> Result<(), HvStatus> {
    if (MIN_POST_PAYLOAD..=MAX_PAYLOAD).contains(&payload.len()) {
        Ok(())
    } else {
        Err(HvStatus::InvalidParameter)
    }
}

/// Host-side (and local) errors of a SynIC port.
#[derive(Debug, thiserror::Error)]
pub enum SynicError {
    #[error("VP {vp} does not exist (partition has {vps})")]
    InvalidVp { vp: u32, vps: u32 },
    #[error("message payload of {0} bytes exceeds the 240-byte SynIC payload")]
    PayloadTooLarge(usize),
    #[error("message type 0 (HVMSG_NONE) cannot be delivered")]
    NoneMessageType,
    #[error("queue for VP {vp} SINT {sint} is full ({depth} messages): the guest is not consuming")]
    QueueFull { vp: u32, sint: u8, depth: usize },
    #[error("event flag {0} is outside the 2048 flags of a SINT")]
    InvalidFlag(u32),
    #[error("connection id {0:#x} is 0 or wider than 24 bits")]
    InvalidConnectionId(u32),
    #[error("connection id {0:#x} is already registered")]
    PortExists(u32),
    #[error("no room for more ports ({0} registered)")]
    TooManyPorts(usize),
    #[error("guest broke the shared {what}: {detail}")]
    GuestFault {
        what: &'static str,
        detail: alloc::string::String,
    },
    #[error("the other end is gone or the transport is broken")]
    Disconnected,
    #[cfg(feature = "std")]
    #[error("doorbell or mapping: {0}")]
    Io(#[from] std::io::Error),
}

/// Host side of a SynIC port: what the VMBus server uses to reach the guest, and to declare which
/// connection ids the guest may post to / signal.
pub trait HostPort {
    /// Sends `payload` (≤ 240 bytes) as a VMBus channel message (`HVMSG_CHANNEL_MESSAGE`) to SINT
    /// `sint` of VP `vp`. Messages to one (VP, SINT) arrive in order. `Delivery::Delivered`: it is in
    /// the slot now and the SINT interrupt was raised; `Delivery::SlotBusy`: it waits in the host's
    /// queue behind the guest's unconsumed messages and is delivered on a later EOM.
    /// `Err(QueueFull)` when that queue is full (the guest stopped consuming).
    fn post_to_guest(&self, vp: u32, sint: Sint, payload: &[u8]) -> Result<Delivery, SynicError>;

    /// Sets event flag `flag` (< 2048; VMBus: the relid) in SINT `sint`'s area of VP `vp`'s SIEF
    /// page, raising the SINT interrupt only if the flag was clear. `Ok(true)` = it was clear.
    fn signal_guest(&self, vp: u32, sint: Sint, flag: u32) -> Result<bool, SynicError>;

    /// Registers connection id `connection_id` (1..2^24) as a port of `kind`.
    fn register_port(&self, connection_id: u32, kind: PortKind) -> Result<(), SynicError>;

    /// Removes a port; later posts / signals to it fail with `HV_STATUS_INVALID_CONNECTION_ID`.
    /// `false` if it was not registered.
    fn unregister_port(&self, connection_id: u32) -> bool;
}

/// How a host that is not the hypervisor receives what the guest posted (local and shared ports;
/// a KVM host gets the same from hypercall exits instead).
pub trait HostInbox {
    /// The oldest message the guest posted and the host has not taken yet.
    fn recv_message(&self) -> Result<Option<PostedMessage>, SynicError>;

    /// Calls `f` with the connection id of every event port the guest signalled since the last
    /// call (each once, however often it was signalled), and clears them. Returns how many.
    fn take_events(&self, f: &mut dyn FnMut(u32)) -> Result<usize, SynicError>;

    /// Sleeps until the guest posts, signals or writes EOM, or `timeout` passes (`Ok(false)`).
    /// EOMs are handled inside (queued messages move into freed slots). May return early; callers
    /// re-check [`Self::recv_message`] and [`Self::take_events`].
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError>;
}

/// A guest's SynIC on one VP: the hypercalls and the interrupt-side reads of the message and event
/// pages, as in a real partition.
pub trait GuestPort {
    /// This port's VP index.
    fn vp(&self) -> u32;

    /// `HvPostMessage` to `connection_id` (bits 31:24 ignored) with message type 1.
    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus>;

    /// `HvSignalEvent` on `connection_id` with flag number `flag` (accepted and ignored).
    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvStatus>;

    /// Takes the message in `sint`'s slot, if any: copies it, frees the slot, writes EOM when the
    /// host flagged more pending, then validates the copy (a malformed one is freed and returned as
    /// an error).
    fn next_message(&self, sint: Sint) -> Option<Result<SynicMessage, MessageError>>;

    /// Calls `f` for every event flag set in `sint`'s SIEF area (ascending), clearing them.
    /// Returns how many.
    fn take_events(&self, sint: Sint, f: &mut dyn FnMut(u32)) -> usize;

    /// Sleeps until a SINT interrupt for this VP (a delivered message or a newly set flag) or until
    /// `timeout` passes (`Ok(false)`). May return early; callers re-check slots and flags.
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError>;
}
