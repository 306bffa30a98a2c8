//! RNDIS, the message layer of the synthetic network protocol, byte-exact with Linux
//! `drivers/net/hyperv/hyperv_net.h` and `include/linux/rndis.h`.
//!
//! An RNDIS message is an 8-byte [`Header`] `{type, msg_len}` and a type-specific body. Every
//! `*_offset` field counts from the first body byte (message offset 8), except PPI payload offsets,
//! which count from their PPI. Several messages may follow each other in one buffer (batched data
//! packets in a send-buffer section); [`Messages`] walks them by `msg_len`, which must be at least
//! 8, so a walk always ends.
//!
//! [`parse`] is total: any bytes give `Ok` or a typed [`RndisError`]. Every length and offset is
//! checked against the message before a slice is taken (the CVE-2021-28476 class of bugs: an
//! offset+length pointing outside the message or into the fixed header), the data and
//! per-packet-info areas of an RNDIS_PACKET may not overlap each other or the header, and a PPI
//! chain is validated eagerly, advancing by at least 12 bytes per element ([`ppi`]).
//!
//! - [`ppi`]: per-packet info elements and their bitfields (checksum, LSO v2, 802.1Q, hash).
//! - [`ndis`]: NDIS structures carried by OIDs (offload capabilities / parameters, RSS).
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

pub mod ndis;
pub mod ppi;

use alloc::vec::Vec;
use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Message types (`RNDIS_MSG_*`).
pub mod msg_type {
    pub const PACKET: u32 = 0x0000_0001;
    pub const INITIALIZE: u32 = 0x0000_0002;
    pub const INITIALIZE_COMPLETE: u32 = 0x8000_0002;
    pub const HALT: u32 = 0x0000_0003;
    pub const QUERY: u32 = 0x0000_0004;
    pub const QUERY_COMPLETE: u32 = 0x8000_0004;
    pub const SET: u32 = 0x0000_0005;
    pub const SET_COMPLETE: u32 = 0x8000_0005;
    pub const RESET: u32 = 0x0000_0006;
    pub const RESET_COMPLETE: u32 = 0x8000_0006;
    pub const INDICATE_STATUS: u32 = 0x0000_0007;
    pub const KEEPALIVE: u32 = 0x0000_0008;
    pub const KEEPALIVE_COMPLETE: u32 = 0x8000_0008;
    /// Not implemented by OpenVMM nor here.
    pub const SET_EX: u32 = 0x0000_0009;
}

/// Status codes (`RNDIS_STATUS_*`).
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const FAILURE: u32 = 0xC000_0001;
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    pub const INVALID_DATA: u32 = 0xC001_0015;
    pub const INVALID_LENGTH: u32 = 0xC001_0014;
    pub const INVALID_OID: u32 = 0xC001_0017;
    pub const BAD_VERSION: u32 = 0xC001_0004;
    pub const BUFFER_OVERFLOW: u32 = 0x8000_0005;
    pub const MEDIA_CONNECT: u32 = 0x4001_000B;
    pub const MEDIA_DISCONNECT: u32 = 0x4001_000C;
    pub const LINK_SPEED_CHANGE: u32 = 0x4001_0013;
    pub const NETWORK_CHANGE: u32 = 0x4001_0018;
}

/// Object identifiers Linux, Windows and DPDK use.
pub mod oid {
    pub const GEN_SUPPORTED_LIST: u32 = 0x0001_0101;
    pub const GEN_HARDWARE_STATUS: u32 = 0x0001_0102;
    pub const GEN_MEDIA_SUPPORTED: u32 = 0x0001_0103;
    pub const GEN_MEDIA_IN_USE: u32 = 0x0001_0104;
    pub const GEN_MAXIMUM_LOOKAHEAD: u32 = 0x0001_0105;
    pub const GEN_MAXIMUM_FRAME_SIZE: u32 = 0x0001_0106;
    pub const GEN_LINK_SPEED: u32 = 0x0001_0107;
    pub const GEN_TRANSMIT_BLOCK_SIZE: u32 = 0x0001_010A;
    pub const GEN_RECEIVE_BLOCK_SIZE: u32 = 0x0001_010B;
    pub const GEN_VENDOR_ID: u32 = 0x0001_010C;
    pub const GEN_VENDOR_DESCRIPTION: u32 = 0x0001_010D;
    pub const GEN_CURRENT_PACKET_FILTER: u32 = 0x0001_010E;
    pub const GEN_CURRENT_LOOKAHEAD: u32 = 0x0001_010F;
    pub const GEN_DRIVER_VERSION: u32 = 0x0001_0110;
    pub const GEN_MAXIMUM_TOTAL_SIZE: u32 = 0x0001_0111;
    pub const GEN_MAC_OPTIONS: u32 = 0x0001_0113;
    pub const GEN_MEDIA_CONNECT_STATUS: u32 = 0x0001_0114;
    pub const GEN_MAXIMUM_SEND_PACKETS: u32 = 0x0001_0115;
    pub const GEN_VENDOR_DRIVER_VERSION: u32 = 0x0001_0116;
    pub const GEN_RECEIVE_SCALE_CAPABILITIES: u32 = 0x0001_0203;
    pub const GEN_RECEIVE_SCALE_PARAMETERS: u32 = 0x0001_0204;
    pub const GEN_FRIENDLY_NAME: u32 = 0x0002_0216;
    pub const GEN_RNDIS_CONFIG_PARAMETER: u32 = 0x0001_021B;
    pub const GEN_XMIT_OK: u32 = 0x0002_0101;
    pub const GEN_RCV_OK: u32 = 0x0002_0102;
    pub const GEN_XMIT_ERROR: u32 = 0x0002_0103;
    pub const GEN_RCV_ERROR: u32 = 0x0002_0104;
    pub const GEN_RCV_NO_BUFFER: u32 = 0x0002_0105;
    pub const _802_3_PERMANENT_ADDRESS: u32 = 0x0101_0101;
    pub const _802_3_CURRENT_ADDRESS: u32 = 0x0101_0102;
    pub const _802_3_MULTICAST_LIST: u32 = 0x0101_0103;
    pub const _802_3_MAXIMUM_LIST_SIZE: u32 = 0x0101_0104;
    pub const OFFLOAD_ENCAPSULATION: u32 = 0x0101_010A;
    pub const TCP_OFFLOAD_CURRENT_CONFIG: u32 = 0xFC01_020B;
    pub const TCP_OFFLOAD_PARAMETERS: u32 = 0xFC01_020C;
    pub const TCP_OFFLOAD_HARDWARE_CAPABILITIES: u32 = 0xFC01_020D;
}

/// GEN_CURRENT_PACKET_FILTER bits (`NDIS_PACKET_TYPE_*`).
pub mod packet_filter {
    pub const DIRECTED: u32 = 0x0000_0001;
    pub const MULTICAST: u32 = 0x0000_0002;
    pub const ALL_MULTICAST: u32 = 0x0000_0004;
    pub const BROADCAST: u32 = 0x0000_0008;
    pub const SOURCE_ROUTING: u32 = 0x0000_0010;
    pub const PROMISCUOUS: u32 = 0x0000_0020;
    /// What Linux sets on ifup.
    pub const LINUX_DEFAULT: u32 = DIRECTED | ALL_MULTICAST | BROADCAST;
}

/// Size of [`Header`].
pub const HEADER_SIZE: usize = 8;
/// RNDIS version carried by INITIALIZE / INITIALIZE_CMPLT.
pub const MAJOR_VERSION: u32 = 1;
pub const MINOR_VERSION: u32 = 0;
/// INITIALIZE_CMPLT `device_flags`: connectionless (`RNDIS_DF_CONNECTIONLESS`).
pub const DF_CONNECTIONLESS: u32 = 0x1;
/// INITIALIZE_CMPLT `medium`: 802.3.
pub const MEDIUM_802_3: u32 = 0;
/// Longest response Linux accepts (`sizeof(struct rndis_message) + RNDIS_EXT_LEN`); longer ones
/// get their status forced to BUFFER_OVERFLOW.
pub const LINUX_MAX_RESPONSE_LEN: usize = 4148;

macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
        #[repr(C, packed)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
    };
}
pub(crate) use wire;

wire!(
    /// Every message starts with this (`struct rndis_message` head).
    Header { msg_type: u32, msg_len: u32 }
);
wire!(
    /// INITIALIZE body.
    InitializeRequest { req_id: u32, major_version: u32, minor_version: u32, max_transfer_size: u32 }
);
wire!(
    /// INITIALIZE_CMPLT body (44 bytes).
    InitializeComplete {
        req_id: u32,
        status: u32,
        major_version: u32,
        minor_version: u32,
        device_flags: u32,
        medium: u32,
        max_packets_per_message: u32,
        max_transfer_size: u32,
        /// Messages batched in one buffer are aligned to `1 << packet_alignment_factor`.
        packet_alignment_factor: u32,
        af_list_offset: u32,
        af_list_size: u32,
    }
);
wire!(
    /// HALT body (no reply).
    HaltRequest { req_id: u32 }
);
wire!(
    /// QUERY and SET bodies (`struct rndis_query_request` / `rndis_set_request`); the information
    /// buffer sits at `info_buf_offset` from the body start.
    OidRequest { req_id: u32, oid: u32, info_buflen: u32, info_buf_offset: u32, dev_vc_handle: u32 }
);
wire!(
    /// QUERY_CMPLT body; data at `info_buf_offset` (>= 16) from the body start.
    QueryComplete { req_id: u32, status: u32, info_buflen: u32, info_buf_offset: u32 }
);
wire!(
    /// SET_CMPLT body.
    SetComplete { req_id: u32, status: u32 }
);
wire!(
    /// RESET body.
    ResetRequest { reserved: u32 }
);
wire!(
    /// RESET_CMPLT body.
    ResetComplete { status: u32, addressing_reset: u32 }
);
wire!(
    /// INDICATE_STATUS body; status data at `status_buf_offset` (>= 12) from the body start.
    IndicateStatus { status: u32, status_buflen: u32, status_buf_offset: u32 }
);
wire!(
    /// KEEPALIVE body.
    KeepaliveRequest { req_id: u32 }
);
wire!(
    /// KEEPALIVE_CMPLT body.
    KeepaliveComplete { req_id: u32, status: u32 }
);
wire!(
    /// RNDIS_PACKET body (36 bytes). Offsets count from the body start.
    Packet {
        data_offset: u32,
        data_len: u32,
        oob_data_offset: u32,
        oob_data_len: u32,
        num_oob_data_elements: u32,
        per_packet_info_offset: u32,
        per_packet_info_len: u32,
        vc_handle: u32,
        reserved: u32,
    }
);

/// Size of the RNDIS_PACKET body.
pub const PACKET_BODY_SIZE: usize = size_of::<Packet>();

/// Why bytes are not a valid RNDIS message. Offsets and lengths are the guest's values.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RndisError {
    #[error("{len} bytes cannot hold an RNDIS header")]
    Truncated { len: usize },
    #[error("msg_len {msg_len} is below 8 or beyond the {available} bytes available")]
    BadMessageLength { msg_len: u32, available: usize },
    #[error("RNDIS message {msg_type:#x} needs a {needed}-byte body, has {len}")]
    BodyTooShort {
        msg_type: u32,
        needed: usize,
        len: usize,
    },
    #[error("unknown RNDIS message type {0:#x}")]
    UnknownType(u32),
    #[error(
        "{field}: offset {offset} + length {len} not inside the {body_len}-byte body (minimum offset {min})"
    )]
    OutOfBounds {
        field: &'static str,
        offset: u32,
        len: u32,
        body_len: usize,
        min: usize,
    },
    #[error("RNDIS_PACKET with no data")]
    EmptyData,
    #[error(
        "RNDIS_PACKET: out-of-band data is not supported (offset {offset}, len {len}, count {count})"
    )]
    OobData { offset: u32, len: u32, count: u32 },
    #[error("RNDIS_PACKET: non-zero VC handle {0:#x}")]
    VcHandle(u32),
    #[error("RNDIS_PACKET: per-packet info overlaps the data")]
    PpiOverlapsData,
    #[error("PPI at {at}: {fault}")]
    Ppi { at: usize, fault: ppi::PpiFault },
    #[error("PPI type {ty:#x}: payload of {len} bytes, needs {needed}")]
    PpiPayloadTooSmall { ty: u32, len: usize, needed: usize },
}

/// An RNDIS_PACKET whose data and PPI areas were validated.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PacketMessage<'a> {
    pub header: Packet,
    /// The frame (`data_len` bytes at `data_offset`).
    pub data: &'a [u8],
    /// The per-packet-info area; its chain is valid (see [`ppi::PpiIter`]).
    pub ppi: &'a [u8],
}

impl<'a> PacketMessage<'a> {
    /// The PPI elements.
    pub fn ppis(&self) -> ppi::PpiIter<'a> {
        ppi::PpiIter::new(self.ppi)
    }

    /// The PPIs this crate knows, decoded.
    pub fn info(&self) -> Result<ppi::PacketInfo, RndisError> {
        ppi::PacketInfo::from_ppis(self.ppis())
    }
}

/// A QUERY or SET with its validated information buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OidMessage<'a> {
    pub request: OidRequest,
    pub info: &'a [u8],
}

/// A QUERY_CMPLT with its validated information buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QueryCompleteMessage<'a> {
    pub complete: QueryComplete,
    pub info: &'a [u8],
}

/// An INDICATE_STATUS with its validated status buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StatusMessage<'a> {
    pub indicate: IndicateStatus,
    pub buffer: &'a [u8],
}

/// A parsed RNDIS message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RndisMessage<'a> {
    Packet(PacketMessage<'a>),
    Initialize(InitializeRequest),
    InitializeComplete(InitializeComplete),
    Halt(HaltRequest),
    Query(OidMessage<'a>),
    QueryComplete(QueryCompleteMessage<'a>),
    Set(OidMessage<'a>),
    SetComplete(SetComplete),
    Reset(ResetRequest),
    ResetComplete(ResetComplete),
    IndicateStatus(StatusMessage<'a>),
    Keepalive(KeepaliveRequest),
    KeepaliveComplete(KeepaliveComplete),
}

fn fixed<T: FromBytes>(body: &[u8], msg_type: u32) -> Result<T, RndisError> {
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| RndisError::BodyTooShort {
            msg_type,
            needed: size_of::<T>(),
            len: body.len(),
        })
}

/// `len` bytes at `offset` inside `body`, not starting before `min`. A zero length gives an empty
/// slice whatever the offset (Linux sends offset 0 or garbage with empty buffers).
pub fn sub_slice<'a>(
    body: &'a [u8],
    field: &'static str,
    offset: u32,
    len: u32,
    min: usize,
) -> Result<&'a [u8], RndisError> {
    if len == 0 {
        return Ok(&[]);
    }
    let err = RndisError::OutOfBounds {
        field,
        offset,
        len,
        body_len: body.len(),
        min,
    };
    let start = offset as usize;
    if start < min {
        return Err(err);
    }
    let end = start.checked_add(len as usize).ok_or(err)?;
    body.get(start..end).ok_or(err)
}

/// Validates an RNDIS_PACKET body.
pub fn parse_packet(body: &[u8]) -> Result<PacketMessage<'_>, RndisError> {
    let header: Packet = fixed(body, msg_type::PACKET)?;
    let (oob_off, oob_len, oob_n) = (
        header.oob_data_offset,
        header.oob_data_len,
        header.num_oob_data_elements,
    );
    if oob_off != 0 || oob_len != 0 || oob_n != 0 {
        return Err(RndisError::OobData {
            offset: oob_off,
            len: oob_len,
            count: oob_n,
        });
    }
    let vc = header.vc_handle;
    if vc != 0 {
        return Err(RndisError::VcHandle(vc));
    }
    let (data_offset, data_len) = (header.data_offset, header.data_len);
    if data_len == 0 {
        return Err(RndisError::EmptyData);
    }
    let data = sub_slice(body, "data", data_offset, data_len, PACKET_BODY_SIZE)?;
    let (ppi_offset, ppi_len) = (header.per_packet_info_offset, header.per_packet_info_len);
    let ppi = sub_slice(
        body,
        "per_packet_info",
        ppi_offset,
        ppi_len,
        PACKET_BODY_SIZE,
    )?;
    if ppi_len != 0 {
        // Both ranges are inside the body, so the ends cannot overflow.
        let d0 = data_offset as usize;
        let d1 = d0.saturating_add(data_len as usize);
        let p0 = ppi_offset as usize;
        let p1 = p0.saturating_add(ppi_len as usize);
        if d0 < p1 && p0 < d1 {
            return Err(RndisError::PpiOverlapsData);
        }
    }
    ppi::validate_chain(ppi)?;
    Ok(PacketMessage { header, data, ppi })
}

/// Parses the message at the start of `bytes`; returns it and its `msg_len` (the offset of the
/// next message in a batch). Bytes after `msg_len` are not looked at.
pub fn parse(bytes: &[u8]) -> Result<(RndisMessage<'_>, usize), RndisError> {
    use msg_type as t;
    let (h, _) =
        Header::read_from_prefix(bytes).map_err(|_| RndisError::Truncated { len: bytes.len() })?;
    let (ty, msg_len) = (h.msg_type, h.msg_len);
    let len = msg_len as usize;
    if len < HEADER_SIZE || len > bytes.len() {
        return Err(RndisError::BadMessageLength {
            msg_len,
            available: bytes.len(),
        });
    }
    let body = bytes.get(HEADER_SIZE..len).unwrap_or_default();
    let msg = match ty {
        t::PACKET => RndisMessage::Packet(parse_packet(body)?),
        t::INITIALIZE => RndisMessage::Initialize(fixed(body, ty)?),
        t::INITIALIZE_COMPLETE => RndisMessage::InitializeComplete(fixed(body, ty)?),
        t::HALT => RndisMessage::Halt(fixed(body, ty)?),
        t::QUERY | t::SET => {
            let request: OidRequest = fixed(body, ty)?;
            let info = sub_slice(
                body,
                "info_buf",
                request.info_buf_offset,
                request.info_buflen,
                size_of::<OidRequest>(),
            )?;
            let m = OidMessage { request, info };
            if ty == t::QUERY {
                RndisMessage::Query(m)
            } else {
                RndisMessage::Set(m)
            }
        }
        t::QUERY_COMPLETE => {
            let complete: QueryComplete = fixed(body, ty)?;
            let info = sub_slice(
                body,
                "info_buf",
                complete.info_buf_offset,
                complete.info_buflen,
                size_of::<QueryComplete>(),
            )?;
            RndisMessage::QueryComplete(QueryCompleteMessage { complete, info })
        }
        t::SET_COMPLETE => RndisMessage::SetComplete(fixed(body, ty)?),
        t::RESET => RndisMessage::Reset(fixed(body, ty)?),
        t::RESET_COMPLETE => RndisMessage::ResetComplete(fixed(body, ty)?),
        t::INDICATE_STATUS => {
            let indicate: IndicateStatus = fixed(body, ty)?;
            let buffer = sub_slice(
                body,
                "status_buf",
                indicate.status_buf_offset,
                indicate.status_buflen,
                size_of::<IndicateStatus>(),
            )?;
            RndisMessage::IndicateStatus(StatusMessage { indicate, buffer })
        }
        t::KEEPALIVE => RndisMessage::Keepalive(fixed(body, ty)?),
        t::KEEPALIVE_COMPLETE => RndisMessage::KeepaliveComplete(fixed(body, ty)?),
        other => return Err(RndisError::UnknownType(other)),
    };
    Ok((msg, len))
}

/// The `(type, msg_len)` of the message at the start of `bytes`, validated (what a batch walk
/// needs even for a message it cannot parse).
pub fn peek(bytes: &[u8]) -> Result<(u32, usize), RndisError> {
    let (h, _) =
        Header::read_from_prefix(bytes).map_err(|_| RndisError::Truncated { len: bytes.len() })?;
    let (ty, msg_len) = (h.msg_type, h.msg_len);
    if (msg_len as usize) < HEADER_SIZE || msg_len as usize > bytes.len() {
        return Err(RndisError::BadMessageLength {
            msg_len,
            available: bytes.len(),
        });
    }
    Ok((ty, msg_len as usize))
}

/// Walks a buffer of back-to-back RNDIS messages. Each item is one message's bytes (`msg_len`
/// long) or the error that ends the walk; every step advances by at least 8 bytes.
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Messages<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Messages {
            rest: bytes,
            failed: false,
        }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<&'a [u8], RndisError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match peek(self.rest) {
            Ok((_, len)) => {
                let (msg, rest) = self.rest.split_at_checked(len)?;
                self.rest = rest;
                Some(Ok(msg))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn message(ty: u32, parts: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let total = HEADER_SIZE.saturating_add(body_len);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// INITIALIZE as Linux sends it.
pub fn initialize_request(req_id: u32, max_transfer_size: u32) -> Vec<u8> {
    let r = InitializeRequest {
        req_id,
        major_version: MAJOR_VERSION,
        minor_version: MINOR_VERSION,
        max_transfer_size,
    };
    message(msg_type::INITIALIZE, &[r.as_bytes()])
}

/// INITIALIZE_CMPLT.
pub fn initialize_complete(c: &InitializeComplete) -> Vec<u8> {
    message(msg_type::INITIALIZE_COMPLETE, &[c.as_bytes()])
}

fn oid_request(ty: u32, req_id: u32, oid: u32, info: &[u8]) -> Vec<u8> {
    let r = OidRequest {
        req_id,
        oid,
        info_buflen: u32::try_from(info.len()).unwrap_or(u32::MAX),
        info_buf_offset: size_of::<OidRequest>() as u32,
        dev_vc_handle: 0,
    };
    message(ty, &[r.as_bytes(), info])
}

/// QUERY with the input buffer right after the request (offset 20), as Linux sends it.
pub fn query_request(req_id: u32, oid: u32, info: &[u8]) -> Vec<u8> {
    oid_request(msg_type::QUERY, req_id, oid, info)
}

/// SET with the data right after the request (offset 20).
pub fn set_request(req_id: u32, oid: u32, info: &[u8]) -> Vec<u8> {
    oid_request(msg_type::SET, req_id, oid, info)
}

/// QUERY_CMPLT with the data at offset 16 (also for failures: Linux checks the offset first).
pub fn query_complete(req_id: u32, status: u32, info: &[u8]) -> Vec<u8> {
    let c = QueryComplete {
        req_id,
        status,
        info_buflen: u32::try_from(info.len()).unwrap_or(u32::MAX),
        info_buf_offset: size_of::<QueryComplete>() as u32,
    };
    message(msg_type::QUERY_COMPLETE, &[c.as_bytes(), info])
}

/// SET_CMPLT.
pub fn set_complete(req_id: u32, status: u32) -> Vec<u8> {
    message(
        msg_type::SET_COMPLETE,
        &[SetComplete { req_id, status }.as_bytes()],
    )
}

/// HALT.
pub fn halt_request(req_id: u32) -> Vec<u8> {
    message(msg_type::HALT, &[HaltRequest { req_id }.as_bytes()])
}

/// RESET_CMPLT.
pub fn reset_complete(status: u32, addressing_reset: u32) -> Vec<u8> {
    let c = ResetComplete {
        status,
        addressing_reset,
    };
    message(msg_type::RESET_COMPLETE, &[c.as_bytes()])
}

/// KEEPALIVE.
pub fn keepalive_request(req_id: u32) -> Vec<u8> {
    message(
        msg_type::KEEPALIVE,
        &[KeepaliveRequest { req_id }.as_bytes()],
    )
}

/// KEEPALIVE_CMPLT.
pub fn keepalive_complete(req_id: u32, status: u32) -> Vec<u8> {
    message(
        msg_type::KEEPALIVE_COMPLETE,
        &[KeepaliveComplete { req_id, status }.as_bytes()],
    )
}

/// INDICATE_STATUS with the buffer right after the body (offset 12).
pub fn indicate_status(status: u32, buffer: &[u8]) -> Vec<u8> {
    let i = IndicateStatus {
        status,
        status_buflen: u32::try_from(buffer.len()).unwrap_or(u32::MAX),
        status_buf_offset: size_of::<IndicateStatus>() as u32,
    };
    message(msg_type::INDICATE_STATUS, &[i.as_bytes(), buffer])
}

/// The header part of an RNDIS_PACKET carrying a `data_len`-byte frame: RNDIS header, packet body
/// and the PPIs (written with [`ppi::write`]); the frame follows the returned bytes directly.
pub fn packet_header(data_len: usize, ppis: &[u8]) -> Vec<u8> {
    let head = HEADER_SIZE
        .saturating_add(PACKET_BODY_SIZE)
        .saturating_add(ppis.len());
    let total = u32::try_from(head.saturating_add(data_len)).unwrap_or(u32::MAX);
    let p = Packet {
        data_offset: u32::try_from(PACKET_BODY_SIZE.saturating_add(ppis.len())).unwrap_or(u32::MAX),
        data_len: u32::try_from(data_len).unwrap_or(u32::MAX),
        per_packet_info_offset: if ppis.is_empty() {
            0
        } else {
            PACKET_BODY_SIZE as u32
        },
        per_packet_info_len: u32::try_from(ppis.len()).unwrap_or(u32::MAX),
        ..Packet::default()
    };
    let mut out = Vec::with_capacity(head);
    out.extend_from_slice(&msg_type::PACKET.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(p.as_bytes());
    out.extend_from_slice(ppis);
    out
}

#[cfg(test)]
#[path = "rndis/tests.rs"]
mod tests;
