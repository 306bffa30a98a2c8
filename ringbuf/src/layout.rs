//! Wire layout of a VMBus ring: control page, packet descriptor and the type-specific headers.
//!
//! Offsets follow Linux `struct hv_ring_buffer` / `struct vmpacket_descriptor` and OpenVMM `vmbus_ring`
//! (reference: vmbus-protocol.md §1.2–1.6). Everything is little-endian.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a ring's control page (the first page of each ring).
pub const CONTROL_PAGE_SIZE: usize = 0x1000;
/// Ring data areas are a whole number of these pages.
pub const PAGE_SIZE: usize = 0x1000;

/// Byte offsets of the control-page fields.
pub mod control {
    /// Written by the ring's writer: where the next packet goes.
    pub const WRITE_INDEX: usize = 0x00;
    /// Written by the ring's reader: where the next unread packet starts.
    pub const READ_INDEX: usize = 0x04;
    /// Written by the reader: non-zero asks the writer not to signal empty→non-empty.
    pub const INTERRUPT_MASK: usize = 0x08;
    /// Written by the writer: non-zero = blocked until this many bytes are free.
    pub const PENDING_SEND_SZ: usize = 0x0C;
    /// Feature bits; bit 0 = `feat_pending_send_sz`.
    pub const FEATURE_BITS: usize = 0x40;
    /// `feature_bits` bit 0: flow control through `pending_send_sz` is supported.
    pub const FEAT_PENDING_SEND_SZ: u32 = 1;
}

/// Names a 32-bit word of the control page, so memory implementations can hand out the right atomic.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ControlWord {
    WriteIndex,
    ReadIndex,
    InterruptMask,
    PendingSendSize,
    FeatureBits,
}

impl ControlWord {
    pub const ALL: [ControlWord; 5] = [
        ControlWord::WriteIndex,
        ControlWord::ReadIndex,
        ControlWord::InterruptMask,
        ControlWord::PendingSendSize,
        ControlWord::FeatureBits,
    ];

    /// Byte offset of the word inside the control page.
    pub const fn offset(self) -> usize {
        match self {
            ControlWord::WriteIndex => control::WRITE_INDEX,
            ControlWord::ReadIndex => control::READ_INDEX,
            ControlWord::InterruptMask => control::INTERRUPT_MASK,
            ControlWord::PendingSendSize => control::PENDING_SEND_SZ,
            ControlWord::FeatureBits => control::FEATURE_BITS,
        }
    }

    /// Dense index 0..5, for implementations that keep only these words.
    pub const fn dense(self) -> usize {
        match self {
            ControlWord::WriteIndex => 0,
            ControlWord::ReadIndex => 1,
            ControlWord::InterruptMask => 2,
            ControlWord::PendingSendSize => 3,
            ControlWord::FeatureBits => 4,
        }
    }
}

/// Packet types that travel on VMBus rings (vmbus-protocol.md §1.5). Others are ring corruption.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum PacketType {
    /// `VM_PKT_DATA_INBAND`: payload inside the ring.
    InBand = 0x6,
    /// `VM_PKT_DATA_USING_XFER_PAGES`: ranges of a registered transfer-page set (netvsc receive).
    TransferPages = 0x7,
    /// `VM_PKT_DATA_USING_GPA_DIRECT`: guest page ranges (storvsc, netvsc send).
    GpaDirect = 0x9,
    /// `VM_PKT_COMP`: completion echoing a request's transaction id.
    Completion = 0xB,
}

impl PacketType {
    pub const fn from_wire(v: u16) -> Option<Self> {
        match v {
            0x6 => Some(PacketType::InBand),
            0x7 => Some(PacketType::TransferPages),
            0x9 => Some(PacketType::GpaDirect),
            0xB => Some(PacketType::Completion),
            _ => None,
        }
    }
}

/// `flags` bit 0: the sender wants a completion packet.
pub const FLAG_COMPLETION_REQUESTED: u16 = 0x1;

/// `struct vmpacket_descriptor`: the 16 bytes that start every packet.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct PacketDescriptor {
    pub packet_type: U16,
    /// Payload starts at `offset8 * 8` from the packet start.
    pub offset8: U16,
    /// Packet length in 8-byte units, descriptor included, trailer excluded.
    pub len8: U16,
    pub flags: U16,
    pub trans_id: U64,
}

/// Size of [`PacketDescriptor`].
pub const DESCRIPTOR_SIZE: usize = 16;
/// The u64 after every packet: high half = the packet's start offset ("previous write index").
pub const TRAILER_SIZE: usize = 8;
/// Largest `len8 * 8` the descriptor can encode.
pub const MAX_ENCODED_PACKET_LEN: usize = 0xFFFF * 8;

/// Header after the descriptor of a GPA-direct packet (`struct vmdata_gpa_direct` minus descriptor).
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct GpaDirectHeader {
    /// Ignored on receive (Linux leaves garbage here).
    pub reserved: U32,
    pub range_count: U32,
}

/// `struct gpa_range` head; `pfn_count(byte_offset, byte_count)` u64 PFNs follow.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct GpaRangeHeader {
    pub byte_count: U32,
    pub byte_offset: U32,
}

/// Header after the descriptor of a transfer-page packet (`struct vmtransfer_page_packet_header`).
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct TransferPageHeader {
    pub transfer_page_set_id: U16,
    pub sender_owns_set: u8,
    pub reserved: u8,
    pub range_count: U32,
}

/// One `struct vmtransfer_page_range`: a piece of the registered transfer-page buffer.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct TransferPageRange {
    pub byte_count: U32,
    pub byte_offset: U32,
}

/// Number of PFNs a GPA range with this offset and length spans, or `None` when the
/// range is not one the protocol allows (empty, or `byte_offset` outside the first page).
pub fn gpa_range_pfn_count(byte_offset: u32, byte_count: u32) -> Option<usize> {
    if byte_count == 0 || byte_offset as usize >= PAGE_SIZE {
        return None;
    }
    let end = u64::from(byte_offset) + u64::from(byte_count);
    usize::try_from(end.div_ceil(PAGE_SIZE as u64)).ok()
}

/// Total bytes a packet with `len8` occupies in the ring, trailer included.
pub const fn ring_footprint(len8: u16) -> usize {
    len8 as usize * 8 + TRAILER_SIZE
}

/// The trailer value Linux and OpenVMM write: the packet's start offset in the high half.
pub const fn trailer_value(packet_start: u32) -> u64 {
    (packet_start as u64) << 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn control_page_offsets_match_linux_hv_ring_buffer() {
        assert_eq!(control::WRITE_INDEX, 0x00);
        assert_eq!(control::READ_INDEX, 0x04);
        assert_eq!(control::INTERRUPT_MASK, 0x08);
        assert_eq!(control::PENDING_SEND_SZ, 0x0C);
        // 12 reserved u32 after pending_send_sz.
        assert_eq!(control::PENDING_SEND_SZ + 4 + 12 * 4, control::FEATURE_BITS);
        assert_eq!(control::FEATURE_BITS, 0x40);
        assert_eq!(CONTROL_PAGE_SIZE, 4096);
        let offsets: [usize; 5] = ControlWord::ALL.map(ControlWord::offset);
        assert_eq!(offsets, [0, 4, 8, 12, 0x40]);
        let dense: [usize; 5] = ControlWord::ALL.map(ControlWord::dense);
        assert_eq!(dense, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn descriptor_layout() {
        assert_eq!(size_of::<PacketDescriptor>(), DESCRIPTOR_SIZE);
        assert_eq!(offset_of!(PacketDescriptor, packet_type), 0);
        assert_eq!(offset_of!(PacketDescriptor, offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, len8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, trans_id), 8);
        let d = PacketDescriptor {
            packet_type: 0x6.into(),
            offset8: 2.into(),
            len8: 10.into(),
            flags: 1.into(),
            trans_id: 0x1122_3344_5566_7788.into(),
        };
        assert_eq!(
            d.as_bytes(),
            &[
                6, 0, 2, 0, 10, 0, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
    }

    #[test]
    fn gpa_direct_layout() {
        // Descriptor 0x00..0x10, reserved at 0x10, range_count at 0x14, ranges from 0x18.
        assert_eq!(size_of::<GpaDirectHeader>(), 8);
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(GpaDirectHeader, reserved),
            0x10
        );
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(GpaDirectHeader, range_count),
            0x14
        );
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
        assert_eq!(offset_of!(GpaRangeHeader, byte_count), 0);
        assert_eq!(offset_of!(GpaRangeHeader, byte_offset), 4);
    }

    #[test]
    fn transfer_page_layout() {
        assert_eq!(size_of::<TransferPageHeader>(), 8);
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(TransferPageHeader, transfer_page_set_id),
            0x10
        );
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(TransferPageHeader, sender_owns_set),
            0x12
        );
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(TransferPageHeader, reserved),
            0x13
        );
        assert_eq!(
            DESCRIPTOR_SIZE + offset_of!(TransferPageHeader, range_count),
            0x14
        );
        assert_eq!(size_of::<TransferPageRange>(), 8);
        assert_eq!(offset_of!(TransferPageRange, byte_count), 0);
        assert_eq!(offset_of!(TransferPageRange, byte_offset), 4);
    }

    #[test]
    fn packet_type_values() {
        assert_eq!(PacketType::InBand as u16, 6);
        assert_eq!(PacketType::TransferPages as u16, 7);
        assert_eq!(PacketType::GpaDirect as u16, 9);
        assert_eq!(PacketType::Completion as u16, 0xB);
        for v in 0..=0xFFu16 {
            let t = PacketType::from_wire(v);
            assert_eq!(t.is_some(), matches!(v, 6 | 7 | 9 | 0xB), "type {v:#x}");
            if let Some(t) = t {
                assert_eq!(t as u16, v);
            }
        }
    }

    #[test]
    fn pfn_counts() {
        assert_eq!(gpa_range_pfn_count(0, 1), Some(1));
        assert_eq!(gpa_range_pfn_count(0, 4096), Some(1));
        assert_eq!(gpa_range_pfn_count(1, 4096), Some(2));
        assert_eq!(gpa_range_pfn_count(4095, 2), Some(2));
        assert_eq!(gpa_range_pfn_count(0, 0), None);
        assert_eq!(gpa_range_pfn_count(4096, 1), None);
        assert_eq!(gpa_range_pfn_count(4095, u32::MAX), Some(0x10_0001));
    }

    #[test]
    fn linux_inband_sizes_and_trailer() {
        // Linux in-band: offset8 = 2, len8 = ceil((16 + payload) / 8); footprint adds the trailer.
        let len8 = (16u16 + 64).div_ceil(8);
        assert_eq!(len8, 10);
        assert_eq!(ring_footprint(len8), 88);
        assert_eq!(trailer_value(0x1230), 0x0000_1230_0000_0000);
        assert_eq!(MAX_ENCODED_PACKET_LEN, 0x7FFF8);
    }
}
