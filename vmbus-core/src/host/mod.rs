//! The host (parent) side of VMBus: a sans-IO state machine.
//!
//! [`Server`] takes channel messages posted by the guest ([`Server::handle_message`]) and requests
//! from the VMM (add or rescind an offer, finish an open) and produces [`HostAction`]s: messages to
//! deliver to a guest VP/SINT, and channel open/close/retarget work for the devices. It never blocks,
//! spawns or touches memory; whoever drives it (kvm-host, a test, a VSP supervisor) does the I/O.
//!
//! Every guest message is validated against the connection state, the negotiated version and the
//! channel/GPADL tables (vmbus-protocol.md §10). Where the protocol has a status field the guest gets a
//! failure status; otherwise the message is dropped. Either way [`Server::handle_message`] returns the
//! [`HostError`] so the caller can log it, and the server stays consistent.

mod gpadls;
#[cfg(test)]
mod proptests;
mod server;
mod snapshot;
#[cfg(test)]
mod tests;

pub use server::Server;
pub use snapshot::{ChannelSnapshot, ServerSnapshot, SnapshotError};

use crate::device::{DeviceDescription, OpenChannelInfo};
use crate::gpadl::{GpadlError, GpadlLimits};
use crate::wire::{MessageBuf, MessageType, Version, WireError};

/// Host configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Number of guest VPs (valid target VPs are `0..vp_count`).
    pub vp_count: u32,
    /// Versions the host accepts. Default: 2.4 (Win8) to 5.3, what Linux 6.x negotiates.
    pub versions: alloc::vec::Vec<Version>,
    pub gpadl_limits: GpadlLimits,
    /// Relids are `1..=max_relid` (Linux handles relids below 2048).
    pub max_relid: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            vp_count: 1,
            versions: alloc::vec![
                Version::Win8,
                Version::Win8_1,
                Version::Win10,
                Version::Win10V4_1,
                Version::Win10V5,
                Version::Win10V5_1,
                Version::Win10V5_2,
                Version::Win10V5_3,
            ],
            gpadl_limits: GpadlLimits::default(),
            max_relid: 2047,
        }
    }
}

/// Work for whoever drives the server, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostAction {
    /// Deliver a channel message to the guest: SynIC message type 1 into `sint` of `vp`.
    Send { vp: u32, sint: u8, msg: MessageBuf },
    /// The guest opened a channel: hand it to its device, then call [`Server::complete_open`].
    Open(OpenChannelInfo),
    /// Stop serving the channel's rings now (guest close, rescind of an open channel, unload).
    Close { relid: u32 },
    /// Move the channel's interrupts to another VP.
    Retarget { relid: u32, target_vp: u32 },
    /// The guest disconnected (UNLOAD or a fresh INITIATE_CONTACT): every channel is closed and
    /// every GPADL gone.
    Reset,
}

/// An offered channel's lifecycle on the host.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Registered; the offer goes out with the next REQUESTOFFERS (or now, if offers were requested).
    Pending,
    /// The guest knows the channel; it is closed.
    Offered,
    /// OPENCHANNEL accepted, waiting for the device ([`Server::complete_open`]).
    Opening {
        gpadl: u32,
        target_vp: u32,
    },
    Open {
        gpadl: u32,
        target_vp: u32,
    },
    /// RESCIND sent; waiting for RELID_RELEASED before the relid can be reused.
    Rescinded,
}

/// What the guest (or the caller) did wrong. Messages that have a status field were also answered
/// with a failure status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("malformed channel message: {0}")]
    Wire(#[from] WireError),
    #[error("{msgtype} is a host-to-guest message")]
    WrongDirection { msgtype: MessageType },
    #[error("{msgtype} not allowed while {state}")]
    WrongState {
        msgtype: MessageType,
        state: &'static str,
    },
    #[error("{msgtype} needs protocol version {needs}, connected at {version}")]
    VersionTooOld {
        msgtype: MessageType,
        needs: Version,
        version: Version,
    },
    #[error("{msgtype} arrived on connection id {connection_id}, expected {expected}")]
    WrongConnectionId {
        msgtype: MessageType,
        connection_id: u32,
        expected: u32,
    },
    #[error("INITIATE_CONTACT refused: {0}")]
    ContactRefused(&'static str),
    #[error("{msgtype}: relid {relid} is unknown")]
    UnknownRelid { msgtype: MessageType, relid: u32 },
    #[error("{msgtype}: channel {relid} is {state:?}")]
    ChannelState {
        msgtype: MessageType,
        relid: u32,
        state: ChannelState,
    },
    #[error("GPADL: {0}")]
    Gpadl(#[from] GpadlError),
    #[error("GPADL {handle:#x} belongs to channel {owner}, not {relid}")]
    GpadlOwner { handle: u32, owner: u32, relid: u32 },
    #[error("OPENCHANNEL {relid}: {reason}")]
    BadOpen { relid: u32, reason: &'static str },
    #[error("target VP {vp} does not exist ({vp_count} VPs)")]
    BadVp { vp: u32, vp_count: u32 },
    #[error("no free relid")]
    NoRelid,
    #[error("device refused to open channel {relid}")]
    DeviceRefused { relid: u32 },
}

/// Status values the host puts in OPENCHANNEL_RESULT / GPADL_CREATED / MODIFYCHANNEL_RESPONSE on
/// failure (OpenVMM uses STATUS_UNSUCCESSFUL; Linux only checks for non-zero).
pub const FAILURE_STATUS: u32 = crate::wire::STATUS_UNSUCCESSFUL;

pub(crate) fn device_offer_flags(desc: &DeviceDescription) -> u16 {
    if desc.pipe_mode.is_some() {
        crate::wire::offer_flags::NAMED_PIPE_MODE
    } else {
        0
    }
}
