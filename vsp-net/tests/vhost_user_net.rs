//! vhost-user-net end to end: this test is the frontend (memfd guest RAM, split virtqueues written
//! by hand, kick/call eventfds) against the device served in-process on a Unix socket, attached
//! to a switch port or to a TAP in a network namespace.
#![allow(clippy::unwrap_used)]

mod common;
mod netns_util;

use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vsp_net::switch::{PortConfig, PortHandle, Switch};
use vsp_net::tap::FrameMeta;
use vsp_net::vhost_user::config::feat;
use vsp_net::vhost_user::ctrl;
use vsp_net::vhost_user::{NetDeviceConfig, SwitchPort};

const VMAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];
const PEER: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];

fn raw(dst: [u8; 6], src: [u8; 6], len: usize, tag: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

fn peer_recv(p: &mut PortHandle) -> Option<Vec<u8>> {
    if !p.wait(Some(T)) {
        return None;
    }
    p.recv().map(|f| f.data.to_vec())
}

/// A switch with the virtio NIC (served on a socket) and a test-owned NIC port.
fn switch_setup(pairs: u16, conns: usize) -> (Switch, Daemon, PortHandle) {
    let sw = Switch::default();
    let port = SwitchPort::new(&sw, "virtio", VMAC).unwrap();
    let cfg = NetDeviceConfig {
        mac: VMAC,
        pairs,
        mtu: Some(1500),
        ..NetDeviceConfig::default()
    };
    let d = Daemon::start(cfg, Box::new(port), conns);
    let peer = sw.add_port(PortConfig::nic("peer", PEER)).unwrap();
    (sw, d, peer)
}

#[test]
fn negotiation_and_config_are_byte_exact_and_reconnect_works() {
    let (_sw, d, mut peer) = switch_setup(2, 2);
    for round in 0..2u8 {
        let mut drv = NetDrv::start(
            &d.socket,
            DrvCfg {
                pairs: 2,
                ..DrvCfg::default()
            },
        );
        let offered = drv.fe.get_features().unwrap();
        assert_eq!(
            offered,
            (1 << 0)
                | (1 << 1)
                | (1 << 3)
                | (1 << 5)
                | (1 << 7)
                | (1 << 8)
                | (1 << 9)
                | (1 << 11)
                | (1 << 12)
                | (1 << 13)
                | (1 << 15)
                | (1 << 16)
                | (1 << 17)
                | (1 << 18)
                | (1 << 20)
                | (1 << 22)
                | (1 << 23)
                | (1 << 28)
                | (1 << 29)
                | (1 << 30)
                | (1 << 32),
            "offered {offered:#x}"
        );
        assert_eq!(
            drv.acked,
            DrvCfg::default().features | feat::PROTOCOL_FEATURES
        );
        assert_eq!(drv.fe.get_queue_num().unwrap(), 5);
        // mac, status = LINK_UP, max_virtqueue_pairs = 2, mtu = 1500.
        assert_eq!(
            drv.config(0, 12),
            [0x52, 0x54, 0, 0, 0, 1, 1, 0, 2, 0, 0xdc, 0x05]
        );
        assert_eq!(drv.config(6, 2), [1, 0]);
        // Past the fields this device fills: zeros (a frontend may read the whole struct).
        assert_eq!(drv.config(8, 8), [2, 0, 0xdc, 5, 0, 0, 0, 0]);
        // Frames flow on every connection.
        let f = raw(PEER, VMAC, 100, round);
        drv.send(0, &f);
        same(&peer_recv(&mut peer).unwrap(), &f);
        drop(drv);
    }
    d.join();
}

#[test]
fn early_set_vring_enable_like_qemu_7_2_is_tolerated() {
    use std::io::Write;
    let (_sw, d, mut peer) = switch_setup(1, 1);
    // QEMU 7.2 enables the first pair when the guest sets FEATURES_OK, before SET_FEATURES.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut msg = Vec::new();
    for w in [18u32, 1, 8, 0, 1] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&msg).unwrap();
    let fe = vhost::vhost_user::Frontend::from_stream(s, 3);
    let mut drv = NetDrv::with_frontend(fe, DrvCfg::default());
    let f = raw(PEER, VMAC, 128, 5);
    drv.send(0, &f);
    same(&peer_recv(&mut peer).unwrap(), &f);
    let back = raw(VMAC, PEER, 128, 6);
    peer.send(&back, &FrameMeta::default());
    same(&drv.recv(0, T).unwrap().frame, &back);
}

#[test]
fn switch_frames_both_ways_with_small_mergeable_buffers() {
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            rx_buf: 1024,
            ..DrvCfg::default()
        },
    );
    let out = raw(PEER, VMAC, 1514, 1);
    drv.send(0, &out);
    same(&peer_recv(&mut peer).unwrap(), &out);
    // 9000 bytes + 12-byte header over 1024-byte buffers: 9 buffers, num_buffers = 9.
    let big = raw(VMAC, PEER, 9000, 2);
    peer.send(&big, &FrameMeta::default());
    let r = drv.recv(0, T).unwrap();
    assert_eq!(r.bufs, 9);
    same(&r.frame, &big);
    assert_eq!(r.flags(), 0);
    // A small one right behind it uses one buffer.
    let small = raw(VMAC, PEER, 60, 3);
    peer.send(&small, &FrameMeta::default());
    let r = drv.recv(0, T).unwrap();
    assert_eq!((r.bufs, r.frame), (1, small));
    let s = d.stats.snapshot();
    assert_eq!((s.tx_frames, s.rx_frames, s.rx_dropped), (1, 2, 0));
    assert_eq!(s.rx_bytes, 9060);
}

#[test]
fn without_mrg_rxbuf_a_frame_needs_one_big_enough_buffer() {
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            features: DrvCfg::default().features & !feat::MRG_RXBUF,
            rx_buf: 1600,
            ..DrvCfg::default()
        },
    );
    let big = raw(VMAC, PEER, 3000, 1);
    peer.send(&big, &FrameMeta::default());
    let ok = raw(VMAC, PEER, 1514, 2);
    peer.send(&ok, &FrameMeta::default());
    let r = drv.recv(0, T).unwrap();
    assert_eq!(
        (r.bufs, r.frame),
        (1, ok),
        "oversized frame dropped, next delivered"
    );
    let s = d.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
}

#[test]
fn big_receive_buffers_without_mrg_rxbuf_take_a_64k_frame() {
    // Linux without MRG_RXBUF but with GUEST_TSO posts ~17-page chains ("big packets"), larger
    // than any frame: they must be accepted, and a super-frame from the switch fits in one.
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            features: (DrvCfg::default().features & !feat::MRG_RXBUF)
                | feat::GUEST_TSO4
                | feat::GUEST_TSO6,
            rx_buf: 17 * 4096,
            rx_count: 4,
            queue_size: 16,
            ..DrvCfg::default()
        },
    );
    let big = raw(VMAC, PEER, 60_000, 9);
    peer.send(&big, &FrameMeta::default());
    let r = drv.recv(0, T).unwrap();
    assert_eq!(r.bufs, 1);
    same(&r.frame, &big);
    let s = d.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_bad, s.rx_dropped), (1, 0, 0));
}

#[test]
fn switch_super_frames_are_segmented_for_a_driver_without_guest_tso() {
    use vsp_net::tap::offload::{complete_checksum, verify_checksums};
    use vsp_net::tap::{Checksum, Gso, GsoKind};
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());
    assert_eq!(drv.acked & feat::GUEST_TSO4, 0);
    let data: Vec<u8> = (0..5500u32).map(|i| (i % 241) as u8).collect();
    let f = netns::tcp4_virtio_gso(PEER, VMAC, [10, 0, 0, 1], [10, 0, 0, 2], 77, &data);
    let meta = FrameMeta {
        csum: Checksum::Partial {
            start: 34,
            offset: 16,
        },
        gso: Some(Gso {
            kind: GsoKind::TcpV4,
            mss: 1000,
            hdr_len: 54,
            ecn: false,
        }),
        vlan: None,
    };
    let rep = peer.send(&f, &meta);
    assert_eq!(rep.delivered, 1, "{rep:?}");
    let mut got = Vec::new();
    for i in 0..6 {
        let r = drv.recv(0, T).unwrap_or_else(|| panic!("segment {i}"));
        assert_eq!(r.gso_type(), 0, "no super-frame for this driver");
        assert!(r.frame.len() <= 1054);
        // GUEST_CSUM was acked: the checksum is left partial, at the TCP field.
        assert_eq!((r.flags(), r.u16_at(6), r.u16_at(8)), (1, 34, 16));
        let mut s = r.frame.clone();
        let mut m = FrameMeta {
            csum: Checksum::Partial {
                start: 34,
                offset: 16,
            },
            ..FrameMeta::default()
        };
        complete_checksum(&mut s, &mut m).unwrap();
        assert!(verify_checksums(&s).unwrap(), "segment {i}");
        got.extend_from_slice(&s[54..]);
    }
    assert_eq!(got, data);
    assert_eq!(d.stats.snapshot().rx_frames, 6);
}

#[test]
fn back_pressure_keeps_frames_until_buffers_come() {
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            rx_count: 0,
            ..DrvCfg::default()
        },
    );
    let frames: Vec<_> = (0..5).map(|i| raw(VMAC, PEER, 200 + i, i as u8)).collect();
    for f in &frames {
        peer.send(f, &FrameMeta::default());
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(drv.recv(0, Duration::from_millis(50)).is_none());
    let s = d.stats.snapshot();
    assert!(s.rx_stalls >= 1, "{s:?}");
    assert_eq!(s.rx_dropped, 0);
    drv.post_rx(0, 2);
    for f in &frames {
        let r = drv
            .recv(0, T)
            .expect("frame held while the guest had no buffers");
        same(&r.frame, f);
    }
    let s = d.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (5, 0));
}

#[test]
fn control_queue_mac_and_rx_mode_reach_the_switch_port() {
    let (sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x77];
    // Unknown unicast is flooded but the default filter keeps it out.
    peer.send(&raw(OTHER, PEER, 80, 1), &FrameMeta::default());
    assert!(drv.recv(0, Duration::from_millis(200)).is_none());
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[1]),
        ctrl::VIRTIO_NET_OK
    );
    peer.send(&raw(OTHER, PEER, 80, 2), &FrameMeta::default());
    assert_eq!(
        drv.recv(0, T).unwrap().frame[14],
        2,
        "promiscuous: flooded unicast arrives"
    );
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[0]),
        ctrl::VIRTIO_NET_OK
    );
    // NOBCAST: broadcasts stop.
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_NOBCAST, &[1]),
        ctrl::VIRTIO_NET_OK
    );
    peer.send(&raw([0xff; 6], PEER, 80, 3), &FrameMeta::default());
    assert!(drv.recv(0, Duration::from_millis(200)).is_none());
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_NOBCAST, &[0]),
        ctrl::VIRTIO_NET_OK
    );
    // MAC table (Linux turns all-multicast off first): a listed group comes through, another
    // one does not.
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_ALLMULTI, &[0]),
        ctrl::VIRTIO_NET_OK
    );
    let group = [0x01, 0x00, 0x5e, 0, 0, 0x42];
    let mut tbl = 0u32.to_le_bytes().to_vec();
    tbl.extend_from_slice(&1u32.to_le_bytes());
    tbl.extend_from_slice(&group);
    assert_eq!(
        drv.ctrl(ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET, &tbl),
        ctrl::VIRTIO_NET_OK
    );
    peer.send(
        &raw([0x01, 0, 0x5e, 0, 0, 0x43], PEER, 80, 4),
        &FrameMeta::default(),
    );
    peer.send(&raw(group, PEER, 80, 5), &FrameMeta::default());
    assert_eq!(drv.recv(0, T).unwrap().frame[..6], group);
    // MAC_ADDR_SET: the config space, the switch's spoofing check and unicast delivery follow.
    const NEW: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x99];
    assert_eq!(
        drv.ctrl(ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET, &NEW),
        ctrl::VIRTIO_NET_OK
    );
    assert_eq!(drv.config(0, 6), NEW);
    let from_new = raw(PEER, NEW, 90, 6);
    drv.send(0, &from_new);
    same(&peer_recv(&mut peer).unwrap(), &from_new);
    peer.send(&raw(NEW, PEER, 80, 7), &FrameMeta::default());
    assert_eq!(drv.recv(0, T).unwrap().frame[..6], NEW);
    assert!(
        sw.lookup(1, &NEW).is_some(),
        "the new MAC is pinned to the port"
    );
    // Refused: malformed, unsupported, out-of-range pairs.
    assert_eq!(
        drv.ctrl(ctrl::CLASS_RX, ctrl::RX_PROMISC, &[1, 1]),
        ctrl::VIRTIO_NET_ERR
    );
    assert_eq!(drv.ctrl(ctrl::CLASS_VLAN, 0, &[1, 0]), ctrl::VIRTIO_NET_ERR);
    assert_eq!(
        drv.ctrl(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &5u16.to_le_bytes()),
        ctrl::VIRTIO_NET_ERR
    );
    assert_eq!(
        drv.ctrl(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &1u16.to_le_bytes()),
        ctrl::VIRTIO_NET_OK
    );
    let s = d.stats.snapshot();
    assert_eq!((s.ctrl_ok, s.ctrl_err), (8, 3));
}

#[test]
fn two_queue_pairs_carry_traffic() {
    let (_sw, d, mut peer) = switch_setup(2, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            pairs: 2,
            ..DrvCfg::default()
        },
    );
    assert_eq!(
        drv.ctrl(ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
        ctrl::VIRTIO_NET_OK
    );
    for q in 0..2 {
        for i in 0..10u8 {
            let f = raw(PEER, VMAC, 64 + usize::from(i), i ^ (q as u8 * 16));
            drv.send(q, &f);
            same(&peer_recv(&mut peer).unwrap(), &f);
        }
    }
    // Frames for the guest land on whichever pair's worker read them: all arrive, once.
    let n = 40;
    for i in 0..n {
        peer.send(&raw(VMAC, PEER, 100, i as u8), &FrameMeta::default());
    }
    let mut seen = vec![false; n];
    let mut got = 0;
    let deadline = std::time::Instant::now() + T;
    while got < n && std::time::Instant::now() < deadline {
        for q in 0..2 {
            while let Some(r) = drv.recv(q, Duration::from_millis(10)) {
                let tag = usize::from(r.frame[14]);
                assert!(!seen[tag], "frame {tag} twice");
                seen[tag] = true;
                got += 1;
            }
        }
    }
    assert_eq!(got, n);
    assert_eq!(d.stats.snapshot().tx_frames, 20);
}

#[test]
fn hostile_chains_are_dropped_and_counted() {
    use virtio_driver::DESC_F_NEXT;
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());
    let buf = drv.ram.alloc(4096, 4096).unwrap();
    drv.ram.write(buf, &[0u8; 4096]).unwrap();
    let ram_end = drv.ram.size();
    let tx = &mut drv.tx[0];
    // 1. Header too short: 5 bytes.
    tx.add(&drv.ram, &[(buf, 5, false)]).unwrap();
    // 2. Device-writable TX descriptor.
    tx.add(&drv.ram, &[(buf, 100, true)]).unwrap();
    // 3. Buffer outside guest memory.
    tx.add(
        &drv.ram,
        &[(vm_memory::GuestAddress(ram_end - 16), 200, false)],
    )
    .unwrap();
    // 4. A loop: descriptor pointing at itself (over-long chain).
    let ids = tx.reserve(1).unwrap();
    tx.write_desc(&drv.ram, ids[0], buf.0, 64, DESC_F_NEXT, ids[0])
        .unwrap();
    tx.push_avail(&drv.ram, ids[0]).unwrap();
    // 5. A 64 KiB + 1 frame in two descriptors.
    let big = drv.ram.alloc(70 * 1024, 4096).unwrap();
    tx.add(
        &drv.ram,
        &[
            (big, 12, false),
            (vm_memory::GuestAddress(big.0 + 12), 65_535 + 19, false),
        ],
    )
    .unwrap();
    tx.kick().unwrap();
    let used = tx.wait_used(&drv.ram, 5, T).unwrap();
    assert!(used.iter().all(|&(_, len)| len == 0));
    let s = d.stats.snapshot();
    assert_eq!((s.tx_bad, s.tx_frames), (5, 0), "{s:?}");
    // The device still works.
    let f = raw(PEER, VMAC, 300, 9);
    drv.send(0, &f);
    same(&peer_recv(&mut peer).unwrap(), &f);
}

#[test]
fn hostile_rx_chain_is_returned_empty_and_the_frame_waits() {
    use virtio_driver::{DESC_F_NEXT, DESC_F_WRITE};
    let (_sw, d, mut peer) = switch_setup(1, 1);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            rx_count: 0,
            ..DrvCfg::default()
        },
    );
    let buf = drv.ram.alloc(8192, 4096).unwrap();
    // A device-readable descriptor in an RX chain, then one outside memory.
    let rxq = &mut drv.rx[0];
    let ids = rxq.reserve(2).unwrap();
    rxq.write_desc(&drv.ram, ids[0], buf.0, 64, DESC_F_NEXT, ids[1])
        .unwrap();
    rxq.write_desc(&drv.ram, ids[1], buf.0 + 64, 2048, DESC_F_WRITE, 0)
        .unwrap();
    rxq.push_avail(&drv.ram, ids[0]).unwrap();
    let far = drv.ram.size() + (1 << 30);
    let ids2 = rxq.reserve(1).unwrap();
    rxq.write_desc(&drv.ram, ids2[0], far, 2048, DESC_F_WRITE, 0)
        .unwrap();
    rxq.push_avail(&drv.ram, ids2[0]).unwrap();
    rxq.kick().unwrap();
    let f = raw(VMAC, PEER, 500, 1);
    peer.send(&f, &FrameMeta::default());
    let used = drv.rx[0].wait_used(&drv.ram, 2, T).unwrap();
    assert_eq!(used, vec![(ids[0], 0), (ids2[0], 0)]);
    let s = d.stats.snapshot();
    assert_eq!((s.rx_bad, s.rx_dropped, s.rx_frames), (2, 0, 0), "{s:?}");
    drv.post_rx(0, 4);
    assert_eq!(drv.recv(0, T).unwrap().frame, f);
}

#[path = "vhost_user_net/netns.rs"]
mod netns;
