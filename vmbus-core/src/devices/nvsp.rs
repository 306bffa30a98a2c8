//! NVSP, the transport half of the synthetic network protocol (netvsc ↔ netvsp), byte-exact with
//! Linux `drivers/net/hyperv/hyperv_net.h`.
//!
//! Every NVSP message is a `u32` type followed by a type-specific body; Linux declares the union
//! `__packed` and pads the whole message to 28 bytes before NVSP 6.1 and 40 bytes from 6.1 on
//! ([`message_size`]). Linux always sends 40 bytes. Both ends use this module: [`NvspMessage::parse`]
//! is total (any bytes give `Ok` or a typed [`NvspError`], never a panic) and [`NvspMessage::to_bytes`]
//! writes a message padded to the size the caller asks for.
//!
//! Bodies are `#[repr(C, packed)]` like Linux; read fields by value.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;
use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// NVSP protocol versions (`major << 16 | minor`; version 1 keeps its legacy encoding).
pub mod version {
    pub const V1: u32 = 0x0000_0002;
    pub const V2: u32 = 0x0003_0002;
    pub const V4: u32 = 0x0004_0000;
    pub const V5: u32 = 0x0005_0000;
    pub const V6: u32 = 0x0006_0000;
    pub const V61: u32 = 0x0006_0001;
    /// Every version a host may grant, oldest first (Linux `ver_list`).
    pub const ALL: [u32; 6] = [V1, V2, V4, V5, V6, V61];
    /// The order Linux tries them (newest first, `min = max = v` each time).
    pub const LINUX_ORDER: [u32; 6] = [V61, V6, V5, V4, V2, V1];
}

/// Message types (Linux `NVSP_MSG*_TYPE_*`).
pub mod msg_type {
    pub const INIT: u32 = 1;
    pub const INIT_COMPLETE: u32 = 2;
    pub const SEND_NDIS_VERSION: u32 = 100;
    pub const SEND_RECEIVE_BUFFER: u32 = 101;
    pub const SEND_RECEIVE_BUFFER_COMPLETE: u32 = 102;
    pub const REVOKE_RECEIVE_BUFFER: u32 = 103;
    pub const SEND_SEND_BUFFER: u32 = 104;
    pub const SEND_SEND_BUFFER_COMPLETE: u32 = 105;
    pub const REVOKE_SEND_BUFFER: u32 = 106;
    pub const SEND_RNDIS_PACKET: u32 = 107;
    pub const SEND_RNDIS_PACKET_COMPLETE: u32 = 108;
    /// First of the obsolete v2 chimney / VMQ messages (109..=124, 126, 127).
    pub const V2_CHIMNEY_FIRST: u32 = 109;
    pub const V2_CHIMNEY_LAST: u32 = 124;
    pub const SEND_NDIS_CONFIG: u32 = 125;
    pub const ALLOC_CHIMNEY_HANDLE: u32 = 126;
    pub const ALLOC_CHIMNEY_HANDLE_COMPLETE: u32 = 127;
    pub const SEND_VF_ASSOCIATION: u32 = 128;
    pub const SWITCH_DATA_PATH: u32 = 129;
    pub const UPLINK_CONNECT_STATE_DEPRECATED: u32 = 130;
    pub const OID_QUERY_EX: u32 = 131;
    pub const OID_QUERY_EX_COMPLETE: u32 = 132;
    pub const SUBCHANNEL: u32 = 133;
    pub const SEND_INDIRECTION_TABLE: u32 = 134;
    pub const PD_API: u32 = 135;
    pub const PD_POST_BATCH: u32 = 136;
}

/// Status values (`NVSP_STAT_*`).
pub mod status {
    pub const NONE: u32 = 0;
    pub const SUCCESS: u32 = 1;
    pub const FAIL: u32 = 2;
    pub const PROTOCOL_TOO_NEW: u32 = 3;
    pub const PROTOCOL_TOO_OLD: u32 = 4;
    pub const INVALID_RNDIS_PACKET: u32 = 5;
    pub const BUSY: u32 = 6;
    pub const PROTOCOL_UNSUPPORTED: u32 = 7;
}

/// NDIS-config capability bits (`struct nvsp_2_vsc_capability`).
pub mod capability {
    pub const VMQ: u64 = 1 << 0;
    pub const CHIMNEY: u64 = 1 << 1;
    pub const SRIOV: u64 = 1 << 2;
    pub const IEEE8021Q: u64 = 1 << 3;
    pub const CORRELATION_ID: u64 = 1 << 4;
    pub const TEAMING: u64 = 1 << 5;
    pub const VIRTUAL_SUBNET_ID: u64 = 1 << 6;
    pub const RSC: u64 = 1 << 7;
}

/// Whole message size before NVSP 6.1 (`sizeof(struct nvsp_message)` then).
pub const MESSAGE_SIZE_V1: usize = 28;
/// Whole message size from NVSP 6.1 on.
pub const MESSAGE_SIZE_V61: usize = 40;
/// Receive-buffer id Linux registers; also the transfer-page set id of every receive packet.
pub const LINUX_RECEIVE_BUFFER_ID: u16 = 0xCAFE;
/// Send-buffer id Linux registers.
pub const LINUX_SEND_BUFFER_ID: u16 = 0;
/// `send_buf_section_index` meaning "no send-buffer section" (GPA-direct data).
pub const INVALID_SECTION_INDEX: u32 = 0xFFFF_FFFF;
/// `channel_type` of SEND_RNDIS_PKT: data (RMC_DATA).
pub const CHANNEL_TYPE_DATA: u32 = 0;
/// `channel_type` of SEND_RNDIS_PKT: control (RMC_CONTROL).
pub const CHANNEL_TYPE_CONTROL: u32 = 1;
/// SUBCHANNEL `op`: allocate.
pub const SUBCHANNEL_ALLOCATE: u32 = 1;
/// SWITCH_DATA_PATH values.
pub const DATAPATH_SYNTHETIC: u32 = 0;
pub const DATAPATH_VF: u32 = 1;
/// Entries of the send indirection table (`VRSS_SEND_TAB_SIZE`).
pub const INDIRECTION_TABLE_ENTRIES: usize = 16;
/// Offset of the table in the SEND_INDIRECTION_TABLE message OpenVMM (and this host) sends.
pub const INDIRECTION_TABLE_OFFSET: u32 = 12;
/// Offset Linux substitutes for NVSP <= 6 when the message is long enough (old host bug):
/// header + `union nvsp_6_message_uber`.
pub const LEGACY_INDIRECTION_TABLE_OFFSET: u32 = 40;
/// Largest receive-packet ranges Linux accepts in one transfer-page packet (`NVSP_RSC_MAX`).
pub const MAX_RECEIVE_RANGES: usize = 562;

/// NVSP message size for a negotiated version (28 before 6.1, 40 from 6.1).
pub const fn message_size(version: u32) -> usize {
    if version >= version::V61 {
        MESSAGE_SIZE_V61
    } else {
        MESSAGE_SIZE_V1
    }
}

/// The lowest negotiated version a message type is valid in, `None` for types that are never
/// valid (obsolete, or unknown).
pub const fn min_version(msg_type: u32) -> Option<u32> {
    match msg_type {
        msg_type::INIT | msg_type::INIT_COMPLETE => Some(0),
        msg_type::SEND_NDIS_VERSION..=msg_type::SEND_RNDIS_PACKET_COMPLETE => Some(version::V1),
        msg_type::SEND_NDIS_CONFIG => Some(version::V2),
        msg_type::SEND_VF_ASSOCIATION | msg_type::SWITCH_DATA_PATH => Some(version::V4),
        msg_type::SUBCHANNEL | msg_type::SEND_INDIRECTION_TABLE => Some(version::V5),
        _ => None,
    }
}

macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
        #[repr(C, packed)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}

wire!(
    /// `struct nvsp_message_header`.
    MessageHeader { msg_type: u32 }
);
wire!(
    /// INIT (`struct nvsp_message_init`).
    Init { min_protocol_version: u32, max_protocol_version: u32 }
);
wire!(
    /// INIT_COMPLETE (`struct nvsp_message_init_complete`).
    InitComplete {
        /// Deprecated: OpenVMM sends `0xFFFFFFFF` (2 for version 1); Linux ignores it.
        negotiated_protocol_version: u32,
        max_mdl_chain_length: u32,
        status: u32,
    }
);
wire!(
    /// SEND_NDIS_VER (`struct nvsp_1_message_send_ndis_version`).
    SendNdisVersion { ndis_major_version: u32, ndis_minor_version: u32 }
);
wire!(
    /// SEND_RECV_BUF / SEND_SEND_BUF (`struct nvsp_1_message_send_receive_buffer`).
    SendBuffer { gpadl_handle: u32, id: u16 }
);
wire!(
    /// One receive-buffer section (`struct nvsp_1_receive_buffer_section`).
    ReceiveBufferSection { offset: u32, sub_allocation_size: u32, num_sub_allocations: u32, end_offset: u32 }
);
wire!(
    /// SEND_RECV_BUF_COMPLETE with its one section (`..._send_receive_buffer_complete`).
    SendReceiveBufferComplete { status: u32, num_sections: u32, section: ReceiveBufferSection }
);
wire!(
    /// REVOKE_RECV_BUF / REVOKE_SEND_BUF.
    RevokeBuffer { id: u16 }
);
wire!(
    /// SEND_SEND_BUF_COMPLETE.
    SendSendBufferComplete { status: u32, section_size: u32 }
);
wire!(
    /// SEND_RNDIS_PKT (`struct nvsp_1_message_send_rndis_packet`).
    SendRndisPacket { channel_type: u32, send_buffer_section_index: u32, send_buffer_section_size: u32 }
);
wire!(
    /// SEND_RNDIS_PKT_COMPLETE.
    SendRndisPacketComplete { status: u32 }
);
wire!(
    /// SEND_NDIS_CONFIG (`struct nvsp_2_send_ndis_config`).
    SendNdisConfig {
        /// MTU including the 14-byte Ethernet header.
        mtu: u32,
        reserved: u32,
        /// [`capability`] bits.
        capabilities: u64,
    }
);
wire!(
    /// SEND_VF_ASSOCIATION.
    SendVfAssociation { allocated: u32, serial: u32 }
);
wire!(
    /// SWITCH_DATA_PATH.
    SwitchDataPath { active_datapath: u32 }
);
wire!(
    /// SUBCHANNEL request (guest → host).
    SubchannelRequest { operation: u32, num_subchannels: u32 }
);
wire!(
    /// SUBCHANNEL completion (host → guest).
    SubchannelComplete { status: u32, num_subchannels: u32 }
);
wire!(
    /// SEND_INDIRECTION_TABLE head; the `u32` entries sit at `offset` from the message start.
    SendIndirectionTable { count: u32, offset: u32 }
);

/// Which way a message travels (types 107/108 and 133 exist in both directions with different
/// meanings or bodies).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    GuestToHost,
    HostToGuest,
}

/// A parsed NVSP message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NvspMessage {
    Init(Init),
    InitComplete(InitComplete),
    SendNdisVersion(SendNdisVersion),
    SendReceiveBuffer(SendBuffer),
    SendReceiveBufferComplete(SendReceiveBufferComplete),
    RevokeReceiveBuffer(RevokeBuffer),
    SendSendBuffer(SendBuffer),
    SendSendBufferComplete(SendSendBufferComplete),
    RevokeSendBuffer(RevokeBuffer),
    SendRndisPacket(SendRndisPacket),
    SendRndisPacketComplete(SendRndisPacketComplete),
    SendNdisConfig(SendNdisConfig),
    SendVfAssociation(SendVfAssociation),
    SwitchDataPath(SwitchDataPath),
    SubchannelRequest(SubchannelRequest),
    SubchannelComplete(SubchannelComplete),
    /// Host → guest; the table itself is read with [`indirection_table`].
    SendIndirectionTable(SendIndirectionTable),
}

/// Why bytes are not a valid NVSP message.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NvspError {
    #[error("NVSP message of {len} bytes has no 4-byte type")]
    NoHeader { len: usize },
    #[error("NVSP message type {msg_type} needs {needed} bytes, got {len}")]
    TooShort {
        msg_type: u32,
        needed: usize,
        len: usize,
    },
    #[error("unknown NVSP message type {0}")]
    UnknownType(u32),
    #[error("NVSP message type {0} is obsolete or not supported")]
    Unsupported(u32),
    #[error("NVSP message type {msg_type} is not sent {direction:?}")]
    WrongDirection { msg_type: u32, direction: Direction },
    #[error("NVSP message type {msg_type} needs version {needs:#x}, negotiated {negotiated:#x}")]
    VersionTooOld {
        msg_type: u32,
        needs: u32,
        negotiated: u32,
    },
    #[error("send indirection table: {count} entries at offset {offset} in a {len}-byte message")]
    BadIndirectionTable { count: u32, offset: u32, len: usize },
}

fn body<T: FromBytes>(bytes: &[u8], msg_type: u32) -> Result<T, NvspError> {
    let needed = size_of::<MessageHeader>().saturating_add(size_of::<T>());
    bytes
        .get(size_of::<MessageHeader>()..)
        .and_then(|b| T::read_from_prefix(b).ok())
        .map(|(v, _)| v)
        .ok_or(NvspError::TooShort {
            msg_type,
            needed,
            len: bytes.len(),
        })
}

/// The message type of `bytes` without parsing the body.
pub fn peek_type(bytes: &[u8]) -> Result<u32, NvspError> {
    MessageHeader::read_from_prefix(bytes)
        .map(|(h, _)| h.msg_type)
        .map_err(|_| NvspError::NoHeader { len: bytes.len() })
}

/// Checks that `msg_type` may be used once `negotiated` is the NVSP version.
pub fn check_version(msg_type: u32, negotiated: u32) -> Result<(), NvspError> {
    match min_version(msg_type) {
        None => Err(NvspError::Unsupported(msg_type)),
        Some(needs) if negotiated < needs => Err(NvspError::VersionTooOld {
            msg_type,
            needs,
            negotiated,
        }),
        Some(_) => Ok(()),
    }
}

impl NvspMessage {
    /// Parses one message travelling in `direction`. Extra bytes after the body (padding to 28/40
    /// bytes, the ring's padding to 8) are ignored.
    pub fn parse(bytes: &[u8], direction: Direction) -> Result<Self, NvspError> {
        use Direction::*;
        use msg_type as t;
        let ty = peek_type(bytes)?;
        let wrong = Err(NvspError::WrongDirection {
            msg_type: ty,
            direction,
        });
        Ok(match (ty, direction) {
            (t::INIT, GuestToHost) => Self::Init(body(bytes, ty)?),
            (t::INIT_COMPLETE, HostToGuest) => Self::InitComplete(body(bytes, ty)?),
            (t::SEND_NDIS_VERSION, GuestToHost) => Self::SendNdisVersion(body(bytes, ty)?),
            (t::SEND_RECEIVE_BUFFER, GuestToHost) => Self::SendReceiveBuffer(body(bytes, ty)?),
            (t::SEND_RECEIVE_BUFFER_COMPLETE, HostToGuest) => {
                Self::SendReceiveBufferComplete(body(bytes, ty)?)
            }
            (t::REVOKE_RECEIVE_BUFFER, GuestToHost) => Self::RevokeReceiveBuffer(body(bytes, ty)?),
            (t::SEND_SEND_BUFFER, GuestToHost) => Self::SendSendBuffer(body(bytes, ty)?),
            (t::SEND_SEND_BUFFER_COMPLETE, HostToGuest) => {
                Self::SendSendBufferComplete(body(bytes, ty)?)
            }
            (t::REVOKE_SEND_BUFFER, GuestToHost) => Self::RevokeSendBuffer(body(bytes, ty)?),
            (t::SEND_RNDIS_PACKET, _) => Self::SendRndisPacket(body(bytes, ty)?),
            (t::SEND_RNDIS_PACKET_COMPLETE, _) => Self::SendRndisPacketComplete(body(bytes, ty)?),
            (t::SEND_NDIS_CONFIG, GuestToHost) => Self::SendNdisConfig(body(bytes, ty)?),
            (t::SEND_VF_ASSOCIATION, HostToGuest) => Self::SendVfAssociation(body(bytes, ty)?),
            (t::SWITCH_DATA_PATH, GuestToHost) => Self::SwitchDataPath(body(bytes, ty)?),
            (t::SUBCHANNEL, GuestToHost) => Self::SubchannelRequest(body(bytes, ty)?),
            (t::SUBCHANNEL, HostToGuest) => Self::SubchannelComplete(body(bytes, ty)?),
            (t::SEND_INDIRECTION_TABLE, HostToGuest) => {
                Self::SendIndirectionTable(body(bytes, ty)?)
            }
            (
                t::INIT
                | t::INIT_COMPLETE
                | t::SEND_NDIS_VERSION
                | t::SEND_RECEIVE_BUFFER
                | t::SEND_RECEIVE_BUFFER_COMPLETE
                | t::REVOKE_RECEIVE_BUFFER
                | t::SEND_SEND_BUFFER
                | t::SEND_SEND_BUFFER_COMPLETE
                | t::REVOKE_SEND_BUFFER
                | t::SEND_NDIS_CONFIG
                | t::SEND_VF_ASSOCIATION
                | t::SWITCH_DATA_PATH
                | t::SEND_INDIRECTION_TABLE,
                _,
            ) => return wrong,
            (
                t::V2_CHIMNEY_FIRST..=t::V2_CHIMNEY_LAST
                | t::ALLOC_CHIMNEY_HANDLE
                | t::ALLOC_CHIMNEY_HANDLE_COMPLETE
                | t::UPLINK_CONNECT_STATE_DEPRECATED
                | t::OID_QUERY_EX
                | t::OID_QUERY_EX_COMPLETE
                | t::PD_API
                | t::PD_POST_BATCH,
                _,
            ) => return Err(NvspError::Unsupported(ty)),
            _ => return Err(NvspError::UnknownType(ty)),
        })
    }

    /// The message type.
    pub fn msg_type(&self) -> u32 {
        use msg_type as t;
        match self {
            Self::Init(_) => t::INIT,
            Self::InitComplete(_) => t::INIT_COMPLETE,
            Self::SendNdisVersion(_) => t::SEND_NDIS_VERSION,
            Self::SendReceiveBuffer(_) => t::SEND_RECEIVE_BUFFER,
            Self::SendReceiveBufferComplete(_) => t::SEND_RECEIVE_BUFFER_COMPLETE,
            Self::RevokeReceiveBuffer(_) => t::REVOKE_RECEIVE_BUFFER,
            Self::SendSendBuffer(_) => t::SEND_SEND_BUFFER,
            Self::SendSendBufferComplete(_) => t::SEND_SEND_BUFFER_COMPLETE,
            Self::RevokeSendBuffer(_) => t::REVOKE_SEND_BUFFER,
            Self::SendRndisPacket(_) => t::SEND_RNDIS_PACKET,
            Self::SendRndisPacketComplete(_) => t::SEND_RNDIS_PACKET_COMPLETE,
            Self::SendNdisConfig(_) => t::SEND_NDIS_CONFIG,
            Self::SendVfAssociation(_) => t::SEND_VF_ASSOCIATION,
            Self::SwitchDataPath(_) => t::SWITCH_DATA_PATH,
            Self::SubchannelRequest(_) | Self::SubchannelComplete(_) => t::SUBCHANNEL,
            Self::SendIndirectionTable(_) => t::SEND_INDIRECTION_TABLE,
        }
    }

    fn body_bytes(&self) -> &[u8] {
        match self {
            Self::Init(b) => b.as_bytes(),
            Self::InitComplete(b) => b.as_bytes(),
            Self::SendNdisVersion(b) => b.as_bytes(),
            Self::SendReceiveBuffer(b) | Self::SendSendBuffer(b) => b.as_bytes(),
            Self::SendReceiveBufferComplete(b) => b.as_bytes(),
            Self::RevokeReceiveBuffer(b) | Self::RevokeSendBuffer(b) => b.as_bytes(),
            Self::SendSendBufferComplete(b) => b.as_bytes(),
            Self::SendRndisPacket(b) => b.as_bytes(),
            Self::SendRndisPacketComplete(b) => b.as_bytes(),
            Self::SendNdisConfig(b) => b.as_bytes(),
            Self::SendVfAssociation(b) => b.as_bytes(),
            Self::SwitchDataPath(b) => b.as_bytes(),
            Self::SubchannelRequest(b) => b.as_bytes(),
            Self::SubchannelComplete(b) => b.as_bytes(),
            Self::SendIndirectionTable(b) => b.as_bytes(),
        }
    }

    /// The message bytes, zero-padded to at least `size` (use [`message_size`]).
    pub fn to_bytes(&self, size: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size.max(MESSAGE_SIZE_V61));
        out.extend_from_slice(&self.msg_type().to_le_bytes());
        out.extend_from_slice(self.body_bytes());
        if out.len() < size {
            out.resize(size, 0);
        }
        out
    }
}

/// A SEND_INDIRECTION_TABLE message the way OpenVMM sends it: 16 entries at offset 12, 76 bytes.
pub fn indirection_table_message(table: &[u32; INDIRECTION_TABLE_ENTRIES]) -> Vec<u8> {
    let mut out = NvspMessage::SendIndirectionTable(SendIndirectionTable {
        count: INDIRECTION_TABLE_ENTRIES as u32,
        offset: INDIRECTION_TABLE_OFFSET,
    })
    .to_bytes(0);
    for e in table {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

/// Reads the send indirection table out of a SEND_INDIRECTION_TABLE message as Linux does:
/// exactly 16 entries; for NVSP <= 6 the offset is forced to 40 when the message is long enough
/// (an old host bug); the table must lie inside the message.
pub fn indirection_table(
    bytes: &[u8],
    negotiated: u32,
) -> Result<[u32; INDIRECTION_TABLE_ENTRIES], NvspError> {
    let head: SendIndirectionTable = body(bytes, msg_type::SEND_INDIRECTION_TABLE)?;
    let (count, mut offset) = (head.count, head.offset);
    let bad = NvspError::BadIndirectionTable {
        count,
        offset,
        len: bytes.len(),
    };
    if count as usize != INDIRECTION_TABLE_ENTRIES {
        return Err(bad);
    }
    let table_len = INDIRECTION_TABLE_ENTRIES * 4;
    let legacy_end = (LEGACY_INDIRECTION_TABLE_OFFSET as usize).saturating_add(table_len);
    if negotiated <= version::V6 && bytes.len() >= legacy_end {
        offset = LEGACY_INDIRECTION_TABLE_OFFSET;
    }
    let start = offset as usize;
    let raw = bytes
        .get(start..start.checked_add(table_len).ok_or(bad)?)
        .ok_or(bad)?;
    let mut table = [0u32; INDIRECTION_TABLE_ENTRIES];
    for (e, c) in table.iter_mut().zip(raw.chunks_exact(4)) {
        *e = u32::from_le_bytes(c.try_into().unwrap_or([0; 4]));
    }
    Ok(table)
}

#[cfg(test)]
#[path = "nvsp_tests.rs"]
mod tests;
