//! Hostile-peer tests: the peer owns half of the control page and every byte of the data area, so it
//! can publish any index and any packet. Each test crafts a ring with `HeapRing::poke` (sometimes after
//! a real writer put valid packets in), then checks that the half under test returns the exact typed
//! error, and afterwards `RingError::Broken` on every call, without panicking or looping.

mod common;
use common::*;

#[test]
fn write_index_beyond_data_area() {
    for value in [SIZE, SIZE + 8, 0x8000_0000, u32::MAX - 7, u32::MAX] {
        let r = ring(1);
        set_write_index(&r, value);
        let mut reader = RingReader::new(&r).unwrap();
        assert_eq!(
            peek_err(&mut reader),
            RingError::BadIndex {
                field: "write_index",
                value,
                size: SIZE
            }
        );
        assert_reader_broken(&mut reader);
    }
}

#[test]
fn write_index_beyond_data_area_seen_by_available_and_unmask() {
    let r = ring(2);
    set_write_index(&r, 2 * SIZE);
    let expect = RingError::BadIndex {
        field: "write_index",
        value: 2 * SIZE,
        size: 2 * SIZE,
    };
    let mut reader = RingReader::new(&r).unwrap();
    assert_eq!(reader.available(), Err(expect));
    assert_reader_broken(&mut reader);

    let mut reader = RingReader::new(&r).unwrap();
    assert_eq!(reader.unmask_interrupts(), Err(expect));
    assert_reader_broken(&mut reader);
}

#[test]
fn misaligned_write_index() {
    for value in [1, 4, 7, 12, SIZE - 1, SIZE - 4] {
        let r = ring(1);
        set_write_index(&r, value);
        let mut reader = RingReader::new(&r).unwrap();
        assert_eq!(
            peek_err(&mut reader),
            RingError::BadIndex {
                field: "write_index",
                value,
                size: SIZE
            }
        );
        assert_reader_broken(&mut reader);
    }
}

#[test]
fn corrupt_write_index_after_a_good_packet() {
    // The writer publishes a packet, then the peer corrupts write_index while the reader has
    // consumed it: the next refresh breaks the reader.
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[b"hello"];
    writer
        .try_write(&OutgoingPacket::in_band(5, true, payload))
        .unwrap();
    let mut reader = RingReader::new(&r).unwrap();
    let mut buf = Vec::new();
    let info = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(info.trans_id, 5);
    assert!(info.completion_requested);
    assert_eq!(&buf[..5], b"hello");
    set_write_index(&r, 3);
    assert_eq!(
        peek_err(&mut reader),
        RingError::BadIndex {
            field: "write_index",
            value: 3,
            size: SIZE
        }
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn corrupt_write_index_seen_by_commit() {
    // commit() loads write_index when the writer asked for space; a corrupt one breaks the reader.
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[&[7u8; 40]];
    writer
        .try_write(&OutgoingPacket::in_band(1, false, payload))
        .unwrap();
    let mut reader = RingReader::new(&r).unwrap();
    let mut buf = Vec::new();
    reader.read_into(&mut buf).unwrap().unwrap();
    poke_control(&r, control::PENDING_SEND_SZ, 1024);
    set_write_index(&r, SIZE + 16);
    assert_eq!(
        reader.commit(),
        Err(RingError::BadIndex {
            field: "write_index",
            value: SIZE + 16,
            size: SIZE
        })
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn corrupt_read_index_at_attach() {
    for value in [SIZE, 4, u32::MAX] {
        let r = ring(1);
        set_read_index(&r, value);
        assert_eq!(
            RingReader::new(&r).err(),
            Some(RingError::BadIndex {
                field: "read_index",
                value,
                size: SIZE
            })
        );
    }
    for value in [SIZE, 9, u32::MAX] {
        let r = ring(1);
        set_write_index(&r, value);
        assert_eq!(
            RingWriter::new(&r).err(),
            Some(RingError::BadIndex {
                field: "write_index",
                value,
                size: SIZE
            })
        );
    }
}

#[test]
fn corrupt_read_index_seen_by_writer_free_bytes() {
    for value in [SIZE, SIZE + 8, 12, 1, u32::MAX] {
        let r = ring(1);
        let mut writer = RingWriter::new(&r).unwrap();
        assert_eq!(writer.free_bytes(), Ok(SIZE));
        set_read_index(&r, value);
        assert_eq!(
            writer.free_bytes(),
            Err(RingError::BadIndex {
                field: "read_index",
                value,
                size: SIZE
            })
        );
        // Fixing the index afterwards does not un-break the writer.
        set_read_index(&r, 0);
        assert_writer_broken(&mut writer);
    }
}

#[test]
fn corrupt_read_index_seen_by_writer_try_write() {
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[b"first"];
    let pkt = OutgoingPacket::in_band(1, false, payload);
    assert_eq!(writer.try_write(&pkt), Ok(true));
    let published = writer.write_index();
    set_read_index(&r, 0x7FFF_FFFC);
    assert_eq!(
        writer.try_write(&pkt),
        Err(WriteError::Ring(RingError::BadIndex {
            field: "read_index",
            value: 0x7FFF_FFFC,
            size: SIZE
        }))
    );
    // Nothing more was published.
    assert_eq!(writer.write_index(), published);
    assert_writer_broken(&mut writer);
    assert_eq!(writer.write_index(), published);
}

#[test]
fn corrupt_read_index_seen_by_request_space() {
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    set_read_index(&r, 20);
    assert_eq!(
        writer.request_space(512),
        Err(RingError::BadIndex {
            field: "read_index",
            value: 20,
            size: SIZE
        })
    );
    assert_writer_broken(&mut writer);
}

#[test]
fn valid_but_hostile_read_index_only_limits_space() {
    // An in-range, aligned read_index the peer moved arbitrarily is not detectable: the writer must
    // just treat it as the truth (Full, not a panic or corruption of its own state).
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    set_read_index(&r, 8);
    assert_eq!(writer.free_bytes(), Ok(8));
    let payload: &[&[u8]] = &[b"x"];
    assert_eq!(
        writer.try_write(&OutgoingPacket::in_band(1, false, payload)),
        Err(WriteError::Full {
            needed: 32,
            free: 8
        })
    );
    set_read_index(&r, 0);
    assert_eq!(
        writer.try_write(&OutgoingPacket::in_band(1, false, payload)),
        Ok(true)
    );
}

// ---------------------------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------------------------

#[test]
fn offset8_below_two() {
    for offset8 in [0u16, 1] {
        let mut bytes = desc(0x6, offset8, 4, 0, 7).to_vec();
        bytes.resize(32 + TRAILER_SIZE, 0);
        assert_eq!(
            reader_error_for(&bytes),
            bad_packet(0, PacketFault::BadOffset { offset8, len8: 4 })
        );
    }
}

#[test]
fn offset8_beyond_len8() {
    let mut bytes = desc(0x6, 5, 4, 0, 7).to_vec();
    bytes.resize(32 + TRAILER_SIZE, 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::BadOffset {
                offset8: 5,
                len8: 4
            }
        )
    );
    // len8 below 2 can never hold the descriptor: caught as offset8 > len8.
    let mut bytes = desc(0xB, 2, 0, 0, 7).to_vec();
    bytes.resize(32, 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::BadOffset {
                offset8: 2,
                len8: 0
            }
        )
    );
    let mut bytes = desc(0x6, u16::MAX, 3, 0, 7).to_vec();
    bytes.resize(32, 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::BadOffset {
                offset8: u16::MAX,
                len8: 3
            }
        )
    );
}

#[test]
fn len8_past_published_bytes() {
    // 40 bytes published (packet of 32 + trailer), descriptor claims 80.
    let mut bytes = desc(0x6, 2, 10, 0, 7).to_vec();
    bytes.resize(40, 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::Overrun {
                len: 80,
                available: 40
            }
        )
    );
    // Exactly the packet but no room for the trailer.
    let mut bytes = desc(0x6, 2, 5, 0, 7).to_vec();
    bytes.resize(40, 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::Overrun {
                len: 40,
                available: 40
            }
        )
    );
}

#[test]
fn len8_exceeding_the_ring() {
    // len8 = 0xFFFF claims ~512 KiB in a 4 KiB ring, with the most bytes a peer can publish.
    let r = ring(1);
    poke_data(&r, 0, &desc(0x6, 2, u16::MAX, 0, 7));
    set_write_index(&r, SIZE - 8);
    let mut reader = RingReader::new(&r).unwrap();
    assert_eq!(
        peek_err(&mut reader),
        bad_packet(
            0,
            PacketFault::Overrun {
                len: 0xFFFF * 8,
                available: SIZE - 8
            }
        )
    );
    assert_reader_broken(&mut reader);

    // Same in a ring whose read position is near the end, so `available` wraps.
    let r = ring(1);
    set_read_index(&r, SIZE - 16);
    poke_data(&r, SIZE - 16, &desc(0x9, 3, 600, 0, 7));
    set_write_index(&r, 64);
    let mut reader = RingReader::new(&r).unwrap();
    assert_eq!(
        peek_err(&mut reader),
        bad_packet(
            SIZE - 16,
            PacketFault::Overrun {
                len: 4800,
                available: 80
            }
        )
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn unknown_packet_type() {
    for ty in [0u16, 1, 5, 8, 0xA, 0xC, 0x100, u16::MAX] {
        let mut bytes = desc(ty, 2, 4, 0, 7).to_vec();
        bytes.resize(40, 0);
        assert_eq!(
            reader_error_for(&bytes),
            bad_packet(0, PacketFault::UnknownType(ty))
        );
    }
}

#[test]
fn undefined_flag_bits() {
    for flags in [2u16, 4, 0x8000, 0x8001, u16::MAX] {
        let mut bytes = desc(0x6, 2, 4, flags, 7).to_vec();
        bytes.resize(40, 0);
        assert_eq!(
            reader_error_for(&bytes),
            bad_packet(0, PacketFault::BadFlags(flags))
        );
    }
}

#[test]
fn truncated_packet() {
    // Fewer bytes published than a descriptor and trailer.
    for available in [8u32, 16] {
        let r = ring(1);
        poke_data(&r, 0, &desc(0x6, 2, 2, 0, 7));
        set_write_index(&r, available);
        let mut reader = RingReader::new(&r).unwrap();
        assert_eq!(
            peek_err(&mut reader),
            bad_packet(0, PacketFault::Truncated { available })
        );
        assert_reader_broken(&mut reader);
    }
}

#[test]
fn smallest_packet_is_accepted() {
    // offset8 == len8 == 2: a descriptor, no payload, and the trailer: 24 bytes. Not an error.
    let r = ring(1);
    publish_raw(&r, 0, &packet_bytes(0xB, 0, 99, &[], &[], 0));
    let mut reader = RingReader::new(&r).unwrap();
    let mut buf = vec![1u8; 8];
    let info = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(info.packet_type, PacketType::Completion);
    assert_eq!(info.len, 16);
    assert!(buf.is_empty());
    assert_eq!(reader.read_into(&mut buf), Ok(None));
    assert_eq!(reader.commit(), Ok(false));
    assert_eq!(reader.read_index(), 24);
}

// ---------------------------------------------------------------------------------------------
// GPA-direct headers
// ---------------------------------------------------------------------------------------------
