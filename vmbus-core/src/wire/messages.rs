//! The channel-management messages (`CHANNELMSG_*`) as zerocopy structs, byte-exact with Linux
//! `include/linux/hyperv.h`.
//!
//! Linux declares every one of them `__packed`, so they are `#[repr(C, packed)]` here too (which
//! matters for the offer: with natural alignment its two `u64`s would pad it from 0xC4 to 0xC8).
//! Each struct starts with the 8-byte [`MessageHeader`], as in Linux, so a struct's bytes are the
//! whole SynIC payload. Read fields by value (`let r = msg.child_relid;`); packed fields cannot be
//! borrowed.

use core::mem::size_of;

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::guid::Guid;
use super::msgtype::{Field, MessageType, WireMessage};
use super::version::{FeatureFlags, Version};

/// Largest channel message: the SynIC message payload (`HV_MESSAGE_PAYLOAD_BYTE_COUNT`).
pub const MAX_MESSAGE_SIZE: usize = 240;
/// Size of [`MessageHeader`].
pub const HEADER_SIZE: usize = 8;
/// Size of the user-defined area of an offer and of OPENCHANNEL (`MAX_USER_DEFINED_BYTES`).
pub const USER_DEFINED_SIZE: usize = 120;

/// Status value for success (GPADL_CREATED, OPENCHANNEL_RESULT, MODIFYCHANNEL_RESPONSE).
pub const STATUS_SUCCESS: u32 = 0;
/// A generic failure status (NTSTATUS `STATUS_UNSUCCESSFUL`, what OpenVMM sends).
pub const STATUS_UNSUCCESSFUL: u32 = 0x8000_FFFF;
/// TL_CONNECT_RESULT status for a refused hv_sock connection (`STATUS_CONNECTION_REFUSED`).
pub const STATUS_CONNECTION_REFUSED: u32 = 0xC000_0236;
/// Offer monitor id when no monitor is allocated (OpenVMM's choice).
pub const MONITOR_ID_NONE: u8 = 0xFF;
/// OPENCHANNEL / MODIFYCHANNEL `target_vp` meaning "no interrupts" (OpenVMM).
pub const VP_INDEX_DISABLE_INTERRUPT: u32 = u32::MAX;

/// Offer `chn_flags` bits (Linux `VMBUS_CHANNEL_*`).
pub mod offer_flags {
    /// `ENUMERATE_DEVICE_INTERFACE`.
    pub const ENUMERATE_DEVICE_INTERFACE: u16 = 0x0001;
    /// Linux 6.1 `SERVER_SUPPORTS_TRANSFER_PAGES`; 6.0 / confidential series: the ring buffer
    /// must be in encrypted memory. Must be 0 for ordinary devices.
    pub const CONFIDENTIAL_RING_BUFFER: u16 = 0x0002;
    /// Linux 6.1 `SERVER_SUPPORTS_GPADLS`; 6.0 / confidential series: GPA-direct ranges and
    /// extra GPADLs must be encrypted memory. Must be 0 for ordinary devices.
    pub const CONFIDENTIAL_EXTERNAL_MEMORY: u16 = 0x0004;
    /// `NAMED_PIPE_MODE`: the user-defined area starts with a `pipe_mode` u32.
    pub const NAMED_PIPE_MODE: u16 = 0x0010;
    /// `LOOPBACK_OFFER`.
    pub const LOOPBACK_OFFER: u16 = 0x0100;
    /// `PARENT_OFFER`.
    pub const PARENT_OFFER: u16 = 0x0200;
    /// `REQUEST_MONITORED_NOTIFICATION`.
    pub const REQUEST_MONITORED_NOTIFICATION: u16 = 0x0400;
    /// `TLNPI_PROVIDER_OFFER`: an hv_sock connection, not a device (Linux reads this one).
    pub const TLNPI_PROVIDER_OFFER: u16 = 0x2000;
}

/// Pipe-mode offers: first u32 of the user-defined area (`VMBUS_PIPE_TYPE_*`).
pub mod pipe_type {
    /// Byte-stream pipe.
    pub const BYTE: u32 = 0;
    /// Message pipe.
    pub const MESSAGE: u32 = 4;
}

/// VERSION_RESPONSE `connection_state` values (Linux ignores the field).
pub mod connection_state {
    /// Connected.
    pub const SUCCESSFUL: u8 = 0;
    /// Refused for lack of resources.
    pub const FAILED_LOW_RESOURCES: u8 = 1;
    /// Refused for another reason.
    pub const FAILED_UNKNOWN_FAILURE: u8 = 2;
}

/// `struct vmbus_channel_message_header`: the first 8 bytes of every channel message.
#[repr(C, packed)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct MessageHeader {
    /// `enum vmbus_channel_message_type` as a u32.
    pub msgtype: u32,
    /// Padding; senders write 0, receivers ignore it.
    pub padding: u32,
}

impl MessageHeader {
    /// A header for `t` with zero padding.
    pub const fn new(t: MessageType) -> MessageHeader {
        MessageHeader {
            msgtype: t.raw(),
            padding: 0,
        }
    }
}

/// Declares a packed wire struct that starts with a [`MessageHeader`], with its [`WireMessage`]
/// impl (field table from `offset_of!`) and a `Default` that fills in the header.
macro_rules! wire_message {
    (
        $(#[$meta:meta])*
        pub struct $name:ident : $mt:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C, packed)]
        #[derive(
            Copy, Clone, Debug, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
        )]
        pub struct $name {
            /// Message header; `msgtype` identifies the message.
            pub header: MessageHeader,
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl WireMessage for $name {
            const TYPE: MessageType = MessageType::$mt;
            const FIELDS: &'static [Field] = &[
                Field { name: "header", offset: 0, size: HEADER_SIZE },
                $( Field {
                    name: stringify!($field),
                    offset: core::mem::offset_of!($name, $field),
                    size: size_of::<$ty>(),
                }, )*
            ];
        }

        impl Default for $name {
            /// All zero except the header's `msgtype`.
            fn default() -> Self {
                let mut m = <Self as FromZeros>::new_zeroed();
                m.header = MessageHeader::new(MessageType::$mt);
                m
            }
        }
    };
}

wire_message! {
    /// OFFERCHANNEL, 0xC4 bytes: `struct vmbus_channel_offer_channel` with the embedded
    /// `struct vmbus_channel_offer` (0x08..0xB8) flattened.
    pub struct OfferChannel: OfferChannel {
        /// Device class GUID (`offer.if_type`), one of [`class`](super::guid::class).
        pub if_type: Guid,
        /// Device instance GUID (`offer.if_instance`); sub-channels repeat the primary's.
        pub if_instance: Guid,
        /// `offer.reserved1` (0).
        pub reserved1: u64,
        /// `offer.reserved2` (0).
        pub reserved2: u64,
        /// `offer.chn_flags`, see [`offer_flags`].
        pub chn_flags: u16,
        /// `offer.mmio_megabytes`: MMIO space the device wants from the VMBus window.
        pub mmio_megabytes: u16,
        /// `offer.u`: 120 user-defined bytes (`u.std.user_def`), or in pipe mode a `pipe_mode`
        /// u32 followed by 116 bytes (`u.pipe`); see [`OfferChannel::pipe_mode`].
        pub user_defined: [u8; USER_DEFINED_SIZE],
        /// `offer.sub_channel_index`: 0 = primary, ≥ 1 = sub-channel (Win8+).
        pub sub_channel_index: u16,
        /// `offer.reserved3` (OpenVMM: "mmio megabytes optional"); send 0.
        pub reserved3: u16,
        /// `child_relid`: the channel id, 1…2047.
        pub child_relid: u32,
        /// `monitorid`, 0…127 (0xFF when none is allocated).
        pub monitor_id: u8,
        /// Linux bitfield byte: bit 0 `monitor_allocated`, bits 1–7 reserved.
        pub monitor_flags: u8,
        /// Linux bitfield u16: bit 0 `is_dedicated_interrupt`, bits 1–15 reserved (Win7+).
        pub interrupt_flags: u16,
        /// `connection_id` the guest signals with (HvSignalEvent) (Win7+).
        pub connection_id: u32,
    }
}

impl OfferChannel {
    /// `monitor_allocated` bit.
    pub const fn monitor_allocated(&self) -> bool {
        self.monitor_flags & 1 != 0
    }

    /// Sets the `monitor_allocated` bit, keeping the reserved bits.
    pub fn set_monitor_allocated(&mut self, on: bool) {
        self.monitor_flags = (self.monitor_flags & !1) | u8::from(on);
    }

    /// `is_dedicated_interrupt` bit.
    pub const fn dedicated_interrupt(&self) -> bool {
        self.interrupt_flags & 1 != 0
    }

    /// Sets the `is_dedicated_interrupt` bit, keeping the reserved bits.
    pub fn set_dedicated_interrupt(&mut self, on: bool) {
        self.interrupt_flags = (self.interrupt_flags & !1) | u16::from(on);
    }

    /// `u.pipe.pipe_mode` (the first u32 of the user-defined area), meaningful when
    /// [`offer_flags::NAMED_PIPE_MODE`] is set.
    pub const fn pipe_mode(&self) -> u32 {
        let u = self.user_defined;
        u32::from_le_bytes([u[0], u[1], u[2], u[3]])
    }

    /// Sets `u.pipe.pipe_mode`.
    pub fn set_pipe_mode(&mut self, mode: u32) {
        let mut u = self.user_defined;
        for (d, s) in u.iter_mut().zip(mode.to_le_bytes()) {
            *d = s;
        }
        self.user_defined = u;
    }

    /// `u.pipe.user_def`: the 116 bytes after `pipe_mode`.
    pub fn pipe_user_defined(&self) -> [u8; 116] {
        let mut out = [0u8; 116];
        let u = self.user_defined;
        for (d, s) in out.iter_mut().zip(u.iter().skip(4)) {
            *d = *s;
        }
        out
    }

    /// An hv_sock connection offer ([`offer_flags::TLNPI_PROVIDER_OFFER`]), Linux `is_hvsock_offer`.
    pub const fn is_hvsock(&self) -> bool {
        self.chn_flags & offer_flags::TLNPI_PROVIDER_OFFER != 0
    }

    /// A sub-channel offer (index ≠ 0), Linux `is_sub_channel`.
    pub const fn is_sub_channel(&self) -> bool {
        self.sub_channel_index != 0
    }
}

wire_message! {
    /// RESCIND_CHANNELOFFER, 0x0C bytes (`struct vmbus_channel_rescind_offer`).
    pub struct RescindChannelOffer: RescindChannelOffer {
        /// Channel being withdrawn.
        pub child_relid: u32,
    }
}

wire_message! {
    /// REQUESTOFFERS, header only (8 bytes).
    pub struct RequestOffers: RequestOffers {}
}

wire_message! {
    /// ALLOFFERS_DELIVERED, header only (8 bytes; Linux accepts any length).
    pub struct AllOffersDelivered: AllOffersDelivered {}
}

wire_message! {
    /// OPENCHANNEL, 0x94 bytes (`struct vmbus_channel_open_channel`). 6.0 adds an optional
    /// [`OpenChannelExt`] at 0x94.
    pub struct OpenChannel: OpenChannel {
        /// Channel to open.
        pub child_relid: u32,
        /// `openid`: Linux sends the relid; the result echoes it.
        pub openid: u32,
        /// GPADL holding both rings.
        pub ringbuffer_gpadlhandle: u32,
        /// VP index for host→guest interrupts of this channel (Win8+; before, 0).
        pub target_vp: u32,
        /// Page offset of the host→guest ("downstream", Linux inbound) ring in the GPADL.
        pub downstream_ringbuffer_pageoffset: u32,
        /// `userdata`: 120 bytes passed to the device (Linux ICs/storage/net send zeros).
        pub userdata: [u8; USER_DEFINED_SIZE],
    }
}

/// 6.0 OPENCHANNEL extension at 0x94 (OpenVMM `OpenChannel2`; not in Linux). Meaningful only
/// with [`FeatureFlags::GUEST_SPECIFIED_SIGNAL_PARAMETERS`] / `CHANNEL_INTERRUPT_REDIRECTION`
/// negotiated.
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct OpenChannelExt {
    /// Guest-chosen connection id for signalling the host.
    pub connection_id: u32,
    /// Guest-chosen event flag.
    pub event_flag: u16,
    /// Bit 0: redirect interrupt.
    pub flags: u16,
}

wire_message! {
    /// OPENCHANNEL_RESULT, 0x14 bytes (`struct vmbus_channel_open_result`).
    pub struct OpenChannelResult: OpenChannelResult {
        /// Channel that was opened.
        pub child_relid: u32,
        /// Echo of OPENCHANNEL `openid`.
        pub openid: u32,
        /// 0 = success; Linux fails the open on anything else.
        pub status: u32,
    }
}

wire_message! {
    /// CLOSECHANNEL, 0x0C bytes (`struct vmbus_channel_close_channel`).
    pub struct CloseChannel: CloseChannel {
        /// Channel to close.
        pub child_relid: u32,
    }
}

wire_message! {
    /// GPADL_HEADER fixed part, 0x14 bytes (`struct vmbus_channel_gpadl_header` without the
    /// `range[]` flexible array). It is followed by u64 range words: for each range a
    /// [`GpaRange`] word then its PFNs.
    pub struct GpadlHeader: GpadlHeader {
        /// Channel the GPADL belongs to.
        pub child_relid: u32,
        /// Guest-chosen GPADL handle.
        pub gpadl: u32,
        /// Bytes of range words in the whole GPADL (this message and its bodies).
        pub range_buflen: u16,
        /// Number of ranges (Linux: 1).
        pub rangecount: u16,
    }
}

/// `struct gpa_range` header word: one range of a GPADL, followed by
/// [`GpaRange::pfn_count`] PFN words.
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct GpaRange {
    /// Length of the range in bytes.
    pub byte_count: u32,
    /// Offset of the range's start into its first page.
    pub byte_offset: u32,
}

impl GpaRange {
    /// The range header from its u64 word (`byte_count` in the low half).
    pub const fn from_word(w: u64) -> GpaRange {
        GpaRange {
            byte_count: w as u32,
            byte_offset: (w >> 32) as u32,
        }
    }

    /// The u64 word.
    pub const fn to_word(&self) -> u64 {
        (self.byte_count as u64) | ((self.byte_offset as u64) << 32)
    }

    /// PFNs following this header: `ceil((byte_offset + byte_count) / 4096)` (no overflow: the
    /// sum of two u32 fits a u64).
    pub const fn pfn_count(&self) -> u64 {
        (self.byte_offset as u64 + self.byte_count as u64).div_ceil(4096)
    }
}

wire_message! {
    /// GPADL_BODY fixed part, 0x10 bytes (`struct vmbus_channel_gpadl_body` without `pfn[]`);
    /// followed by more PFN / range words of the GPADL.
    pub struct GpadlBody: GpadlBody {
        /// Linux 0; OpenVMM "reserved". Not a sequence number: do not validate.
        pub msgnumber: u32,
        /// GPADL handle from the header.
        pub gpadl: u32,
    }
}

wire_message! {
    /// GPADL_CREATED, 0x14 bytes (`struct vmbus_channel_gpadl_created`).
    pub struct GpadlCreated: GpadlCreated {
        /// Channel from the header.
        pub child_relid: u32,
        /// GPADL handle.
        pub gpadl: u32,
        /// 0 = success (Linux: anything else fails with -EDQUOT).
        pub creation_status: u32,
    }
}

wire_message! {
    /// GPADL_TEARDOWN, 0x10 bytes (`struct vmbus_channel_gpadl_teardown`).
    pub struct GpadlTeardown: GpadlTeardown {
        /// Channel the GPADL belongs to.
        pub child_relid: u32,
        /// GPADL handle.
        pub gpadl: u32,
    }
}

wire_message! {
    /// GPADL_TORNDOWN, 0x0C bytes (`struct vmbus_channel_gpadl_torndown`).
    pub struct GpadlTorndown: GpadlTorndown {
        /// GPADL handle.
        pub gpadl: u32,
    }
}

wire_message! {
    /// RELID_RELEASED, 0x0C bytes (`struct vmbus_channel_relid_released`).
    pub struct RelidReleased: RelidReleased {
        /// Channel id the guest no longer uses.
        pub child_relid: u32,
    }
}

wire_message! {
    /// INITIATE_CONTACT, 0x28 bytes (`struct vmbus_channel_initiate_contact`). Bytes 0x10..0x18
    /// are a union: the interrupt page GPA before 5.0, else `msg_sint`, `msg_vtl`, 2 reserved
    /// bytes and (6.0) `feature_flags`. 6.0 with [`FeatureFlags::CLIENT_ID`] appends a client id
    /// GUID at 0x28.
    pub struct InitiateContact: InitiateContact {
        /// Requested [`Version`] wire value.
        pub vmbus_version_requested: u32,
        /// VP the host sends its messages to (3.0+).
        pub target_vcpu: u32,
        /// SINT for host→guest messages (5.0+; Linux 2). Low byte of the interrupt page GPA before.
        pub msg_sint: u8,
        /// VTL for host→guest messages (5.1+; Linux `ms_hyperv.vtl`, 0).
        pub msg_vtl: u8,
        /// Reserved (0).
        pub reserved: [u8; 2],
        /// Requested [`FeatureFlags`] (6.0+).
        pub feature_flags: u32,
        /// Parent→child monitor page GPA.
        pub monitor_page1: u64,
        /// Child→parent monitor page GPA (the guest sets trigger bits here).
        pub monitor_page2: u64,
    }
}

impl InitiateContact {
    /// The union at 0x10 read as `interrupt_page` (before 5.0).
    pub const fn interrupt_page(&self) -> u64 {
        let r = self.reserved;
        let f = self.feature_flags.to_le_bytes();
        u64::from_le_bytes([
            self.msg_sint,
            self.msg_vtl,
            r[0],
            r[1],
            f[0],
            f[1],
            f[2],
            f[3],
        ])
    }

    /// Writes the union at 0x10 as `interrupt_page`.
    pub fn set_interrupt_page(&mut self, gpa: u64) {
        let b = gpa.to_le_bytes();
        self.msg_sint = b[0];
        self.msg_vtl = b[1];
        self.reserved = [b[2], b[3]];
        self.feature_flags = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    }

    /// `vmbus_version_requested` as a known [`Version`].
    pub const fn version(&self) -> Option<Version> {
        Version::from_raw(self.vmbus_version_requested)
    }

    /// `feature_flags` as [`FeatureFlags`] (meaningful from 6.0).
    pub const fn features(&self) -> FeatureFlags {
        FeatureFlags(self.feature_flags)
    }
}

wire_message! {
    /// VERSION_RESPONSE, 0x10 bytes (`struct vmbus_channel_version_response`). 6.0 appends
    /// `supported_features` (u32 at 0x10, 0x14 bytes) and, with
    /// [`FeatureFlags::SERVER_SPECIFIED_MONITOR_PAGES`], [`ServerMonitorPages`] (0x28 bytes).
    pub struct VersionResponse: VersionResponse {
        /// 1 = version accepted, 0 = refused.
        pub version_supported: u8,
        /// See [`connection_state`] (Linux ignores it).
        pub connection_state: u8,
        /// Padding (0).
        pub padding: u16,
        /// Connection id for all later guest messages (read by Linux only from 5.0; OpenVMM puts
        /// the accepted version here below 5.0).
        pub msg_conn_id: u32,
    }
}

/// VERSION_RESPONSE tail at 0x14 when the server provides the monitor pages (OpenVMM
/// `VersionResponse3`; not in Linux).
#[repr(C, packed)]
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct ServerMonitorPages {
    /// Padding (0).
    pub padding: u32,
    /// Parent→child monitor page GPA (may be 0).
    pub parent_to_child_monitor_page_gpa: u64,
    /// Child→parent monitor page GPA (non-zero).
    pub child_to_parent_monitor_page_gpa: u64,
}

wire_message! {
    /// UNLOAD, header only (8 bytes).
    pub struct Unload: Unload {}
}

wire_message! {
    /// UNLOAD_RESPONSE, header only (8 bytes; Linux accepts any length).
    pub struct UnloadResponse: UnloadResponse {}
}

wire_message! {
    /// TL_CONNECT_REQUEST, 0x28 bytes (`struct vmbus_channel_tl_connect_request`); OpenVMM's
    /// 5.2+ variant appends a silo id GUID at 0x28.
    pub struct TlConnectRequest: TlConnectRequest {
        /// hv_sock endpoint on the guest side.
        pub guest_endpoint_id: Guid,
        /// hv_sock service on the host side.
        pub host_service_id: Guid,
    }
}

wire_message! {
    /// MODIFYCHANNEL, 0x10 bytes (`struct vmbus_channel_modifychannel`).
    pub struct ModifyChannel: ModifyChannel {
        /// Channel to retarget.
        pub child_relid: u32,
        /// New VP for host→guest interrupts.
        pub target_vp: u32,
    }
}

wire_message! {
    /// TL_CONNECT_RESULT, 0x2C bytes (OpenVMM layout; Linux has no struct and ignores it).
    pub struct TlConnectResult: TlConnectResult {
        /// Endpoint from the request.
        pub endpoint_id: Guid,
        /// Service from the request.
        pub service_id: Guid,
        /// NTSTATUS (e.g. [`STATUS_CONNECTION_REFUSED`]).
        pub status: u32,
    }
}

wire_message! {
    /// MODIFYCHANNEL_RESPONSE, 0x10 bytes (`struct vmbus_channel_modifychannel_response`).
    pub struct ModifyChannelResponse: ModifyChannelResponse {
        /// Channel from the request.
        pub child_relid: u32,
        /// 0 = success.
        pub status: u32,
    }
}
