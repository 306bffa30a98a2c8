//! Hostile-peer tests, part 2: type-specific headers (GPA-direct, transfer pages), payloads that
//! change after validation, and garbage after valid packets. Part 1 (indices, descriptors) is hostile.rs.

mod common;
use common::*;

#[test]
fn gpa_direct_zero_ranges() {
    let header = gpa_header_with_count(0, &[]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"payload", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(0, PacketFault::NoRanges)
    );
}

#[test]
fn gpa_direct_header_shorter_than_its_fixed_part() {
    // offset8 = 2: no room even for reserved/range_count.
    let bytes = packet_bytes(0x9, 0, 1, &[], b"payload!", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(0, PacketFault::HeaderOverrun { len: 0, needed: 8 })
    );
}

#[test]
fn gpa_direct_range_count_exceeds_header_area() {
    // Room for one range with one PFN (24 bytes of header), but range_count says 2.
    let mut header = gpa_header(&[(100, 0, &[0x1234])]);
    header[4..8].copy_from_slice(&2u32.to_le_bytes());
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::HeaderOverrun {
                len: 24,
                needed: 32
            }
        )
    );

    // A huge range_count with a tiny header ends at the first missing range, not after 2^32 steps.
    let header = gpa_header_with_count(u32::MAX, &[]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(0, PacketFault::HeaderOverrun { len: 8, needed: 16 })
    );

    // The range's PFN list runs past the header: 8192 bytes at offset 0 need 2 PFNs, 1 is there.
    let header = gpa_header(&[(8192, 0, &[0x1])]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::HeaderOverrun {
                len: 24,
                needed: 32
            }
        )
    );
}

#[test]
fn gpa_direct_bad_ranges() {
    // byte_offset outside the first page.
    for byte_offset in [4096u32, 4097, u32::MAX] {
        let header = gpa_header(&[(16, byte_offset, &[0x1])]);
        let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
        assert_eq!(
            reader_error_for(&bytes),
            bad_packet(
                0,
                PacketFault::BadRange {
                    index: 0,
                    byte_offset,
                    byte_count: 16
                }
            )
        );
    }
    // Empty range.
    let header = gpa_header(&[(0, 0, &[0x1])]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::BadRange {
                index: 0,
                byte_offset: 0,
                byte_count: 0
            }
        )
    );
    // The second range is the bad one: the index names it.
    let header = gpa_header(&[(4096, 0, &[0x10]), (0, 8, &[0x11])]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::BadRange {
                index: 1,
                byte_offset: 8,
                byte_count: 0
            }
        )
    );
}

#[test]
fn gpa_direct_overflowing_pfn_count() {
    // byte_count u32::MAX at offset 4095 spans 0x10_0001 PFNs: a valid range shape whose PFN list
    // can never fit the header, so it is a HeaderOverrun naming the bytes it would need (the
    // computation must not overflow, and nothing is allocated for the claimed PFNs).
    let header = gpa_header(&[(u32::MAX, 4095, &[0x1])]);
    let bytes = packet_bytes(0x9, 0, 1, &header, b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::HeaderOverrun {
                len: 24,
                needed: 8 + 8 + 8 * 0x10_0001
            }
        )
    );
}

#[test]
fn gpa_direct_valid_and_wrapping() {
    // A valid two-range packet that wraps around the end of the data area is parsed from the
    // private copy, and the ranges stay as validated even when the peer rewrites the ring.
    let r = ring(1);
    let start = SIZE - 24;
    set_read_index(&r, start);
    let header = gpa_header(&[(4096, 0, &[0xAA]), (5000, 100, &[0xBB, 0xBC])]);
    let bytes = packet_bytes(0x9, 1, 0x77, &header, b"gpa payload", start);
    let end = publish_raw(&r, start, &bytes);
    let mut reader = RingReader::new(&r).unwrap();
    {
        let pkt = reader.peek().unwrap().unwrap();
        assert_eq!(pkt.packet_type(), PacketType::GpaDirect);
        assert_eq!(pkt.info().header, HeaderInfo::GpaDirect { range_count: 2 });
        // Hostile rewrite of the header bytes in the ring after validation.
        poke_data(&r, start + 16, &[0xFF; 48]);
        let ranges: Vec<_> = pkt.gpa_ranges().unwrap().collect();
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].byte_count, ranges[0].byte_offset), (4096, 0));
        assert_eq!(ranges[0].pfns.len(), 1);
        assert_eq!(ranges[0].pfns[0].get(), 0xAA);
        assert_eq!((ranges[1].byte_count, ranges[1].byte_offset), (5000, 100));
        let pfns: Vec<u64> = ranges[1].pfns.iter().map(|p| p.get()).collect();
        assert_eq!(pfns, [0xBB, 0xBC]);
        assert!(pkt.transfer_ranges().is_none());
        let mut p = [0u8; 11];
        pkt.copy_payload(0, &mut p).unwrap();
        assert_eq!(&p, b"gpa payload");
        pkt.consume();
    }
    assert_eq!(reader.peek().err(), None);
    assert_eq!(reader.commit(), Ok(false));
    assert_eq!(reader.read_index(), end);
}

// ---------------------------------------------------------------------------------------------
// Transfer-page headers
// ---------------------------------------------------------------------------------------------

#[test]
fn transfer_page_header_too_short() {
    // No header at all.
    let bytes = packet_bytes(0x7, 0, 1, &[], b"data", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(0, PacketFault::HeaderOverrun { len: 0, needed: 8 })
    );
    // Fixed part only, but two ranges claimed.
    let bytes = packet_bytes(0x7, 0, 1, &xfer_header(3, 2, &[]), b"data", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(0, PacketFault::HeaderOverrun { len: 8, needed: 24 })
    );
    // One range present, u32::MAX claimed: `needed` is computed in u64.
    let bytes = packet_bytes(0x7, 0, 1, &xfer_header(3, u32::MAX, &[(1, 2)]), b"", 0);
    assert_eq!(
        reader_error_for(&bytes),
        bad_packet(
            0,
            PacketFault::HeaderOverrun {
                len: 16,
                needed: 8 + 8 * u64::from(u32::MAX)
            }
        )
    );
}

#[test]
fn transfer_page_valid() {
    let r = ring(1);
    let header = xfer_header(0xCAFE, 2, &[(100, 0), (200, 4096)]);
    publish_raw(&r, 0, &packet_bytes(0x7, 0, 9, &header, b"", 0));
    let mut reader = RingReader::new(&r).unwrap();
    let pkt = reader.peek().unwrap().unwrap();
    assert_eq!(
        pkt.info().header,
        HeaderInfo::TransferPages {
            set_id: 0xCAFE,
            sender_owns: true,
            range_count: 2
        }
    );
    let ranges = pkt.transfer_ranges().unwrap();
    let got: Vec<(u32, u32)> = ranges
        .iter()
        .map(|r| (r.byte_count.get(), r.byte_offset.get()))
        .collect();
    assert_eq!(got, [(100, 0), (200, 4096)]);
    assert!(pkt.gpa_ranges().is_none());
    assert_eq!(pkt.payload_len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Time-of-check / time-of-use and sequences
// ---------------------------------------------------------------------------------------------

#[test]
fn payload_modified_after_peek() {
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[&[0x11u8; 20]];
    writer
        .try_write(&OutgoingPacket::in_band(42, false, payload))
        .unwrap();
    let footprint = writer.write_index();
    let mut reader = RingReader::new(&r).unwrap();
    {
        let pkt = reader.peek().unwrap().unwrap();
        let info = *pkt.info();
        assert_eq!(info.payload_len(), 24);
        // The peer rewrites the whole packet after validation: a descriptor claiming 0xFFFF units,
        // a new payload, and a write_index pointing elsewhere.
        poke_data(&r, 0, &desc(0x55, 0, u16::MAX, 0xFFFF, 0));
        poke_data(&r, 16, &[0xEE; 64]);
        set_write_index(&r, 13);
        // The reader hands out bytes (whatever is there now), bounded by the validated length.
        let mut dst = [0u8; 24];
        pkt.copy_payload(0, &mut dst).unwrap();
        assert_eq!(dst, [0xEE; 24]);
        let mut big = vec![0u8; 25];
        assert_eq!(
            pkt.copy_payload(0, &mut big),
            Err(ringbuf::PayloadBounds {
                offset: 0,
                len: 25,
                payload_len: 24
            })
        );
        assert!(pkt.copy_payload(25, &mut []).is_err());
        assert!(pkt.copy_payload(24, &mut []).is_ok());
        assert!(pkt.copy_payload(usize::MAX, &mut [0u8; 1]).is_err());
        assert!(pkt.copy_payload(1, &mut [0u8; 23]).is_ok());
        assert_eq!(pkt.read_obj::<u64>(16), Ok(u64::from_le_bytes([0xEE; 8])));
        assert!(pkt.read_obj::<u64>(17).is_err());
        assert_eq!(pkt.info(), &info);
        pkt.consume();
    }
    // Consumption used the validated footprint, not the rewritten descriptor.
    assert_eq!(reader.commit(), Ok(false));
    assert_eq!(reader.read_index(), footprint);
    // The rewritten write_index (13) is now seen and rejected.
    assert_eq!(
        peek_err(&mut reader),
        RingError::BadIndex {
            field: "write_index",
            value: 13,
            size: SIZE
        }
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn valid_packet_then_garbage() {
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[b"good packet"];
    writer
        .try_write(&OutgoingPacket::in_band(1, false, payload))
        .unwrap();
    let first_end = writer.write_index();
    assert_eq!(first_end, 16 + 16 + 8);
    // Garbage published after it.
    let mut garbage = desc(0x1234, 2, 4, 0, 0).to_vec();
    garbage.resize(40, 0xA5);
    publish_raw(&r, first_end, &garbage);

    let mut reader = RingReader::new(&r).unwrap();
    let mut buf = Vec::new();
    let info = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(info.packet_type, PacketType::InBand);
    assert_eq!(info.trans_id, 1);
    assert_eq!(&buf[..11], b"good packet");
    assert_eq!(
        reader.read_into(&mut buf),
        Err(bad_packet(first_end, PacketFault::UnknownType(0x1234)))
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn valid_packets_then_each_kind_of_garbage() {
    // Several good packets through a batch, then one bad packet of each kind; the good ones are
    // delivered in order and the bad one reports its own offset.
    let faults: Vec<(Vec<u8>, PacketFault)> = vec![
        (
            desc(0x6, 1, 4, 0, 0).to_vec(),
            PacketFault::BadOffset {
                offset8: 1,
                len8: 4,
            },
        ),
        (
            desc(0x6, 2, 4, 0x10, 0).to_vec(),
            PacketFault::BadFlags(0x10),
        ),
        (
            desc(0x6, 2, 100, 0, 0).to_vec(),
            PacketFault::Overrun {
                len: 800,
                available: 40,
            },
        ),
        (
            packet_bytes(0x9, 0, 0, &gpa_header_with_count(0, &[]), &[], 0),
            PacketFault::NoRanges,
        ),
    ];
    for (garbage, fault) in faults {
        let r = ring(1);
        let mut writer = RingWriter::new(&r).unwrap();
        let mut batch = writer.batch();
        let parts: [&[u8]; 3] = [b"a", b"bb", &[3u8; 30]];
        for (i, p) in parts.into_iter().enumerate() {
            batch
                .write(&OutgoingPacket::in_band(i as u64, false, &[p]))
                .unwrap();
        }
        batch.commit().unwrap();
        let end = writer.write_index();
        let mut g = garbage.clone();
        g.resize(g.len().max(40), 0);
        publish_raw(&r, end, &g);

        let mut reader = RingReader::new(&r).unwrap();
        let mut buf = Vec::new();
        for i in 0..3u64 {
            let info = reader.read_into(&mut buf).unwrap().unwrap();
            assert_eq!(info.trans_id, i);
        }
        assert_eq!(reader.commit(), Ok(false));
        assert_eq!(reader.read_index(), end);
        assert_eq!(
            reader.read_into(&mut buf),
            Err(bad_packet(end, fault)),
            "garbage {garbage:02x?}"
        );
        assert_reader_broken(&mut reader);
    }
}

#[test]
fn stale_packets_behind_a_wrapped_write_index_never_loop() {
    // The peer moves write_index "backwards" (an in-range, aligned value the reader cannot tell from
    // a real one) so the reader sees almost the whole ring as published, full of stale packets from
    // the previous lap. It must deliver a bounded number of them and then reject the one that does
    // not fit what is published.
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let mut reader = RingReader::new(&r).unwrap();
    let payload: &[&[u8]] = &[&[9u8; 100]];
    let mut buf = Vec::new();
    // 32 packets of footprint 128 cover the 4 KiB data area exactly once.
    for i in 0..32 {
        writer
            .try_write(&OutgoingPacket::in_band(i, false, payload))
            .unwrap();
        assert_eq!(reader.read_into(&mut buf).unwrap().unwrap().trans_id, i);
        reader.commit().unwrap();
    }
    assert_eq!(reader.read_index(), 0);
    assert_eq!(reader.read_into(&mut buf), Ok(None));
    set_write_index(&r, SIZE - 8);
    let mut delivered = 0u64;
    let err = loop {
        match reader.read_into(&mut buf) {
            Ok(Some(info)) => {
                assert_eq!(info.trans_id, delivered);
                delivered += 1;
            }
            Ok(None) => panic!("ring should not look empty"),
            Err(e) => break e,
        }
        assert!(delivered <= u64::from(SIZE / 24), "reader looped");
    };
    assert_eq!(delivered, 31);
    assert_eq!(
        err,
        bad_packet(
            31 * 128,
            PacketFault::Overrun {
                len: 120,
                available: 120
            }
        )
    );
    assert_reader_broken(&mut reader);
}

#[test]
fn control_words_the_reader_owns_do_not_hurt_it() {
    // The peer scribbles pending_send_sz, feature bits and interrupt_mask (and the reserved words):
    // the reader still reads and commits, and only signal decisions change.
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let payload: &[&[u8]] = &[b"ok"];
    writer
        .try_write(&OutgoingPacket::in_band(1, false, payload))
        .unwrap();
    for off in (control::PENDING_SEND_SZ..=control::FEATURE_BITS).step_by(4) {
        poke_control(&r, off, u32::MAX);
    }
    poke_control(&r, control::INTERRUPT_MASK, u32::MAX);
    let mut reader = RingReader::new(&r).unwrap();
    let mut buf = Vec::new();
    reader.read_into(&mut buf).unwrap().unwrap();
    // free after = SIZE, which never exceeds pending = u32::MAX: no signal.
    assert_eq!(reader.commit(), Ok(false));
    assert_eq!(reader.read_into(&mut buf), Ok(None));
    // The writer with the same scribbles: a huge pending_send_sz from the "peer" is ignored, a set
    // interrupt_mask suppresses the signal.
    assert_eq!(
        writer.try_write(&OutgoingPacket::in_band(2, false, payload)),
        Ok(false)
    );
    assert!(writer.peer_supports_pending_send());
}

// ---------------------------------------------------------------------------------------------
// Regressions (request_space: found by fuzz/fuzz_targets/ring_reader.rs; batch commit: found
// while writing the target's mid-batch control-page poke, which now checks it)
// ---------------------------------------------------------------------------------------------

#[test]
fn request_space_with_huge_footprint_does_not_overflow() {
    // request_space rounded the footprint up to 8 before clamping it to the ring: overflow panic
    // with overflow checks, and in release a wrap to 0, i.e. no space request at all.
    for footprint in [u32::MAX, u32::MAX - 6, u32::MAX - 7, SIZE + 1, SIZE - 7] {
        let r = ring(1);
        let mut writer = RingWriter::new(&r).unwrap();
        // Nothing this big is ever free: the request stays posted.
        let expect_posted = footprint >= SIZE;
        assert_eq!(writer.request_space(footprint), Ok(!expect_posted));
        let pending = r.control(ringbuf::ControlWord::PendingSendSize);
        let pending = pending.load(std::sync::atomic::Ordering::Relaxed);
        if expect_posted {
            assert_eq!(pending, SIZE, "footprint {footprint:#x}");
        } else {
            assert_eq!(pending, 0, "withdrawn when the space is there");
        }
        assert_eq!(writer.free_bytes(), Ok(SIZE));
    }
}

#[test]
fn batch_commit_after_a_mid_batch_peer_error_publishes_nothing() {
    // A batch re-reads read_index when its cached free space runs out. If the peer corrupted it
    // in between, that write breaks the writer, and the broken writer must not publish the packets
    // written before the error either: committing the batch returns Broken.
    let r = ring(1);
    let mut writer = RingWriter::new(&r).unwrap();
    let big: &[&[u8]] = &[&[1u8; 4040]]; // footprint 4064: 32 bytes stay cached as free
    let small: &[&[u8]] = &[b"small"];
    let mut batch = writer.batch();
    batch
        .write(&OutgoingPacket::in_band(1, false, big))
        .unwrap();
    set_read_index(&r, 12);
    assert_eq!(
        batch.write(&OutgoingPacket::in_band(2, false, small)),
        Err(WriteError::Ring(RingError::BadIndex {
            field: "read_index",
            value: 12,
            size: SIZE
        }))
    );
    assert_eq!(batch.len(), 1);
    assert_eq!(batch.commit(), Err(RingError::Broken));
    assert_eq!(writer.write_index(), 0);
    assert_eq!(
        r.control(ringbuf::ControlWord::WriteIndex)
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_writer_broken(&mut writer);
}
