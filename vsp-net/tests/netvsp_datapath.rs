//! netvsp data path: transmit from send-buffer sections, GPA-direct pages and both; offloads
//! finished for backends that cannot; receive into sections, several frames per transfer-page
//! packet, recycled on completion; back-pressure when the guest stops completing or reading.
#![allow(clippy::unwrap_used)]

mod netvsp_guest;

use netvsp_guest::*;
use ringbuf::PacketType;
use std::time::Duration;
use vmbus_core::devices::nvsp::{self, NvspMessage};
use vmbus_core::devices::rndis::ppi::{
    self, Ieee8021qInfo, LsoV2Info, RxChecksumInfo, TxChecksumInfo,
};
use vmbus_core::memory::GuestMemory;
use vsp_net::backend::{BackendCaps, MemoryBackend, RxChecksum, RxMeta};
use vsp_net::netvsp::NetvspConfig;
use vsp_net::tap::offload::{internet_checksum, verify_checksums};

const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn with_ip_csum(mut f: Vec<u8>) -> Vec<u8> {
    f[24..26].fill(0);
    let c = internet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

fn ppi_word(ty: u32, v: u32) -> Vec<u8> {
    let mut out = Vec::new();
    ppi::write(&mut out, ty, false, &v.to_le_bytes());
    out
}

#[test]
fn transmit_from_a_section_with_batched_messages() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let f1 = tcp4_frame(PEER, 3);
    let f2 = tcp4_frame(PEER, 100);
    // Linux pads every batched message but the last to the 8-byte alignment and counts the pad.
    let mut m1 = rndis_packet(&f1, &[]);
    let padded = m1.len().next_multiple_of(8);
    m1.resize(padded, 0);
    m1[4..8].copy_from_slice(&(padded as u32).to_le_bytes());
    let m2 = rndis_packet(&f2, &[]);
    let section = [m1, m2].concat();
    g.write_section(7, &section);
    assert_eq!(
        g.send_section(0, 7, section.len() as u32),
        nvsp::status::SUCCESS
    );
    let sent = g.backend.take_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].frame.clone(), sent[1].frame.clone()), (f1, f2));
    assert_eq!(g.dev.stats().tx_frames, 2);
}

#[test]
fn transmit_gpa_direct_over_several_ranges_and_partial_copy() {
    let mut g = Guest::default_pair();
    g.bring_up();
    // [RNDIS header] in one page, the frame in two ranges crossing page boundaries.
    let frame = tcp4_frame(PEER, 1400);
    let hdr = rndis::packet_header(frame.len(), &[]);
    let base = g.alloc_pages(8);
    g.mem.write_at(base * 4096 + 3000, &hdr).unwrap();
    let (a, b) = frame.split_at(1000);
    g.mem.write_at((base + 1) * 4096 + 3500, a).unwrap(); // spans pages base+1..base+2
    g.mem.write_at((base + 4) * 4096, b).unwrap();
    let t = g.trans();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
        send_buffer_section_size: 0,
    })
    .to_bytes(40);
    g.send_gpa(
        0,
        t,
        &body,
        &[
            (3000, hdr.len() as u32, vec![base]),
            (3500, 1000, vec![base + 1, base + 2]),
            (0, b.len() as u32, vec![base + 4]),
        ],
    );
    assert_eq!(g.completion_status(t), 1);
    assert_eq!(g.backend.take_sent()[0].frame, frame);

    // Partial copy: the section holds a whole small message and the header of a big one whose
    // data follows in a GPA-direct range.
    let small = tcp4_frame(PEER, 1);
    let mut m1 = rndis_packet(&small, &[]);
    m1.resize(m1.len().next_multiple_of(8), 0);
    let l = m1.len() as u32;
    m1[4..8].copy_from_slice(&l.to_le_bytes());
    let big = tcp4_frame(PEER, 1446);
    let section = [m1, rndis::packet_header(big.len(), &[])].concat();
    g.write_section(3, &section);
    let data = g.alloc_pages(3);
    g.mem.write_at(data * 4096 + 3000, &big).unwrap();
    let t = g.trans();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: 3,
        send_buffer_section_size: section.len() as u32,
    })
    .to_bytes(40);
    g.send_gpa(
        0,
        t,
        &body,
        &[(3000, big.len() as u32, vec![data, data + 1])],
    );
    assert_eq!(g.completion_status(t), 1);
    let sent = g.backend.take_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].frame, small);
    assert_eq!(sent[1].frame, big);
}

use vmbus_core::devices::rndis;

#[test]
fn checksum_offload_is_completed_for_a_plain_backend() {
    let mut g = Guest::default_pair();
    g.bring_up();
    // TCP: the guest leaves the TCP checksum to the host (IPv4 header checksum done).
    let f = with_ip_csum(tcp4_frame(PEER, 333));
    let c = TxChecksumInfo(TxChecksumInfo::IS_IPV4 | TxChecksumInfo::TCP_CHECKSUM)
        .with_transport_offset(34);
    let m = rndis_packet(&f, &ppi_word(ppi::ty::TCPIP_CHECKSUM, c.0));
    g.write_section(0, &m);
    assert_eq!(g.send_section(0, 0, m.len() as u32), 1);
    let sent = g.backend.take_sent();
    assert_eq!(
        sent[0].meta,
        Default::default(),
        "nothing left for the backend"
    );
    assert!(verify_checksums(&sent[0].frame).unwrap());
    assert_eq!(sent[0].frame[54..], f[54..]);
    // UDP, and the IPv4 header checksum too.
    let mut u = tcp4_frame(PEER, 0);
    u.truncate(14 + 20);
    u[23] = 17;
    u[16..18].copy_from_slice(&(20u16 + 8 + 50).to_be_bytes());
    u.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 58, 0, 0]);
    u.extend((0..50).map(|i| i as u8));
    let c = TxChecksumInfo(
        TxChecksumInfo::IS_IPV4 | TxChecksumInfo::UDP_CHECKSUM | TxChecksumInfo::IP_HEADER_CHECKSUM,
    )
    .with_transport_offset(34);
    let m = rndis_packet(&u, &ppi_word(ppi::ty::TCPIP_CHECKSUM, c.0));
    g.write_section(1, &m);
    assert_eq!(g.send_section(0, 1, m.len() as u32), 1);
    let s = g.backend.take_sent();
    assert!(verify_checksums(&s[0].frame).unwrap());
    assert_ne!(&s[0].frame[24..26], &[0, 0]);
}

/// A TSO frame prepared the way Linux does for LSO v2: IP total length and checksum zero.
fn lso_frame(payload: usize) -> Vec<u8> {
    let mut f = tcp4_frame(PEER, payload);
    f[16..18].fill(0);
    f[24..26].fill(0);
    f
}

fn send_big(g: &mut Guest, frame: &[u8], ppis: &[u8]) -> u32 {
    let hdr = rndis::packet_header(frame.len(), ppis);
    let pages = (frame.len() as u64).div_ceil(4096) + 1;
    let base = g.alloc_pages(pages + 1);
    g.mem.write_at(base * 4096, &hdr).unwrap();
    g.mem.write_at((base + 1) * 4096, frame).unwrap();
    let t = g.trans();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
        send_buffer_section_size: 0,
    })
    .to_bytes(40);
    let n = (frame.len() as u64).div_ceil(4096);
    g.send_gpa(
        0,
        t,
        &body,
        &[
            (0, hdr.len() as u32, vec![base]),
            (0, frame.len() as u32, (base + 1..base + 1 + n).collect()),
        ],
    );
    g.completion_status(t)
}

#[test]
fn lso_is_segmented_for_a_plain_backend() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let f = lso_frame(10_000);
    let lso = LsoV2Info::new(1448, 34, false);
    assert_eq!(
        send_big(&mut g, &f, &ppi_word(ppi::ty::TCP_LARGE_SEND, lso.0)),
        1
    );
    let segs = g.backend.take_sent();
    assert_eq!(segs.len(), 10_000usize.div_ceil(1448));
    let mut payload = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert!(verify_checksums(&s.frame).unwrap(), "segment {i}");
        assert!(s.frame.len() <= 14 + 1500);
        let seq = u32::from_be_bytes(s.frame[38..42].try_into().unwrap());
        assert_eq!(seq, 1000 + (i * 1448) as u32);
        let total = u16::from_be_bytes(s.frame[16..18].try_into().unwrap()) as usize;
        assert_eq!(total, s.frame.len() - 14);
        payload.extend_from_slice(&s.frame[54..]);
    }
    assert_eq!(payload, f[54..]);
}

#[test]
fn lso_and_checksums_pass_through_to_a_capable_backend() {
    let (b, h) = MemoryBackend::new(MAC, 64);
    let b = b.with_caps(BackendCaps {
        tx_csum: true,
        tx_gso: true,
        max_gso_size: 65536,
        tx_vlan: true,
    });
    let mut g = Guest::new(NetvspConfig::default(), b, h);
    g.bring_up();
    let f = lso_frame(20_000);
    let mut ppis = ppi_word(ppi::ty::TCP_LARGE_SEND, LsoV2Info::new(1400, 34, false).0);
    ppis.extend(ppi_word(
        ppi::ty::IEEE_8021Q,
        Ieee8021qInfo::from_tci(0x2005).0,
    ));
    assert_eq!(send_big(&mut g, &f, &ppis), 1);
    let sent = g.backend.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].frame, f);
    let gso = sent[0].meta.gso.unwrap();
    assert_eq!((gso.mss, gso.tcp_offset, gso.ipv6), (1400, 34, false));
    assert_eq!(sent[0].meta.vlan_tci, Some(0x2005));
}

#[test]
fn vlan_tag_goes_in_band_for_a_plain_backend() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let f = with_ip_csum(tcp4_frame(PEER, 20));
    let m = rndis_packet(
        &f,
        &ppi_word(ppi::ty::IEEE_8021Q, Ieee8021qInfo::from_tci(0x6064).0),
    );
    g.write_section(0, &m);
    assert_eq!(g.send_section(0, 0, m.len() as u32), 1);
    let s = &g.backend.take_sent()[0];
    assert_eq!(&s.frame[12..16], &[0x81, 0x00, 0x60, 0x64]);
    assert_eq!(s.frame[16..], f[12..]);
    assert_eq!(s.meta.vlan_tci, None);
}

#[test]
fn several_frames_per_receive_packet_and_sections_recycle() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let (free0, _) = g.dev.receive_buffer_state().unwrap();
    for i in 0..5 {
        assert!(
            g.backend
                .inject(&tcp4_frame(MAC, 100 + i), RxMeta::default())
        );
    }
    g.pump();
    let got = g.take();
    assert_eq!(got.len(), 1, "one transfer-page packet");
    let p = &got[0];
    assert_eq!(
        (p.ty, p.set_id, p.ranges.len()),
        (PacketType::TransferPages, 0xCAFE, 5)
    );
    assert_eq!(g.dev.receive_buffer_state().unwrap(), (free0 - 5, 1));
    for (i, &(off, len)) in p.ranges.iter().enumerate() {
        assert_eq!(off % 1806, 0, "each message at a sub-allocation start");
        assert!(len <= 1806);
        let bytes = g.read_range(off, len);
        let (rndis::RndisMessage::Packet(pk), _) = rndis::parse(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(pk.data, tcp4_frame(MAC, 100 + i));
        assert_eq!(
            { pk.header.per_packet_info_offset },
            0,
            "no PPIs: offset 0 (Linux logs otherwise)"
        );
    }
    let p = p.clone();
    g.complete_rx(&p);
    g.pump();
    assert_eq!(g.dev.receive_buffer_state().unwrap(), (free0, 0));
    // A duplicate completion frees nothing twice.
    g.complete_rx(&p);
    g.pump();
    assert_eq!(g.dev.receive_buffer_state().unwrap(), (free0, 0));
    assert_eq!(g.dev.stats().stray_completions, 1);
}

#[test]
fn receive_checksum_and_vlan_ppis() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let meta = RxMeta {
        csum: RxChecksum {
            ip_ok: true,
            tcp_ok: true,
            udp_ok: false,
        },
        vlan_tci: Some(0x0123),
        hash: None,
    };
    g.backend.inject(&tcp4_frame(MAC, 10), meta);
    let frames = g.receive_frames();
    let info = frames[0].2;
    assert_eq!(
        info.checksum,
        Some(RxChecksumInfo::IP_SUCCEEDED | RxChecksumInfo::TCP_SUCCEEDED)
    );
    assert_eq!(info.vlan.unwrap().tci(), 0x0123);
    assert_eq!(info.hash, None, "no RSS configured: no hash");
}

#[test]
fn guest_not_completing_receives_gets_backpressure_not_drops() {
    let (b, h) = MemoryBackend::new(MAC, 16);
    let mut g = Guest::new(NetvspConfig::default(), b, h);
    g.connect(nvsp::version::V61, 5, 3); // 20480 bytes: 11 sub-allocations
    let id = g.req_id();
    g.rndis(&rndis::initialize_request(id, 0x4000)).unwrap();
    assert_eq!(
        g.set(
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &0x0Du32.to_le_bytes()
        ),
        0
    );
    assert_eq!(g.dev.receive_buffer_state().unwrap(), (11, 0));
    let mut accepted = 0;
    for i in 0..20 {
        accepted += usize::from(g.backend.inject(&tcp4_frame(MAC, i), RxMeta::default()));
    }
    assert_eq!(accepted, 16, "the backend's own bound");
    assert_eq!(g.backend.drops().1, 4);
    g.pump();
    let first = g.take();
    let delivered: usize = first.iter().map(|p| p.ranges.len()).sum();
    assert_eq!(delivered, 11);
    for _ in 0..5 {
        g.pump();
    }
    assert!(
        g.take().is_empty(),
        "nothing more until the guest completes"
    );
    assert_eq!(g.backend.pending_rx(), 5, "the rest waits in the backend");
    assert_eq!(g.dev.stats().rx_dropped_no_buffer, 0);
    for p in &first {
        g.complete_rx(p);
    }
    let rest = g.receive_frames();
    assert_eq!(rest.len(), 5);
    assert_eq!(rest[4].1, tcp4_frame(MAC, 15));
}

#[test]
fn guest_not_reading_its_ring_gets_backpressure() {
    let (b, h) = MemoryBackend::new(MAC, 2000);
    let cfg = NetvspConfig {
        max_rx_ranges: 1,
        ..NetvspConfig::default()
    };
    // 2-page rings: one 4 KiB data page, ~50 receive packets.
    let mut g = Guest::with_ring_pages(cfg, b, h, 2);
    g.bring_up();
    // More frames than the 580 receive sections.
    for i in 0..800 {
        assert!(
            g.backend
                .inject(&tcp4_frame(MAC, i % 50), RxMeta::default())
        );
    }
    for _ in 0..20 {
        g.dev.poll(); // the guest does not read
    }
    let (free, outstanding) = g.dev.receive_buffer_state().unwrap();
    assert_eq!(free, 0, "frames wait in sections, then in the backend");
    assert!(
        outstanding > 50,
        "more lent than the ring holds: queued inside the device (bounded by sections)"
    );
    assert!(g.backend.pending_rx() > 0);
    // The guest drains; everything arrives, in order, nothing dropped.
    let mut n = 0;
    for _ in 0..200 {
        let frames = g.receive_frames();
        for (_, f, _) in &frames {
            assert_eq!(f, &tcp4_frame(MAC, n % 50));
            n += 1;
        }
        if n == 800 {
            break;
        }
    }
    assert_eq!(n, 800);
    assert_eq!(g.dev.stats().rx_dropped_no_buffer, 0);
}

#[test]
fn frames_before_the_filter_is_set_are_dropped_and_counted() {
    let mut g = Guest::default_pair();
    g.connect(nvsp::version::V61, 64, 3);
    g.backend.inject(&tcp4_frame(MAC, 1), RxMeta::default());
    g.pump();
    assert!(g.take().is_empty());
    assert_eq!(g.dev.stats().rx_filtered, 1);
    assert_eq!(g.backend.pending_rx(), 0);
}

#[test]
fn worker_thread_serves_rings_and_interrupts_the_guest() {
    let mut g = Guest::default_pair();
    g.bring_up();
    g.dev.spawn_worker().unwrap();
    let (kick, call) = {
        let b = g.bells.lock().unwrap();
        let (k, c) = &b[&10];
        (k.try_clone().unwrap(), c.try_clone().unwrap())
    };
    // Transmit: write into the ring, kick, wait for the completion interrupt.
    let f = tcp4_frame(PEER, 64);
    let m = rndis_packet(&f, &[]);
    g.write_section(4, &m);
    let t = g.trans();
    let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
        channel_type: 0,
        send_buffer_section_index: 4,
        send_buffer_section_size: m.len() as u32,
    })
    .to_bytes(40);
    call.clear().unwrap();
    g.send_inband(0, t, &body, true);
    kick.ring().unwrap();
    assert!(
        call.wait(Some(Duration::from_secs(5))).unwrap(),
        "interrupt"
    );
    let ch = g.chans.get_mut(&0).unwrap();
    let p = ch.rx.peek().unwrap().expect("completion in the ring");
    assert_eq!((p.packet_type(), p.trans_id()), (PacketType::Completion, t));
    p.consume();
    ch.rx.commit().unwrap();
    assert_eq!(g.backend.take_sent()[0].frame, f);
    // Receive: the worker polls the fd-less backend and interrupts.
    call.clear().unwrap();
    g.backend.inject(&tcp4_frame(MAC, 7), RxMeta::default());
    assert!(call.wait(Some(Duration::from_secs(5))).unwrap());
    g.dev.stop_worker();
    let frames = g.receive_frames();
    assert_eq!(frames.len(), 1);
}
