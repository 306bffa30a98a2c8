//! Errors of the guest client.

use crate::wire::{Guid, MessageType, Version, WireError};

use super::{ChannelState, GpadlState};

/// Why the client refused a guest operation or a host message. After any error the client's
/// state is what it was before the call.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The host message did not parse (truncated, too long, unknown type).
    #[error("host message: {0}")]
    Wire(#[from] WireError),
    /// A host message that is not expected in the connection state (or a guest→host type).
    #[error("unexpected host message {msgtype} while {state}")]
    UnexpectedMessage {
        /// The message.
        msgtype: MessageType,
        /// Connection state name.
        state: &'static str,
    },
    /// A guest operation not allowed in the connection state.
    #[error("{op} not allowed while {state}")]
    WrongState {
        /// The operation.
        op: &'static str,
        /// Connection state name.
        state: &'static str,
    },
    /// The negotiated version does not have the operation.
    #[error("{op} needs protocol {required} or later; negotiated {version}")]
    VersionTooOld {
        /// The operation.
        op: &'static str,
        /// Negotiated version.
        version: Version,
        /// First version with it.
        required: Version,
    },
    /// No versions configured.
    #[error("no protocol versions configured")]
    NoVersions,
    /// [`Client::post_failed`](super::Client::post_failed) with a success status.
    #[error("post_failed called with success status {status:#x}")]
    NotAFailure {
        /// The status.
        status: u16,
    },
    /// No channel with this relid.
    #[error("{msgtype}: unknown relid {relid}")]
    UnknownRelid {
        /// The message received or that would be sent.
        msgtype: MessageType,
        /// The relid.
        relid: u32,
    },
    /// No GPADL with this handle.
    #[error("{msgtype}: unknown GPADL handle {handle:#x}")]
    UnknownGpadl {
        /// The message received or that would be sent.
        msgtype: MessageType,
        /// The handle.
        handle: u32,
    },
    /// The GPADL belongs to another channel.
    #[error("{msgtype}: GPADL {handle:#x} belongs to relid {owner}, not {relid}")]
    GpadlRelidMismatch {
        /// The message.
        msgtype: MessageType,
        /// The handle.
        handle: u32,
        /// The relid given.
        relid: u32,
        /// The channel that owns it.
        owner: u32,
    },
    /// The channel is not in a state the message or operation fits.
    #[error("{msgtype}: relid {relid} is {state:?}")]
    ChannelWrongState {
        /// The message.
        msgtype: MessageType,
        /// The channel.
        relid: u32,
        /// Its state.
        state: ChannelState,
    },
    /// The GPADL is not in a state the message or operation fits.
    #[error("{msgtype}: GPADL {handle:#x} is {state:?}")]
    GpadlWrongState {
        /// The message.
        msgtype: MessageType,
        /// The handle.
        handle: u32,
        /// Its state.
        state: GpadlState,
    },
    /// The GPADL is the ring of an opening or open channel; close the channel first.
    #[error("GPADL {handle:#x} is the ring buffer of open relid {relid}")]
    GpadlInUse {
        /// The handle.
        handle: u32,
        /// The channel.
        relid: u32,
    },
    /// OPENCHANNEL_RESULT echoes another open id than the one sent (the relid).
    #[error("{msgtype}: relid {relid} answered with openid {openid}")]
    OpenIdMismatch {
        /// The message.
        msgtype: MessageType,
        /// The channel.
        relid: u32,
        /// The open id received.
        openid: u32,
    },
    /// A MODIFYCHANNEL_RESPONSE without a MODIFYCHANNEL waiting, or a second MODIFYCHANNEL while
    /// one waits.
    #[error("{msgtype}: relid {relid}: {what}")]
    ModifyMismatch {
        /// The message.
        msgtype: MessageType,
        /// The channel.
        relid: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// Offer for a relid Linux cannot use (≥ 2048).
    #[error("{msgtype}: relid {relid} is not below {max}")]
    RelidOutOfRange {
        /// The message.
        msgtype: MessageType,
        /// The relid.
        relid: u32,
        /// [`MAX_RELIDS`](super::MAX_RELIDS).
        max: u32,
    },
    /// Offer for a relid that is still in use.
    #[error("{msgtype}: relid {relid} is already in use")]
    DuplicateRelid {
        /// The message.
        msgtype: MessageType,
        /// The relid.
        relid: u32,
    },
    /// Primary offer (index 0) whose instance GUID a channel already has: dropped, as Linux.
    #[error("{msgtype}: relid {relid} duplicates primary relid {existing} (instance {instance})")]
    DuplicateOffer {
        /// The message.
        msgtype: MessageType,
        /// The new relid.
        relid: u32,
        /// The channel with that instance GUID.
        existing: u32,
        /// The instance GUID.
        instance: Guid,
    },
    /// A GPADL must have at least one page.
    #[error("GPADL for relid {relid} has no pages")]
    EmptyGpadl {
        /// The channel.
        relid: u32,
    },
    /// More pages than one GPADL range can describe.
    #[error("GPADL for relid {relid}: {count} pages, at most {max}")]
    TooManyPfns {
        /// The channel.
        relid: u32,
        /// Pages given.
        count: usize,
        /// [`GPADL_MAX_PAGES`](super::GPADL_MAX_PAGES).
        max: usize,
    },
    /// Every GPADL handle is in use.
    #[error("no free GPADL handle")]
    GpadlHandlesExhausted,
    /// OPENCHANNEL downstream offset outside the ring GPADL.
    #[error(
        "relid {relid}: downstream ring offset {offset} not inside the {pages}-page ring GPADL"
    )]
    BadRingOffset {
        /// The channel.
        relid: u32,
        /// Offset in pages.
        offset: u32,
        /// Pages of the GPADL.
        pages: u32,
    },
    /// REQUESTOFFERS already sent on this connection.
    #[error("offers were already requested on this connection")]
    OffersAlreadyRequested,
    /// The caller has not drained events; the host message was not processed.
    #[error("{msgtype} dropped: {pending} events not taken with poll_event")]
    EventQueueFull {
        /// The message.
        msgtype: MessageType,
        /// Events queued.
        pending: usize,
    },
    /// A snapshot breaks an invariant.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(&'static str),
    /// Building a message failed (an internal limit was wrong; should not happen).
    #[error("building a message: {0}")]
    Build(WireError),
}
