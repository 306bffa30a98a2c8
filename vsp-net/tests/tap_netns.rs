//! TAP backend against the real kernel stack. Each test creates its own network namespace (named
//! after the pid, deleted on drop even when the test fails), opens the TAP inside it and talks to
//! the namespace's kernel with hand-built frames. Needs root and /dev/net/tun; skips otherwise.
#![allow(clippy::unwrap_used)]

mod netns_util;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netns_util::*;
use vsp_net::backend::{NetBackend, RxMeta, TxChecksum, TxMeta};
use vsp_net::tap::offload::{self, ETH_P_ARP, ETH_P_IPV4, internet_checksum, verify_checksums};
use vsp_net::tap::{Checksum, FrameMeta, GsoKind, Tap, TapBackend, TapConfig};

const G_MAC: Mac = [0x02, 0x56, 0x53, 0x50, 0x00, 0x02];
const T: Duration = Duration::from_secs(5);

fn open_in(ns: &NetNs, cfg: TapConfig) -> (Tap, String) {
    let name = unique("vt");
    let tap = Tap::open(&TapConfig {
        name: name.clone(),
        netns: Some(ns.path()),
        up: true,
        ..cfg
    })
    .unwrap();
    assert_eq!(tap.name(), name);
    (tap, name)
}

fn is_arp_reply(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == ETH_P_ARP.to_be_bytes() && f[20..22] == [0, 2]
}

fn is_udp_to(f: &[u8], port: u16) -> bool {
    f.len() >= 42
        && f[12..14] == ETH_P_IPV4.to_be_bytes()
        && f[23] == 17
        && f[36..38] == port.to_be_bytes()
}

#[test]
fn arp_and_icmp_echo_through_tap() {
    require_netns!();
    for vnet_hdr_len in [12, 10] {
        arp_and_icmp(vnet_hdr_len);
    }
}

fn arp_and_icmp(vnet_hdr_len: usize) {
    let ns = NetNs::new("icmp").unwrap();
    let (mut tap, name) = open_in(
        &ns,
        TapConfig {
            vnet_hdr_len,
            ..TapConfig::default()
        },
    );
    assert_eq!(tap.vnet_hdr_len(), vnet_hdr_len);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", &name]);
    assert!(
        tap.link_up().unwrap(),
        "up + carrier while the fd is attached"
    );
    let host_mac = tap.mac().unwrap();
    let g = Guest {
        mac: G_MAC,
        ip: [10, 77, 0, 2],
    };

    tap.send(
        &arp(1, g.mac, g.ip, [0; 6], [10, 77, 0, 1]),
        &FrameMeta::default(),
    )
    .unwrap();
    let (reply, _) = g.wait_for(&mut tap, T, |f, _| is_arp_reply(f));
    assert_eq!(&reply[0..6], &g.mac, "reply addressed to the guest");
    assert_eq!(&reply[22..28], &host_mac, "sender = the TAP interface");
    assert_eq!(&reply[28..32], &[10, 77, 0, 1]);
    assert_eq!(&reply[38..42], &g.ip);

    let data = b"vsp-net TAP echo payload 0123456789";
    for seq in 1..=3u16 {
        let req = icmp_echo(g.mac, host_mac, g.ip, [10, 77, 0, 1], 0x4242, seq, data);
        tap.send(&req, &FrameMeta::default()).unwrap();
        let (r, _) = g.wait_for(&mut tap, T, |f, _| {
            f.len() >= 42 && f[12..14] == ETH_P_IPV4.to_be_bytes() && f[23] == 1 && f[34] == 0
        });
        assert!(verify_checksums(&r).unwrap(), "IPv4 header checksum");
        assert_eq!(internet_checksum(&r[34..]), 0, "ICMP checksum");
        assert_eq!(&r[26..30], &[10, 77, 0, 1]);
        assert_eq!(&r[30..34], &g.ip);
        assert_eq!(u16::from_be_bytes([r[38], r[39]]), 0x4242);
        assert_eq!(u16::from_be_bytes([r[40], r[41]]), seq);
        assert_eq!(&r[42..], data);
    }
    let st = tap.stats();
    assert_eq!(st.tx_packets, 4);
    assert!(st.rx_packets >= 4);
    assert_eq!((st.tx_errors, st.rx_errors), (0, 0));
}

#[test]
fn udp_checksum_offload_is_completed() {
    require_netns!();
    let ns = NetNs::new("csum").unwrap();
    let (mut tap, name) = open_in(&ns, TapConfig::default());
    ns.ip(&["addr", "add", "10.77.1.1/24", "dev", &name]);
    let host_mac = tap.mac().unwrap();
    let sock = ns.run(|| UdpSocket::bind("10.77.1.1:5555").unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let src = ([10, 77, 1, 2], 4444);
    let dst = ([10, 77, 1, 1], 5555);

    // 1. virtio form: pseudo-header sum in the field, NEEDS_CSUM.
    let mut f = udp4(G_MAC, host_mac, src, dst, b"partial-csum", true, Some(0));
    let p = udp4_pseudo(&f);
    f[40..42].copy_from_slice(&p.to_be_bytes());
    let meta = FrameMeta {
        csum: Checksum::Partial {
            start: 34,
            offset: 6,
        },
        ..FrameMeta::default()
    };
    tap.send(&f, &meta).unwrap();
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"partial-csum");
    assert_eq!(from.to_string(), "10.77.1.2:4444");

    // 2. Control: a wrong checksum without offload is dropped and counted by the kernel.
    let before = ns.snmp("Udp", "InCsumErrors");
    let bad = udp4(G_MAC, host_mac, src, dst, b"bad-csum", true, Some(0xdead));
    tap.send(&bad, &FrameMeta::default()).unwrap();
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "a frame with a bad checksum must not arrive"
    );
    assert_eq!(ns.snmp("Udp", "InCsumErrors"), before + 1);

    // 3. NDIS form through the NetBackend trait: IP and UDP checksums both left to the host.
    let mut be = TapBackend::new(tap, G_MAC);
    let f = udp4(
        G_MAC,
        host_mac,
        src,
        dst,
        b"ndis-offload",
        false,
        Some(0xbeef),
    );
    let tx = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            udp: true,
            ip_header: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        ..TxMeta::default()
    };
    be.send(&f, &tx).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ndis-offload");
    // A transport offset that does not match the headers is refused before reaching the kernel.
    let wrong = TxMeta {
        csum: Some(TxChecksum {
            transport_offset: 30,
            ..tx.csum.unwrap()
        }),
        ..tx
    };
    assert!(be.send(&f, &wrong).is_err());
    assert_eq!(
        ns.snmp("Udp", "InCsumErrors"),
        before + 1,
        "nothing else failed in the kernel"
    );
}

#[test]
fn kernel_frames_carry_offload_metadata() {
    require_netns!();
    let ns = NetNs::new("rxmeta").unwrap();
    let (mut tap, name) = open_in(&ns, TapConfig::default());
    ns.ip(&["addr", "add", "10.77.2.1/24", "dev", &name]);
    let g = G_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip(&[
        "neigh",
        "add",
        "10.77.2.2",
        "lladdr",
        &g,
        "dev",
        &name,
        "nud",
        "permanent",
    ]);
    let guest = Guest {
        mac: G_MAC,
        ip: [10, 77, 2, 2],
    };
    let sock = ns.run(|| UdpSocket::bind("10.77.2.1:0").unwrap());

    // With TUN_F_CSUM the kernel leaves the UDP checksum to us.
    sock.send_to(b"to the guest", "10.77.2.2:4444").unwrap();
    let (mut f, mut m) = guest.wait_for(&mut tap, T, |f, _| is_udp_to(f, 4444));
    assert_eq!(
        m.csum,
        Checksum::Partial {
            start: 34,
            offset: 6
        }
    );
    assert_eq!(m.gso, None);
    offload::complete_checksum(&mut f, &mut m).unwrap();
    assert!(verify_checksums(&f).unwrap());
    assert_eq!(&f[42..], b"to the guest");

    // USO (Linux ≥ 6.2): one UDP_SEGMENT send arrives as one super-frame.
    if tap.offloads().uso {
        let seg: libc::c_int = 1000;
        // SAFETY: valid socket fd; the option value is a c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                std::ptr::from_ref(&seg).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        sock.send_to(&data, "10.77.2.2:4445").unwrap();
        let (f, m) = guest.wait_for(&mut tap, T, |f, _| is_udp_to(f, 4445));
        let gso = m.gso.expect("a USO super-frame");
        assert_eq!((gso.kind, gso.mss), (GsoKind::UdpL4, 1000));
        let mut got = Vec::new();
        let n = offload::segment(&f, &m, true, &mut |s, sm| {
            assert_eq!(sm.csum, Checksum::Valid);
            assert!(verify_checksums(s).unwrap());
            got.extend_from_slice(&s[42..]);
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(got, data);
        assert!(tap.stats().rx_gso >= 1);
    } else {
        eprintln!("kernel refused USO; super-frame part skipped");
    }
}

fn link_becomes(tap: &Tap, up: bool) -> bool {
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if tap.link_up().unwrap() == up {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn link_state_mac_mtu_and_namespace_moves() {
    require_netns!();
    let ns1 = NetNs::new("link1").unwrap();
    let ns2 = NetNs::new("link2").unwrap();
    let (mut tap, name) = open_in(&ns1, TapConfig::default());
    assert!(tap.link_up().unwrap());
    // IFF_RUNNING follows the operational state, which the kernel's link watcher updates with
    // up to ~1 s delay after a carrier change.
    tap.set_carrier(false).unwrap();
    assert!(link_becomes(&tap, false), "carrier off clears IFF_RUNNING");
    tap.set_carrier(true).unwrap();
    assert!(link_becomes(&tap, true));
    tap.set_up(false).unwrap();
    assert!(!tap.link_up().unwrap());
    tap.set_up(true).unwrap();
    assert!(link_becomes(&tap, true));

    let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    tap.set_mac(mac).unwrap();
    assert_eq!(tap.mac().unwrap(), mac);
    tap.set_mtu(9000).unwrap();
    assert_eq!(tap.mtu().unwrap(), 9000);
    assert!(tap.ifindex().unwrap() > 0);

    // Move the interface to another namespace and rename it: the TAP follows.
    ns1.ip(&["link", "set", &name, "netns", &ns2.name]);
    assert_eq!(
        tap.mac().unwrap(),
        mac,
        "queries re-resolve through TUNGETDEVNETNS"
    );
    assert!(!tap.link_up().unwrap(), "a moved interface is down");
    let new = unique("vr");
    ns2.ip(&["link", "set", &name, "name", &new]);
    tap.set_up(true).unwrap();
    assert_eq!(tap.name(), new);
    assert!(link_becomes(&tap, true));

    // Frames still flow in the new namespace.
    ns2.ip(&["addr", "add", "10.77.3.1/24", "dev", &new]);
    let g = Guest {
        mac: G_MAC,
        ip: [10, 77, 3, 2],
    };
    tap.send(
        &arp(1, g.mac, g.ip, [0; 6], [10, 77, 3, 1]),
        &FrameMeta::default(),
    )
    .unwrap();
    let (r, _) = g.wait_for(&mut tap, T, |f, _| is_arp_reply(f));
    assert_eq!(&r[22..28], &mac);
}

#[test]
fn tap_backend_vlan_and_checksums_through_the_trait() {
    require_netns!();
    let ns = NetNs::new("trait").unwrap();
    let name = unique("vt");
    let cfg = TapConfig {
        netns: Some(ns.path()),
        ..TapBackend::recommended_config(&name)
    };
    let mut be = TapBackend::open(&cfg, G_MAC).unwrap();
    assert_eq!(be.mac(), G_MAC);
    assert!(be.link_up());
    assert!(be.caps().tx_csum && be.caps().tx_gso && be.caps().tx_vlan);
    assert_eq!(be.rx_fd(), Some(be.tap().as_raw_fd()));
    let host_mac = be.tap().mac().unwrap();
    ns.ip(&["addr", "add", "10.77.5.1/24", "dev", &name]);
    let gip = [10, 77, 5, 2];

    // ARP through the trait.
    be.send(
        &arp(1, G_MAC, gip, [0; 6], [10, 77, 5, 1]),
        &TxMeta::default(),
    )
    .unwrap();
    let (f, m) = recv_until(&mut be, |f, _| is_arp_reply(f));
    assert_eq!((&f[22..28], m.vlan_tci), (&host_mac[..], None));

    // NDIS checksum offload (IP header + UDP) into a socket.
    let sock = ns.run(|| UdpSocket::bind("10.77.5.1:6000").unwrap());
    sock.set_read_timeout(Some(T)).unwrap();
    let f = udp4(
        G_MAC,
        host_mac,
        (gip, 6001),
        ([10, 77, 5, 1], 6000),
        b"trait+csum",
        false,
        Some(0x1234),
    );
    let csum = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            udp: true,
            ip_header: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        ..TxMeta::default()
    };
    be.send(&f, &csum).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from.to_string().as_str()),
        (&b"trait+csum"[..], "10.77.5.2:6001")
    );

    // Kernel → guest: partial checksum completed in place and reported as verified.
    sock.send_to(b"reply", "10.77.5.2:6001").unwrap();
    let (f, m) = recv_until(&mut be, |f, _| is_udp_to(f, 6001));
    assert!(m.csum.udp_ok && m.csum.ip_ok && !m.csum.tcp_ok);
    assert!(verify_checksums(&f).unwrap());
    assert_eq!(&f[42..], b"reply");

    // VLAN, seen by the kernel through a packet socket (works without the 8021q module): the tag
    // from the metadata is inserted in-band, the checksum offsets shifted by 4.
    let ifindex = be.tap().ifindex().unwrap();
    let ps = ns.run(|| PacketSock::bind(ifindex));
    let tci = (3 << 13) | 5;
    let f = udp4(
        G_MAC,
        host_mac,
        (gip, 6001),
        ([10, 77, 5, 1], 6002),
        b"tagged",
        false,
        Some(0x4321),
    );
    be.send(
        &f,
        &TxMeta {
            vlan_tci: Some(tci),
            ..csum
        },
    )
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    let (mut seen, aux) = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "tagged frame never reached the kernel"
        );
        if let Some((d, aux)) = ps.recv()
            && is_udp_to(&d, 6002)
        {
            break (d, aux);
        }
    };
    assert_ne!(
        aux.tp_status & TP_STATUS_VLAN_VALID,
        0,
        "kernel saw a VLAN tag"
    );
    assert_eq!(aux.tp_vlan_tci, tci);
    assert_eq!(&seen[42..], b"tagged");
    if aux.tp_status & TP_STATUS_CSUMNOTREADY != 0 {
        // Still CHECKSUM_PARTIAL in the kernel: complete it at the (untagged) offsets.
        let mut m = FrameMeta {
            csum: Checksum::Partial {
                start: 34,
                offset: 6,
            },
            ..FrameMeta::default()
        };
        offload::complete_checksum(&mut seen, &mut m).unwrap();
    }
    assert!(
        verify_checksums(&seen).unwrap(),
        "IP header and UDP checksums"
    );

    // A tagged frame from the kernel side arrives untagged with the tag out of band.
    let mut t = udp4(
        host_mac,
        G_MAC,
        ([10, 77, 5, 1], 7000),
        (gip, 7001),
        b"from vlan 9",
        true,
        None,
    );
    t.splice(12..12, [0x81, 0x00, 0x00, 0x09]);
    ps.send(&t);
    let (f, m) = recv_until(&mut be, |f, _| is_udp_to(f, 7001));
    assert_eq!(m.vlan_tci, Some(9));
    assert_eq!(&f[12..14], &ETH_P_IPV4.to_be_bytes());
    assert!(verify_checksums(&f).unwrap());
    assert_eq!(be.rx_dropped(), 0);
}

/// The kernel forwards our frames from one TAP to another that has no offloads, so it must
/// itself compute the checksums at the `csum_start`/`csum_offset` we gave it, and segment our
/// LSO super-frame with the header fix-ups we made. The frames read from the second TAP prove
/// both (a wrong offset would produce a bad checksum there). A priority tag (VLAN 0) is inserted
/// on the way in to exercise the offset shift; the kernel routes priority-tagged frames.
#[test]
fn forwarded_offloads_are_finished_by_the_kernel() {
    require_netns!();
    let ns = NetNs::new("fwd").unwrap();
    sysctl(&ns, "net/ipv4/ip_forward", "1");
    let a_name = unique("va");
    let mut be = TapBackend::open(
        &TapConfig {
            netns: Some(ns.path()),
            ..TapBackend::recommended_config(&a_name)
        },
        G_MAC,
    )
    .unwrap();
    let (mut out, b_name) = open_in(
        &ns,
        TapConfig {
            offloads: vsp_net::tap::TapOffloads::none(),
            ..TapConfig::default()
        },
    );
    const PEER: Mac = [0x02, 0x50, 0x45, 0x45, 0x52, 0x01];
    ns.ip(&["addr", "add", "10.77.6.1/24", "dev", &a_name]);
    ns.ip(&["addr", "add", "10.77.7.1/24", "dev", &b_name]);
    ns.ip(&[
        "neigh",
        "add",
        "10.77.7.2",
        "lladdr",
        "02:50:45:45:52:01",
        "dev",
        &b_name,
        "nud",
        "permanent",
    ]);
    let a_mac = be.tap().mac().unwrap();
    let b_mac = out.mac().unwrap();
    let prio = Some(5 << 13);
    let (src, dst) = ([10, 77, 6, 2], [10, 77, 7, 2]);
    let next_out = |out: &mut Tap, want: &dyn Fn(&[u8]) -> bool| -> Vec<u8> {
        let deadline = std::time::Instant::now() + T;
        loop {
            assert!(std::time::Instant::now() < deadline, "nothing forwarded");
            out.wait_readable(Some(Duration::from_millis(100))).unwrap();
            while let Some((f, m)) = out.recv().unwrap() {
                assert_eq!(
                    (m.csum, m.gso),
                    (Checksum::None, None),
                    "no offloads on this TAP"
                );
                if want(f) {
                    return f.to_vec();
                }
            }
        }
    };

    // UDP, NDIS form: IP header and UDP checksums left to the host.
    let f = udp4(
        G_MAC,
        a_mac,
        (src, 5000),
        (dst, 5001),
        b"forward me",
        false,
        Some(0xffff),
    );
    let tx = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            udp: true,
            ip_header: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        vlan_tci: prio,
        ..TxMeta::default()
    };
    be.send(&f, &tx).unwrap();
    let r = next_out(&mut out, &|f| is_udp_to(f, 5001));
    assert_eq!((&r[0..6], &r[6..12]), (&PEER[..], &b_mac[..]));
    assert_eq!(r[22], 63, "routed: TTL decremented");
    assert!(
        verify_checksums(&r).unwrap(),
        "kernel completed the UDP checksum at our offsets"
    );
    assert_eq!(&r[42..], b"forward me");

    // UDP, virtio form (partial checksum) straight through the TAP, priority-tagged as well.
    let mut f = udp4(
        G_MAC,
        a_mac,
        (src, 5000),
        (dst, 5002),
        b"partial",
        true,
        Some(0),
    );
    let p = udp4_pseudo(&f);
    f[40..42].copy_from_slice(&p.to_be_bytes());
    let meta = FrameMeta {
        csum: Checksum::Partial {
            start: 34,
            offset: 6,
        },
        vlan: Some(vsp_net::tap::VlanTag {
            vid: 0,
            pcp: 5,
            dei: false,
        }),
        ..FrameMeta::default()
    };
    be.tap_mut().send(&f, &meta).unwrap();
    let r = next_out(&mut out, &|f| is_udp_to(f, 5002));
    assert!(verify_checksums(&r).unwrap());

    // TCP LSOv2 (NDIS form): the kernel segments for the offload-less TAP.
    let data: Vec<u8> = (0..8000u32).map(|i| (i * 13 % 256) as u8).collect();
    let f = tcp4_lso(G_MAC, a_mac, (src, 40000), (dst, 80), 0xfffff000, &data);
    let tx = TxMeta {
        gso: Some(vsp_net::backend::TxGso {
            mss: 1400,
            tcp_offset: 34,
            ipv6: false,
        }),
        vlan_tci: prio,
        ..TxMeta::default()
    };
    be.send(&f, &tx).unwrap();
    let mut got = Vec::new();
    let mut seq = 0xfffff000u32;
    for i in 0..data.len().div_ceil(1400) {
        let s = next_out(&mut out, &|f| {
            f.len() > 54 && f[23] == 6 && f[36..38] == [0, 80]
        });
        assert!(verify_checksums(&s).unwrap(), "segment {i}");
        assert_eq!(u32::from_be_bytes([s[38], s[39], s[40], s[41]]), seq);
        assert_eq!(
            usize::from(u16::from_be_bytes([s[16], s[17]])),
            s.len() - 14
        );
        seq = seq.wrapping_add((s.len() - 54) as u32);
        got.extend_from_slice(&s[54..]);
    }
    assert_eq!(got, data);
    assert_eq!(be.tap().stats().tx_errors, 0);
}

/// Polls the backend (answering the kernel's ARP requests for the guest) until `want` matches.
fn recv_until(
    be: &mut TapBackend,
    mut want: impl FnMut(&[u8], &RxMeta) -> bool,
) -> (Vec<u8>, RxMeta) {
    let g = Guest {
        mac: G_MAC,
        ip: [10, 77, 5, 2],
    };
    let deadline = std::time::Instant::now() + T;
    loop {
        assert!(std::time::Instant::now() < deadline, "timed out");
        be.tap()
            .wait_readable(Some(Duration::from_millis(100)))
            .unwrap();
        let mut got = None;
        let mut replies = Vec::new();
        be.poll_recv(16, &mut |f, m| {
            if let Some(r) = g.arp_reply(f) {
                replies.push((r, m.vlan_tci));
            } else if got.is_none() && want(f, m) {
                got = Some((f.to_vec(), *m));
            }
        })
        .unwrap();
        for (r, tci) in replies {
            be.send(
                &r,
                &TxMeta {
                    vlan_tci: tci,
                    ..TxMeta::default()
                },
            )
            .unwrap();
        }
        if let Some(x) = got {
            return x;
        }
    }
}
