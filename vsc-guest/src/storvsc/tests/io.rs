//! SRB packets byte for byte, completion matching, status and sense mapping, hostile host input.

use super::*;
use vmbus_core::devices::vstor::{scsi_status, srb_status};

fn read_req<'a>(pfns: &'a [u64], offset: u32, len: u32, tag: u64) -> ScsiRequest<'a> {
    ScsiRequest {
        addr: ScsiAddress::new(0, 1, 2),
        cdb: cdb::rw10(false, 0x1234, (len / 512) as u16, false),
        data: Some((Direction::In, PageRange::new(offset, len, pfns).unwrap())),
        tagged: true,
        tag,
    }
}

#[test]
fn read_packet_bytes_match_linux() {
    let mut drv = ready();
    let pfns = [0x1000u64, 0x2345, 0x0FFF_FFFF_FFFF];
    let id = drv.submit(&read_req(&pfns, 0x200, 8192, 77)).unwrap();
    assert_eq!(id, 1);
    let p = one(&mut drv);
    let b = p.wire_bytes();
    // Descriptor: GPA direct (9), offset8 = (16 + 8 + 8 + 3*8) / 8 = 7, len8 = 7 + 8 = 15.
    assert_eq!(&b[..8], &[9, 0, 7, 0, 15, 0, 1, 0]);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), id);
    // reserved 0, range count 1, byte_count, byte_offset, PFNs.
    assert_eq!(&b[16..24], &[0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(&b[24..32], &[0, 0x20, 0, 0, 0, 2, 0, 0]);
    for (i, pfn) in pfns.iter().enumerate() {
        assert_eq!(&b[32 + 8 * i..40 + 8 * i], &pfn.to_le_bytes());
    }
    let v = &b[56..];
    assert_eq!(v.len(), 64);
    // vstor header: EXECUTE_SRB, REQUEST_COMPLETION, status 0.
    assert_eq!(&v[..12], &[3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    // vmscsi_request.
    let s = &v[12..];
    assert_eq!(&s[0..2], &[0x34, 0]); // length
    assert_eq!(&s[2..4], &[0, 0]); // srb / scsi status
    assert_eq!(&s[4..8], &[0, 0, 1, 2]); // port, path, target, lun
    assert_eq!(&s[8..12], &[10, 0x14, 1, 0]); // cdb_length, sense_info_length, data_in READ
    assert_eq!(&s[12..16], &8192u32.to_le_bytes());
    assert_eq!(&s[16..26], &[0x28, 0, 0, 0, 0x12, 0x34, 0, 0, 16, 0]);
    assert_eq!(&s[26..36], &[0; 10]);
    assert_eq!(&s[36..38], &[0, 0]); // reserve
    assert_eq!(&s[38..40], &[0xFF, 0x20]); // queue tag, simple tag
    // DISABLE_SYNCH_TRANSFER | QUEUE_ACTION_ENABLE | NO_QUEUE_FREEZE | DATA_IN.
    assert_eq!(&s[40..44], &(0x8u32 | 0x2 | 0x100 | 0x40).to_le_bytes());
    assert_eq!(&s[44..48], &60u32.to_le_bytes());
    assert_eq!(&s[48..52], &[0; 4]);
}

#[test]
fn write_and_no_data_packets() {
    let mut drv = ready();
    let pfns = [5u64];
    let id = drv
        .submit(&ScsiRequest {
            addr: ScsiAddress::default(),
            cdb: cdb::rw16(true, 1 << 33, 1, true),
            data: Some((Direction::Out, PageRange::new(0, 512, &pfns).unwrap())),
            tagged: false,
            tag: 1,
        })
        .unwrap();
    let p = one(&mut drv);
    assert_eq!(p.trans_id, id);
    let s = p.vstor().srb();
    assert_eq!((s.data_in, s.cdb_length), (0, 16));
    assert_eq!({ s.srb_flags }, 0x8 | 0x80);
    assert_eq!((s.queue_tag, s.queue_action), (0, 0));
    assert_eq!(s.cdb()[..2], [0x8A, 0x08]);
    // No data: in-band packet, data_in UNKNOWN (2), length 0.
    drv.submit(&ScsiRequest {
        addr: ScsiAddress::default(),
        cdb: cdb::synchronize_cache_10(),
        data: None,
        tagged: false,
        tag: 2,
    })
    .unwrap();
    let p = one(&mut drv);
    let b = p.wire_bytes();
    assert_eq!(&b[..8], &[6, 0, 2, 0, 10, 0, 1, 0]);
    let s = p.vstor().srb();
    assert_eq!(
        (s.data_in, { s.data_transfer_length }, { s.srb_flags }),
        (2, 0, 0x8)
    );
}

#[test]
fn out_of_order_and_duplicate_completions() {
    let mut drv = ready();
    let pfns = [9u64, 10];
    let mut reqs = Vec::new();
    for tag in 0..32u64 {
        let id = drv.submit(&read_req(&pfns, 0, 8192, tag)).unwrap();
        reqs.push((id, tag));
    }
    assert_eq!(drv.in_flight(), 32);
    let sent = drain(&mut drv, 0);
    assert_eq!(sent.len(), 32);
    // Ids are unique, non-zero, increasing.
    assert!(sent.windows(2).all(|w| w[0].trans_id < w[1].trans_id));
    // Complete in a scrambled order; repeat some completions as a restarted VSP would.
    let mut order: Vec<usize> = (0..32).collect();
    order.sort_by_key(|&i| (i * 13) % 32);
    let mut seen = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        let done = srb_done(&sent[i], 1, 0, 8192, &[]);
        assert_eq!(
            reply(&mut drv, 0, sent[i].trans_id, &done),
            Ok(Handled::Completion)
        );
        let c = drv.poll_completion().unwrap();
        assert_eq!((c.trans_id, c.tag), reqs[i]);
        assert_eq!(c.result(), Ok(8192));
        seen.push(c.tag);
        if n % 5 == 0 {
            assert_eq!(
                reply(&mut drv, 0, sent[i].trans_id, &done),
                Ok(Handled::Duplicate)
            );
            assert!(drv.poll_completion().is_none());
        }
    }
    seen.sort();
    assert_eq!(seen, (0..32).collect::<Vec<_>>());
    assert_eq!(drv.in_flight(), 0);
    let st = drv.stats();
    assert_eq!((st.submitted, st.completed, st.duplicates), (32, 32, 7));
    // An id never issued is an error and counted.
    let done = srb_done(&sent[0], 1, 0, 0, &[]);
    assert_eq!(
        reply(&mut drv, 0, 1 << 40, &done),
        Err(StorvscError::UnknownTransaction {
            channel: 0,
            trans_id: 1 << 40
        })
    );
    assert_eq!(drv.stats().unknown, 1);
}

#[test]
fn transfer_length_and_status_as_linux_reads_them() {
    let mut drv = ready();
    let pfns = [9u64, 10];
    // (srb status, scsi status, data_transfer_length, sense, expected result)
    type Case<'a> = (u8, u8, u32, &'a [u8], Result<u32, IoError>);
    let cases: [Case<'_>; 10] = [
        (srb_status::SUCCESS, 0, 4096, &[], Ok(4096)),
        // Longer than the buffer: clamped.
        (srb_status::SUCCESS, 0, 1 << 30, &[], Ok(8192)),
        // DATA_OVERRUN keeps the host's (short) length.
        (srb_status::DATA_OVERRUN, 0, 512, &[], Ok(512)),
        // 0x81 is not SUCCESS for Linux.
        (
            0x81,
            0,
            8192,
            &[],
            Err(IoError::Host {
                srb_status: 0x81,
                scsi_status: 0,
                nt_status: 0,
            }),
        ),
        (
            srb_status::INVALID_LUN,
            0,
            8192,
            &[],
            Err(IoError::InvalidLun),
        ),
        (
            srb_status::ERROR | srb_status::AUTOSENSE_VALID,
            scsi_status::CHECK_CONDITION,
            8192,
            &fixed_sense(5, 0x21, 0),
            Err(IoError::LbaOutOfRange),
        ),
        (
            srb_status::ERROR | srb_status::AUTOSENSE_VALID,
            scsi_status::CHECK_CONDITION,
            0,
            &fixed_sense(6, 0x2A, 0x09),
            Err(IoError::CapacityChanged),
        ),
        (
            srb_status::ERROR | srb_status::AUTOSENSE_VALID,
            scsi_status::CHECK_CONDITION,
            0,
            &fixed_sense(2, 0x3A, 0),
            Err(IoError::NoMedium { ascq: 0 }),
        ),
        // CHECK CONDITION without AUTOSENSE_VALID: sense bytes are ignored.
        (
            srb_status::ERROR,
            scsi_status::CHECK_CONDITION,
            0,
            &fixed_sense(5, 0x20, 0),
            Err(IoError::CheckConditionNoSense { srb_status: 4 }),
        ),
        (
            srb_status::ERROR,
            scsi_status::BUSY,
            0,
            &[],
            Err(IoError::Busy { scsi_status: 8 }),
        ),
    ];
    for (i, (srb, scsi, len, sense, want)) in cases.iter().enumerate() {
        let id = drv.submit(&read_req(&pfns, 0, 8192, i as u64)).unwrap();
        let p = one(&mut drv);
        let done = srb_done(&p, *srb, *scsi, *len, sense);
        reply(&mut drv, 0, id, &done).unwrap();
        let c = drv.poll_completion().unwrap();
        assert_eq!(&c.result(), want, "case {i}: {c:?}");
    }
}

#[test]
fn hostile_completions_are_refused_without_losing_the_request() {
    let mut drv = ready();
    let pfns = [3u64];
    let id = drv.submit(&read_req(&pfns, 0, 512, 5)).unwrap();
    let p = one(&mut drv);
    let good = srb_done(&p, 1, 0, 512, &[]);
    let bytes = good.as_bytes();
    // Too short for a completion (Linux: "Invalid pkt").
    for len in [0usize, 3, 4, 12, 48, 63] {
        assert!(matches!(
            drv.handle_packet(0, PacketType::Completion, id, &bytes[..len]),
            Err(StorvscError::Vstor { .. })
        ));
    }
    // Too long for storvsc's 80-byte receive limit.
    let mut long = bytes.to_vec();
    long.extend_from_slice(&[0; 8]);
    assert!(matches!(
        drv.handle_packet(0, PacketType::Completion, id, &long),
        Err(StorvscError::Oversized { len: 72, .. })
    ));
    // Wrong packet types.
    for t in [PacketType::GpaDirect, PacketType::TransferPages] {
        assert!(matches!(
            drv.handle_packet(0, t, id, bytes),
            Err(StorvscError::PacketType { .. })
        ));
    }
    // Garbage operation.
    let mut junk = good;
    junk.header.operation = 0xDEAD;
    assert!(matches!(
        reply(&mut drv, 0, id, &junk),
        Err(StorvscError::Vstor {
            error: vstor::VstorError::UnknownOperation { operation: 0xDEAD },
            ..
        })
    ));
    // A guest-direction operation.
    junk.header.operation = Operation::ExecuteSrb.raw();
    assert!(reply(&mut drv, 0, id, &junk).is_err());
    // A completion with id 0.
    assert_eq!(
        reply(&mut drv, 0, 0, &good),
        Err(StorvscError::CompletionWithoutId { channel: 0 })
    );
    // Unknown channel.
    assert_eq!(
        reply(&mut drv, 9, id, &good),
        Err(StorvscError::NoSuchChannel(9))
    );
    assert_eq!(drv.in_flight(), 1);
    assert!(drv.poll_completion().is_none());
    assert!(drv.stats().malformed >= 12);
    // The real completion still completes it.
    assert_eq!(reply(&mut drv, 0, id, &good), Ok(Handled::Completion));
    assert_eq!(drv.poll_completion().unwrap().result(), Ok(512));
}

#[test]
fn garbage_statuses_and_sense_never_panic() {
    let mut drv = ready();
    let pfns = [3u64];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..2000u64 {
        let id = drv.submit(&read_req(&pfns, 0, 512, i)).unwrap();
        let _ = one(&mut drv);
        let mut pkt = VstorPacket::default();
        for b in pkt.as_mut_bytes().iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        pkt.header.operation = Operation::CompleteIo.raw();
        reply(&mut drv, 0, id, &pkt).unwrap();
        let c = drv.poll_completion().unwrap();
        let r = c.result();
        assert!(c.transferred() <= 512);
        if let Ok(n) = r {
            assert!(n <= 512);
        }
        assert!(c.sense_bytes().len() <= 20);
    }
}

#[test]
fn unsolicited_messages() {
    let mut drv = ready();
    let bus = VstorPacket::new(Operation::EnumerateBus, 0, 0);
    // Linux needs only the operation for id 0.
    assert_eq!(
        drv.handle_packet(0, PacketType::InBand, 0, &bus.as_bytes()[..4]),
        Ok(Handled::Unsolicited)
    );
    let rm = VstorPacket::new(Operation::RemoveDevice, 0, 0);
    assert_eq!(reply(&mut drv, 0, 0, &rm), Ok(Handled::Unsolicited));
    assert_eq!(drv.poll_event(), Some(StorvscEvent::Rescan));
    assert_eq!(drv.poll_event(), Some(StorvscEvent::Rescan));
    let fc = VstorPacket::new(Operation::FcHbaData, 0, 0);
    assert!(reply(&mut drv, 0, 0, &fc).is_err());
    assert_eq!(drv.stats().unsolicited, 2);
}

#[test]
fn limits_and_reset() {
    let mut drv = Storvsc::new(StorvscConfig {
        max_outstanding_per_channel: 2,
        ..StorvscConfig::default()
    });
    handshake(&mut drv, &[ProtocolVersion::Win10], props(0, 0, 0x2000));
    assert!(matches!(drv.poll_event(), Some(StorvscEvent::Ready(_))));
    let pfns = [1u64, 2, 3];
    assert_eq!(
        drv.submit(&read_req(&pfns, 0, 0x2001, 0)),
        Err(StorvscError::TransferTooLarge {
            len: 0x2001,
            max: 0x2000
        })
    );
    drv.submit(&read_req(&pfns[..2], 0, 0x2000, 0)).unwrap();
    drv.submit(&read_req(&pfns[..2], 0, 0x2000, 1)).unwrap();
    assert_eq!(
        drv.submit(&read_req(&pfns[..2], 0, 0x2000, 2)),
        Err(StorvscError::Busy(0))
    );
    assert_eq!(
        PageRange::new(0, 0x2000, &pfns),
        Err(RangeError::PfnCount {
            given: 3,
            needed: 2,
            byte_offset: 0,
            len: 0x2000
        })
    );
    assert_eq!(
        PageRange::new(4096, 1, &pfns[..1]),
        Err(RangeError::Offset(4096))
    );
    assert_eq!(PageRange::new(0, 0, &[]), Err(RangeError::Empty));

    // RESET_BUS uses its own id; its completion is an event.
    drain(&mut drv, 0);
    drv.reset_bus(0).unwrap();
    let p = one(&mut drv);
    assert_eq!(p.trans_id, RESET_TRANS_ID);
    assert_eq!({ p.vstor().header.operation }, Operation::ResetBus.raw());
    reply(&mut drv, 0, RESET_TRANS_ID, &complete_io(0)).unwrap();
    assert_eq!(
        drv.poll_event(),
        Some(StorvscEvent::ResetComplete { status: 0 })
    );
    assert_eq!(
        reply(&mut drv, 0, RESET_TRANS_ID, &complete_io(0)),
        Ok(Handled::Duplicate)
    );

    // Cancelling a channel completes its requests with Cancelled.
    drv.cancel_channel(0);
    let a = drv.poll_completion().unwrap();
    let b = drv.poll_completion().unwrap();
    assert_eq!(
        (a.result(), b.result()),
        (Err(IoError::Cancelled), Err(IoError::Cancelled))
    );
    assert_eq!(drv.in_flight(), 0);
}

#[test]
fn requests_spread_over_sub_channels() {
    let mut drv = Storvsc::new(StorvscConfig {
        subchannels: 3,
        ..StorvscConfig::default()
    });
    handshake(
        &mut drv,
        &[ProtocolVersion::Win10],
        props(3, property_flags::SUPPORTS_MULTI_CHANNEL, 0x40000),
    );
    for _ in 0..3 {
        drv.add_channel().unwrap();
    }
    let pfns = [1u64];
    for t in 0..12 {
        drv.submit(&read_req(&pfns, 0, 512, t)).unwrap();
    }
    for ch in 0..4 {
        assert_eq!(drv.outstanding(ch), 3);
        assert_eq!(drv.pending_transmit(ch), 3);
    }
    // A completion on another channel still completes (and is counted).
    let p = drain(&mut drv, 2).remove(0);
    let done = srb_done(&p, 1, 0, 512, &[]);
    assert_eq!(
        reply(&mut drv, 1, p.trans_id, &done),
        Ok(Handled::Completion)
    );
    assert_eq!(drv.stats().wrong_channel, 1);
    assert_eq!(drv.outstanding(2), 2);
    assert_eq!(
        drv.submit_on(7, &read_req(&pfns, 0, 512, 0)),
        Err(StorvscError::NoSuchChannel(7))
    );
}

#[test]
fn ring_channel_moves_packets_both_ways() {
    use ringbuf::HeapRing;
    let mut drv = ready();
    let up = HeapRing::new(4).unwrap();
    let down = HeapRing::new(4).unwrap();
    let mut ch = RingChannel::new(0, &up, &down).unwrap();
    // Fill the 16 KiB ring: 80-byte in-band packets + 8-byte trailers → 186 fit.
    for t in 0..200 {
        drv.submit(&ScsiRequest {
            addr: ScsiAddress::default(),
            cdb: cdb::test_unit_ready(),
            data: None,
            tagged: false,
            tag: t,
        })
        .unwrap();
    }
    let tx = ch.transmit(&mut drv).unwrap();
    assert!(tx.signal);
    assert!(tx.blocked);
    assert_eq!(tx.written, 186);
    assert_eq!(drv.pending_transmit(0), 14);
    // The host's view: read them back from the ring, complete each.
    let mut host_rx = ringbuf::RingReader::new(&up).unwrap();
    let mut host_tx = ringbuf::RingWriter::new(&down).unwrap();
    let mut buf = Vec::new();
    let mut n = 0;
    while let Some(info) = host_rx.read_into(&mut buf).unwrap() {
        assert_eq!(info.packet_type, PacketType::InBand);
        let srb = VstorPacket::from_prefix_zero_filled(&buf).unwrap().srb();
        let done = vstor::srb_completion(&srb, 0, 1, 0, 0, &[]);
        let parts: [&[u8]; 1] = [done.as_bytes()];
        host_tx
            .try_write(&ringbuf::OutgoingPacket::completion(info.trans_id, &parts))
            .unwrap();
        n += 1;
        if n == 100 {
            break;
        }
    }
    host_rx.commit().unwrap();
    let rx = ch.receive(&mut drv, usize::MAX).unwrap();
    assert_eq!(rx.packets, 100);
    assert!(rx.refused.is_empty());
    assert_eq!(drv.stats().completed, 100);
    // Space again: the rest goes out.
    let tx = ch.transmit(&mut drv).unwrap();
    assert_eq!((tx.written, tx.blocked), (14, false));
    // A hostile host packet is refused and counted, the ring stays usable.
    let parts: [&[u8]; 1] = [&[1, 0, 0, 0]];
    host_tx
        .try_write(&ringbuf::OutgoingPacket::completion(5, &parts))
        .unwrap();
    let rx = ch.receive(&mut drv, 8).unwrap();
    assert_eq!(rx.refused.len(), 1);
}

#[test]
fn resend_after_a_vsp_restart() {
    use ringbuf::HeapRing;
    let mut drv = Storvsc::new(StorvscConfig {
        retain_packets: true,
        ..StorvscConfig::default()
    });
    handshake(&mut drv, &[ProtocolVersion::Win10], props(0, 0, 0x40000));
    let up = HeapRing::new(4).unwrap();
    let down = HeapRing::new(4).unwrap();
    let mut ch = RingChannel::new(0, &up, &down).unwrap();
    ch.track_positions();
    let pfns = [4u64, 5];
    let ids: Vec<u64> = (0..5)
        .map(|t| drv.submit(&read_req(&pfns, 0, 8192, t)).unwrap())
        .collect();
    ch.transmit(&mut drv).unwrap();
    // The old VSP took three requests, answered the second, and died.
    let mut host_rx = ringbuf::RingReader::new(&up).unwrap();
    let mut taken = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..3 {
        let info = host_rx.read_into(&mut buf).unwrap().unwrap();
        taken.push((info.trans_id, buf.clone()));
    }
    host_rx.commit().unwrap();
    let mut host_tx = ringbuf::RingWriter::new(&down).unwrap();
    let srb = VstorPacket::from_prefix_zero_filled(&taken[1].1)
        .unwrap()
        .srb();
    let done = vstor::srb_completion(&srb, 0, 1, 0, 8192, &[]);
    let parts: [&[u8]; 1] = [done.as_bytes()];
    host_tx
        .try_write(&ringbuf::OutgoingPacket::completion(taken[1].0, &parts))
        .unwrap();
    // The guest reads what the dead VSP answered, then asks what it lost: only the two it took
    // and never answered (the last two are still in the ring for the new VSP).
    ch.receive(&mut drv, 16).unwrap();
    assert_eq!(drv.poll_completion().unwrap().trans_id, ids[1]);
    let lost = ch.lost_requests(&drv);
    assert_eq!(lost, [ids[0], ids[2]]);
    assert_eq!(drv.resend(0, &lost), 2);
    let again = drain(&mut drv, 0);
    assert_eq!(again.iter().map(|p| p.trans_id).collect::<Vec<_>>(), lost);
    // Byte-identical to what the dead VSP took.
    assert_eq!(again[0].payload(), &taken[0].1[..]);
    assert_eq!(again[1].payload(), &taken[2].1[..]);
    // The new VSP answers everything; an answer arriving twice is a duplicate.
    for id in [ids[0], ids[2], ids[3], ids[4]] {
        let d = vstor::srb_completion(&srb, 0, 1, 0, 8192, &[]);
        assert_eq!(reply(&mut drv, 0, id, &d), Ok(Handled::Completion));
    }
    assert_eq!(reply(&mut drv, 0, ids[0], &done), Ok(Handled::Duplicate));
    let st = drv.stats();
    assert_eq!((st.completed, st.duplicates, st.resent), (5, 1, 2));
    assert_eq!(drv.in_flight(), 0);
    assert!(ch.lost_requests(&drv).is_empty());
    // Without retained packets nothing can be resent; unknown ids are skipped.
    let mut plain = ready();
    let id = plain.submit(&read_req(&pfns, 0, 8192, 0)).unwrap();
    drain(&mut plain, 0);
    assert_eq!(plain.resend(0, &[id, 999]), 0);
}
