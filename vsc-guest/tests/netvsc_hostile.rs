//! Hostile host input to a ready netvsc driver: bad transfer-page ranges and set ids, bad RNDIS
//! lengths and offsets, malformed PPIs, unknown or misdirected NVSP messages, stray completions —
//! each an error, never a panic, every transfer-page packet completed exactly once (FAIL when
//! something in it was bad). Plus the send path's wire format (sections, batching, GPA direct,
//! PPIs) and link indications.
#![allow(clippy::unwrap_used)]

mod netvsc_fake_host;

use netvsc_fake_host::*;
use proptest::prelude::*;
use ringbuf::PacketType;
use vmbus_core::memory::GuestMemory;
use vsc_guest::netvsc::{
    HostPacket, LsoInfo, Netvsc, NetvscError, NetvscEvent, OutKind, SendError, TxChecksum, TxMeta,
};

fn ready() -> (FakeHost, Netvsc<Mem>) {
    let (mut h, mut d) = FakeHost::new();
    bring_up(&mut h, &mut d, 1);
    (h, d)
}

/// An RNDIS_PACKET carrying `frame` with `ppis`.
fn data_msg(frame: &[u8], ppis: &[u8]) -> Vec<u8> {
    let off = 36 + ppis.len() as u32;
    let ppi_off = if ppis.is_empty() { 0 } else { 36 };
    let mut v = rndis(
        1,
        &[
            off,
            frame.len() as u32,
            0,
            0,
            0,
            ppi_off,
            ppis.len() as u32,
            0,
            0,
        ],
        ppis,
    );
    v.extend_from_slice(frame);
    let len = v.len() as u32;
    v[4..8].copy_from_slice(&len.to_le_bytes());
    v
}

fn ppi(ty: u32, value: u32) -> Vec<u8> {
    words(&[16, ty, 12, value])
}

#[test]
fn receive_ranges_are_checked_against_the_buffer() {
    let (mut h, mut d) = ready();
    let end = RECV.len as u32;
    for (off, len) in [(end - 10, 100), (u32::MAX, 10), (end, 1), (0, SUB + 1)] {
        let r = h.transfer(&mut d, 0, 0xCAFE, &[(off, len)], 0);
        assert!(matches!(r, Err(NetvscError::BadRange { .. })), "{r:?}");
    }
    // A good frame next to a bad range still arrives; the packet is completed with FAIL.
    let good = data_msg(&[0x11; 60], &[]);
    h.mem.write_at(RECV.gpa, &good).unwrap();
    let r = h.transfer(&mut d, 0, 0xCAFE, &[(0, good.len() as u32), (end, 8)], 0);
    assert!(r.is_err());
    assert_eq!(d.poll_receive().unwrap().data, vec![0x11; 60]);
    assert!(d.poll_receive().is_none());
    let s = d.stats();
    assert_eq!(s.rx_failed, 5);
    assert_eq!(s.rx_packets, s.rx_completions);
}

#[test]
fn wrong_transfer_page_set_id_is_refused_and_completed() {
    let (mut h, mut d) = ready();
    let m = data_msg(&[1; 60], &[]);
    let r = h.deliver_on(&mut d, 0, 0xBEEF, &[&m], 0);
    assert_eq!(r, Err(NetvscError::BadSetId(0xBEEF)));
    assert!(d.poll_receive().is_none());
}

#[test]
fn bad_rndis_lengths_and_offsets_are_errors() {
    let (mut h, mut d) = ready();
    let frame = [7u8; 60];
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // msg_len below 8, zero, beyond the range.
    for l in [0u32, 4, 500] {
        let mut m = data_msg(&frame, &[]);
        m[4..8].copy_from_slice(&l.to_le_bytes());
        cases.push(m);
    }
    // data_offset / data_len beyond the message, data_len 0, OOB and VC fields set.
    for (field, v) in [(8usize, 1000u32), (12, 1000), (12, 0), (16, 4), (36, 1)] {
        let mut m = data_msg(&frame, &[]);
        m[field..field + 4].copy_from_slice(&v.to_le_bytes());
        cases.push(m);
    }
    // PPIs: size 0, size beyond the area, payload offset >= size, truncated checksum payload.
    for p in [
        words(&[0, 0, 12, 0]),
        words(&[64, 0, 12, 0]),
        words(&[16, 0, 16, 0]),
        words(&[12, 0, 12]),
    ] {
        cases.push(data_msg(&frame, &p));
    }
    // A header only; an unknown type; a host→guest request type.
    cases.push(words(&[1]));
    cases.push(rndis(0x1234, &[0, 0], &[]));
    cases.push(rndis(4, &[9, 0x10101, 0, 20, 0], &[]));
    for m in &cases {
        assert!(h.deliver(&mut d, m).is_err(), "accepted {m:02x?}");
    }
    assert!(d.poll_receive().is_none());
    // And the driver still works.
    h.deliver(&mut d, &data_msg(&frame, &ppi(0, 0x28))).unwrap();
    let f = d.poll_receive().unwrap();
    assert_eq!(f.data, frame);
    assert_eq!(f.csum, Some(0x28));
    assert!(f.l4_checksum_ok());
}

#[test]
fn unknown_and_misdirected_nvsp_messages_are_errors() {
    let (h, mut d) = ready();
    let inband = |d: &mut Netvsc<Mem>, payload: &[u8], ty| {
        d.handle_packet(
            0,
            &HostPacket {
                packet_type: ty,
                trans_id: 5,
                completion_requested: false,
                transfer: None,
                payload,
            },
        )
    };
    assert_eq!(
        inband(&mut d, &nvsp40(&[999]), PacketType::InBand),
        Err(NetvscError::UnexpectedNvsp(999))
    );
    assert!(inband(&mut d, &nvsp40(&[1, 2, 2]), PacketType::InBand).is_err());
    assert!(inband(&mut d, &[1, 2], PacketType::InBand).is_err());
    assert!(inband(&mut d, &nvsp40(&[107, 0, 0, 0]), PacketType::GpaDirect).is_err());
    // Completions: unknown transaction, too short, a guest→host type, an obsolete type.
    assert_eq!(
        h.complete(&mut d, 0xdead, &words(&[108, 1])),
        Err(NetvscError::UnknownTransaction(0xdead))
    );
    assert!(h.complete(&mut d, 1, &[108, 0]).is_err());
    assert!(h.complete(&mut d, 1, &nvsp40(&[101, 1, 1])).is_err());
    assert!(h.complete(&mut d, 1, &nvsp40(&[110, 1, 1])).is_err());
    // INIT_COMPLETE after the bring-up.
    assert!(h.complete(&mut d, 1, &nvsp40(&[2, 0, 0, 1])).is_err());
    // A transfer-page packet whose NVSP message is not SEND_RNDIS_PKT (still completed).
    let mut hh = h;
    let trans = hh.next_trans;
    let r = d.handle_packet(
        0,
        &HostPacket {
            packet_type: PacketType::TransferPages,
            trans_id: trans,
            completion_requested: true,
            transfer: Some((0xCAFE, &[(0, 60)])),
            payload: &nvsp40(&[102, 1]),
        },
    );
    assert!(r.is_err());
    let c = d.pop_transmit(0).unwrap();
    assert_eq!((c.kind, c.trans_id), (OutKind::Completion, trans));
    assert_eq!(c.payload, words(&[108, 2]));
    // RNDIS replies nobody asked for.
    assert_eq!(
        hh.deliver(&mut d, &set_cmplt(77, 0)),
        Err(NetvscError::UnknownRequest(77))
    );
    assert!(d.stats().bad_packets >= 10);
}

#[test]
fn link_indications_and_the_indirection_table() {
    let (mut h, mut d) = ready();
    let ind = |st: u32, buf: &[u8]| rndis(7, &[st, buf.len() as u32, 12], buf);
    h.deliver(&mut d, &ind(0x4001_000C, &[])).unwrap();
    h.deliver(&mut d, &ind(0x4001_000B, &[])).unwrap();
    h.deliver(&mut d, &ind(0x4001_0013, &1_000_000u32.to_le_bytes()))
        .unwrap();
    h.deliver(&mut d, &ind(0x4001_0013, &[])).unwrap(); // no speed: ignored
    h.deliver(&mut d, &ind(0x4001_0018, &[])).unwrap();
    let ev: Vec<_> = std::iter::from_fn(|| d.poll_event()).collect();
    assert_eq!(
        ev,
        [
            NetvscEvent::Link { up: false },
            NetvscEvent::Link { up: true },
            NetvscEvent::LinkSpeed(1_000_000),
            NetvscEvent::NetworkChange,
        ]
    );
    // Status buffer outside the message.
    assert!(
        h.deliver(&mut d, &rndis(7, &[0x4001_000C, 64, 12], &[]))
            .is_err()
    );
    // SEND_INDIRECTION_TABLE as OpenVMM sends it (16 entries at offset 12; NVSP 6 → Linux's
    // legacy offset 40 applies only when the message is long enough, and 76 < 104).
    let mut t = words(&[134, 16, 12]);
    t.extend(words(&[0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]));
    fn pkt(payload: &[u8]) -> HostPacket<'_> {
        HostPacket {
            packet_type: PacketType::InBand,
            trans_id: 0,
            completion_requested: false,
            transfer: None,
            payload,
        }
    }
    d.handle_packet(0, &pkt(&t)).unwrap();
    assert!(matches!(
        d.poll_event(),
        Some(NetvscEvent::IndirectionTable(x)) if x[1] == 1
    ));
    assert!(d.handle_packet(0, &pkt(&words(&[134, 15, 12]))).is_err());
}

#[test]
fn send_path_sections_batching_and_gpa_direct() {
    let (h, mut d) = ready();
    let frame: Vec<u8> = (0..100u8).collect();
    // One frame with a checksum PPI: one section, RNDIS header + PPI + frame.
    let meta = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            tcp: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        vlan_tci: Some(0x2005),
        ..TxMeta::default()
    };
    d.send(0, &frame, &meta, false).unwrap();
    let p = h.take(&mut d, 0);
    assert_eq!(p.kind, OutKind::InBand);
    assert!(p.completion_requested);
    let section = u32_at(&p.payload, 8);
    let len = u32_at(&p.payload, 12);
    assert_eq!(p.payload[..8], words(&[107, 0])[..]);
    assert_eq!(len, 8 + 36 + 32 + 100);
    let mut m = vec![0u8; len as usize];
    h.mem
        .read_at(SEND.gpa + u64::from(section) * 6144, &mut m)
        .unwrap();
    assert_eq!(m[..8], words(&[1, len])[..]);
    assert_eq!(m[8..44], words(&[68, 100, 0, 0, 0, 36, 32, 0, 0])[..]);
    // VLAN PPI (type 6): priority 1, VLAN 5; then checksum PPI (type 0): IPv4 + TCP, offset 34.
    assert_eq!(m[44..60], words(&[16, 6, 12, 1 | (5 << 4)])[..]);
    assert_eq!(m[60..76], words(&[16, 0, 12, 0x5 | (34 << 16)])[..]);
    assert_eq!(m[76..], frame[..]);
    h.complete(&mut d, p.trans_id, &words(&[108, 1])).unwrap();
    // Three frames with `more`: one section, each message padded to 8 bytes.
    let (free, _) = d.free_send_resources();
    for i in 0..3u8 {
        d.send(0, &[i; 61], &TxMeta::default(), i < 2).unwrap();
    }
    let p = h.take(&mut d, 0);
    assert!(d.pop_transmit(0).is_none());
    assert_eq!(u32_at(&p.payload, 12), 2 * 112 + 105);
    assert_eq!(d.stats().tx_batches, 1);
    assert_eq!(d.free_send_resources().0, free - 1);
    h.complete(&mut d, p.trans_id, &words(&[108, 1])).unwrap();
    assert_eq!(d.free_send_resources().0, free);
    // A 20 000-byte LSO frame: GPA direct from a bounce slot, one page buffer per page.
    let big = vec![0x5a; 20_000];
    let lso = TxMeta {
        lso: Some(LsoInfo {
            mss: 1448,
            tcp_offset: 34,
            ipv6: false,
        }),
        ..TxMeta::default()
    };
    d.send(0, &big, &lso, false).unwrap();
    let p = h.take(&mut d, 0);
    assert_eq!(p.payload, nvsp40(&[107, 0, 0xFFFF_FFFF, 0]));
    let OutKind::GpaDirect(ranges) = &p.kind else {
        panic!("{p:?}")
    };
    let total: u32 = ranges.iter().map(|r| r.len).sum();
    assert_eq!(total, 8 + 36 + 16 + 20_000);
    assert!(ranges.iter().all(|r| r.offset + r.len <= 4096));
    assert_eq!(ranges[0].len, 60);
    h.complete(&mut d, p.trans_id, &words(&[108, 2])).unwrap();
    assert_eq!(d.stats().tx_failed, 1);
    // Out of sections and bounce slots: busy, not a panic.
    let mut n = 0;
    while d.send(0, &[1; 64], &TxMeta::default(), false).is_ok() {
        n += 1;
        assert!(n < 1000);
    }
    assert_eq!(n, (SEND.len / 6144) as usize + 2);
    assert_eq!(
        d.send(0, &[1; 64], &TxMeta::default(), false),
        Err(SendError::Busy)
    );
    assert!(matches!(
        d.send(0, &vec![0; 200_000], &TxMeta::default(), false),
        Err(SendError::TooLarge { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Random host packets never panic the driver, and every transfer-page packet is completed
    /// exactly once.
    #[test]
    fn random_host_packets(
        kind in 0u8..4,
        trans in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        nvsp_type in prop_oneof![Just(107u32), any::<u32>()],
        set_id in prop_oneof![Just(0xCAFEu16), any::<u16>()],
        ranges in proptest::collection::vec((any::<u32>(), 0u32..3000), 0..6),
        recv_bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let (h, mut d) = ready();
        h.mem.write_at(RECV.gpa, &recv_bytes).unwrap();
        let mut p = payload.clone();
        if p.len() >= 4 {
            p[..4].copy_from_slice(&nvsp_type.to_le_bytes());
        }
        let ty = [PacketType::InBand, PacketType::TransferPages, PacketType::Completion,
            PacketType::GpaDirect][kind as usize];
        let ranges: Vec<(u32, u32)> = ranges.iter().map(|&(o, l)| (o % (RECV.len as u32 + 100), l)).collect();
        let _ = d.handle_packet(0, &HostPacket {
            packet_type: ty,
            trans_id: trans,
            completion_requested: true,
            transfer: (ty == PacketType::TransferPages).then_some((set_id, ranges.as_slice())),
            payload: &p,
        });
        let completions = std::iter::from_fn(|| d.pop_transmit(0))
            .filter(|o| o.kind == OutKind::Completion && o.trans_id == trans)
            .count();
        prop_assert_eq!(completions, usize::from(ty == PacketType::TransferPages));
        prop_assert_eq!(d.state(), vsc_guest::netvsc::DriverState::Ready);
    }
}
