//! VMBus channel-management wire format, byte-exact with Linux `hv_vmbus`.
//!
//! Channel messages travel as SynIC message payloads of at most 240 bytes: guest→host through
//! `HvPostMessage` to the message connection id, host→guest in the SINT 2 (or `msg_sint`) message
//! slot. Each starts with an 8-byte [`MessageHeader`] `{msgtype, padding}` (reference §3).
//!
//! - [`Guid`]: the mixed-endian wire GUID, [`guid!`](crate::guid) for constants, device
//!   [`class`] GUIDs.
//! - [`Version`]: protocol versions 0.13 … 6.0, Linux's negotiation order, and what each version
//!   changes; [`FeatureFlags`] for 6.0.
//! - One `#[repr(C, packed)]` zerocopy struct per `CHANNELMSG_*` ([`OfferChannel`] …
//!   [`ModifyChannelResponse`]), with [`MessageType`] describing sizes, minimum lengths,
//!   direction and the first version each exists in.
//! - [`ChannelMessage`]: total parser (never panics; typed [`WireError`]) and serializer.
//!
//! Integers are native-endian fields; the crate refuses to build for big-endian targets, so the
//! in-memory bytes are the little-endian wire bytes.
//!
//! Where the shared reference and Linux disagree, Linux is followed (see the crate report); the
//! 6.0 additions Linux lacks follow OpenVMM (`vmbus_core::protocol`).

mod guid;
mod messages;
mod msgtype;
mod parse;
mod version;

#[cfg(test)]
mod tests;

pub use guid::{Guid, GuidParseError, class};
pub use messages::{
    AllOffersDelivered, CloseChannel, GpaRange, GpadlBody, GpadlCreated, GpadlHeader,
    GpadlTeardown, GpadlTorndown, HEADER_SIZE, InitiateContact, MAX_MESSAGE_SIZE, MONITOR_ID_NONE,
    MessageHeader, ModifyChannel, ModifyChannelResponse, OfferChannel, OpenChannel, OpenChannelExt,
    OpenChannelResult, RelidReleased, RequestOffers, RescindChannelOffer,
    STATUS_CONNECTION_REFUSED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL, ServerMonitorPages,
    TlConnectRequest, TlConnectResult, USER_DEFINED_SIZE, Unload, UnloadResponse,
    VP_INDEX_DISABLE_INTERRUPT, VersionResponse, connection_state, offer_flags, pipe_type,
};
pub use msgtype::{Direction, Field, MessageType, WireMessage};
pub use parse::{ChannelMessage, GpadlWords, MessageBuf, WireError};
pub use version::{
    EVENT_CONNECTION_ID, FeatureFlags, MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4,
    MESSAGE_SINT, MONITOR_CONNECTION_ID, Version,
};
