//! Helpers shared by the hostile-peer tests: raw ring pokes and hand-built packets.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub use ringbuf::layout::{
    CONTROL_PAGE_SIZE, DESCRIPTOR_SIZE, GpaDirectHeader, GpaRangeHeader, PacketDescriptor,
    TRAILER_SIZE, TransferPageHeader, TransferPageRange, control, trailer_value,
};
pub use ringbuf::{
    HeaderInfo, HeapRing, OutgoingPacket, PacketFault, PacketType, RingError, RingMem, RingReader,
    RingWriter, WriteError,
};
pub use zerocopy::IntoBytes;

/// Data area of a one-page ring.
pub const SIZE: u32 = 4096;

pub fn ring(pages: usize) -> HeapRing {
    HeapRing::new(pages).expect("ring")
}

pub fn poke_control(r: &HeapRing, offset: usize, value: u32) {
    assert!(r.poke(offset, &value.to_le_bytes()));
}

pub fn set_write_index(r: &HeapRing, value: u32) {
    poke_control(r, control::WRITE_INDEX, value);
}

pub fn set_read_index(r: &HeapRing, value: u32) {
    poke_control(r, control::READ_INDEX, value);
}

/// Raw bytes at data offset `at`, wrapping at the end of the data area as a peer's copy would.
pub fn poke_data(r: &HeapRing, at: u32, bytes: &[u8]) {
    let size = r_size(r);
    for (i, b) in bytes.iter().enumerate() {
        let off = (at as usize + i) % size;
        assert!(r.poke(CONTROL_PAGE_SIZE + off, &[*b]));
    }
}

pub fn r_size(r: &HeapRing) -> usize {
    r.data_len() as usize
}

pub fn desc(ty: u16, offset8: u16, len8: u16, flags: u16, trans_id: u64) -> [u8; DESCRIPTOR_SIZE] {
    let d = PacketDescriptor {
        packet_type: ty.into(),
        offset8: offset8.into(),
        len8: len8.into(),
        flags: flags.into(),
        trans_id: trans_id.into(),
    };
    let mut out = [0u8; DESCRIPTOR_SIZE];
    out.copy_from_slice(d.as_bytes());
    out
}

/// A whole packet as a peer would lay it out: descriptor, `header` (type-specific bytes), payload
/// padded to `len8 * 8`, then the trailer Linux writes for a packet starting at `start`.
pub fn packet_bytes(
    ty: u16,
    flags: u16,
    trans_id: u64,
    header: &[u8],
    payload: &[u8],
    start: u32,
) -> Vec<u8> {
    assert!(header.len().is_multiple_of(8));
    let offset8 = ((DESCRIPTOR_SIZE + header.len()) / 8) as u16;
    let len = (DESCRIPTOR_SIZE + header.len() + payload.len()).next_multiple_of(8);
    let mut v = desc(ty, offset8, (len / 8) as u16, flags, trans_id).to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(payload);
    v.resize(len, 0);
    v.extend_from_slice(&trailer_value(start).to_le_bytes());
    v
}

/// Puts `bytes` at data offset `at` and publishes `write_index = at + bytes.len()` (wrapped).
pub fn publish_raw(r: &HeapRing, at: u32, bytes: &[u8]) -> u32 {
    poke_data(r, at, bytes);
    let end = ((at as usize + bytes.len()) % r_size(r)) as u32;
    set_write_index(r, end);
    end
}

pub fn gpa_header(ranges: &[(u32, u32, &[u64])]) -> Vec<u8> {
    let mut v = GpaDirectHeader {
        reserved: 0xDEAD_BEEF.into(),
        range_count: (ranges.len() as u32).into(),
    }
    .as_bytes()
    .to_vec();
    for &(byte_count, byte_offset, pfns) in ranges {
        v.extend_from_slice(
            GpaRangeHeader {
                byte_count: byte_count.into(),
                byte_offset: byte_offset.into(),
            }
            .as_bytes(),
        );
        for p in pfns {
            v.extend_from_slice(&p.to_le_bytes());
        }
    }
    v
}

pub fn gpa_header_with_count(count: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = GpaDirectHeader {
        reserved: 0.into(),
        range_count: count.into(),
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(rest);
    v
}

pub fn xfer_header(set_id: u16, count: u32, ranges: &[(u32, u32)]) -> Vec<u8> {
    let mut v = TransferPageHeader {
        transfer_page_set_id: set_id.into(),
        sender_owns_set: 1,
        reserved: 0,
        range_count: count.into(),
    }
    .as_bytes()
    .to_vec();
    for &(byte_count, byte_offset) in ranges {
        v.extend_from_slice(
            TransferPageRange {
                byte_count: byte_count.into(),
                byte_offset: byte_offset.into(),
            }
            .as_bytes(),
        );
    }
    v
}

/// The error the next `peek` returns; panics (test failure) if it returns a packet or nothing.
pub fn peek_err(reader: &mut RingReader<&HeapRing>) -> RingError {
    match reader.peek() {
        Err(e) => e,
        Ok(Some(p)) => panic!("expected an error, got packet {:?}", p.info()),
        Ok(None) => panic!("expected an error, ring looked empty"),
    }
}

/// After a peer-caused error the reader refuses everything, every time.
pub fn assert_reader_broken(reader: &mut RingReader<&HeapRing>) {
    let mut buf = Vec::new();
    for _ in 0..3 {
        assert_eq!(reader.peek().err(), Some(RingError::Broken));
        assert_eq!(reader.available(), Err(RingError::Broken));
        assert_eq!(reader.read_into(&mut buf), Err(RingError::Broken));
        assert_eq!(reader.commit(), Err(RingError::Broken));
        assert_eq!(reader.unmask_interrupts(), Err(RingError::Broken));
    }
}

/// After a peer-caused error the writer refuses everything, every time.
pub fn assert_writer_broken(writer: &mut RingWriter<&HeapRing>) {
    let payload: &[&[u8]] = &[b"after"];
    let pkt = OutgoingPacket::in_band(1, false, payload);
    for _ in 0..3 {
        assert_eq!(writer.free_bytes(), Err(RingError::Broken));
        assert_eq!(
            writer.try_write(&pkt),
            Err(WriteError::Ring(RingError::Broken))
        );
        assert_eq!(writer.request_space(64), Err(RingError::Broken));
        let mut batch = writer.batch();
        assert_eq!(batch.write(&pkt), Err(WriteError::Ring(RingError::Broken)));
        assert!(batch.is_empty());
    }
}

/// Reader over a fresh ring with `bytes` published at data offset 0; returns the first error.
pub fn reader_error_for(bytes: &[u8]) -> RingError {
    let r = ring(1);
    publish_raw(&r, 0, bytes);
    let mut reader = RingReader::new(&r).expect("reader attaches");
    let e = peek_err(&mut reader);
    assert_reader_broken(&mut reader);
    e
}

pub fn bad_packet(offset: u32, fault: PacketFault) -> RingError {
    RingError::BadPacket { offset, fault }
}

// ---------------------------------------------------------------------------------------------
// Indices
// ---------------------------------------------------------------------------------------------
