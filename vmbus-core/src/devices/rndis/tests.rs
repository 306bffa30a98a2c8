#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::ndis::*;
use super::ppi::*;
use super::*;
use alloc::vec;
use core::mem::offset_of;
use proptest::prelude::*;

#[test]
fn message_sizes_match_linux() {
    assert_eq!(size_of::<Header>(), 8);
    assert_eq!(size_of::<InitializeRequest>(), 16);
    assert_eq!(size_of::<InitializeComplete>(), 44);
    assert_eq!(size_of::<HaltRequest>(), 4);
    assert_eq!(size_of::<OidRequest>(), 20);
    assert_eq!(size_of::<QueryComplete>(), 16);
    assert_eq!(size_of::<SetComplete>(), 8);
    assert_eq!(size_of::<ResetComplete>(), 8);
    assert_eq!(size_of::<IndicateStatus>(), 12);
    assert_eq!(size_of::<KeepaliveComplete>(), 8);
    assert_eq!(size_of::<Packet>(), 36);
    assert_eq!(offset_of!(Packet, per_packet_info_offset), 20);
    assert_eq!(offset_of!(Packet, per_packet_info_len), 24);
    assert_eq!(offset_of!(Packet, vc_handle), 28);
    assert_eq!(size_of::<PpiHeader>(), 12);
    assert_eq!(size_of::<PktinfoId>(), 4);
    // Linux's largest response: sizeof(struct rndis_message) (8 + 44) + one page.
    assert_eq!(
        HEADER_SIZE + size_of::<InitializeComplete>() + 4096,
        LINUX_MAX_RESPONSE_LEN
    );
}

#[test]
fn ndis_structs_match_linux() {
    assert_eq!(size_of::<ObjectHeader>(), 4);
    assert_eq!(size_of::<CsumOffload>(), 32);
    assert_eq!(offset_of!(Offload, csum), 4);
    assert_eq!(offset_of!(Offload, lsov1), 36);
    assert_eq!(offset_of!(Offload, ipsecv1), 52);
    assert_eq!(offset_of!(Offload, lsov2), 80);
    assert_eq!(offset_of!(Offload, flags), 108);
    assert_eq!(offset_of!(Offload, ipsecv2), OFFLOAD_SIZE_REV1);
    assert_eq!(size_of::<IpsecV2Offload>(), 32);
    assert_eq!(offset_of!(IpsecV2Offload, udp_esp), 16);
    assert_eq!(offset_of!(Offload, rsc), OFFLOAD_SIZE_REV2);
    assert_eq!(offset_of!(Offload, encap_gre), 148);
    assert_eq!(size_of::<Offload>(), OFFLOAD_SIZE_REV3);
    assert_eq!(size_of::<OffloadParams>(), 28);
    assert_eq!(offset_of!(OffloadParams, tcp_connection_ip6), 14);
    assert_eq!(offset_of!(OffloadParams, flags), 16);
    assert_eq!(offset_of!(OffloadParams, ipsecv2), 20);
    assert_eq!(offset_of!(OffloadParams, rsc_ip4), 22);
    assert_eq!(offset_of!(OffloadParams, rsc_ip6), 23);
    assert_eq!(
        offset_of!(OffloadParams, encapsulated_packet_task_offload),
        24
    );
    assert_eq!(offset_of!(OffloadParams, encapsulation_types), 25);
    assert_eq!(size_of::<RecvScaleCapabilities>(), 18);
    assert_eq!(offset_of!(RecvScaleCapabilities, num_receive_queues), 12);
    assert_eq!(
        offset_of!(RecvScaleCapabilities, num_indirection_entries),
        16
    );
    assert_eq!(size_of::<RecvScaleParameters>(), 40);
    assert_eq!(offset_of!(RecvScaleParameters, flags), 4);
    assert_eq!(offset_of!(RecvScaleParameters, base_cpu_number), 6);
    assert_eq!(offset_of!(RecvScaleParameters, hash_info), 8);
    assert_eq!(offset_of!(RecvScaleParameters, indirection_table_size), 12);
    assert_eq!(
        offset_of!(RecvScaleParameters, indirection_table_offset),
        16
    );
    assert_eq!(offset_of!(RecvScaleParameters, hash_key_size), 20);
    assert_eq!(offset_of!(RecvScaleParameters, hash_key_offset), 24);
    assert_eq!(offset_of!(RecvScaleParameters, processor_masks_offset), 28);
    assert_eq!(offset_of!(RecvScaleParameters, num_processor_masks), 32);
    assert_eq!(
        offset_of!(RecvScaleParameters, processor_masks_entry_size),
        36
    );
    assert_eq!(size_of::<ConfigParameterInfo>(), 20);
    assert_eq!(size_of::<OffloadEncapsulation>(), 28);
    assert_eq!(hash_info::LINUX, 0x1701);
    assert_eq!(packet_filter::LINUX_DEFAULT, 0x0D);
}

#[test]
fn linux_query_and_complete_roundtrip() {
    // QUERY 802_3_PERMANENT_ADDRESS as Linux sends it: 28 bytes, info offset 20, no input.
    let q = query_request(7, oid::_802_3_PERMANENT_ADDRESS, &[]);
    assert_eq!(q.len(), 28);
    assert_eq!(&q[..8], &[4, 0, 0, 0, 28, 0, 0, 0]);
    let (m, len) = parse(&q).unwrap();
    assert_eq!(len, 28);
    let RndisMessage::Query(o) = m else {
        panic!("{m:?}")
    };
    assert_eq!(({ o.request.req_id }, { o.request.oid }), (7, 0x0101_0101));
    assert!(o.info.is_empty());
    let c = query_complete(7, status::SUCCESS, &[2, 0, 0, 0, 0, 1]);
    assert_eq!(c.len(), 8 + 16 + 6);
    let (m, _) = parse(&c).unwrap();
    let RndisMessage::QueryComplete(qc) = m else {
        panic!()
    };
    assert_eq!(qc.info, &[2, 0, 0, 0, 0, 1]);
    assert_eq!({ qc.complete.info_buf_offset }, 16);
}

#[test]
fn oid_buffers_outside_the_message_are_refused() {
    let mut q = set_request(1, oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes());
    let (m, _) = parse(&q).unwrap();
    assert!(matches!(m, RndisMessage::Set(o) if o.info == [0x0D, 0, 0, 0]));
    // info_buflen one too large.
    q[8 + 8] = 5;
    assert!(matches!(
        parse(&q),
        Err(RndisError::OutOfBounds {
            field: "info_buf",
            ..
        })
    ));
    // Offset inside the fixed request.
    q[8 + 8] = 4;
    q[8 + 12] = 16;
    assert!(matches!(parse(&q), Err(RndisError::OutOfBounds { .. })));
    // Offset + len overflowing u32.
    q[8 + 12..8 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(parse(&q), Err(RndisError::OutOfBounds { .. })));
    // msg_len beyond the buffer / below 8.
    let mut short = halt_request(3);
    short[4] = 13;
    assert!(matches!(
        parse(&short),
        Err(RndisError::BadMessageLength { msg_len: 13, .. })
    ));
    short[4] = 4;
    assert!(matches!(
        parse(&short),
        Err(RndisError::BadMessageLength { msg_len: 4, .. })
    ));
    assert!(matches!(
        parse(&short[..7]),
        Err(RndisError::Truncated { len: 7 })
    ));
}

fn linux_tx_packet(frame: &[u8], ppis: &[u8]) -> Vec<u8> {
    let mut m = packet_header(frame.len(), ppis);
    m.extend_from_slice(frame);
    m
}

#[test]
fn packets_with_ppis_parse() {
    let mut ppis = Vec::new();
    let csum = TxChecksumInfo(TxChecksumInfo::IS_IPV4 | TxChecksumInfo::TCP_CHECKSUM)
        .with_transport_offset(34);
    write(&mut ppis, ty::TCPIP_CHECKSUM, false, &csum.0.to_le_bytes());
    write(
        &mut ppis,
        ty::TCP_LARGE_SEND,
        false,
        &LsoV2Info::new(1448, 34, false).0.to_le_bytes(),
    );
    write(
        &mut ppis,
        ty::IEEE_8021Q,
        false,
        &Ieee8021qInfo::from_tci(0xA00 | 0x2000 | 5).0.to_le_bytes(),
    );
    write(
        &mut ppis,
        ty::NBL_HASH_VALUE,
        false,
        &0xdead_beefu32.to_le_bytes(),
    );
    write(&mut ppis, 11, false, &[1, 2, 3]);
    let frame: Vec<u8> = (0..100u8).collect();
    let m = linux_tx_packet(&frame, &ppis);
    let (msg, _) = parse(&m).unwrap();
    let RndisMessage::Packet(p) = msg else {
        panic!()
    };
    assert_eq!(p.data, &frame[..]);
    assert_eq!({ p.header.data_offset } as usize, 36 + ppis.len());
    let info = p.info().unwrap();
    let c = TxChecksumInfo(info.checksum.unwrap());
    assert!(c.is_ipv4() && c.tcp_checksum() && !c.udp_checksum());
    assert_eq!(c.transport_offset(), 34);
    let l = info.lso.unwrap();
    assert_eq!(
        (l.mss(), l.tcp_header_offset(), l.lso_type(), l.is_ipv6()),
        (1448, 34, 1, false)
    );
    let v = info.vlan.unwrap();
    assert_eq!((v.priority(), v.cfi(), v.vlan_id()), (1, false, 0xA05));
    assert_eq!(v.tci(), 0x2A05);
    assert_eq!(info.hash, Some(0xdead_beef));
    assert_eq!(info.unknown, 1);
}

#[test]
fn hostile_packets_are_refused() {
    let frame = [0xAAu8; 60];
    let mut ppis = Vec::new();
    write(&mut ppis, ty::TCPIP_CHECKSUM, false, &1u32.to_le_bytes());
    let good = linux_tx_packet(&frame, &ppis);
    let body = |m: &mut Vec<u8>, off: usize, v: u32| {
        m[8 + off..8 + off + 4].copy_from_slice(&v.to_le_bytes())
    };
    // data beyond msg_len
    let mut m = good.clone();
    body(&mut m, 4, 61);
    assert!(matches!(
        parse(&m),
        Err(RndisError::OutOfBounds { field: "data", .. })
    ));
    // data overlapping the packet header
    let mut m = good.clone();
    body(&mut m, 0, 20);
    assert!(matches!(
        parse(&m),
        Err(RndisError::OutOfBounds { field: "data", .. })
    ));
    // PPI area overlapping the data
    let mut m = good.clone();
    body(&mut m, 20, 36 + 16);
    assert!(matches!(parse(&m), Err(RndisError::PpiOverlapsData)));
    // zero data
    let mut m = good.clone();
    body(&mut m, 4, 0);
    assert!(matches!(parse(&m), Err(RndisError::EmptyData)));
    // OOB and VC handle
    let mut m = good.clone();
    body(&mut m, 16, 1);
    assert!(matches!(parse(&m), Err(RndisError::OobData { .. })));
    let mut m = good.clone();
    body(&mut m, 28, 9);
    assert!(matches!(parse(&m), Err(RndisError::VcHandle(9))));
    // PPI size 0 (Linux's walker would loop forever), size beyond the area, offset >= size.
    for (size, off) in [(0u32, 12u32), (17, 12), (16, 16), (16, 4)] {
        let mut m = good.clone();
        body(&mut m, 36, size);
        body(&mut m, 44, off);
        assert!(
            matches!(parse(&m), Err(RndisError::Ppi { at: 0, .. })),
            "{size} {off}"
        );
    }
    // A second PPI that does not fit.
    let mut ppis2 = ppis.clone();
    ppis2.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0]);
    assert!(matches!(
        parse(&linux_tx_packet(&frame, &ppis2)),
        Err(RndisError::Ppi { at: 16, .. })
    ));
    // Known PPI type with a payload too small.
    let mut small = Vec::new();
    write(&mut small, ty::TCP_LARGE_SEND, false, &[1, 2]);
    let m = linux_tx_packet(&frame, &small);
    let (RndisMessage::Packet(p), _) = parse(&m).unwrap() else {
        panic!()
    };
    assert!(matches!(
        p.info(),
        Err(RndisError::PpiPayloadTooSmall {
            ty: 2,
            len: 2,
            needed: 4
        })
    ));
}

#[test]
fn batches_walk_by_msg_len() {
    let mut buf = linux_tx_packet(&[1; 20], &[]);
    buf.resize(buf.len().next_multiple_of(8), 0);
    let first = buf.len();
    // The padding belongs to the message: Linux adds it to msg_len.
    buf[4..8].copy_from_slice(&(first as u32).to_le_bytes());
    buf.extend_from_slice(&linux_tx_packet(&[2; 30], &[]));
    let msgs: Vec<_> = Messages::new(&buf).collect::<Result<_, _>>().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].len(), first);
    // A zero msg_len ends the walk with an error instead of looping.
    let mut bad = buf.clone();
    bad[first + 4..first + 8].copy_from_slice(&0u32.to_le_bytes());
    let r: Vec<_> = Messages::new(&bad).collect();
    assert_eq!(r.len(), 2);
    assert!(r[1].is_err());
}

#[test]
fn offload_params_validate() {
    // Linux 6.1 at NVSP 6.1: type 0x80, rev 3, size 28, IPv4 csum disabled, TCP4/6 both, LSO on.
    let mut p = OffloadParams {
        header: ObjectHeader {
            ty: 0x80,
            revision: 3,
            size: 28,
        },
        ip4_csum: 1,
        tcp4_csum: 4,
        tcp6_csum: 4,
        udp4_csum: 4,
        udp6_csum: 4,
        lsov2_ip4: 2,
        lsov2_ip6: 2,
        ..Default::default()
    };
    assert_eq!(parse_offload_params(p.as_bytes()).unwrap(), p);
    // NVSP <= 4: 22 bytes.
    p.header.size = 22;
    assert!(parse_offload_params(&p.as_bytes()[..22]).is_ok());
    p.header.size = 30;
    assert!(matches!(
        parse_offload_params(p.as_bytes()),
        Err(NdisError::BadHeader { .. })
    ));
    p.header.size = 28;
    p.lsov2_ip4 = 3;
    assert!(matches!(
        parse_offload_params(p.as_bytes()),
        Err(NdisError::BadValue {
            field: "lsov2_ip4",
            ..
        })
    ));
    p.lsov2_ip4 = 2;
    p.header.ty = 0xA7;
    assert!(parse_offload_params(p.as_bytes()).is_err());
    assert!(parse_offload_params(&[0x80, 3]).is_err());
}

fn linux_rss(flags: u16, entries: &[u32]) -> Vec<u8> {
    let p = RecvScaleParameters {
        header: ObjectHeader {
            ty: 0x89,
            revision: 2,
            size: 40,
        },
        flags,
        hash_info: hash_info::LINUX,
        indirection_table_size: (entries.len() * 4) as u16,
        indirection_table_offset: 40,
        hash_key_size: 40,
        hash_key_offset: 40 + (entries.len() * 4) as u32,
        ..Default::default()
    };
    let mut v = p.as_bytes().to_vec();
    for e in entries {
        v.extend_from_slice(&e.to_le_bytes());
    }
    v.extend_from_slice(&LINUX_RSS_KEY);
    v
}

#[test]
fn rss_params_validate() {
    let table: Vec<u32> = (0..128).map(|i| i % 4).collect();
    let b = linux_rss(0, &table);
    let r = parse_rss_params(&b).unwrap();
    assert!(!r.disable());
    assert_eq!(r.entries().collect::<Vec<_>>(), table);
    assert_eq!(r.key, Some(&LINUX_RSS_KEY[..]));
    assert!(
        parse_rss_params(&linux_rss(rss_flags::DISABLE_RSS, &table))
            .unwrap()
            .disable()
    );
    // table size not a multiple of 4, key size not 40, table outside, table overlapping header.
    let mut bad = b.clone();
    bad[12] = 6;
    assert!(parse_rss_params(&bad).is_err());
    let mut bad = b.clone();
    bad[20] = 16;
    assert!(parse_rss_params(&bad).is_err());
    let mut bad = b.clone();
    bad[16..20].copy_from_slice(&4000u32.to_le_bytes());
    assert!(parse_rss_params(&bad).is_err());
    let mut bad = b.clone();
    bad[16..20].copy_from_slice(&8u32.to_le_bytes());
    assert!(parse_rss_params(&bad).is_err());
    assert!(parse_rss_params(&b[..30]).is_err());
}

#[test]
fn config_parameter_network_address() {
    // Linux rndis_filter_set_device_mac: name at 20 (28 bytes), type 2, value at 48 (24 bytes).
    let mut v = ConfigParameterInfo {
        name_offset: 20,
        name_length: 28,
        param_type: CONFIG_PARAM_TYPE_STRING,
        value_offset: 48,
        value_length: 24,
    }
    .as_bytes()
    .to_vec();
    for c in "NetworkAddress".bytes().chain("00155d0a0b0c".bytes()) {
        v.extend_from_slice(&[c, 0]);
    }
    let c = parse_config_parameter(&v).unwrap();
    assert!(c.name_is("NetworkAddress"));
    assert!(c.name_is("networkaddress"));
    assert_eq!(c.mac_address(), Some([0x00, 0x15, 0x5d, 0x0a, 0x0b, 0x0c]));
    let mut bad = v.clone();
    bad[12..16].copy_from_slice(&60u32.to_le_bytes());
    assert!(parse_config_parameter(&bad).is_err());
    let mut bad = v.clone();
    bad[48] = b'x';
    assert_eq!(parse_config_parameter(&bad).unwrap().mac_address(), None);
}

proptest! {
    #[test]
    fn parse_is_total_and_slices_stay_inside(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        for m in Messages::new(&bytes) {
            let Ok(m) = m else { break };
            if let Ok((msg, len)) = parse(m) {
                prop_assert_eq!(len, m.len());
                if let RndisMessage::Packet(p) = msg {
                    prop_assert!(!p.data.is_empty());
                    let _ = p.info();
                    prop_assert!(p.ppis().count() <= p.ppi.len() / 12);
                }
            }
        }
        let _ = parse_offload_params(&bytes);
        if let Ok(r) = parse_rss_params(&bytes) {
            prop_assert!(r.entries().count() <= RSS_MAX_TABLE_ENTRIES);
        }
        if let Ok(c) = parse_config_parameter(&bytes) {
            let _ = c.mac_address();
        }
        prop_assert!(PpiIter::new(&bytes).count() <= bytes.len() / 12);
    }

    #[test]
    fn packets_built_here_parse_back(frame in proptest::collection::vec(any::<u8>(), 1..300),
                                     csum in any::<u32>(), vlan in any::<u16>(), hash in proptest::option::of(any::<u32>())) {
        let mut ppis = Vec::new();
        write(&mut ppis, ty::TCPIP_CHECKSUM, false, &csum.to_le_bytes());
        write(&mut ppis, ty::IEEE_8021Q, false, &Ieee8021qInfo::from_tci(vlan).0.to_le_bytes());
        if let Some(h) = hash {
            write(&mut ppis, ty::NBL_HASH_VALUE, false, &h.to_le_bytes());
        }
        let m = linux_tx_packet(&frame, &ppis);
        let (msg, len) = parse(&m).unwrap();
        prop_assert_eq!(len, m.len());
        let RndisMessage::Packet(p) = msg else { panic!() };
        prop_assert_eq!(p.data, &frame[..]);
        let info = p.info().unwrap();
        prop_assert_eq!(info.checksum, Some(csum));
        prop_assert_eq!(info.vlan.map(|v| v.tci()), Some(vlan));
        prop_assert_eq!(info.hash, hash);
    }

    #[test]
    fn corrupting_a_packet_never_yields_out_of_message_slices(frame in proptest::collection::vec(any::<u8>(), 1..100),
                                                               at in 0usize..80, v in any::<u32>()) {
        let mut ppis = Vec::new();
        write(&mut ppis, ty::TCPIP_CHECKSUM, false, &1u32.to_le_bytes());
        let mut m = linux_tx_packet(&frame, &ppis);
        let at = (at / 4) * 4;
        if at + 4 <= m.len() {
            m[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        if let Ok((RndisMessage::Packet(p), len)) = parse(&m) {
            let base = m.as_ptr() as usize;
            let d = p.data.as_ptr() as usize - base;
            prop_assert!(d >= 8 + 36 && d + p.data.len() <= len);
            let _ = p.info();
        }
    }
}

#[test]
fn ppi_iter_never_loops_on_zero_size() {
    let area = vec![0u8; 48];
    assert_eq!(PpiIter::new(&area).count(), 0);
    assert!(validate_chain(&area).is_err());
    assert!(validate_chain(&[]).is_ok());
}
