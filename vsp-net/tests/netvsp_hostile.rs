//! Hostile guest input against netvsp (reference §5.3): every bad packet is refused with a clear,
//! counted error and the documented reply; nothing panics; the device and its other channels keep
//! working; host memory stays bounded.
#![allow(clippy::unwrap_used)]

mod netvsp_guest;

use netvsp_guest::*;
use proptest::prelude::*;
use ringbuf::layout::ControlWord;
use ringbuf::{PacketType, RingMem};
use std::sync::atomic::Ordering;
use vmbus_core::devices::nvsp::{self, NvspMessage, msg_type, status, version};
use vmbus_core::devices::rndis::{self, ppi};
use vmbus_core::memory::GuestMemory;
use vsp_net::backend::{MemoryBackend, RxMeta};
use vsp_net::netvsp::NetvspConfig;

const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Sends `msg` (RNDIS bytes) from send section 0; returns the completion status.
fn send_rndis(g: &mut Guest, msg: &[u8]) -> u32 {
    g.write_section(0, msg);
    g.send_section(0, 0, msg.len() as u32)
}

fn keepalive_ok(g: &mut Guest) {
    let id = g.req_id();
    let r = g.rndis(&rndis::keepalive_request(id)).unwrap();
    assert_eq!(words(&r), [0x8000_0008, 16, id, 0]);
}

fn body_word(m: &mut [u8], off: usize, v: u32) {
    m[8 + off..12 + off].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn rndis_lengths_and_offsets_out_of_range_fail_the_packet() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let f = tcp4_frame(PEER, 50);
    let good = rndis_packet(&f, &[]);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut m = good.clone();
    body_word(&mut m, 4, 10_000);
    cases.push(("data_len beyond msg_len", m));
    let mut m = good.clone();
    body_word(&mut m, 0, u32::MAX - 2);
    cases.push(("data_offset overflow", m));
    let mut m = good.clone();
    body_word(&mut m, 0, 8);
    cases.push(("data inside the packet header", m));
    let mut m = good.clone();
    m[4..8].copy_from_slice(&((good.len() + 100) as u32).to_le_bytes());
    cases.push(("msg_len beyond the section bytes", m));
    let mut m = good.clone();
    m[4..8].copy_from_slice(&4u32.to_le_bytes());
    cases.push(("msg_len below the header", m));
    let mut m = good.clone();
    body_word(&mut m, 4, 0);
    cases.push(("no data", m));
    let mut m = good.clone();
    body_word(&mut m, 12, 4);
    cases.push(("OOB data", m));
    // PPI area overlapping the frame.
    let mut p = Vec::new();
    ppi::write(&mut p, ppi::ty::TCPIP_CHECKSUM, false, &0u32.to_le_bytes());
    let mut m = rndis_packet(&f, &p);
    body_word(&mut m, 20, 36 + 16);
    cases.push(("PPI overlapping data", m));
    // PPI chains: size 0 (Linux would loop), size past the area, payload offset >= size.
    for (what, size, off) in [
        ("PPI size 0", 0u32, 12u32),
        ("PPI overrun", 40, 12),
        ("PPI offset", 16, 16),
    ] {
        let mut m = rndis_packet(&f, &p);
        body_word(&mut m, 36, size);
        body_word(&mut m, 44, off);
        cases.push((what, m));
    }
    // A batch whose second message has msg_len 0: nothing of it is sent.
    let mut batch = good.clone();
    batch.resize(batch.len().next_multiple_of(8), 0);
    let l = batch.len() as u32;
    batch[4..8].copy_from_slice(&l.to_le_bytes());
    batch.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    cases.push(("zero msg_len in a batch", batch));
    // Host-to-guest RNDIS messages.
    cases.push(("INITIALIZE_CMPLT from the guest", rndis::set_complete(1, 0)));
    let mut bad = 0;
    for (what, m) in &cases {
        assert_eq!(send_rndis(&mut g, m), status::FAIL, "{what}");
        bad += 1;
        assert_eq!(g.dev.stats().bad_packets, bad, "{what}");
    }
    assert!(g.backend.take_sent().is_empty());
    // The device still works.
    assert_eq!(send_rndis(&mut g, &good), status::SUCCESS);
    assert_eq!(g.backend.take_sent().len(), 1);
    keepalive_ok(&mut g);
}

#[test]
fn oid_requests_with_bad_buffers_get_invalid_data() {
    let mut g = Guest::default_pair();
    g.bring_up();
    for ty in [rndis::msg_type::QUERY, rndis::msg_type::SET] {
        let mut q = rndis::query_request(41, rndis::oid::GEN_CURRENT_PACKET_FILTER, &[1, 2, 3, 4]);
        q[..4].copy_from_slice(&ty.to_le_bytes());
        body_word(&mut q, 12, 0xFFFF_FFF0); // info_buf_offset far outside
        let r = g.rndis(&q).unwrap();
        assert_eq!(words(&r)[2..4], [41, rndis::status::INVALID_DATA]);
    }
    // Packet filter with a short buffer, bad RSS and offload parameters.
    assert_eq!(
        g.set(rndis::oid::GEN_CURRENT_PACKET_FILTER, &[1]),
        rndis::status::INVALID_LENGTH
    );
    assert_eq!(
        g.set(rndis::oid::GEN_RECEIVE_SCALE_PARAMETERS, &[0x89, 2, 40, 0]),
        rndis::status::INVALID_DATA
    );
    assert_eq!(
        g.set(rndis::oid::TCP_OFFLOAD_PARAMETERS, &[0xA7, 3, 28, 0]),
        rndis::status::INVALID_DATA
    );
    // RSS table entries naming queues that do not exist (no sub-channels granted).
    let mut rss = vec![0x89, 2, 40, 0, 0, 0, 0, 0];
    rss.extend_from_slice(&0x1701u32.to_le_bytes());
    rss.extend_from_slice(&8u16.to_le_bytes());
    rss.extend_from_slice(&[0, 0]);
    rss.extend_from_slice(&40u32.to_le_bytes());
    rss.extend_from_slice(&40u16.to_le_bytes());
    rss.extend_from_slice(&[0, 0]);
    rss.extend_from_slice(&48u32.to_le_bytes());
    rss.resize(40, 0);
    rss.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0]);
    rss.extend_from_slice(&[7; 40]);
    assert_eq!(
        g.set(rndis::oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss),
        rndis::status::INVALID_DATA
    );
    rss[44] = 0;
    assert_eq!(g.set(rndis::oid::GEN_RECEIVE_SCALE_PARAMETERS, &rss), 0);
    keepalive_ok(&mut g);
}

#[test]
fn send_buffer_indices_and_guest_addresses_are_checked() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let count = (255 * 4096) / 6144;
    let m = rndis_packet(&tcp4_frame(PEER, 10), &[]);
    g.write_section(0, &m);
    for (index, size) in [(count, 64), (0xFFFF_FFFE, 64), (0, 6145)] {
        assert_eq!(
            g.send_section(0, index, size),
            status::FAIL,
            "{index} {size}"
        );
    }
    // GPA-direct pages beyond guest RAM.
    let t = g.trans();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
        send_buffer_section_size: 0,
    })
    .to_bytes(40);
    g.send_gpa(0, t, &body, &[(0, 100, vec![RAM_PAGES + 5])]);
    assert_eq!(g.completion_status(t), status::FAIL);
    let t = g.trans();
    g.send_gpa(0, t, &body, &[(0, 4096, vec![u64::MAX / 4096])]);
    assert_eq!(g.completion_status(t), status::FAIL);
    // No data at all, and an absurd total length.
    let t = g.trans();
    g.send_inband(0, t, &body, true);
    assert_eq!(g.completion_status(t), status::FAIL);
    let t = g.trans();
    let many: Vec<u64> = (100..100 + 2048).collect();
    g.send_gpa(0, t, &body, &[(0, 2048 * 4096, many)]);
    assert_eq!(
        g.completion_status(t),
        status::FAIL,
        "8 MiB transmit refused before reading"
    );
    assert_eq!(g.dev.stats().bad_packets, 7);
    assert!(g.backend.take_sent().is_empty());
    assert_eq!(g.send_section(0, 0, m.len() as u32), status::SUCCESS);
}

#[test]
fn receive_buffer_registration_is_checked() {
    let (b, h) = MemoryBackend::new(MAC, 8);
    let mut g = Guest::new(NetvspConfig::default(), b, h);
    g.open(0);
    // Before INIT: refused with a failure completion.
    let (handle, _) = g.gpadl(64);
    let rb = NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
        gpadl_handle: handle,
        id: 0xCAFE,
    });
    assert_eq!(words(&g.nvsp_reply(rb)[..8]), [102, status::FAIL]);
    let r = g.nvsp_reply(NvspMessage::Init(nvsp::Init {
        min_protocol_version: version::V61,
        max_protocol_version: version::V61,
    }));
    assert_eq!(words(&r)[3], status::SUCCESS);
    // Before NDIS config (v >= 2): refused.
    assert_eq!(words(&g.nvsp_reply(rb)[..8]), [102, status::FAIL]);
    let cfg = NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
        mtu: 9014,
        reserved: 0,
        capabilities: 0,
    });
    assert!(g.nvsp(cfg, false).is_empty());
    // Unknown GPADL, a buffer smaller than one 9306-byte sub-allocation.
    let unknown = NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
        gpadl_handle: 0xdead,
        id: 0xCAFE,
    });
    assert_eq!(
        words(&g.nvsp_reply(unknown)),
        [102, status::FAIL, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let (tiny, _) = g.gpadl(2);
    let small = NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
        gpadl_handle: tiny,
        id: 0xCAFE,
    });
    assert_eq!(words(&g.nvsp_reply(small))[..4], [102, status::FAIL, 0, 0]);
    // A big enough buffer is accepted (sub-allocations sized from the 9014-byte MTU).
    let r = g.nvsp_reply(rb);
    assert_eq!(
        words(&r)[..6],
        [102, 1, 1, 0, 256 + 9014 + 36, (64 * 4096) / 9306]
    );
    // Twice: refused.
    assert_eq!(words(&g.nvsp_reply(rb))[..4], [102, status::FAIL, 0, 0]);
    // Send buffer of one page (< one 6144-byte section): refused.
    let (one, _) = g.gpadl(1);
    let sb = NvspMessage::SendSendBuffer(nvsp::SendBuffer {
        gpadl_handle: one,
        id: 0,
    });
    assert_eq!(words(&g.nvsp_reply(sb))[..3], [105, status::FAIL, 0]);
    assert_eq!(g.dev.stats().bad_packets, 6);
}

#[test]
fn unknown_short_and_out_of_order_nvsp_messages_are_refused() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let before = g.dev.stats().bad_packets;
    // Unknown type, obsolete chimney type, OID_QUERY_EX: no reply (no reply format), counted.
    for ty in [99u32, 116, 131, 0xFFFF_FFFF] {
        let mut m = [0u8; 40];
        m[..4].copy_from_slice(&ty.to_le_bytes());
        let t = g.trans();
        g.send_inband(0, t, &m, true);
        g.pump();
        assert!(g.take().is_empty(), "type {ty}");
    }
    // Too short for its type: INIT of 6 bytes gets INIT_COMPLETE FAIL.
    let t = g.trans();
    g.send_inband(0, t, &[1, 0, 0, 0, 2, 0], true);
    g.pump();
    let got = g.take();
    assert_eq!(
        words(&got[0].payload[..16]),
        [2, u32::MAX, 34, status::FAIL]
    );
    // INIT twice, NDIS config twice: refused, state unchanged.
    let r = g.nvsp_reply(NvspMessage::Init(nvsp::Init {
        min_protocol_version: 2,
        max_protocol_version: 2,
    }));
    assert_eq!(words(&r)[3], status::FAIL);
    assert_eq!(g.dev.nvsp_version(), Some(version::V61));
    // Sub-channels: bad op, too many.
    for (op, n) in [(2, 1), (1, 8), (1, u32::MAX)] {
        let r = g.nvsp_reply(NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
            operation: op,
            num_subchannels: n,
        }));
        assert_eq!(words(&r)[..3], [133, status::FAIL, 0]);
    }
    assert!(g.offers.0.lock().unwrap().is_empty());
    // A transfer-page packet from the guest, SEND_RNDIS_PKT_COMPLETE in-band.
    let comp = [108u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
    g.send_inband(0, 5, &comp, false);
    // Switch data path: empty completion, stays synthetic.
    let t = g.trans();
    g.send_inband(
        0,
        t,
        &NvspMessage::SwitchDataPath(nvsp::SwitchDataPath { active_datapath: 1 }).to_bytes(40),
        true,
    );
    g.pump();
    let got = g.take();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].ty, got[0].trans_id, got[0].payload.len()),
        (PacketType::Completion, t, 0)
    );
    assert_eq!(g.dev.stats().bad_packets - before, 4 + 1 + 1 + 3 + 1);
    // Stray receive completions: counted, nothing freed.
    let free = g.dev.receive_buffer_state().unwrap();
    for id in [0, 12345, u64::MAX] {
        g.send_completion(0, id, &comp);
    }
    g.pump();
    assert_eq!(g.dev.receive_buffer_state().unwrap(), free);
    assert_eq!(g.dev.stats().stray_completions, 3);
    keepalive_ok(&mut g);
}

#[test]
fn bad_offload_requests_fail_and_oversize_frames_are_dropped() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let f = tcp4_frame(PEER, 100);
    let ppi_word = |ty, v: u32| {
        let mut p = Vec::new();
        ppi::write(&mut p, ty, false, &v.to_le_bytes());
        p
    };
    let csum =
        ppi::TxChecksumInfo(ppi::TxChecksumInfo::IS_IPV4 | ppi::TxChecksumInfo::TCP_CHECKSUM);
    let cases = [
        (
            "LSO MSS 0",
            ppi_word(ppi::ty::TCP_LARGE_SEND, ppi::LsoV2Info::new(0, 34, false).0),
        ),
        (
            "LSO header beyond frame",
            ppi_word(
                ppi::ty::TCP_LARGE_SEND,
                ppi::LsoV2Info::new(1000, 1000, false).0,
            ),
        ),
        (
            "LSO v1",
            ppi_word(ppi::ty::TCP_LARGE_SEND, 1000 | (34 << 20)),
        ),
        (
            "checksum offset in Ethernet header",
            ppi_word(ppi::ty::TCPIP_CHECKSUM, csum.with_transport_offset(4).0),
        ),
        (
            "checksum offset past frame",
            ppi_word(ppi::ty::TCPIP_CHECKSUM, csum.with_transport_offset(1000).0),
        ),
        (
            "checksum IPv4 and IPv6",
            ppi_word(ppi::ty::TCPIP_CHECKSUM, csum.0 | 2),
        ),
        (
            "checksum over wrong offset",
            ppi_word(ppi::ty::TCPIP_CHECKSUM, csum.with_transport_offset(40).0),
        ),
        ("short PPI payload", {
            let mut p = Vec::new();
            ppi::write(&mut p, ppi::ty::IEEE_8021Q, false, &[1, 2]);
            p
        }),
    ];
    for (what, p) in &cases {
        assert_eq!(
            send_rndis(&mut g, &rndis_packet(&f, p)),
            status::FAIL,
            "{what}"
        );
    }
    assert!(g.backend.take_sent().is_empty());
    // Non-LSO frame above MTU + 14 (+4): dropped and counted, not failed.
    let big = tcp4_frame(PEER, 1500);
    assert_eq!(
        send_rndis(&mut g, &rndis_packet(&big, &[])),
        status::SUCCESS
    );
    assert_eq!(g.dev.stats().tx_dropped, 1);
    assert!(g.backend.take_sent().is_empty());
}

#[test]
fn control_replies_stay_bounded_when_the_guest_stops_completing() {
    let (b, h) = MemoryBackend::new(MAC, 8);
    let mut g = Guest::new(NetvspConfig::default(), b, h);
    g.connect(version::V61, 1, 3); // 4096 bytes: 2 receive sections
    let init = rndis::initialize_request(1, 0x4000);
    assert_eq!(send_rndis(&mut g, &init), status::SUCCESS);
    let mut ok = 0;
    let mut failed = 0;
    for i in 0..200 {
        match send_rndis(&mut g, &rndis::keepalive_request(i)) {
            status::SUCCESS => ok += 1,
            _ => failed += 1,
        }
    }
    // 1 INITIALIZE reply + keepalives fill the 2 sections and the 64-entry queue.
    assert_eq!(ok, 2 + 64 - 1);
    assert_eq!(failed, 200 - ok);
    assert_eq!(g.dev.stats().control_dropped, failed as u64);
    let held: usize = g
        .take()
        .iter()
        .filter(|p| p.ty == PacketType::TransferPages)
        .count();
    assert_eq!(held, 2);
}

#[test]
fn a_broken_sub_channel_does_not_affect_the_others() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let r = g.nvsp_reply(NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
        operation: 1,
        num_subchannels: 2,
    }));
    assert_eq!(words(&r)[..3], [133, 1, 2]);
    g.open(1);
    g.open(2);
    g.pump();
    g.take();
    // Control messages on a sub-channel are refused there.
    let t = g.trans();
    let init = NvspMessage::Init(nvsp::Init {
        min_protocol_version: 2,
        max_protocol_version: 2,
    })
    .to_bytes(40);
    g.send_inband(1, t, &init, true);
    g.pump();
    let got = g.take();
    assert_eq!(
        (got[0].queue, words(&got[0].payload[..16])[3]),
        (1, status::FAIL)
    );
    // Data on a sub-channel is fine.
    let m = rndis_packet(&tcp4_frame(PEER, 10), &[]);
    g.write_section(9, &m);
    assert_eq!(g.send_section(2, 9, m.len() as u32), status::SUCCESS);
    // Corrupt sub-channel 1's ring: a write index outside the ring.
    let ch = g.chans.get(&1).unwrap();
    ch.tx
        .mem()
        .control(ControlWord::WriteIndex)
        .store(0x7777_7771, Ordering::Release);
    g.pump();
    assert!(g.dev.stats().bad_packets >= 2);
    // The primary and sub-channel 2 keep working.
    keepalive_ok(&mut g);
    assert_eq!(g.send_section(2, 9, m.len() as u32), status::SUCCESS);
    g.backend.inject(&tcp4_frame(MAC, 3), RxMeta::default());
    assert_eq!(g.receive_frames().len(), 1);
    // Closing the broken channel is clean.
    g.close(1);
    g.pump();
}

#[test]
fn revoked_buffers_are_not_used_again() {
    let mut g = Guest::default_pair();
    g.bring_up();
    assert!(
        g.nvsp(
            NvspMessage::RevokeReceiveBuffer(nvsp::RevokeBuffer { id: 0x1234 }),
            false
        )
        .is_empty()
    );
    assert_eq!(g.dev.stats().bad_packets, 1, "wrong id refused");
    assert!(
        g.nvsp(
            NvspMessage::RevokeReceiveBuffer(nvsp::RevokeBuffer { id: 0xCAFE }),
            false
        )
        .is_empty()
    );
    assert!(
        g.nvsp(
            NvspMessage::RevokeSendBuffer(nvsp::RevokeBuffer { id: 0 }),
            false
        )
        .is_empty()
    );
    assert!(g.dev.receive_buffer_state().is_none());
    g.backend.inject(&tcp4_frame(MAC, 3), RxMeta::default());
    g.pump();
    assert!(g.take().is_empty());
    assert_eq!(g.dev.stats().rx_filtered, 1);
    let m = rndis_packet(&tcp4_frame(PEER, 10), &[]);
    g.write_section(0, &m);
    assert_eq!(
        g.send_section(0, 0, m.len() as u32),
        status::FAIL,
        "no send buffer"
    );
    // Close and reopen: a fresh session.
    g.close(0);
    g.bring_up();
    keepalive_ok(&mut g);
}

/// One random guest action.
#[derive(Debug, Clone)]
enum Action {
    InBand {
        ty: u32,
        body: Vec<u8>,
        completion: bool,
    },
    Rndis {
        bytes: Vec<u8>,
        in_section: bool,
    },
    Completion {
        trans_id: u64,
        body: Vec<u8>,
    },
    Gpa {
        ranges: Vec<(u32, u32, u64)>,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let nvsp_types = prop::sample::select(vec![
        1u32, 100, 101, 103, 104, 106, 107, 108, 125, 129, 133, 134, 200,
    ]);
    let rndis_types = prop::sample::select(vec![1u32, 2, 3, 4, 5, 6, 7, 8, 9, 0x8000_0002]);
    prop_oneof![
        (
            nvsp_types,
            prop::collection::vec(any::<u8>(), 0..40),
            any::<bool>()
        )
            .prop_map(|(ty, body, completion)| Action::InBand {
                ty,
                body,
                completion
            }),
        (
            rndis_types,
            prop::collection::vec(any::<u8>(), 0..300),
            any::<u16>(),
            any::<bool>()
        )
            .prop_map(|(ty, mut rest, len, in_section)| {
                let mut bytes = ty.to_le_bytes().to_vec();
                let l = u32::from(len) % 400;
                bytes.extend_from_slice(&l.to_le_bytes());
                bytes.append(&mut rest);
                Action::Rndis { bytes, in_section }
            }),
        (0u64..64, prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(trans_id, body)| Action::Completion { trans_id, body }),
        prop::collection::vec((any::<u32>(), any::<u32>(), any::<u64>()), 1..4)
            .prop_map(|ranges| Action::Gpa { ranges }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_guest_traffic_never_breaks_the_device(actions in prop::collection::vec(action(), 1..40)) {
        let mut g = Guest::default_pair();
        g.bring_up();
        let scratch = g.alloc_pages(2);
        for a in actions {
            match a {
                Action::InBand { ty, mut body, completion } => {
                    let mut m = ty.to_le_bytes().to_vec();
                    m.append(&mut body);
                    let t = g.trans();
                    g.send_inband(0, t, &m, completion);
                }
                Action::Rndis { bytes, in_section } => {
                    if in_section {
                        g.write_section(5, &bytes[..bytes.len().min(6144)]);
                        let t = g.trans();
                        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
                            channel_type: 0,
                            send_buffer_section_index: 5,
                            send_buffer_section_size: bytes.len() as u32,
                        }).to_bytes(40);
                        g.send_inband(0, t, &body, true);
                    } else {
                        g.mem.write_at(scratch * 4096, &bytes).unwrap();
                        let t = g.trans();
                        let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
                            channel_type: 1,
                            send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
                            send_buffer_section_size: 0,
                        }).to_bytes(40);
                        g.send_gpa(0, t, &body, &[(0, bytes.len().max(1) as u32, vec![scratch])]);
                    }
                }
                Action::Completion { trans_id, body } => g.send_completion(0, trans_id, &body),
                Action::Gpa { ranges } => {
                    let t = g.trans();
                    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket::default()).to_bytes(40);
                    let r: Vec<(u32, u32, Vec<u64>)> = ranges
                        .iter()
                        .map(|&(off, len, pfn)| {
                            let (off, len) = (off % 4096, len % 20000 + 1);
                            let n = (u64::from(off) + u64::from(len)).div_ceil(4096);
                            (off, len, (0..n).map(|i| pfn.wrapping_add(i)).collect())
                        })
                        .collect();
                    g.send_gpa(0, t, &body, &r);
                }
            }
            g.pump();
            let got = g.take();
            for p in got.iter().filter(|p| p.ty == PacketType::TransferPages) {
                g.complete_rx(p);
            }
        }
        g.pump();
        g.take();
        if g.dev.receive_buffer_state().is_some() {
            keepalive_ok(&mut g);
        }
    }
}

#[test]
fn messages_before_init_get_no_service() {
    let mut g = Guest::default_pair();
    g.open(0);
    for ty in [
        msg_type::SEND_NDIS_VERSION,
        msg_type::SEND_RNDIS_PACKET,
        msg_type::SUBCHANNEL,
    ] {
        let mut m = [0u8; 40];
        m[..4].copy_from_slice(&ty.to_le_bytes());
        let t = g.trans();
        g.send_inband(0, t, &m, true);
    }
    g.pump();
    let got = g.take();
    // SEND_RNDIS_PKT and SUBCHANNEL have failure replies; SEND_NDIS_VER has none.
    assert_eq!(got.len(), 2);
    assert_eq!(words(&got[0].payload[..8]), [108, status::FAIL]);
    assert_eq!(words(&got[1].payload[..12]), [133, status::FAIL, 0]);
    assert_eq!(g.dev.stats().bad_packets, 3);
}
