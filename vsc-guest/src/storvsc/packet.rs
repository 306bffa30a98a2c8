//! Packets the driver puts on a channel's guest→host ring, byte-exact with Linux storvsc:
//! in-band (type 6) for everything without data, GPA-direct (type 9) with exactly one range for
//! SRBs with data; always a 64-byte vstor packet (Linux 6.1), completion requested.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;
use ringbuf::layout::{GpaDirectHeader, GpaRangeHeader, PAGE_SIZE};
use ringbuf::{OutgoingPacket, PacketType};
use vmbus_core::devices::vstor::{PACKET_SIZE, VstorPacket};
use zerocopy::IntoBytes;

/// Data direction of an SRB (`data_in` byte and `SRB_FLAGS_DATA_IN/OUT`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device → guest memory (READ_TYPE).
    In,
    /// Guest memory → device (WRITE_TYPE).
    Out,
}

/// Why a page list cannot describe a transfer.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("empty transfer")]
    Empty,
    #[error("byte offset {0:#x} is not inside the first page")]
    Offset(u32),
    #[error("{given} PFNs given, {needed} needed for offset {byte_offset:#x} + {len:#x} bytes")]
    PfnCount {
        given: usize,
        needed: u64,
        byte_offset: u32,
        len: u32,
    },
}

/// A guest buffer as storvsc describes it: `len` bytes starting `byte_offset` into the first of
/// `pfns` (4 KiB pages, no holes: every inner page is whole, as Linux's `virt_boundary_mask` ensures).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageRange<'a> {
    byte_offset: u32,
    len: u32,
    pfns: &'a [u64],
}

impl<'a> PageRange<'a> {
    /// Validates the page list against the length.
    pub fn new(byte_offset: u32, len: u32, pfns: &'a [u64]) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if byte_offset as usize >= PAGE_SIZE {
            return Err(RangeError::Offset(byte_offset));
        }
        let needed =
            (u64::from(byte_offset).saturating_add(u64::from(len))).div_ceil(PAGE_SIZE as u64);
        if pfns.len() as u64 != needed {
            return Err(RangeError::PfnCount {
                given: pfns.len(),
                needed,
                byte_offset,
                len,
            });
        }
        Ok(PageRange {
            byte_offset,
            len,
            pfns,
        })
    }

    pub fn byte_offset(&self) -> u32 {
        self.byte_offset
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pfns(&self) -> &'a [u64] {
        self.pfns
    }
}

/// The PFNs of a physically contiguous buffer at `gpa` of `len` bytes: `(byte_offset, pfns)`.
pub fn contiguous_pfns(gpa: u64, len: u32) -> (u32, Vec<u64>) {
    let page = PAGE_SIZE as u64;
    let first = gpa >> 12;
    let offset = (gpa & 0xFFF) as u32;
    let count = (u64::from(offset).saturating_add(u64::from(len))).div_ceil(page);
    (
        offset,
        (0..count).map(|i| first.saturating_add(i)).collect(),
    )
}

/// Encodes the GPA-direct header Linux `vmbus_sendpacket_mpb_desc` writes after the descriptor:
/// `{reserved 0, range_count 1}`, then `{byte_count, byte_offset, pfn[]}`.
pub fn gpa_direct_header(range: &PageRange<'_>) -> Vec<u8> {
    let mut h = Vec::with_capacity(16usize.saturating_add(range.pfns.len().saturating_mul(8)));
    h.extend_from_slice(
        GpaDirectHeader {
            reserved: 0.into(),
            range_count: 1.into(),
        }
        .as_bytes(),
    );
    h.extend_from_slice(
        GpaRangeHeader {
            byte_count: range.len.into(),
            byte_offset: range.byte_offset.into(),
        }
        .as_bytes(),
    );
    for pfn in range.pfns {
        h.extend_from_slice(&pfn.to_le_bytes());
    }
    h
}

/// A packet the driver wants written to a channel's guest→host ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutPacket {
    /// Channel index (0 = primary).
    pub channel: u16,
    pub trans_id: u64,
    /// [`PacketType::InBand`] or [`PacketType::GpaDirect`].
    pub packet_type: PacketType,
    /// GPA-direct header (empty for in-band).
    pub headers: Vec<u8>,
    /// The vstor packet.
    pub payload: [u8; PACKET_SIZE],
    /// Bytes of `payload` sent (64, or 48 after a pre-Win8 negotiation).
    pub payload_len: usize,
}

impl OutPacket {
    pub(crate) fn in_band(channel: u16, trans_id: u64, p: &VstorPacket, len: usize) -> Self {
        let mut payload = [0u8; PACKET_SIZE];
        payload.copy_from_slice(p.as_bytes());
        OutPacket {
            channel,
            trans_id,
            packet_type: PacketType::InBand,
            headers: Vec::new(),
            payload,
            payload_len: len.min(PACKET_SIZE),
        }
    }

    pub(crate) fn gpa_direct(
        channel: u16,
        trans_id: u64,
        p: &VstorPacket,
        len: usize,
        range: &PageRange<'_>,
    ) -> Self {
        let mut out = OutPacket::in_band(channel, trans_id, p, len);
        out.packet_type = PacketType::GpaDirect;
        out.headers = gpa_direct_header(range);
        out
    }

    /// The vstor packet bytes sent.
    pub fn payload(&self) -> &[u8] {
        self.payload
            .get(..self.payload_len)
            .unwrap_or(&self.payload)
    }

    /// The vstor packet, parsed back.
    pub fn vstor(&self) -> VstorPacket {
        VstorPacket::from_prefix_zero_filled(self.payload()).unwrap_or_default()
    }

    /// Hands the ring writer's view of this packet to `f` (completion always requested).
    pub fn with_outgoing<R>(&self, f: impl FnOnce(&OutgoingPacket<'_>) -> R) -> R {
        let parts: [&[u8]; 1] = [self.payload()];
        f(&OutgoingPacket {
            packet_type: self.packet_type,
            completion_requested: true,
            trans_id: self.trans_id,
            headers: &self.headers,
            payload: &parts,
        })
    }

    /// The bytes a ring holds for this packet (descriptor, headers, payload, zero padding; no
    /// trailer): what tests compare against the reference layout.
    pub fn wire_bytes(&self) -> Vec<u8> {
        let offset = 16usize.saturating_add(self.headers.len());
        let len = offset.saturating_add(self.payload_len).next_multiple_of(8);
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&(self.packet_type as u16).to_le_bytes());
        v.extend_from_slice(&((offset / 8) as u16).to_le_bytes());
        v.extend_from_slice(&((len / 8) as u16).to_le_bytes());
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&self.trans_id.to_le_bytes());
        v.extend_from_slice(&self.headers);
        v.extend_from_slice(self.payload());
        v.resize(len, 0);
        v
    }
}
