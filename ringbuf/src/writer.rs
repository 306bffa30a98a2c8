//! The writing half of a ring.
//!
//! The writer owns `write_index` and `pending_send_sz`; it keeps its own copy of `write_index` and never
//! trusts the shared one after attaching. `read_index` and `interrupt_mask` come from the peer: each is
//! loaded once per decision and validated before use.

use crate::error::{RingError, WriteError};
use crate::layout::{
    ControlWord, DESCRIPTOR_SIZE, FLAG_COMPLETION_REQUESTED, MAX_ENCODED_PACKET_LEN,
    PacketDescriptor, PacketType, TRAILER_SIZE, trailer_value,
};
use crate::mem::RingMem;
use crate::sync::{Ordering, fence};
use crate::{checked_index, mark_broken};
use zerocopy::IntoBytes;

/// A packet to send: descriptor fields, the type-specific header bytes and a gather list of payload
/// slices. The writer adds the descriptor, zero padding to 8 bytes and the trailer.
#[derive(Copy, Clone, Debug)]
pub struct OutgoingPacket<'a> {
    pub packet_type: PacketType,
    pub completion_requested: bool,
    pub trans_id: u64,
    /// Type-specific header (GPA ranges, transfer-page ranges); a multiple of 8 bytes.
    pub headers: &'a [u8],
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band data packet, the kind Linux sends with `vmbus_sendpacket`.
    pub fn in_band(trans_id: u64, completion_requested: bool, payload: &'a [&'a [u8]]) -> Self {
        OutgoingPacket {
            packet_type: PacketType::InBand,
            completion_requested,
            trans_id,
            headers: &[],
            payload,
        }
    }

    /// A completion echoing a request's transaction id.
    pub fn completion(trans_id: u64, payload: &'a [&'a [u8]]) -> Self {
        OutgoingPacket {
            packet_type: PacketType::Completion,
            completion_requested: false,
            trans_id,
            headers: &[],
            payload,
        }
    }

    fn payload_len(&self) -> usize {
        self.payload.iter().map(|s| s.len()).sum()
    }

    /// `(offset8, len8)` of this packet, or why it cannot be encoded.
    pub fn encoded_lengths(&self) -> Result<(u16, u16), WriteError> {
        if !self.headers.len().is_multiple_of(8) {
            return Err(WriteError::UnalignedHeader(self.headers.len()));
        }
        let offset = DESCRIPTOR_SIZE + self.headers.len();
        let len = offset
            .checked_add(self.payload_len())
            .map(|l| l.next_multiple_of(8))
            .filter(|&l| l <= MAX_ENCODED_PACKET_LEN)
            .ok_or(WriteError::TooLarge {
                len: offset.saturating_add(self.payload_len()),
                max: MAX_ENCODED_PACKET_LEN,
            })?;
        // Both fit in u16 units: len <= 0xFFFF * 8 and offset <= len.
        Ok(((offset / 8) as u16, (len / 8) as u16))
    }

    /// Bytes this packet takes in the ring, trailer included.
    pub fn footprint(&self) -> Result<u32, WriteError> {
        let (_, len8) = self.encoded_lengths()?;
        Ok(crate::layout::ring_footprint(len8) as u32)
    }
}

/// Packets up to this footprint are assembled on the stack and copied into the ring in one piece.
const SMALL_PACKET: usize = 256;

/// The writing half of one ring.
pub struct RingWriter<M: RingMem> {
    mem: M,
    size: u32,
    write_index: u32,
    broken: bool,
}

impl<M: RingMem> RingWriter<M> {
    /// Attach to a ring, taking up at the `write_index` stored in it (0 for a fresh ring; a saved
    /// position after reconnect or restore).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let size = crate::checked_size(mem.data_len())?;
        let stored = mem.control(ControlWord::WriteIndex).load(Ordering::Relaxed);
        let write_index = checked_index("write_index", stored, size)?;
        Ok(RingWriter {
            mem,
            size,
            write_index,
            broken: false,
        })
    }

    /// The memory under this half.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Data area size `D`.
    pub fn data_len(&self) -> u32 {
        self.size
    }

    /// Current (published) write position.
    pub fn write_index(&self) -> u32 {
        self.write_index
    }

    /// Largest footprint (`len8 * 8 + 8`) a packet can have in this ring (one word always stays free).
    pub fn max_footprint(&self) -> u32 {
        self.size - 8
    }

    fn ring_err(&mut self, e: RingError) -> RingError {
        mark_broken(&mut self.broken, "writer", e)
    }

    fn check_broken(&self) -> Result<(), RingError> {
        if self.broken {
            Err(RingError::Broken)
        } else {
            Ok(())
        }
    }

    /// Free bytes with the next packet written at `pos`, from a fresh, validated `read_index`.
    fn free_from(&mut self, pos: u32) -> Result<u32, RingError> {
        let raw = self
            .mem
            .control(ControlWord::ReadIndex)
            .load(Ordering::Acquire);
        let r = checked_index("read_index", raw, self.size).map_err(|e| self.ring_err(e))?;
        let used = if pos >= r {
            pos - r
        } else {
            self.size - (r - pos)
        };
        Ok(self.size - used)
    }

    /// Free bytes right now (a packet needs strictly more than its footprint).
    pub fn free_bytes(&mut self) -> Result<u32, RingError> {
        self.check_broken()?;
        self.free_from(self.write_index)
    }

    #[inline]
    fn advance(&self, pos: u32, n: usize) -> u32 {
        // pos < size <= 2^31 and n <= size, so no overflow.
        let p = pos as usize + n;
        let s = self.size as usize;
        (if p >= s { p - s } else { p }) as u32
    }

    /// Writes `pkt` at `pos` (space already checked) and returns the position after its trailer.
    fn put(&self, pos: u32, pkt: &OutgoingPacket<'_>, offset8: u16, len8: u16) -> u32 {
        let desc = PacketDescriptor {
            packet_type: (pkt.packet_type as u16).into(),
            offset8: offset8.into(),
            len8: len8.into(),
            flags: if pkt.completion_requested {
                FLAG_COMPLETION_REQUESTED
            } else {
                0
            }
            .into(),
            trans_id: pkt.trans_id.into(),
        };
        let len = len8 as usize * 8;
        let footprint = len + TRAILER_SIZE;
        let trailer = trailer_value(pos).to_le_bytes();
        if footprint <= SMALL_PACKET {
            let mut buf = [0u8; SMALL_PACKET];
            buf[..DESCRIPTOR_SIZE].copy_from_slice(desc.as_bytes());
            let mut at = DESCRIPTOR_SIZE;
            for part in core::iter::once(&pkt.headers).chain(pkt.payload.iter()) {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            buf[len..footprint].copy_from_slice(&trailer);
            self.mem.write_data(pos, &buf[..footprint]);
        } else {
            self.mem.write_data(pos, desc.as_bytes());
            let mut at = self.advance(pos, DESCRIPTOR_SIZE);
            let mut written = DESCRIPTOR_SIZE;
            for part in core::iter::once(&pkt.headers).chain(pkt.payload.iter()) {
                if !part.is_empty() {
                    self.mem.write_data(at, part);
                    at = self.advance(at, part.len());
                    written += part.len();
                }
            }
            let pad = len - written;
            if pad > 0 {
                self.mem.write_data(at, &[0u8; 8][..pad]);
                at = self.advance(at, pad);
            }
            self.mem.write_data(at, &trailer);
        }
        self.advance(pos, footprint)
    }

    /// Publishes `new` as the write index and decides whether the reader must be signalled: the ring
    /// was empty before (`read_index == old`) and the reader's `interrupt_mask` is clear.
    fn publish(&mut self, old: u32, new: u32) -> bool {
        // Release: the packet bytes are visible before the index that covers them.
        self.mem
            .control(ControlWord::WriteIndex)
            .store(new, Ordering::Release);
        self.write_index = new;
        // Full barrier: our index store is ordered before the loads below (pairs with the reader's
        // fence between clearing interrupt_mask and re-reading write_index).
        fence(Ordering::SeqCst);
        if self
            .mem
            .control(ControlWord::InterruptMask)
            .load(Ordering::Acquire)
            != 0
        {
            return false;
        }
        self.mem
            .control(ControlWord::ReadIndex)
            .load(Ordering::Acquire)
            == old
    }

    /// Writes one packet and publishes it. `Ok(true)` = signal the reader.
    pub fn try_write(&mut self, pkt: &OutgoingPacket<'_>) -> Result<bool, WriteError> {
        let mut batch = self.batch();
        batch.write(pkt)?;
        Ok(batch.commit()?)
    }

    /// Starts a batch: packets written through it are published together, with one signalling
    /// decision, when it is committed. Dropping it uncommitted discards them.
    pub fn batch(&mut self) -> WriteBatch<'_, M> {
        let start = self.write_index;
        WriteBatch {
            writer: self,
            start,
            cursor: start,
            free: 0,
            count: 0,
        }
    }

    /// The writer is blocked on a packet of `footprint` bytes: ask the reader, through
    /// `pending_send_sz`, to signal once more than that is free. Returns `Ok(true)` when the space
    /// is already there (the request is withdrawn and the caller retries at once); otherwise the caller
    /// waits for the signal, retries, and calls [`Self::clear_space_request`] once written.
    pub fn request_space(&mut self, footprint: u32) -> Result<bool, RingError> {
        self.check_broken()?;
        // Clamp before rounding: `size` is a multiple of 8 below 2^31, so this cannot overflow
        // (rounding first overflowed for footprints above u32::MAX - 7).
        let want = footprint.min(self.size).next_multiple_of(8);
        self.mem
            .control(ControlWord::PendingSendSize)
            .store(want, Ordering::Relaxed);
        // Full barrier: the request is visible before we re-read read_index (pairs with the reader's
        // fence between storing read_index and loading pending_send_sz).
        fence(Ordering::SeqCst);
        if self.free_from(self.write_index)? > footprint {
            self.clear_space_request();
            return Ok(true);
        }
        Ok(false)
    }

    /// Withdraws a space request.
    pub fn clear_space_request(&self) {
        self.mem
            .control(ControlWord::PendingSendSize)
            .store(0, Ordering::Relaxed);
    }

    /// Whether the reader advertises `feat_pending_send_sz` in this ring's control page.
    pub fn peer_supports_pending_send(&self) -> bool {
        self.mem
            .control(ControlWord::FeatureBits)
            .load(Ordering::Relaxed)
            & crate::layout::control::FEAT_PENDING_SEND_SZ
            != 0
    }
}

/// Packets written but not yet published; see [`RingWriter::batch`].
pub struct WriteBatch<'a, M: RingMem> {
    writer: &'a mut RingWriter<M>,
    start: u32,
    cursor: u32,
    free: u32,
    count: usize,
}

impl<M: RingMem> WriteBatch<'_, M> {
    /// Appends one packet to the batch (not yet visible to the reader).
    pub fn write(&mut self, pkt: &OutgoingPacket<'_>) -> Result<(), WriteError> {
        self.writer.check_broken()?;
        let (offset8, len8) = pkt.encoded_lengths()?;
        let needed = crate::layout::ring_footprint(len8);
        if needed > self.writer.max_footprint() as usize {
            return Err(WriteError::TooLarge {
                len: needed,
                max: self.writer.max_footprint() as usize,
            });
        }
        let needed = needed as u32;
        if self.free <= needed {
            // The cached figure ran out: look at read_index again.
            self.free = self.writer.free_from(self.cursor)?;
            if self.free <= needed {
                return Err(WriteError::Full {
                    needed,
                    free: self.free,
                });
            }
        }
        self.cursor = self.writer.put(self.cursor, pkt, offset8, len8);
        self.free -= needed;
        self.count += 1;
        Ok(())
    }

    /// Packets in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Publishes every packet in the batch. `Ok(true)` = signal the reader. A writer broken by a
    /// peer error (even one met by a later write of this same batch) publishes nothing.
    pub fn commit(self) -> Result<bool, RingError> {
        self.writer.check_broken()?;
        if self.count == 0 {
            return Ok(false);
        }
        Ok(self.writer.publish(self.start, self.cursor))
    }
}
