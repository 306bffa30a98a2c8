//! Per-packet information (PPI) elements of an RNDIS_PACKET.
//!
//! A PPI is `{u32 size, u32 type (bit 31 = internal), u32 payload offset}` followed by its payload;
//! elements sit back to back and `size` (header + payload) advances to the next one. A valid chain
//! has every `size` in `12..=remaining` and `12 <= offset < size` (Linux's walker loops forever on a
//! zero size, so a host must never emit one and must refuse one). [`validate_chain`] checks a whole
//! area; [`PpiIter`] then walks it and stops, never loops, even on an unvalidated area.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::{RndisError, wire};
use alloc::vec::Vec;
use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// PPI types (`enum ndis_per_pkt_info_type`).
pub mod ty {
    pub const TCPIP_CHECKSUM: u32 = 0;
    pub const IPSEC: u32 = 1;
    pub const TCP_LARGE_SEND: u32 = 2;
    pub const CLASSIFICATION_HANDLE: u32 = 3;
    pub const SG_LIST: u32 = 5;
    pub const IEEE_8021Q: u32 = 6;
    pub const ORIGINAL: u32 = 7;
    pub const PACKET_CANCEL_ID: u32 = 8;
    /// RSS hash value (`NBL_HASH_VALUE`, same number as PACKET_CANCEL_ID).
    pub const NBL_HASH_VALUE: u32 = 8;
    /// Internal type 1 (`RNDIS_PKTINFO_ID`, with [`super::INTERNAL`] set): RSC fragment id.
    pub const PKTINFO_ID: u32 = 1;
}

/// Bit 31 of the type word: an internal (Hyper-V specific) PPI type.
pub const INTERNAL: u32 = 0x8000_0000;

wire!(
    /// PPI header (`struct rndis_per_packet_info`).
    PpiHeader {
        size: u32,
        /// Type in bits 0..31, internal flag in bit 31.
        ty: u32,
        /// Payload offset from the PPI start.
        ppi_offset: u32,
    }
);

/// Size of [`PpiHeader`].
pub const PPI_HEADER_SIZE: usize = size_of::<PpiHeader>();

/// How a PPI element is malformed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PpiFault {
    #[error("{remaining} bytes left, fewer than a 12-byte PPI header")]
    Truncated { remaining: usize },
    #[error("size {size} not in 12..={remaining}")]
    BadSize { size: u32, remaining: usize },
    #[error("payload offset {offset} not in 12..{size}")]
    BadOffset { offset: u32, size: u32 },
}

/// One PPI element.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Ppi<'a> {
    /// Type without the internal bit.
    pub ty: u32,
    pub internal: bool,
    pub payload: &'a [u8],
}

impl Ppi<'_> {
    /// The payload's first `u32`, if it has one.
    pub fn value_u32(&self) -> Option<u32> {
        u32::read_from_prefix(self.payload).ok().map(|(v, _)| v)
    }
}

/// Checks one element at the head of `rest`; returns it and its size.
fn element(rest: &[u8]) -> Result<(Ppi<'_>, usize), PpiFault> {
    let (h, _) = PpiHeader::read_from_prefix(rest).map_err(|_| PpiFault::Truncated {
        remaining: rest.len(),
    })?;
    let (size, offset) = (h.size, h.ppi_offset);
    if (size as usize) < PPI_HEADER_SIZE || size as usize > rest.len() {
        return Err(PpiFault::BadSize {
            size,
            remaining: rest.len(),
        });
    }
    if (offset as usize) < PPI_HEADER_SIZE || offset >= size {
        return Err(PpiFault::BadOffset { offset, size });
    }
    let payload = rest.get(offset as usize..size as usize).unwrap_or_default();
    Ok((
        Ppi {
            ty: h.ty & !INTERNAL,
            internal: h.ty & INTERNAL != 0,
            payload,
        },
        size as usize,
    ))
}

/// Checks a whole PPI area: every element well formed and the last one ending exactly at the end.
pub fn validate_chain(area: &[u8]) -> Result<(), RndisError> {
    let mut at = 0usize;
    while let Some(rest) = area.get(at..).filter(|r| !r.is_empty()) {
        let (_, size) = element(rest).map_err(|fault| RndisError::Ppi { at, fault })?;
        // size >= 12 and <= rest.len(): strictly advancing, never past the end.
        at = at.saturating_add(size);
    }
    Ok(())
}

/// Iterator over a PPI area. Stops at the first malformed element (use [`validate_chain`] first
/// to tell a short chain from a bad one).
#[derive(Clone, Debug)]
pub struct PpiIter<'a> {
    rest: &'a [u8],
}

impl<'a> PpiIter<'a> {
    pub fn new(area: &'a [u8]) -> Self {
        PpiIter { rest: area }
    }
}

impl<'a> Iterator for PpiIter<'a> {
    type Item = Ppi<'a>;

    fn next(&mut self) -> Option<Ppi<'a>> {
        let Ok((ppi, size)) = element(self.rest) else {
            self.rest = &[];
            return None;
        };
        self.rest = self.rest.get(size..).unwrap_or_default();
        Some(ppi)
    }
}

/// Appends one well-formed PPI (`size = 12 + payload`, offset 12) to `out`.
pub fn write(out: &mut Vec<u8>, ty: u32, internal: bool, payload: &[u8]) {
    let h = PpiHeader {
        size: u32::try_from(PPI_HEADER_SIZE.saturating_add(payload.len())).unwrap_or(u32::MAX),
        ty: if internal { ty | INTERNAL } else { ty },
        ppi_offset: PPI_HEADER_SIZE as u32,
    };
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(payload);
}

/// TCP/IP checksum PPI, transmit form (`ndis_tcp_ip_checksum_info.transmit`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TxChecksumInfo(pub u32);

impl TxChecksumInfo {
    pub const IS_IPV4: u32 = 1 << 0;
    pub const IS_IPV6: u32 = 1 << 1;
    pub const TCP_CHECKSUM: u32 = 1 << 2;
    pub const UDP_CHECKSUM: u32 = 1 << 3;
    pub const IP_HEADER_CHECKSUM: u32 = 1 << 4;

    pub fn is_ipv4(self) -> bool {
        self.0 & Self::IS_IPV4 != 0
    }
    pub fn is_ipv6(self) -> bool {
        self.0 & Self::IS_IPV6 != 0
    }
    pub fn tcp_checksum(self) -> bool {
        self.0 & Self::TCP_CHECKSUM != 0
    }
    pub fn udp_checksum(self) -> bool {
        self.0 & Self::UDP_CHECKSUM != 0
    }
    pub fn ip_header_checksum(self) -> bool {
        self.0 & Self::IP_HEADER_CHECKSUM != 0
    }
    /// Bits 16..26: transport header offset from the frame start.
    pub fn transport_offset(self) -> u16 {
        ((self.0 >> 16) & 0x3FF) as u16
    }
    pub fn with_transport_offset(self, offset: u16) -> Self {
        TxChecksumInfo((self.0 & !(0x3FF << 16)) | ((u32::from(offset) & 0x3FF) << 16))
    }
}

/// TCP/IP checksum PPI, receive form (`ndis_tcp_ip_checksum_info.receive`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RxChecksumInfo(pub u32);

impl RxChecksumInfo {
    pub const TCP_FAILED: u32 = 1 << 0;
    pub const UDP_FAILED: u32 = 1 << 1;
    pub const IP_FAILED: u32 = 1 << 2;
    pub const TCP_SUCCEEDED: u32 = 1 << 3;
    pub const UDP_SUCCEEDED: u32 = 1 << 4;
    pub const IP_SUCCEEDED: u32 = 1 << 5;
    pub const LOOPBACK: u32 = 1 << 6;
    pub const TCP_VALUE_INVALID: u32 = 1 << 7;
    pub const IP_VALUE_INVALID: u32 = 1 << 8;
}

/// LSO v2 transmit PPI (`ndis_tcp_lso_info.lso_v2_transmit`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LsoV2Info(pub u32);

impl LsoV2Info {
    /// `type` value of LSO v2 (`NDIS_TCP_LARGE_SEND_OFFLOAD_V2_TYPE`).
    pub const TYPE_V2: u32 = 1;

    pub fn new(mss: u32, tcp_offset: u16, ipv6: bool) -> Self {
        LsoV2Info(
            (mss & 0xF_FFFF)
                | ((u32::from(tcp_offset) & 0x3FF) << 20)
                | (Self::TYPE_V2 << 30)
                | (u32::from(ipv6) << 31),
        )
    }
    /// Bits 0..20.
    pub fn mss(self) -> u32 {
        self.0 & 0xF_FFFF
    }
    /// Bits 20..30.
    pub fn tcp_header_offset(self) -> u16 {
        ((self.0 >> 20) & 0x3FF) as u16
    }
    /// Bit 30: 1 = LSO v2.
    pub fn lso_type(self) -> u32 {
        (self.0 >> 30) & 1
    }
    /// Bit 31: 0 = IPv4, 1 = IPv6.
    pub fn is_ipv6(self) -> bool {
        self.0 >> 31 != 0
    }
}

/// 802.1Q PPI (`ndis_pkt_8021q_info`): priority bits 0..3, CFI bit 3, VLAN id bits 4..16.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Ieee8021qInfo(pub u32);

impl Ieee8021qInfo {
    pub fn priority(self) -> u8 {
        (self.0 & 0x7) as u8
    }
    pub fn cfi(self) -> bool {
        self.0 & 0x8 != 0
    }
    pub fn vlan_id(self) -> u16 {
        ((self.0 >> 4) & 0xFFF) as u16
    }
    /// The 802.1Q tag control information (PCP << 13 | DEI << 12 | VID) as on the wire.
    pub fn tci(self) -> u16 {
        (u16::from(self.priority()) << 13) | (u16::from(self.cfi()) << 12) | self.vlan_id()
    }
    pub fn from_tci(tci: u16) -> Self {
        Ieee8021qInfo(
            u32::from(tci >> 13)
                | (u32::from((tci >> 12) & 1) << 3)
                | (u32::from(tci & 0xFFF) << 4),
        )
    }
}

wire!(
    /// RSC fragment id (internal PPI type 1, `struct rndis_pktinfo_id`).
    PktinfoId { version: u8, flags: u8, packet_id: u16 }
);

impl PktinfoId {
    pub const VERSION_1: u8 = 1;
    pub const SUBALLOC: u8 = 1 << 0;
    pub const FIRST_FRAGMENT: u8 = 1 << 1;
    pub const LAST_FRAGMENT: u8 = 1 << 2;
}

/// The PPIs of one packet that this crate knows, decoded (the first of each type wins).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketInfo {
    /// Raw checksum word (transmit or receive form, by direction).
    pub checksum: Option<u32>,
    pub lso: Option<LsoV2Info>,
    pub vlan: Option<Ieee8021qInfo>,
    pub hash: Option<u32>,
    pub pktinfo_id: Option<PktinfoId>,
    /// Elements of other types (ignored).
    pub unknown: u32,
}

impl PacketInfo {
    /// Decodes the elements; a known type with a payload too small for it is an error.
    pub fn from_ppis<'a>(ppis: impl Iterator<Item = Ppi<'a>>) -> Result<Self, RndisError> {
        let mut info = PacketInfo::default();
        for p in ppis {
            let word = || {
                p.value_u32().ok_or(RndisError::PpiPayloadTooSmall {
                    ty: p.ty,
                    len: p.payload.len(),
                    needed: 4,
                })
            };
            match (p.internal, p.ty) {
                (false, ty::TCPIP_CHECKSUM) => {
                    let v = word()?;
                    info.checksum.get_or_insert(v);
                }
                (false, ty::TCP_LARGE_SEND) => {
                    let v = LsoV2Info(word()?);
                    info.lso.get_or_insert(v);
                }
                (false, ty::IEEE_8021Q) => {
                    let v = Ieee8021qInfo(word()?);
                    info.vlan.get_or_insert(v);
                }
                (false, ty::NBL_HASH_VALUE) => {
                    let v = word()?;
                    info.hash.get_or_insert(v);
                }
                (true, ty::PKTINFO_ID) => {
                    let (v, _) = PktinfoId::read_from_prefix(p.payload).map_err(|_| {
                        RndisError::PpiPayloadTooSmall {
                            ty: p.ty | INTERNAL,
                            len: p.payload.len(),
                            needed: size_of::<PktinfoId>(),
                        }
                    })?;
                    info.pktinfo_id.get_or_insert(v);
                }
                _ => info.unknown = info.unknown.saturating_add(1),
            }
        }
        Ok(info)
    }
}
