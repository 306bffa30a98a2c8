//! Round-trips through a real ring checked against a model: random packet sizes, gather lists, batches
//! and interleavings of writes, reads and commits, with wrap-around, exact fits and full rings.

use proptest::prelude::*;
use ringbuf::layout::{GpaDirectHeader, GpaRangeHeader, PacketType, ring_footprint};
use ringbuf::{HeapRing, OutgoingPacket, RingReader, RingWriter, WriteError};
use std::collections::VecDeque;
use zerocopy::IntoBytes;

#[derive(Clone, Debug)]
enum Op {
    /// A batch of packets: (payload length, gather split points, GPA-direct?).
    Write(Vec<(usize, (usize, usize), bool)>),
    /// Read up to n packets (zero-copy for even indices, copy-out for odd ones).
    Read(usize),
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    let pkt = (0usize..1200, (0usize..1200, 0usize..1200), any::<bool>());
    prop_oneof![
        4 => prop::collection::vec(pkt, 1..5).prop_map(Op::Write),
        3 => (1usize..6).prop_map(Op::Read),
        2 => Just(Op::Commit),
    ]
}

fn payload_bytes(id: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (id as usize * 131 + j * 7) as u8)
        .collect()
}

/// GPA-direct header with one range covering `len` bytes from offset 100 of made-up pages.
fn gpa_header(id: u64, len: usize) -> Vec<u8> {
    let byte_count = len.max(1) as u32;
    let pages = (100 + byte_count as usize).div_ceil(4096);
    let mut h = GpaDirectHeader {
        reserved: 0.into(),
        range_count: 1.into(),
    }
    .as_bytes()
    .to_vec();
    h.extend_from_slice(
        GpaRangeHeader {
            byte_count: byte_count.into(),
            byte_offset: 100.into(),
        }
        .as_bytes(),
    );
    for p in 0..pages as u64 {
        h.extend_from_slice(&(id * 1000 + p).to_le_bytes());
    }
    h
}

struct Expected {
    id: u64,
    payload: Vec<u8>,
    gpa: bool,
    footprint: u32,
}

fn footprint_of(headers: usize, payload: usize) -> u32 {
    let len8 = (16 + headers + payload).div_ceil(8);
    ring_footprint(len8 as u16) as u32
}

fn run(ops: Vec<Op>, pages: usize) -> Result<(), TestCaseError> {
    let ring = HeapRing::new(pages).expect("ring");
    let size = (pages * 4096) as u32;
    let mut w = RingWriter::new(&ring).expect("writer");
    let mut r = RingReader::new(&ring).expect("reader");
    // Model: packets written and not yet read; bytes held by read-but-uncommitted packets.
    let mut in_ring: VecDeque<Expected> = VecDeque::new();
    let mut uncommitted = 0u32;
    let mut next_id = 0u64;
    let mut buf = Vec::new();
    for op in ops {
        match op {
            Op::Write(pkts) => {
                let used: u32 = in_ring.iter().map(|e| e.footprint).sum::<u32>() + uncommitted;
                let was_empty = used == 0;
                let mut free = size - used;
                let mut batch = w.batch();
                let mut written = 0;
                let mut storage = Vec::new();
                for (len, (a, b), gpa) in pkts {
                    let id = next_id;
                    let payload = payload_bytes(id, len);
                    let headers = if gpa { gpa_header(id, len) } else { Vec::new() };
                    storage.push((id, payload, headers, (a.min(len), b.min(len)), gpa));
                }
                for (id, payload, headers, (a, b), gpa) in &storage {
                    let (lo, hi) = (*a.min(b), *a.max(b));
                    let parts: [&[u8]; 3] = [&payload[..lo], &payload[lo..hi], &payload[hi..]];
                    let pkt = OutgoingPacket {
                        packet_type: if *gpa {
                            PacketType::GpaDirect
                        } else {
                            PacketType::InBand
                        },
                        completion_requested: *id % 3 == 0,
                        trans_id: *id,
                        headers,
                        payload: &parts,
                    };
                    let fp = footprint_of(headers.len(), payload.len());
                    prop_assert_eq!(pkt.footprint().expect("encodable"), fp);
                    match batch.write(&pkt) {
                        Ok(()) => {
                            // One 8-byte word always stays free: a packet needs strictly more.
                            prop_assert!(free > fp, "accepted {} bytes with {} free", fp, free);
                            free -= fp;
                            written += 1;
                            next_id += 1;
                            in_ring.push_back(Expected {
                                id: *id,
                                payload: payload.clone(),
                                gpa: *gpa,
                                footprint: fp,
                            });
                        }
                        Err(WriteError::Full { needed, free: f }) => {
                            prop_assert_eq!(needed, fp);
                            prop_assert!(free <= fp, "refused {} bytes with {} free", fp, free);
                            prop_assert_eq!(f, free);
                            break;
                        }
                        Err(WriteError::TooLarge { .. }) => {
                            prop_assert!(fp > size - 8);
                            break;
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("write: {e}"))),
                    }
                }
                let signal = batch.commit().expect("commit");
                // Linux rule: signal when the batch made an empty ring non-empty (mask is clear).
                prop_assert_eq!(signal, was_empty && written > 0);
            }
            Op::Read(n) => {
                for i in 0..n {
                    let Some(exp) = in_ring.pop_front() else {
                        prop_assert!(r.peek().expect("peek").is_none());
                        break;
                    };
                    if i % 2 == 0 {
                        let pkt = r.peek().expect("peek").expect("a packet");
                        prop_assert_eq!(pkt.trans_id(), exp.id);
                        prop_assert_eq!(pkt.completion_requested(), exp.id % 3 == 0);
                        prop_assert_eq!(pkt.info().footprint(), exp.footprint);
                        // Payload is padded to 8 bytes; the padding reads as zeros.
                        let mut got = vec![0xFFu8; pkt.payload_len()];
                        pkt.copy_payload(0, &mut got).expect("in bounds");
                        prop_assert_eq!(&got[..exp.payload.len()], &exp.payload[..]);
                        prop_assert!(got[exp.payload.len()..].iter().all(|&b| b == 0));
                        prop_assert!(got.len() - exp.payload.len() < 8);
                        if exp.gpa {
                            prop_assert_eq!(pkt.packet_type(), PacketType::GpaDirect);
                            let ranges: Vec<_> = pkt.gpa_ranges().expect("gpa").collect();
                            prop_assert_eq!(ranges.len(), 1);
                            prop_assert_eq!(ranges[0].byte_offset, 100);
                            prop_assert_eq!(ranges[0].pfns[0].get(), exp.id * 1000);
                        } else {
                            prop_assert_eq!(pkt.packet_type(), PacketType::InBand);
                            prop_assert!(pkt.gpa_ranges().is_none());
                        }
                        pkt.consume();
                    } else {
                        let info = r.read_into(&mut buf).expect("read").expect("a packet");
                        prop_assert_eq!(info.trans_id, exp.id);
                        prop_assert_eq!(&buf[..exp.payload.len()], &exp.payload[..]);
                    }
                    uncommitted += exp.footprint;
                }
            }
            Op::Commit => {
                // No pending_send_sz request: never a signal.
                prop_assert!(!r.commit().expect("commit"));
                uncommitted = 0;
                prop_assert_eq!(r.read_index(), ring_position(&ring));
            }
        }
        let used: u32 = in_ring.iter().map(|e| e.footprint).sum::<u32>() + uncommitted;
        prop_assert_eq!(w.free_bytes().expect("free"), size - used);
    }
    Ok(())
}

fn ring_position(ring: &HeapRing) -> u32 {
    use ringbuf::RingMem;
    ring.control(ringbuf::ControlWord::ReadIndex)
        .load(std::sync::atomic::Ordering::Relaxed)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn round_trips_one_page(ops in prop::collection::vec(op(), 1..80)) {
        run(ops, 1)?;
    }

    #[test]
    fn round_trips_three_pages(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, 3)?;
    }
}

/// Fills a ring exactly: the last packet leaves precisely the one reserved word free.
#[test]
fn exact_fit_and_full() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    // Footprint of a packet with p payload bytes (p % 8 == 0) is 16 + p + 8.
    let big = vec![1u8; 4096 - 24 - 24 - 32];
    let small = [2u8; 0];
    assert!(
        w.try_write(&OutgoingPacket::in_band(1, false, &[&big]))
            .unwrap()
    );
    assert!(
        !w.try_write(&OutgoingPacket::in_band(2, false, &[&small]))
            .unwrap()
    );
    assert_eq!(w.free_bytes().unwrap(), 32);
    // A 32-byte packet would leave nothing free: refused.
    let eight = [3u8; 8];
    let err = w
        .try_write(&OutgoingPacket::in_band(3, false, &[&eight]))
        .unwrap_err();
    assert_eq!(
        err,
        WriteError::Full {
            needed: 32,
            free: 32
        }
    );
    // A 24-byte one is the exact fit: it leaves the one reserved word.
    assert!(
        !w.try_write(&OutgoingPacket::in_band(3, false, &[&small]))
            .unwrap()
    );
    assert_eq!(w.free_bytes().unwrap(), 8);
    let err = w
        .try_write(&OutgoingPacket::in_band(4, false, &[&small]))
        .unwrap_err();
    assert_eq!(
        err,
        WriteError::Full {
            needed: 24,
            free: 8
        }
    );
    // Too large for this ring whatever is free.
    let huge = vec![0u8; 4096];
    assert!(matches!(
        w.try_write(&OutgoingPacket::in_band(4, false, &[&huge])),
        Err(WriteError::TooLarge { .. })
    ));
    let mut buf = Vec::new();
    assert_eq!(r.read_into(&mut buf).unwrap().unwrap().trans_id, 1);
    assert_eq!(buf, big);
    assert_eq!(r.read_into(&mut buf).unwrap().unwrap().trans_id, 2);
    assert_eq!(r.read_into(&mut buf).unwrap().unwrap().trans_id, 3);
    assert!(r.read_into(&mut buf).unwrap().is_none());
    r.commit().unwrap();
    assert_eq!(w.free_bytes().unwrap(), 4096);
}

/// The reader signals the writer exactly when freed space crosses its pending_send_sz request.
#[test]
fn pending_send_size_crossing() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    let p = vec![0u8; 1000]; // footprint 1024
    for i in 0..3 {
        w.try_write(&OutgoingPacket::in_band(i, false, &[&p]))
            .unwrap();
    }
    assert_eq!(w.free_bytes().unwrap(), 1024);
    let err = w
        .try_write(&OutgoingPacket::in_band(9, false, &[&p]))
        .unwrap_err();
    assert_eq!(
        err,
        WriteError::Full {
            needed: 1024,
            free: 1024
        }
    );
    assert!(w.peer_supports_pending_send());
    // Ask for space; not there yet.
    assert!(!w.request_space(1024).unwrap());
    let mut buf = Vec::new();
    // Reading one packet frees 1024 -> 2048 free > 1024 requested: crossing, signal.
    r.read_into(&mut buf).unwrap().unwrap();
    assert!(r.commit().unwrap());
    // Already above the threshold: no second signal.
    r.read_into(&mut buf).unwrap().unwrap();
    assert!(!r.commit().unwrap());
    w.clear_space_request();
    r.read_into(&mut buf).unwrap().unwrap();
    assert!(!r.commit().unwrap());
    // With space present, request_space answers at once and withdraws the request.
    assert!(w.request_space(1024).unwrap());
}

/// interrupt_mask: a masked reader is not signalled; unmasking reports the pending data.
#[test]
fn interrupt_mask_suppresses_signal() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    r.mask_interrupts();
    assert!(
        !w.try_write(&OutgoingPacket::in_band(1, false, &[b"abc"]))
            .unwrap()
    );
    assert!(
        r.unmask_interrupts().unwrap(),
        "data published while masked must be reported"
    );
    let mut buf = Vec::new();
    r.read_into(&mut buf).unwrap().unwrap();
    r.commit().unwrap();
    assert!(!r.unmask_interrupts().unwrap());
    assert!(
        w.try_write(&OutgoingPacket::in_band(2, false, &[b"abc"]))
            .unwrap()
    );
    // Not empty before: no signal for the second packet.
    assert!(
        !w.try_write(&OutgoingPacket::in_band(3, false, &[b"abc"]))
            .unwrap()
    );
}
