//! Channel message types: numbers, names, direction, sizes, minimum lengths and field tables.

use core::fmt;
use core::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::messages::*;
use super::version::Version;

/// Which side sends a message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the host (parent, VSP side).
    HostToGuest,
    /// Sent by the guest (child, VSC side).
    GuestToHost,
}

/// A channel message type this crate implements (`enum vmbus_channel_message_type`).
///
/// Linux numbers 18–20 as placeholders (`CHANNELMSG_18/19/20`, OpenVMM's reserved-channel
/// messages) and drops 0, 18–20 and everything ≥ 25 (OpenVMM's 6.0 MODIFY_CONNECTION, PAUSE, …);
/// [`MessageType::from_raw`] returns `None` for those.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageType {
    /// `CHANNELMSG_OFFERCHANNEL` (1), host → guest.
    OfferChannel = 1,
    /// `CHANNELMSG_RESCIND_CHANNELOFFER` (2), host → guest.
    RescindChannelOffer = 2,
    /// `CHANNELMSG_REQUESTOFFERS` (3), guest → host.
    RequestOffers = 3,
    /// `CHANNELMSG_ALLOFFERS_DELIVERED` (4), host → guest.
    AllOffersDelivered = 4,
    /// `CHANNELMSG_OPENCHANNEL` (5), guest → host.
    OpenChannel = 5,
    /// `CHANNELMSG_OPENCHANNEL_RESULT` (6), host → guest.
    OpenChannelResult = 6,
    /// `CHANNELMSG_CLOSECHANNEL` (7), guest → host.
    CloseChannel = 7,
    /// `CHANNELMSG_GPADL_HEADER` (8), guest → host.
    GpadlHeader = 8,
    /// `CHANNELMSG_GPADL_BODY` (9), guest → host.
    GpadlBody = 9,
    /// `CHANNELMSG_GPADL_CREATED` (10), host → guest.
    GpadlCreated = 10,
    /// `CHANNELMSG_GPADL_TEARDOWN` (11), guest → host.
    GpadlTeardown = 11,
    /// `CHANNELMSG_GPADL_TORNDOWN` (12), host → guest.
    GpadlTorndown = 12,
    /// `CHANNELMSG_RELID_RELEASED` (13), guest → host.
    RelidReleased = 13,
    /// `CHANNELMSG_INITIATE_CONTACT` (14), guest → host.
    InitiateContact = 14,
    /// `CHANNELMSG_VERSION_RESPONSE` (15), host → guest.
    VersionResponse = 15,
    /// `CHANNELMSG_UNLOAD` (16), guest → host.
    Unload = 16,
    /// `CHANNELMSG_UNLOAD_RESPONSE` (17), host → guest.
    UnloadResponse = 17,
    /// `CHANNELMSG_TL_CONNECT_REQUEST` (21), guest → host.
    TlConnectRequest = 21,
    /// `CHANNELMSG_MODIFYCHANNEL` (22), guest → host.
    ModifyChannel = 22,
    /// `CHANNELMSG_TL_CONNECT_RESULT` (23), host → guest (Linux ignores it).
    TlConnectResult = 23,
    /// `CHANNELMSG_MODIFYCHANNEL_RESPONSE` (24), host → guest.
    ModifyChannelResponse = 24,
}

impl MessageType {
    /// Every implemented type, in numeric order.
    pub const ALL: [MessageType; 21] = [
        MessageType::OfferChannel,
        MessageType::RescindChannelOffer,
        MessageType::RequestOffers,
        MessageType::AllOffersDelivered,
        MessageType::OpenChannel,
        MessageType::OpenChannelResult,
        MessageType::CloseChannel,
        MessageType::GpadlHeader,
        MessageType::GpadlBody,
        MessageType::GpadlCreated,
        MessageType::GpadlTeardown,
        MessageType::GpadlTorndown,
        MessageType::RelidReleased,
        MessageType::InitiateContact,
        MessageType::VersionResponse,
        MessageType::Unload,
        MessageType::UnloadResponse,
        MessageType::TlConnectRequest,
        MessageType::ModifyChannel,
        MessageType::TlConnectResult,
        MessageType::ModifyChannelResponse,
    ];

    /// Linux `CHANNELMSG_COUNT`: Linux drops any host message whose type is ≥ this.
    pub const LINUX_COUNT: u32 = 25;

    /// The type with this wire number, if implemented.
    pub const fn from_raw(raw: u32) -> Option<MessageType> {
        let mut i = 0;
        while i < MessageType::ALL.len() {
            if MessageType::ALL[i] as u32 == raw {
                return Some(MessageType::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// The wire number.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The Linux name, e.g. `CHANNELMSG_OPENCHANNEL`.
    pub const fn name(self) -> &'static str {
        match self {
            MessageType::OfferChannel => "CHANNELMSG_OFFERCHANNEL",
            MessageType::RescindChannelOffer => "CHANNELMSG_RESCIND_CHANNELOFFER",
            MessageType::RequestOffers => "CHANNELMSG_REQUESTOFFERS",
            MessageType::AllOffersDelivered => "CHANNELMSG_ALLOFFERS_DELIVERED",
            MessageType::OpenChannel => "CHANNELMSG_OPENCHANNEL",
            MessageType::OpenChannelResult => "CHANNELMSG_OPENCHANNEL_RESULT",
            MessageType::CloseChannel => "CHANNELMSG_CLOSECHANNEL",
            MessageType::GpadlHeader => "CHANNELMSG_GPADL_HEADER",
            MessageType::GpadlBody => "CHANNELMSG_GPADL_BODY",
            MessageType::GpadlCreated => "CHANNELMSG_GPADL_CREATED",
            MessageType::GpadlTeardown => "CHANNELMSG_GPADL_TEARDOWN",
            MessageType::GpadlTorndown => "CHANNELMSG_GPADL_TORNDOWN",
            MessageType::RelidReleased => "CHANNELMSG_RELID_RELEASED",
            MessageType::InitiateContact => "CHANNELMSG_INITIATE_CONTACT",
            MessageType::VersionResponse => "CHANNELMSG_VERSION_RESPONSE",
            MessageType::Unload => "CHANNELMSG_UNLOAD",
            MessageType::UnloadResponse => "CHANNELMSG_UNLOAD_RESPONSE",
            MessageType::TlConnectRequest => "CHANNELMSG_TL_CONNECT_REQUEST",
            MessageType::ModifyChannel => "CHANNELMSG_MODIFYCHANNEL",
            MessageType::TlConnectResult => "CHANNELMSG_TL_CONNECT_RESULT",
            MessageType::ModifyChannelResponse => "CHANNELMSG_MODIFYCHANNEL_RESPONSE",
        }
    }

    /// Who sends it.
    pub const fn direction(self) -> Direction {
        match self {
            MessageType::OfferChannel
            | MessageType::RescindChannelOffer
            | MessageType::AllOffersDelivered
            | MessageType::OpenChannelResult
            | MessageType::GpadlCreated
            | MessageType::GpadlTorndown
            | MessageType::VersionResponse
            | MessageType::UnloadResponse
            | MessageType::TlConnectResult
            | MessageType::ModifyChannelResponse => Direction::HostToGuest,
            MessageType::RequestOffers
            | MessageType::OpenChannel
            | MessageType::CloseChannel
            | MessageType::GpadlHeader
            | MessageType::GpadlBody
            | MessageType::GpadlTeardown
            | MessageType::RelidReleased
            | MessageType::InitiateContact
            | MessageType::Unload
            | MessageType::TlConnectRequest
            | MessageType::ModifyChannel => Direction::GuestToHost,
        }
    }

    /// Size of the fixed struct (header included); variable/optional tails come after it.
    pub const fn struct_size(self) -> usize {
        match self {
            MessageType::OfferChannel => size_of::<OfferChannel>(),
            MessageType::RescindChannelOffer => size_of::<RescindChannelOffer>(),
            MessageType::RequestOffers => size_of::<RequestOffers>(),
            MessageType::AllOffersDelivered => size_of::<AllOffersDelivered>(),
            MessageType::OpenChannel => size_of::<OpenChannel>(),
            MessageType::OpenChannelResult => size_of::<OpenChannelResult>(),
            MessageType::CloseChannel => size_of::<CloseChannel>(),
            MessageType::GpadlHeader => size_of::<GpadlHeader>(),
            MessageType::GpadlBody => size_of::<GpadlBody>(),
            MessageType::GpadlCreated => size_of::<GpadlCreated>(),
            MessageType::GpadlTeardown => size_of::<GpadlTeardown>(),
            MessageType::GpadlTorndown => size_of::<GpadlTorndown>(),
            MessageType::RelidReleased => size_of::<RelidReleased>(),
            MessageType::InitiateContact => size_of::<InitiateContact>(),
            MessageType::VersionResponse => size_of::<VersionResponse>(),
            MessageType::Unload => size_of::<Unload>(),
            MessageType::UnloadResponse => size_of::<UnloadResponse>(),
            MessageType::TlConnectRequest => size_of::<TlConnectRequest>(),
            MessageType::ModifyChannel => size_of::<ModifyChannel>(),
            MessageType::TlConnectResult => size_of::<TlConnectResult>(),
            MessageType::ModifyChannelResponse => size_of::<ModifyChannelResponse>(),
        }
    }

    /// `min_payload_len` of Linux's `channel_message_table` (drivers/hv/channel_mgmt.c) for the
    /// host→guest messages Linux handles; `None` for the ones it has no handler for (it drops
    /// them whatever their length). 0 means "any length".
    pub const fn linux_min_payload_len(self) -> Option<usize> {
        match self {
            MessageType::OfferChannel => Some(size_of::<OfferChannel>()),
            MessageType::RescindChannelOffer => Some(size_of::<RescindChannelOffer>()),
            MessageType::AllOffersDelivered => Some(0),
            MessageType::OpenChannelResult => Some(size_of::<OpenChannelResult>()),
            MessageType::GpadlCreated => Some(size_of::<GpadlCreated>()),
            MessageType::GpadlTorndown => Some(size_of::<GpadlTorndown>()),
            MessageType::VersionResponse => Some(size_of::<VersionResponse>()),
            MessageType::UnloadResponse => Some(0),
            MessageType::ModifyChannelResponse => Some(size_of::<ModifyChannelResponse>()),
            _ => None,
        }
    }

    /// Shortest message [`ChannelMessage::parse`](super::ChannelMessage::parse) accepts:
    /// Linux's `min_payload_len` where Linux has one, except that the 4-byte `msgtype` itself must
    /// be present (Linux's 0 for ALLOFFERS_DELIVERED / UNLOAD_RESPONSE reads it from the slot);
    /// for guest→host messages the size Linux sends (the fixed struct; GPADL header/body without
    /// any range words). Longer messages are accepted and the extra bytes ignored.
    pub const fn min_len(self) -> usize {
        match self.linux_min_payload_len() {
            Some(0) => 4,
            Some(n) => n,
            None => self.struct_size(),
        }
    }

    /// Lowest protocol version in which the message exists (reference §3.2 / OpenVMM). Version
    /// negotiation messages exist in every version.
    pub const fn min_version(self) -> Version {
        match self {
            MessageType::UnloadResponse => Version::Win7,
            MessageType::TlConnectRequest => Version::Win10,
            MessageType::ModifyChannel | MessageType::TlConnectResult => Version::Win10V4_1,
            MessageType::ModifyChannelResponse => Version::Win10V5_3,
            _ => Version::Ws2008,
        }
    }

    /// Name and byte offset/size of each fixed field, in order (for error messages and docs).
    pub const fn fields(self) -> &'static [Field] {
        match self {
            MessageType::OfferChannel => OfferChannel::FIELDS,
            MessageType::RescindChannelOffer => RescindChannelOffer::FIELDS,
            MessageType::RequestOffers => RequestOffers::FIELDS,
            MessageType::AllOffersDelivered => AllOffersDelivered::FIELDS,
            MessageType::OpenChannel => OpenChannel::FIELDS,
            MessageType::OpenChannelResult => OpenChannelResult::FIELDS,
            MessageType::CloseChannel => CloseChannel::FIELDS,
            MessageType::GpadlHeader => GpadlHeader::FIELDS,
            MessageType::GpadlBody => GpadlBody::FIELDS,
            MessageType::GpadlCreated => GpadlCreated::FIELDS,
            MessageType::GpadlTeardown => GpadlTeardown::FIELDS,
            MessageType::GpadlTorndown => GpadlTorndown::FIELDS,
            MessageType::RelidReleased => RelidReleased::FIELDS,
            MessageType::InitiateContact => InitiateContact::FIELDS,
            MessageType::VersionResponse => VersionResponse::FIELDS,
            MessageType::Unload => Unload::FIELDS,
            MessageType::UnloadResponse => UnloadResponse::FIELDS,
            MessageType::TlConnectRequest => TlConnectRequest::FIELDS,
            MessageType::ModifyChannel => ModifyChannel::FIELDS,
            MessageType::TlConnectResult => TlConnectResult::FIELDS,
            MessageType::ModifyChannelResponse => ModifyChannelResponse::FIELDS,
        }
    }

    /// The first field that does not fit entirely in `len` bytes (`"(end)"` if all do).
    pub fn field_cut_at(self, len: usize) -> &'static str {
        self.fields()
            .iter()
            .find(|f| f.offset.saturating_add(f.size) > len)
            .map_or("(end)", |f| f.name)
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fixed field of a message struct.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Rust field name (Linux's, where it has one).
    pub name: &'static str,
    /// Byte offset from the start of the message (header included).
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Implemented by every fixed message struct.
pub trait WireMessage: FromBytes + IntoBytes + KnownLayout + Immutable + Copy {
    /// The message type in its header.
    const TYPE: MessageType;
    /// The struct's size, header included.
    const SIZE: usize = size_of::<Self>();
    /// Its fields, in order.
    const FIELDS: &'static [Field];
}
