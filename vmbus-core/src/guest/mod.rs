//! The guest (child) side of VMBus: a sans-IO state machine mirroring Linux `hv_vmbus`.
//!
//! [`Client`] never blocks, spawns, maps memory or makes hypercalls. Whoever drives it (the
//! `vsc-guest` library, a bare-metal test guest, a test) does the I/O:
//!
//! - calls a guest operation ([`Client::connect`], [`Client::create_gpadl`],
//!   [`Client::open_channel`], …), which queues channel messages;
//! - takes them with [`Client::poll_post`] and posts each with `HvPostMessage` to
//!   [`Post::connection_id`] (SynIC message type 1), in order; if the INITIATE_CONTACT post fails,
//!   reports it with [`Client::post_failed`];
//! - feeds every host message read from the SINT 2 message slot to [`Client::handle_message`];
//! - takes the outcomes with [`Client::poll_event`] ([`ClientEvent`]).
//!
//! The sequences follow Linux 6.1 (`drivers/hv/connection.c`, `channel_mgmt.c`, `channel.c`),
//! see the reference §2–§5:
//!
//! - **Version negotiation**: INITIATE_CONTACT for each configured version, newest first
//!   ([`Version::LINUX_NEGOTIATION_ORDER`]), to connection id 4 from 5.0 on and 1 before; a
//!   refusal (`version_supported = 0`) or a failed post moves to the next version; when all are
//!   refused the client reports [`ClientEvent::ConnectFailed`]. Once connected, every message goes
//!   to the VERSION_RESPONSE `msg_conn_id` (≥ 5.0) or to connection id 1.
//! - **Offers**: recorded per relid (relids ≥ 2048 are refused, as Linux cannot map them);
//!   sub-channels (same class and instance GUID, index ≥ 1) are tied to their primary; a second
//!   primary with an instance GUID already in use is dropped.
//! - **GPADLs**: one range, `byte_offset` 0, GPADL_HEADER with up to 26 PFNs, then GPADL_BODYs of
//!   up to 28 (`msgnumber` 0); handles count up from [`ClientConfig::first_gpadl_handle`] and are
//!   never 0.
//! - **Channels**: offered → opening → open → closed (reopenable); a rescind fails whatever
//!   the channel was waiting for (open, GPADL creation or teardown, MODIFYCHANNEL) and leaves it to
//!   the driver to close it (if open) and release the relid.
//! - **Unload** (≥ 3.0): UNLOAD, then on UNLOAD_RESPONSE every channel and GPADL is gone and the
//!   client can connect again.
//!
//! Host messages that do not fit the state (wrong connection state, unknown relid or handle,
//! nothing pending, guest→host types, unparsable bytes) are refused with a [`ClientError`] that
//! names the message and the id; the client's state is then unchanged, so the caller logs the
//! error and carries on. The client never panics on host input and host input cannot make it grow
//! without bound (at most [`MAX_RELIDS`] channels, at most [`MAX_PENDING_EVENTS`] queued events).
//!
//! [`Client::save`] / [`Client::restore`] turn the whole state into a plain [`ClientSnapshot`].

mod client;
mod dispatch;
mod error;
mod snapshot;
#[cfg(test)]
mod tests;

use crate::wire::{
    GpadlBody, GpadlHeader, Guid, MAX_MESSAGE_SIZE, MessageBuf, OfferChannel, USER_DEFINED_SIZE,
    Version, WireMessage, offer_flags,
};

pub use client::Client;
pub use error::ClientError;
pub use snapshot::{ChannelRecord, ClientSnapshot, ConnectionState, GpadlRecord};

/// Relids Linux can use: `MAX_CHANNEL_RELIDS` (2048, one bit per relid in the SynIC event flags
/// page). Offers for relids at or above this are refused.
pub const MAX_RELIDS: u32 = 2048;

/// GPADL handle Linux starts counting from (`vmbus_connection.next_gpadl_handle`).
pub const LINUX_FIRST_GPADL_HANDLE: u32 = 0xE1E10;

/// PFNs that fit in a GPADL_HEADER after the one range word: `(240 − 20 − 8) / 8` = 26.
pub const GPADL_HEADER_MAX_PFNS: usize = (MAX_MESSAGE_SIZE - GpadlHeader::SIZE - 8) / 8;

/// PFNs that fit in a GPADL_BODY: `(240 − 16) / 8` = 28.
pub const GPADL_BODY_MAX_PFNS: usize = (MAX_MESSAGE_SIZE - GpadlBody::SIZE) / 8;

/// Most pages one GPADL range can describe: `range_buflen = 8 + 8 × pages` is a u16.
pub const GPADL_MAX_PAGES: usize = (u16::MAX as usize - 8) / 8;

/// Size of a GPADL page (Hyper-V page).
pub const PAGE_SIZE: u32 = 4096;

/// Status the client reports (in [`ClientEvent::OpenResult`], [`ClientEvent::GpadlCreated`],
/// [`ClientEvent::ModifyResult`]) for an operation abandoned because the host rescinded the
/// channel. Never on the wire; NTSTATUS `STATUS_DEVICE_REMOVED`. Linux returns `-ENODEV` here.
pub const STATUS_CHANNEL_RESCINDED: u32 = 0xC000_02B6;

/// Host messages the client queues events for at most; beyond this [`Client::handle_message`]
/// refuses host messages ([`ClientError::EventQueueFull`]) until the caller drains events.
pub const MAX_PENDING_EVENTS: usize = 4096;

/// How often an INITIATE_CONTACT whose post failed with a transient status is re-queued before
/// the client moves on to the next version (Linux `vmbus_post_msg` retries 100 times).
pub const POST_RETRY_LIMIT: u8 = 100;

/// Hypercall status codes [`Client::post_failed`] distinguishes (`HV_STATUS_*`).
pub mod hv_status {
    /// `HV_STATUS_SUCCESS`.
    pub const SUCCESS: u16 = 0x0000;
    /// `HV_STATUS_INSUFFICIENT_MEMORY`: transient, Linux retries the post.
    pub const INSUFFICIENT_MEMORY: u16 = 0x000B;
    /// `HV_STATUS_INVALID_CONNECTION_ID`: for INITIATE_CONTACT, the host does not serve this
    /// version's connection id (a pre-5.0 host and connection id 4); Linux moves on.
    pub const INVALID_CONNECTION_ID: u16 = 0x0012;
    /// `HV_STATUS_INSUFFICIENT_BUFFERS`: transient, Linux retries the post.
    pub const INSUFFICIENT_BUFFERS: u16 = 0x0013;
}

/// How the client introduces itself in INITIATE_CONTACT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// VP index the host sends channel messages to (Linux: the VP of CPU 0).
    pub target_vcpu: u32,
    /// SINT for host→guest messages (sent from 5.0 on; Linux 2).
    pub msg_sint: u8,
    /// VTL for host→guest messages (sent from 5.0 on, read by hosts from 5.1; Linux 0).
    pub msg_vtl: u8,
    /// Versions to try, in order (default [`Version::LINUX_NEGOTIATION_ORDER`], newest first).
    pub versions: alloc::vec::Vec<Version>,
    /// First GPADL handle (default [`LINUX_FIRST_GPADL_HANDLE`]).
    pub first_gpadl_handle: u32,
    /// Legacy interrupt page GPA sent below 5.0 (Linux sends its page; 0 = none).
    pub interrupt_page: u64,
    /// Monitor pages (parent→child, child→parent) GPAs; `None` sends 0 for both.
    pub monitor_pages: Option<(u64, u64)>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            target_vcpu: 0,
            msg_sint: crate::wire::MESSAGE_SINT,
            msg_vtl: 0,
            versions: Version::LINUX_NEGOTIATION_ORDER.to_vec(),
            first_gpadl_handle: LINUX_FIRST_GPADL_HANDLE,
            interrupt_page: 0,
            monitor_pages: None,
        }
    }
}

/// A channel message the client wants posted to the host (`HvPostMessage`, message type 1).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Post {
    /// Connection id to post to.
    pub connection_id: u32,
    /// The message; its length is the post's payload size.
    pub msg: MessageBuf,
}

/// What [`Client::open_channel`] puts in OPENCHANNEL.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OpenParams {
    /// GPADL holding both rings (created on this channel, GPADL_CREATED received).
    pub ring_gpadl: u32,
    /// Page offset of the host→guest ring in that GPADL (= pages of the guest→host ring).
    pub downstream_offset_pages: u32,
    /// VP index for this channel's interrupts.
    pub target_vp: u32,
    /// OPENCHANNEL user data (Linux drivers send zeros).
    pub user_data: [u8; USER_DEFINED_SIZE],
}

impl OpenParams {
    /// Parameters with zero user data.
    pub const fn new(ring_gpadl: u32, downstream_offset_pages: u32, target_vp: u32) -> Self {
        OpenParams {
            ring_gpadl,
            downstream_offset_pages,
            target_vp,
            user_data: [0; USER_DEFINED_SIZE],
        }
    }
}

/// What the client keeps of an OFFERCHANNEL (all Linux uses and a little more).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct OfferInfo {
    /// Channel id.
    pub relid: u32,
    /// Device class (interface type) GUID.
    pub class_id: Guid,
    /// Device instance GUID (sub-channels repeat their primary's).
    pub instance_id: Guid,
    /// 0 for a primary channel, ≥ 1 for a sub-channel.
    pub sub_channel_index: u16,
    /// Offer flags ([`offer_flags`]).
    pub flags: u16,
    /// MMIO space the device wants, in MiB.
    pub mmio_megabytes: u16,
    /// The 120 user-defined bytes (in pipe mode: `pipe_mode` u32 first).
    pub user_defined: [u8; USER_DEFINED_SIZE],
    /// Connection id for `HvSignalEvent` (the legacy event connection 2 on 0.13, as Linux).
    pub connection_id: u32,
    /// Monitor id (meaningful when `monitor_allocated`).
    pub monitor_id: u8,
    /// The host allocated a monitor (MNF) slot for this channel.
    pub monitor_allocated: bool,
    /// Dedicated interrupt (always false on 0.13, as Linux).
    pub dedicated_interrupt: bool,
}

impl OfferInfo {
    /// What Linux `vmbus_setup_channel_state` takes from an offer under `version`.
    pub fn from_wire(offer: &OfferChannel, version: Version) -> OfferInfo {
        let (connection_id, dedicated_interrupt) = if version.offer_has_connection_id() {
            (offer.connection_id, offer.dedicated_interrupt())
        } else {
            (crate::wire::EVENT_CONNECTION_ID, false)
        };
        OfferInfo {
            relid: offer.child_relid,
            class_id: offer.if_type,
            instance_id: offer.if_instance,
            sub_channel_index: offer.sub_channel_index,
            flags: offer.chn_flags,
            mmio_megabytes: offer.mmio_megabytes,
            user_defined: offer.user_defined,
            connection_id,
            monitor_id: offer.monitor_id,
            monitor_allocated: offer.monitor_allocated(),
            dedicated_interrupt,
        }
    }

    /// A sub-channel offer (index ≠ 0).
    pub const fn is_subchannel(&self) -> bool {
        self.sub_channel_index != 0
    }

    /// An hv_sock connection offer (`TLNPI_PROVIDER_OFFER`).
    pub const fn is_hvsock(&self) -> bool {
        self.flags & offer_flags::TLNPI_PROVIDER_OFFER != 0
    }

    /// The pipe mode (first u32 of the user-defined bytes) if the offer is in named-pipe mode.
    pub const fn pipe_mode(&self) -> Option<u32> {
        if self.flags & offer_flags::NAMED_PIPE_MODE == 0 {
            return None;
        }
        let u = &self.user_defined;
        Some(u32::from_le_bytes([u[0], u[1], u[2], u[3]]))
    }
}

/// Where a channel is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ChannelState {
    /// Offered and not open (never opened, or the last open failed).
    Offered,
    /// OPENCHANNEL sent, waiting for OPENCHANNEL_RESULT.
    Opening,
    /// Open.
    Open,
    /// CLOSECHANNEL sent (nothing answers it); may be opened again.
    Closed,
    /// Rescinded while open: close it, then release the relid.
    RescindedOpen,
    /// Rescinded and not open: release the relid.
    Rescinded,
}

impl ChannelState {
    /// The host rescinded the channel.
    pub const fn is_rescinded(self) -> bool {
        matches!(self, ChannelState::Rescinded | ChannelState::RescindedOpen)
    }

    /// The channel has a ring GPADL in use (opening or open, rescinded or not).
    pub const fn uses_ring(self) -> bool {
        matches!(
            self,
            ChannelState::Opening | ChannelState::Open | ChannelState::RescindedOpen
        )
    }
}

/// Where a GPADL is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum GpadlState {
    /// GPADL_HEADER (and bodies) sent, waiting for GPADL_CREATED.
    Creating,
    /// Created; usable.
    Created,
    /// GPADL_TEARDOWN sent, waiting for GPADL_TORNDOWN.
    TearingDown,
}

/// Something the driver should know, in the order it happened.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The host accepted `version`; later posts go to `msg_conn_id`.
    Connected {
        /// Negotiated version.
        version: Version,
        /// Connection id for all later messages.
        msg_conn_id: u32,
    },
    /// The host refused every configured version (Linux: "Unable to connect to host").
    ConnectFailed,
    /// A new channel (primary or sub-channel, see [`Client::primary_of`]).
    Offer(OfferInfo),
    /// ALLOFFERS_DELIVERED.
    AllOffersDelivered,
    /// The host withdrew the channel: close it if it was open, then [`Client::release_relid`].
    Rescinded {
        /// The channel.
        relid: u32,
    },
    /// GPADL_CREATED (status 0 = usable; otherwise the handle is gone), or
    /// [`STATUS_CHANNEL_RESCINDED`].
    GpadlCreated {
        /// Channel of the GPADL.
        relid: u32,
        /// The handle.
        handle: u32,
        /// Host status.
        status: u32,
    },
    /// The GPADL is gone (GPADL_TORNDOWN, or teardown on a rescinded channel).
    GpadlTorndown {
        /// The handle.
        handle: u32,
    },
    /// OPENCHANNEL_RESULT (status 0 = open), or [`STATUS_CHANNEL_RESCINDED`].
    OpenResult {
        /// The channel.
        relid: u32,
        /// Host status.
        status: u32,
    },
    /// MODIFYCHANNEL answered (≥ 5.3), or sent (below 5.3, no answer exists: status 0), or
    /// [`STATUS_CHANNEL_RESCINDED`].
    ModifyResult {
        /// The channel.
        relid: u32,
        /// Host status.
        status: u32,
    },
    /// UNLOAD_RESPONSE: every channel and GPADL is gone; [`Client::connect`] may be called again.
    Unloaded,
}
