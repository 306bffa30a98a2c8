use super::*;

const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// Ethernet + IPv4 (no options) + TCP (with 12 bytes of options) + payload, checksums complete.
fn tcp4(payload: &[u8], flags: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    let tot = (20 + 32 + payload.len()) as u16;
    f.extend_from_slice(&[
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    let tcp_start = f.len();
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]); // ports 12345 -> 80
    f.extend_from_slice(&0xfffff000u32.to_be_bytes()); // seq (wraps during segmentation)
    f.extend_from_slice(&7u32.to_be_bytes()); // ack
    f.extend_from_slice(&[0x80, flags, 0xff, 0xff, 0, 0, 0, 0]); // doff 8 words
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]); // NOP NOP timestamps
    assert_eq!(f.len() - tcp_start, 32);
    f.extend_from_slice(payload);
    let ipc = internet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&ipc.to_be_bytes());
    let h = parse(&f).unwrap();
    let c = !fold(ones_sum(
        &f[h.l4_off..],
        pseudo_sum(&f, &h, f.len() - h.l4_off),
    ));
    f[h.l4_off + 16..h.l4_off + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// Ethernet + 802.1Q + IPv6 + hop-by-hop (8 bytes) + UDP + payload, checksum complete.
fn udp6_tagged(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(
        &VlanTag {
            vid: 42,
            pcp: 5,
            dei: false,
        }
        .tci()
        .to_be_bytes(),
    );
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    let plen = (8 + 8 + payload.len()) as u16;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[0, 64]); // next = hop-by-hop
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // HBH: next UDP, len 0 (8 bytes), PadN
    let ulen = (8 + payload.len()) as u16;
    f.extend_from_slice(&[0x13, 0x88, 0x13, 0x89]);
    f.extend_from_slice(&ulen.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let h = parse(&f).unwrap();
    let c = !fold(ones_sum(
        &f[h.l4_off..],
        pseudo_sum(&f, &h, f.len() - h.l4_off),
    ));
    f[h.l4_off + 6..h.l4_off + 8].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn parses_headers() {
    let f = tcp4(b"hello", 0x18);
    let h = parse(&f).unwrap();
    assert_eq!(
        (h.l3_off, h.l3, h.l4_off, h.l4, h.l4_hdr_len),
        (14, Some(L3Proto::Ipv4), 34, Some(L4Proto::Tcp), 32)
    );
    assert_eq!(h.l3_end, Some(f.len()));
    assert!(verify_checksums(&f).unwrap());

    let u = udp6_tagged(b"world!");
    let h = parse(&u).unwrap();
    assert_eq!(
        (h.l3_off, h.l3, h.l4_off, h.l4),
        (18, Some(L3Proto::Ipv6), 18 + 48, Some(L4Proto::Udp))
    );
    assert!(verify_checksums(&u).unwrap());

    // Truncated headers are errors, not panics.
    for n in 0..f.len().min(66) {
        assert!(parse(&f[..n]).is_err(), "prefix {n}");
    }
    let mut arp = f.clone();
    arp[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    assert_eq!(parse(&arp).unwrap().l3, None);
}

#[test]
fn checksum_known_vector() {
    // RFC 1071 example bytes.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(ones_sum(&d, 0)), 0xddf2);
    assert_eq!(internet_checksum(&d), !0xddf2);
    // Odd length pads with zero.
    assert_eq!(fold(ones_sum(&[0xab], 0)), 0xab00);
}

#[test]
fn vlan_tag_encodings() {
    let t = VlanTag {
        vid: 0x123,
        pcp: 6,
        dei: true,
    };
    assert_eq!(t.tci(), 0xd123);
    assert_eq!(VlanTag::from_tci(0xd123), t);
    assert_eq!(t.to_ndis_ppi(), 6 | 8 | (0x123 << 4));
    assert_eq!(VlanTag::from_ndis_ppi(t.to_ndis_ppi()), t);
}

#[test]
fn ndis_checksum_request_completes_to_valid() {
    let good = tcp4(&[0x5a; 333], 0x18);
    let mut f = good.clone();
    // Guest left the IPv4 header checksum and the TCP checksum to the host (garbage in both).
    f[24..26].copy_from_slice(&[0xde, 0xad]);
    f[34 + 16..34 + 18].copy_from_slice(&[0xbe, 0xef]);
    let mut meta = FrameMeta {
        csum: Checksum::Offload {
            l3: L3Proto::Ipv4,
            l4: Some(L4Proto::Tcp),
            ip_header: true,
            l4_offset: 34,
        },
        ..FrameMeta::default()
    };
    let mut partial = f.clone();
    let mut pm = meta;
    let len = partial.len();
    finalize_tx(&mut partial, len, &mut pm).unwrap();
    assert_eq!(
        pm.csum,
        Checksum::Partial {
            start: 34,
            offset: 16
        }
    );
    complete_checksum(&mut f, &mut meta).unwrap();
    assert_eq!(meta.csum, Checksum::Valid);
    assert_eq!(f, good);

    // A wrong transport offset from the PPI is refused.
    let mut bad = FrameMeta {
        csum: Checksum::Offload {
            l3: L3Proto::Ipv4,
            l4: Some(L4Proto::Tcp),
            ip_header: false,
            l4_offset: 30,
        },
        ..FrameMeta::default()
    };
    let mut c = good.clone();
    assert_eq!(
        complete_checksum(&mut c, &mut bad),
        Err(OffloadError::L4OffsetMismatch {
            given: 30,
            parsed: 34
        })
    );
}

#[test]
fn udp_partial_checksum_with_vlan_and_padding() {
    let good = udp6_tagged(b"abc");
    let h = parse(&good).unwrap();
    let mut f = good.clone();
    // Replace the checksum by the folded pseudo-header sum (virtio NEEDS_CSUM form) and pad.
    let p = fold(pseudo_sum(&f, &h, f.len() - h.l4_off));
    f[h.l4_off + 6..h.l4_off + 8].copy_from_slice(&p.to_be_bytes());
    f.extend_from_slice(&[0xee; 7]);
    let mut meta = FrameMeta {
        csum: Checksum::Partial {
            start: h.l4_off as u16,
            offset: 6,
        },
        ..FrameMeta::default()
    };
    complete_checksum(&mut f, &mut meta).unwrap();
    assert_eq!(&f[..good.len()], &good[..]);
    // Offsets outside the frame are errors.
    let mut m = FrameMeta {
        csum: Checksum::Partial {
            start: 200,
            offset: 6,
        },
        ..FrameMeta::default()
    };
    assert!(matches!(
        complete_checksum(&mut f, &mut m),
        Err(OffloadError::BadCsumOffset { .. })
    ));
}

/// Reassembles the TCP payload of segments and checks every segment's headers and checksums.
fn check_segments(segs: &[Vec<u8>], orig: &[u8], mss: usize) -> Vec<u8> {
    let oh = parse(orig).unwrap();
    let mut data = Vec::new();
    let seq0 = u32::from_be_bytes(orig[oh.l4_off + 4..oh.l4_off + 8].try_into().unwrap());
    for (i, s) in segs.iter().enumerate() {
        assert!(verify_checksums(s).unwrap(), "segment {i} checksum");
        let h = parse(s).unwrap();
        assert_eq!(h.l3_end, Some(s.len()));
        let seq = u32::from_be_bytes(s[h.l4_off + 4..h.l4_off + 8].try_into().unwrap());
        assert_eq!(seq, seq0.wrapping_add((i * mss) as u32));
        let flags = s[h.l4_off + 13];
        if i + 1 < segs.len() {
            assert_eq!(flags & 0x09, 0, "FIN/PSH only on the last segment");
            assert!(s.len() - h.hdr_end() == mss);
        } else {
            assert_eq!(flags & 0x09, orig[oh.l4_off + 13] & 0x09);
        }
        if i > 0 {
            assert_eq!(flags & 0x80, 0, "CWR only on the first segment");
        }
        data.extend_from_slice(&s[h.hdr_end()..]);
    }
    data
}

#[test]
fn ndis_lso_v4_segments() {
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut f = tcp4(&payload, 0x80 | 0x18 | 0x01); // CWR PSH ACK FIN
    // NDIS LSOv2 form: IP total length and checksum 0, pseudo-header sum without length.
    f[16..18].copy_from_slice(&[0, 0]);
    f[24..26].copy_from_slice(&[0, 0]);
    let h = parse(&f).unwrap();
    let p = fold(pseudo_sum(&f, &h, 0));
    f[h.l4_off + 16..h.l4_off + 18].copy_from_slice(&p.to_be_bytes());
    let meta = FrameMeta {
        csum: Checksum::Offload {
            l3: L3Proto::Ipv4,
            l4: Some(L4Proto::Tcp),
            ip_header: true,
            l4_offset: 34,
        },
        gso: Some(Gso {
            kind: GsoKind::TcpV4,
            mss: 1448,
            hdr_len: 0,
            ecn: false,
        }),
        vlan: Some(VlanTag::new(9)),
    };
    let mut segs = Vec::new();
    let n = segment(&f, &meta, true, &mut |s, m| {
        assert_eq!(m.csum, Checksum::Valid);
        assert_eq!(m.gso, None);
        assert_eq!(m.vlan, Some(VlanTag::new(9)));
        segs.push(s.to_vec());
    })
    .unwrap();
    assert_eq!(n, 10_000usize.div_ceil(1448));
    assert_eq!(segs.len(), n);
    assert_eq!(check_segments(&segs, &f, 1448), payload);
    // IPv4 ids increase.
    let id1 = u16::from_be_bytes([segs[1][18], segs[1][19]]);
    assert_eq!(id1, 0x1235);

    // Partial output: the checksum field holds the pseudo-header sum; completing it gives the same.
    let mut partial = Vec::new();
    segment(&f, &meta, false, &mut |s, m| partial.push((s.to_vec(), *m))).unwrap();
    for ((mut s, mut m), full) in partial.into_iter().zip(&segs) {
        assert!(matches!(
            m.csum,
            Checksum::Partial {
                start: 34,
                offset: 16
            }
        ));
        complete_checksum(&mut s, &mut m).unwrap();
        assert_eq!(&s, full);
    }
}

#[test]
fn finalize_sets_lengths_for_virtio() {
    let payload = vec![1u8; 3000];
    let mut f = tcp4(&payload, 0x10);
    f[16..18].copy_from_slice(&[0, 0]);
    let mut meta = FrameMeta {
        gso: Some(Gso {
            kind: GsoKind::TcpV4,
            mss: 1000,
            hdr_len: 0,
            ecn: false,
        }),
        ..FrameMeta::default()
    };
    let len = f.len();
    finalize_tx(&mut f, len, &mut meta).unwrap();
    assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, len - 14);
    assert_eq!(internet_checksum(&f[14..34]), 0);
    assert_eq!(meta.gso.unwrap().hdr_len, 66);
    assert_eq!(
        meta.csum,
        Checksum::Partial {
            start: 34,
            offset: 16
        }
    );
    // Kind/header mismatch and MSS 0 are refused.
    for gso in [
        Gso {
            kind: GsoKind::TcpV6,
            mss: 1000,
            hdr_len: 0,
            ecn: false,
        },
        Gso {
            kind: GsoKind::UdpL4,
            mss: 1000,
            hdr_len: 0,
            ecn: false,
        },
        Gso {
            kind: GsoKind::TcpV4,
            mss: 0,
            hdr_len: 0,
            ecn: false,
        },
    ] {
        let mut m = FrameMeta {
            gso: Some(gso),
            ..FrameMeta::default()
        };
        assert!(
            matches!(
                finalize_tx(&mut f, len, &mut m),
                Err(OffloadError::BadGso(_))
            ),
            "{gso:?}"
        );
    }
}

#[test]
fn uso_segments_udp6() {
    let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
    let f = udp6_tagged(&payload);
    let meta = FrameMeta {
        gso: Some(Gso {
            kind: GsoKind::UdpL4,
            mss: 1000,
            hdr_len: 0,
            ecn: false,
        }),
        ..FrameMeta::default()
    };
    let mut segs = Vec::new();
    segment(&f, &meta, true, &mut |s, _| segs.push(s.to_vec())).unwrap();
    assert_eq!(segs.len(), 3);
    let mut data = Vec::new();
    for s in &segs {
        assert!(verify_checksums(s).unwrap());
        let h = parse(s).unwrap();
        assert_eq!(
            u16::from_be_bytes([s[h.l4_off + 4], s[h.l4_off + 5]]) as usize,
            s.len() - h.l4_off
        );
        data.extend_from_slice(&s[h.hdr_end()..]);
    }
    assert_eq!(data, payload);
}

#[test]
fn vlan_strip_and_insert() {
    let tagged = udp6_tagged(b"x");
    let mut meta = FrameMeta {
        csum: Checksum::Partial {
            start: 66,
            offset: 6,
        },
        ..FrameMeta::default()
    };
    let untagged = strip_vlan(&tagged, &mut meta).unwrap();
    assert_eq!(
        meta.vlan,
        Some(VlanTag {
            vid: 42,
            pcp: 5,
            dei: false
        })
    );
    assert_eq!(
        meta.csum,
        Checksum::Partial {
            start: 62,
            offset: 6
        }
    );
    assert_eq!(untagged.len(), tagged.len() - 4);
    assert_eq!(strip_vlan(&untagged, &mut meta.clone()), None);
    let back = insert_vlan(&untagged, &mut meta).unwrap();
    assert_eq!(back, tagged);
    assert_eq!(meta.vlan, None);
    assert_eq!(
        meta.csum,
        Checksum::Partial {
            start: 66,
            offset: 6
        }
    );
}

#[test]
fn hostile_frames_do_not_panic() {
    let base = tcp4(&[7; 100], 0x18);
    let metas = [
        FrameMeta {
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                mss: 1,
                hdr_len: 0,
                ecn: false,
            }),
            ..FrameMeta::default()
        },
        FrameMeta {
            csum: Checksum::Offload {
                l3: L3Proto::Ipv4,
                l4: Some(L4Proto::Udp),
                ip_header: true,
                l4_offset: 34,
            },
            ..FrameMeta::default()
        },
        FrameMeta {
            csum: Checksum::Partial {
                start: u16::MAX,
                offset: u16::MAX,
            },
            ..FrameMeta::default()
        },
    ];
    // Flip every byte of the headers to a few values and try every offload on every length.
    for pos in 0..70 {
        for v in [0u8, 0x0f, 0x45, 0xff] {
            let mut f = base.clone();
            f[pos] = v;
            for cut in [f.len(), 60, 40, 20] {
                let frame = &f[..cut];
                for m in &metas {
                    let _ = segment(frame, m, true, &mut |_, _| {});
                    let mut c = frame.to_vec();
                    let mut mm = *m;
                    let _ = complete_checksum(&mut c, &mut mm);
                    let _ = verify_checksums(frame);
                    let _ = strip_vlan(frame, &mut mm);
                }
            }
        }
    }
}
