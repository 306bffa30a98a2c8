//! The reading half of a ring.
//!
//! The reader owns `read_index` and `interrupt_mask`. The peer's `write_index`, descriptors and
//! type-specific headers are copied out once, validated, and only then used. Type-specific headers are
//! parsed from a private copy, so the peer cannot change a range after it was checked. Payload bytes
//! stay in the ring (zero-copy view) and are copied straight to the consumer's buffer on demand.

use crate::error::{PacketFault, PayloadBounds, RingError};
use crate::layout::{
    ControlWord, DESCRIPTOR_SIZE, FLAG_COMPLETION_REQUESTED, GpaDirectHeader, GpaRangeHeader,
    PacketDescriptor, PacketType, TRAILER_SIZE, TransferPageHeader, TransferPageRange,
    gpa_range_pfn_count,
};
use crate::mem::RingMem;
use crate::sync::{Ordering, fence};
use crate::{checked_index, mark_broken};
use alloc::vec::Vec;
use zerocopy::FromBytes;
use zerocopy::little_endian::U64;

/// What the type-specific header of a packet held, after validation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HeaderInfo {
    /// In-band or completion packet (any bytes between descriptor and payload are ignored).
    None,
    /// GPA-direct: this many ranges, validated, in the reader's private copy.
    GpaDirect { range_count: u32 },
    /// Transfer pages: set id and this many ranges, in the reader's private copy.
    TransferPages {
        set_id: u16,
        sender_owns: bool,
        range_count: u32,
    },
}

/// The validated descriptor of a packet.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub packet_type: PacketType,
    pub completion_requested: bool,
    pub trans_id: u64,
    /// Data offset of the packet's descriptor.
    pub start: u32,
    /// `offset8 * 8`: where the payload starts, from the packet start.
    pub payload_offset: u32,
    /// `len8 * 8`: packet length without the trailer.
    pub len: u32,
    pub header: HeaderInfo,
}

impl PacketInfo {
    /// Payload length as a reader sees it (includes the sender's padding).
    pub fn payload_len(&self) -> usize {
        (self.len - self.payload_offset) as usize
    }

    /// Bytes the packet occupies in the ring, trailer included.
    pub fn footprint(&self) -> u32 {
        self.len + TRAILER_SIZE as u32
    }
}

/// Why [`RingReader::commit_to`] failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The local caller named a position outside the consumed span; nothing was published and
    /// the ring stays usable.
    #[error(
        "commit position {pos:#x} is not between read_index {read_index:#x} and the read position {next:#x}"
    )]
    BadPosition {
        pos: u32,
        read_index: u32,
        next: u32,
    },
    /// The ring itself failed (the peer misbehaved, or the ring was already broken).
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// The reading half of one ring.
pub struct RingReader<M: RingMem> {
    mem: M,
    size: u32,
    /// Last published read_index.
    read_index: u32,
    /// Private read position: packets before it are consumed but not yet published.
    next: u32,
    /// Last validated write_index seen from the peer.
    write_index: u32,
    scratch: Vec<u8>,
    broken: bool,
}

impl<M: RingMem> RingReader<M> {
    /// Attach to a ring, taking up at the `read_index` stored in it.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let size = crate::checked_size(mem.data_len())?;
        let stored = mem.control(ControlWord::ReadIndex).load(Ordering::Relaxed);
        let read_index = checked_index("read_index", stored, size)?;
        Ok(RingReader {
            mem,
            size,
            read_index,
            next: read_index,
            write_index: read_index,
            scratch: Vec::new(),
            broken: false,
        })
    }

    pub fn mem(&self) -> &M {
        &self.mem
    }

    pub fn data_len(&self) -> u32 {
        self.size
    }

    /// Published read position.
    pub fn read_index(&self) -> u32 {
        self.read_index
    }

    fn ring_err(&mut self, e: RingError) -> RingError {
        mark_broken(&mut self.broken, "reader", e)
    }

    fn bad_packet(&mut self, fault: PacketFault) -> RingError {
        let e = RingError::BadPacket {
            offset: self.next,
            fault,
        };
        self.ring_err(e)
    }

    #[inline]
    fn distance(&self, from: u32, to: u32) -> u32 {
        if to >= from {
            to - from
        } else {
            self.size - (from - to)
        }
    }

    #[inline]
    fn advance(&self, pos: u32, n: u32) -> u32 {
        let p = pos as u64 + n as u64;
        (if p >= self.size as u64 {
            p - self.size as u64
        } else {
            p
        }) as u32
    }

    /// Loads and validates the peer's write_index (acquire: packet bytes are read after it).
    fn refresh_write_index(&mut self) -> Result<u32, RingError> {
        let raw = self
            .mem
            .control(ControlWord::WriteIndex)
            .load(Ordering::Acquire);
        let w = checked_index("write_index", raw, self.size).map_err(|e| self.ring_err(e))?;
        self.write_index = w;
        Ok(self.distance(self.next, w))
    }

    /// Bytes published by the writer and not yet consumed.
    pub fn available(&mut self) -> Result<u32, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        self.refresh_write_index()
    }

    /// The next packet, validated, without consuming it. `Ok(None)` when the ring is empty.
    pub fn peek(&mut self) -> Result<Option<IncomingPacket<'_, M>>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let mut avail = self.distance(self.next, self.write_index);
        if avail == 0 {
            avail = self.refresh_write_index()?;
            if avail == 0 {
                return Ok(None);
            }
        }
        let info = self.parse_packet(avail)?;
        Ok(Some(IncomingPacket { reader: self, info }))
    }

    fn parse_packet(&mut self, avail: u32) -> Result<PacketInfo, RingError> {
        if (avail as usize) < DESCRIPTOR_SIZE + TRAILER_SIZE {
            return Err(self.bad_packet(PacketFault::Truncated { available: avail }));
        }
        let mut raw = [0u8; DESCRIPTOR_SIZE];
        self.mem.read_data(self.next, &mut raw);
        let desc = PacketDescriptor::read_from_bytes(&raw).map_err(|_| RingError::Broken)?;
        let ty = desc.packet_type.get();
        let Some(packet_type) = PacketType::from_wire(ty) else {
            return Err(self.bad_packet(PacketFault::UnknownType(ty)));
        };
        let flags = desc.flags.get();
        if flags & !FLAG_COMPLETION_REQUESTED != 0 {
            return Err(self.bad_packet(PacketFault::BadFlags(flags)));
        }
        let (offset8, len8) = (desc.offset8.get(), desc.len8.get());
        if offset8 < 2 || offset8 > len8 {
            return Err(self.bad_packet(PacketFault::BadOffset { offset8, len8 }));
        }
        let len = u32::from(len8) * 8;
        if len as u64 + TRAILER_SIZE as u64 > u64::from(avail) {
            return Err(self.bad_packet(PacketFault::Overrun {
                len,
                available: avail,
            }));
        }
        let payload_offset = u32::from(offset8) * 8;
        let header_len = payload_offset - DESCRIPTOR_SIZE as u32;
        let header = match packet_type {
            PacketType::InBand | PacketType::Completion => HeaderInfo::None,
            PacketType::GpaDirect => {
                self.copy_header(header_len);
                let range_count =
                    validate_gpa_header(&self.scratch).map_err(|f| self.bad_packet(f))?;
                HeaderInfo::GpaDirect { range_count }
            }
            PacketType::TransferPages => {
                self.copy_header(header_len);
                let (h, count) =
                    validate_xfer_header(&self.scratch).map_err(|f| self.bad_packet(f))?;
                HeaderInfo::TransferPages {
                    set_id: h.transfer_page_set_id.get(),
                    sender_owns: h.sender_owns_set != 0,
                    range_count: count,
                }
            }
        };
        Ok(PacketInfo {
            packet_type,
            completion_requested: flags & FLAG_COMPLETION_REQUESTED != 0,
            trans_id: desc.trans_id.get(),
            start: self.next,
            payload_offset,
            len,
            header,
        })
    }

    /// Copies the type-specific header into private memory. Bounded by the packet, which fits the ring.
    fn copy_header(&mut self, header_len: u32) {
        self.scratch.clear();
        self.scratch.resize(header_len as usize, 0);
        let at = self.advance(self.next, DESCRIPTOR_SIZE as u32);
        self.mem.read_data(at, &mut self.scratch);
    }

    /// Copy-out read: the next packet's payload replaces `buf`'s contents, and the packet is consumed
    /// (publish with [`Self::commit`]).
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<PacketInfo>, RingError> {
        let Some(pkt) = self.peek()? else {
            return Ok(None);
        };
        let info = *pkt.info();
        buf.clear();
        buf.resize(info.payload_len(), 0);
        pkt.copy_payload(0, buf).map_err(|_| RingError::Broken)?;
        pkt.consume();
        Ok(Some(info))
    }

    /// Publishes the consumed packets (stores `read_index`) and decides, as Linux does, whether the
    /// writer must be signalled: it asked for space through `pending_send_sz` and the free space just
    /// crossed that figure. `Ok(true)` = signal the writer.
    pub fn commit(&mut self) -> Result<bool, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        self.publish(self.next)
    }

    /// Publishes part of the consumed packets: `read_index` becomes `pos`, which must lie in ring
    /// order between the published `read_index` and the private read position (both inclusive),
    /// normally the [`end`](IncomingPacket::end_position) of a consumed packet. Packets after `pos`
    /// stay consumed (reading goes on after them) but their space is not returned to the writer;
    /// if this side goes away, whoever attaches to the ring next reads them again. Signals exactly as
    /// [`Self::commit`]. A position outside that span is refused and changes nothing.
    pub fn commit_to(&mut self, pos: u32) -> Result<bool, CommitError> {
        if self.broken {
            return Err(CommitError::Ring(RingError::Broken));
        }
        if pos >= self.size
            || !pos.is_multiple_of(8)
            || self.distance(self.read_index, pos) > self.distance(self.read_index, self.next)
        {
            return Err(CommitError::BadPosition {
                pos,
                read_index: self.read_index,
                next: self.next,
            });
        }
        Ok(self.publish(pos)?)
    }

    /// Private read position: where the next packet starts; packets before it are consumed.
    pub fn position(&self) -> u32 {
        self.next
    }

    /// Data offset just after `info`'s packet (trailer included), wrapping.
    pub fn position_after(&self, info: &PacketInfo) -> u32 {
        self.advance(info.start, info.footprint())
    }

    /// Stores `read_index = pos` (already validated: between `read_index` and `next`) and makes the
    /// Linux signalling decision (`hv_pkt_iter_close`).
    fn publish(&mut self, pos: u32) -> Result<bool, RingError> {
        if pos == self.read_index {
            return Ok(false);
        }
        let start = self.read_index;
        // Release: every read of the consumed bytes completes before the writer may reuse them.
        self.mem
            .control(ControlWord::ReadIndex)
            .store(pos, Ordering::Release);
        self.read_index = pos;
        let feat = self
            .mem
            .control(ControlWord::FeatureBits)
            .load(Ordering::Relaxed);
        if feat & crate::layout::control::FEAT_PENDING_SEND_SZ == 0 {
            return Ok(false);
        }
        // Full barrier: the read_index store is ordered before the pending_send_sz load (pairs with
        // the writer's fence between storing pending_send_sz and re-reading read_index).
        fence(Ordering::SeqCst);
        let pending = self
            .mem
            .control(ControlWord::PendingSendSize)
            .load(Ordering::Acquire);
        if pending == 0 {
            return Ok(false);
        }
        let raw = self
            .mem
            .control(ControlWord::WriteIndex)
            .load(Ordering::Acquire);
        let w = checked_index("write_index", raw, self.size).map_err(|e| self.ring_err(e))?;
        let free_after = self.size - self.distance(self.read_index, w);
        let bytes_read = self.distance(start, self.read_index);
        // Signal only on the transition "not enough" (free <= pending) -> "enough" (free > pending).
        Ok(free_after.wrapping_sub(bytes_read) <= pending && free_after > pending)
    }

    /// Asks the writer not to signal (Linux `hv_begin_read`): use while draining or polling.
    pub fn mask_interrupts(&self) {
        self.mem
            .control(ControlWord::InterruptMask)
            .store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Re-arms signalling (Linux `hv_end_read`) and re-checks for data published meanwhile.
    /// `Ok(true)` = data is waiting: keep reading instead of sleeping, or a wake-up is lost.
    pub fn unmask_interrupts(&mut self) -> Result<bool, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        self.mem
            .control(ControlWord::InterruptMask)
            .store(0, Ordering::Relaxed);
        // Full barrier: pairs with the writer's fence between storing write_index and loading the mask.
        fence(Ordering::SeqCst);
        Ok(self.refresh_write_index()? != 0)
    }
}

/// A validated packet at the head of the ring. Payload bytes stay in the ring until copied out.
pub struct IncomingPacket<'a, M: RingMem> {
    reader: &'a mut RingReader<M>,
    info: PacketInfo,
}

impl<M: RingMem> IncomingPacket<'_, M> {
    pub fn info(&self) -> &PacketInfo {
        &self.info
    }

    pub fn packet_type(&self) -> PacketType {
        self.info.packet_type
    }

    pub fn trans_id(&self) -> u64 {
        self.info.trans_id
    }

    pub fn completion_requested(&self) -> bool {
        self.info.completion_requested
    }

    pub fn payload_len(&self) -> usize {
        self.info.payload_len()
    }

    /// Data offset of the packet's descriptor.
    pub fn start_position(&self) -> u32 {
        self.info.start
    }

    /// Data offset just after the packet (trailer included): the read position once it is
    /// consumed, and what to pass to [`RingReader::commit_to`] to release it.
    pub fn end_position(&self) -> u32 {
        self.reader.position_after(&self.info)
    }

    /// Copies `dst.len()` payload bytes starting at `offset` straight out of the ring.
    pub fn copy_payload(&self, offset: usize, dst: &mut [u8]) -> Result<(), PayloadBounds> {
        let payload_len = self.payload_len();
        if offset > payload_len || dst.len() > payload_len - offset {
            return Err(PayloadBounds {
                offset,
                len: dst.len(),
                payload_len,
            });
        }
        if !dst.is_empty() {
            // offset + payload_offset < len <= size, so this stays in u32.
            let rel = self.info.payload_offset + offset as u32;
            let at = self.reader.advance(self.info.start, rel);
            self.reader.mem.read_data(at, dst);
        }
        Ok(())
    }

    /// Reads a fixed-size wire struct from the payload (copied out, then interpreted).
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, PayloadBounds> {
        let mut v = T::new_zeroed();
        self.copy_payload(offset, v.as_mut_bytes())?;
        Ok(v)
    }

    /// The validated GPA ranges of a GPA-direct packet.
    pub fn gpa_ranges(&self) -> Option<GpaRanges<'_>> {
        match self.info.header {
            HeaderInfo::GpaDirect { range_count } => Some(GpaRanges {
                rest: self.reader.scratch.get(size_of::<GpaDirectHeader>()..)?,
                remaining: range_count,
            }),
            _ => None,
        }
    }

    /// The validated ranges of a transfer-page packet.
    pub fn transfer_ranges(&self) -> Option<&[TransferPageRange]> {
        match self.info.header {
            HeaderInfo::TransferPages { range_count, .. } => {
                let bytes = self.reader.scratch.get(size_of::<TransferPageHeader>()..)?;
                <[TransferPageRange]>::ref_from_prefix_with_elems(bytes, range_count as usize)
                    .ok()
                    .map(|(r, _)| r)
            }
            _ => None,
        }
    }

    /// Marks the packet consumed; the space returns to the writer at the next [`RingReader::commit`].
    pub fn consume(self) {
        self.reader.next = self.reader.position_after(&self.info);
    }
}

use core::mem::size_of;
use zerocopy::IntoBytes;

/// One validated GPA range: `byte_count` bytes from `byte_offset` into the first of `pfns`.
#[derive(Copy, Clone, Debug)]
pub struct GpaRange<'a> {
    pub byte_count: u32,
    pub byte_offset: u32,
    pub pfns: &'a [U64],
}

/// Iterator over the ranges of a GPA-direct packet (already validated).
pub struct GpaRanges<'a> {
    rest: &'a [u8],
    remaining: u32,
}

impl<'a> Iterator for GpaRanges<'a> {
    type Item = GpaRange<'a>;

    fn next(&mut self) -> Option<GpaRange<'a>> {
        if self.remaining == 0 {
            return None;
        }
        let (head, rest) = GpaRangeHeader::read_from_prefix(self.rest).ok()?;
        let n = gpa_range_pfn_count(head.byte_offset.get(), head.byte_count.get())?;
        let (pfns, rest) = <[U64]>::ref_from_prefix_with_elems(rest, n).ok()?;
        self.rest = rest;
        self.remaining -= 1;
        Some(GpaRange {
            byte_count: head.byte_count.get(),
            byte_offset: head.byte_offset.get(),
            pfns,
        })
    }
}

/// Checks a GPA-direct header: at least one range, each allowed, all inside the header.
fn validate_gpa_header(bytes: &[u8]) -> Result<u32, PacketFault> {
    let len = bytes.len() as u32;
    let (head, mut rest) =
        GpaDirectHeader::read_from_prefix(bytes).map_err(|_| PacketFault::HeaderOverrun {
            len,
            needed: size_of::<GpaDirectHeader>() as u64,
        })?;
    let count = head.range_count.get();
    if count == 0 {
        return Err(PacketFault::NoRanges);
    }
    let mut needed = size_of::<GpaDirectHeader>() as u64;
    for index in 0..count {
        // Each range takes at least 16 bytes, so this loop ends within len / 16 iterations.
        let Ok((range, after)) = GpaRangeHeader::read_from_prefix(rest) else {
            return Err(PacketFault::HeaderOverrun {
                len,
                needed: needed + size_of::<GpaRangeHeader>() as u64,
            });
        };
        let (byte_offset, byte_count) = (range.byte_offset.get(), range.byte_count.get());
        let n = gpa_range_pfn_count(byte_offset, byte_count).ok_or(PacketFault::BadRange {
            index,
            byte_offset,
            byte_count,
        })?;
        needed += size_of::<GpaRangeHeader>() as u64 + 8 * n as u64;
        rest = after
            .get(n * 8..)
            .ok_or(PacketFault::HeaderOverrun { len, needed })?;
    }
    Ok(count)
}

/// Checks a transfer-page header: its ranges fit inside the header.
fn validate_xfer_header(bytes: &[u8]) -> Result<(TransferPageHeader, u32), PacketFault> {
    let len = bytes.len() as u32;
    let (head, rest) =
        TransferPageHeader::read_from_prefix(bytes).map_err(|_| PacketFault::HeaderOverrun {
            len,
            needed: size_of::<TransferPageHeader>() as u64,
        })?;
    let count = head.range_count.get();
    let needed = size_of::<TransferPageHeader>() as u64 + 8 * u64::from(count);
    if (rest.len() as u64) < 8 * u64::from(count) {
        return Err(PacketFault::HeaderOverrun { len, needed });
    }
    Ok((head, count))
}
