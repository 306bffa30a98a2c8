use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::{NetBackend, TxGso, TxMeta};
use crate::tap::offload::{self, ETH_P_IPV4, VlanTag};

const A: MacAddr = [0x02, 0, 0, 0, 0, 0xa];
const B: MacAddr = [0x02, 0, 0, 0, 0, 0xb];
const C: MacAddr = [0x02, 0, 0, 0, 0, 0xc];
const X: MacAddr = [0x02, 0, 0, 0, 0, 0x58];
const Y: MacAddr = [0x02, 0, 0, 0, 0, 0x59];
const MCAST: MacAddr = [0x01, 0x00, 0x5e, 0, 0, 0xfb];

fn eth(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len.max(14));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f.resize(len.max(14), 0x5a);
    f
}

fn tagged(dst: MacAddr, src: MacAddr, tci: u16) -> Vec<u8> {
    let mut f = eth(dst, src, 64);
    f.splice(12..12, [0x81, 0x00, (tci >> 8) as u8, tci as u8]);
    f
}

fn none() -> FrameMeta {
    FrameMeta::default()
}

/// Drains a port: (destination MACs, metadata) of queued frames.
fn drain(p: &mut PortHandle) -> Vec<(MacAddr, FrameMeta)> {
    let mut v = Vec::new();
    while let Some(f) = p.recv() {
        let mut d = [0; 6];
        d.copy_from_slice(&f.data[..6]);
        v.push((d, f.meta));
    }
    v
}

fn manual_switch(aging: Duration) -> (Switch, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    let cfg = SwitchConfig {
        aging,
        ..SwitchConfig::default()
    };
    (Switch::with_clock(cfg, clock.clone()), clock)
}

#[test]
fn learning_and_unicast_forwarding() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw.add_port(PortConfig::nic("b", B)).unwrap();
    let mut up = sw.add_port(PortConfig::uplink("up")).unwrap();

    // Unknown X: flooded; only the uplink (no filter) takes it, b filters it.
    let r = a.send(&eth(X, A, 60), &none());
    assert!(r.flooded);
    assert_eq!((r.delivered, r.dropped), (1, 1));
    assert_eq!(drain(&mut up).len(), 1);
    assert_eq!(b.stats().dropped(DropReason::Filtered), 1);

    // X answers from behind the uplink: learned there, delivered to a (pinned NIC MAC).
    let r = up.send(&eth(A, X, 60), &none());
    assert!(!r.flooded);
    assert_eq!(r.delivered, 1);
    assert_eq!(drain(&mut a).len(), 1);
    assert_eq!(sw.lookup(1, &X), Some(up.id()));

    // Now a → X is unicast to the uplink only.
    let r = a.send(&eth(X, A, 60), &none());
    assert!(!r.flooded);
    assert_eq!(drain(&mut up).len(), 1);
    assert!(drain(&mut b).is_empty());

    // NIC to NIC through the pinned entries, before b ever sent anything.
    let r = a.send(&eth(B, A, 60), &none());
    assert_eq!((r.flooded, r.delivered), (false, 1));
    assert_eq!(drain(&mut b).len(), 1);

    let entries = sw.fdb_entries();
    assert!(
        entries
            .iter()
            .any(|e| e.mac == A && e.is_static && e.port == a.id())
    );
    assert!(
        entries
            .iter()
            .any(|e| e.mac == X && !e.is_static && e.port == up.id())
    );
}

#[test]
fn broadcast_and_multicast_flooding_with_filters() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw.add_port(PortConfig::nic("b", B)).unwrap(); // directed|all-multi|broadcast
    let mut c = sw.add_port(PortConfig::nic("c", C)).unwrap();
    let mut up = sw.add_port(PortConfig::uplink("up")).unwrap();
    c.set_packet_filter(filter::DIRECTED | filter::BROADCAST);

    let r = a.send(&eth(BROADCAST, A, 60), &none());
    assert_eq!((r.flooded, r.delivered, r.dropped), (true, 3, 0));
    assert_eq!(
        (
            drain(&mut b).len(),
            drain(&mut c).len(),
            drain(&mut up).len()
        ),
        (1, 1, 1)
    );
    assert!(drain(&mut a).is_empty(), "never back to the sender");

    // Multicast: b (all-multicast) and the uplink; c filters it.
    let r = a.send(&eth(MCAST, A, 60), &none());
    assert_eq!((r.delivered, r.dropped), (2, 1));
    assert_eq!(c.stats().dropped(DropReason::Filtered), 1);
    drain(&mut b);
    drain(&mut up);

    // Multicast list: c takes only listed groups.
    c.set_packet_filter(filter::DIRECTED | filter::MULTICAST);
    c.set_multicast_list(&[MCAST]).unwrap();
    a.send(&eth(MCAST, A, 60), &none());
    a.send(&eth([0x01, 0, 0x5e, 0, 0, 1], A, 60), &none());
    assert_eq!(drain(&mut c), vec![(MCAST, none())]);
    assert!(c.set_multicast_list(&[MCAST; 33]).is_err());

    // Filter 0: nothing at all, not even directed frames.
    c.set_packet_filter(0);
    a.send(&eth(C, A, 60), &none());
    a.send(&eth(BROADCAST, A, 60), &none());
    assert!(drain(&mut c).is_empty());

    // Promiscuous: also unknown unicast for somebody else.
    c.set_packet_filter(filter::PROMISCUOUS);
    b.send(&eth(Y, B, 60), &none());
    assert_eq!(drain(&mut c), vec![(Y, none())]);
}

#[test]
fn ingress_checks() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut up = sw.add_port(PortConfig::uplink("up")).unwrap();
    let cases = [
        (eth(BROADCAST, B, 60), DropReason::Spoofed),
        (eth(BROADCAST, MCAST, 60), DropReason::InvalidSource),
        (eth(BROADCAST, [0; 6], 60), DropReason::InvalidSource),
        (vec![0xff; 13], DropReason::Runt),
        (eth(BROADCAST, A, 70_000), DropReason::Oversize),
    ];
    for (f, why) in &cases {
        assert_eq!(a.send(f, &none()).ingress_drop, Some(*why), "{why:?}");
    }
    assert_eq!(a.stats().total_drops(), cases.len() as u64);
    assert_eq!(a.stats().tx_packets, 0);
    assert!(drain(&mut up).is_empty());

    // Hairpin: X and Y both behind the uplink.
    up.send(&eth(BROADCAST, X, 60), &none());
    assert_eq!(
        up.send(&eth(X, Y, 60), &none()).ingress_drop,
        Some(DropReason::Hairpin)
    );

    // Spoofing allowed on request; disabled ports neither send nor receive.
    let mut cfg = PortConfig::nic("s", C);
    cfg.allow_mac_spoofing = true;
    let mut s = sw.add_port(cfg).unwrap();
    assert_eq!(s.send(&eth(BROADCAST, Y, 60), &none()).ingress_drop, None);
    s.set_enabled(false);
    assert_eq!(
        s.send(&eth(BROADCAST, C, 60), &none()).ingress_drop,
        Some(DropReason::PortDisabled)
    );
    a.send(&eth(BROADCAST, A, 60), &none());
    assert_eq!(s.stats().dropped(DropReason::PortDisabled), 2);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn counters_count_packets_and_bytes() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw.add_port(PortConfig::nic("b", B)).unwrap();
    for len in [60, 100, 1514] {
        a.send(&eth(B, A, len), &none());
    }
    b.send(&eth(A, B, 200), &none());
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(
        (sa.tx_packets, sa.tx_bytes, sa.rx_packets, sa.rx_bytes),
        (3, 1674, 1, 200)
    );
    assert_eq!(
        (sb.tx_packets, sb.tx_bytes, sb.rx_packets, sb.rx_bytes),
        (1, 200, 3, 1674)
    );
    assert_eq!(sw.port_stats(a.id()), Some(sa));
    assert_eq!(b.queued(), (3, 1674));
    drain(&mut b);
    assert_eq!(b.queued(), (0, 0));
}

#[test]
fn bounded_queues_drop_and_count() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw
        .add_port(PortConfig::nic("b", B).with_queue(4, 1 << 20))
        .unwrap();
    let mut full = 0;
    for _ in 0..10 {
        full += a.send(&eth(B, A, 100), &none()).queue_full;
    }
    assert_eq!(full, 6);
    assert_eq!(b.stats().dropped(DropReason::QueueFull), 6);
    assert_eq!(b.stats().rx_packets, 4);
    assert_eq!(drain(&mut b).len(), 4);

    // Byte bound: 1000-byte budget takes two 400-byte frames, not a third.
    let mut c = sw
        .add_port(PortConfig::nic("c", C).with_queue(100, 1000))
        .unwrap();
    let r: Vec<_> = (0..3)
        .map(|_| a.send(&eth(C, A, 400), &none()).queue_full)
        .collect();
    assert_eq!(r, vec![0, 0, 1]);
    assert_eq!(c.queued(), (2, 800));
    drain(&mut c);
    // An empty queue always takes one frame even above the byte budget (no livelock).
    assert_eq!(a.send(&eth(C, A, 1400), &none()).delivered, 1);

    // The trait reports a full unicast destination as WouldBlock.
    let mut d = sw
        .add_port(PortConfig::nic("d", [2, 0, 0, 0, 0, 0xd]).with_queue(1, 1 << 20))
        .unwrap();
    let tx = TxMeta::default();
    NetBackend::send(&mut a, &eth(d_mac(), A, 60), &tx).unwrap();
    assert!(matches!(
        NetBackend::send(&mut a, &eth(d_mac(), A, 60), &tx),
        Err(crate::backend::NetError::WouldBlock)
    ));
    assert_eq!(drain(&mut d).len(), 1);
}

fn d_mac() -> MacAddr {
    [2, 0, 0, 0, 0, 0xd]
}

#[test]
fn aging_and_moves() {
    let (sw, clock) = manual_switch(Duration::from_secs(10));
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut up1 = sw.add_port(PortConfig::uplink("up1")).unwrap();
    let mut up2 = sw.add_port(PortConfig::uplink("up2")).unwrap();
    up1.send(&eth(BROADCAST, X, 60), &none());
    assert_eq!(sw.lookup(1, &X), Some(up1.id()));

    clock.advance(Duration::from_secs(9));
    assert!(!a.send(&eth(X, A, 60), &none()).flooded);
    // Traffic from X refreshes it.
    up1.send(&eth(A, X, 60), &none());
    clock.advance(Duration::from_secs(9));
    assert_eq!(sw.lookup(1, &X), Some(up1.id()));
    clock.advance(Duration::from_secs(2));
    assert_eq!(sw.lookup(1, &X), None, "expired after 11 s of silence");
    assert!(a.send(&eth(X, A, 60), &none()).flooded);
    assert!(sw.fdb_entries().iter().all(|e| e.mac != X));
    // Sweeping removes it; the pinned NIC entry never ages.
    // (forwarding already swept it in passing: aging/4 had elapsed)
    sw.age();
    assert_eq!(sw.stats().aged_out, 1);
    assert_eq!(sw.lookup(1, &A), Some(a.id()));

    // Moves.
    up1.send(&eth(BROADCAST, Y, 60), &none());
    up2.send(&eth(BROADCAST, Y, 60), &none());
    assert_eq!(sw.lookup(1, &Y), Some(up2.id()));
    assert_eq!(sw.stats().mac_moves, 1);
    // A NIC's pinned MAC does not move when it shows up behind an uplink.
    up1.send(&eth(BROADCAST, A, 60), &none());
    assert_eq!(sw.lookup(1, &A), Some(a.id()));
    assert_eq!(sw.stats().mac_conflicts, 1);
    drain(&mut up1);
    drain(&mut up2);
}

#[test]
fn table_limit_and_port_removal() {
    let sw = Switch::new(SwitchConfig {
        max_fdb_entries: 3,
        ..SwitchConfig::default()
    });
    let _a = sw.add_port(PortConfig::nic("a", A)).unwrap(); // 1 static entry
    let mut up = sw.add_port(PortConfig::uplink("up")).unwrap();
    for i in 0..5u8 {
        up.send(&eth(BROADCAST, [2, 0, 0, 0, 1, i], 60), &none());
    }
    assert_eq!(sw.fdb_entries().len(), 3);
    assert_eq!(sw.stats().fdb_full, 3);
    let up_id = up.id();
    drop(up);
    assert!(sw.fdb_entries().iter().all(|e| e.port != up_id));
    assert_eq!(sw.ports().len(), 1);
    // Duplicate NIC MAC on the same VLAN is refused; on another VLAN it is fine.
    assert!(matches!(
        sw.add_port(PortConfig::nic("dup", A)),
        Err(SwitchError::DuplicateMac { .. })
    ));
    assert!(
        sw.add_port(PortConfig::nic("dup", A).with_vlan(VlanMode::Access(5)))
            .is_ok()
    );
    assert!(matches!(
        sw.add_port(PortConfig::nic("bad", B).with_vlan(VlanMode::Access(4095))),
        Err(SwitchError::BadVlan(_))
    ));
}

#[test]
fn vlans_access_and_trunk() {
    let sw = Switch::default();
    let mut a10 = sw
        .add_port(PortConfig::nic("a10", A).with_vlan(VlanMode::Access(10)))
        .unwrap();
    let mut b20 = sw
        .add_port(PortConfig::nic("b20", B).with_vlan(VlanMode::Access(20)))
        .unwrap();
    let mut c10 = sw
        .add_port(PortConfig::nic("c10", C).with_vlan(VlanMode::Access(10)))
        .unwrap();
    let trunk_mode = VlanMode::Trunk {
        native: Some(30),
        allowed: [10, 20].into_iter().collect(),
    };
    let mut tr = sw
        .add_port(PortConfig::uplink("trunk").with_vlan(trunk_mode))
        .unwrap();

    // Broadcast on VLAN 10 reaches c10 untagged and the trunk tagged 10; never b20.
    a10.send(&eth(BROADCAST, A, 60), &none());
    assert_eq!(drain(&mut c10), vec![(BROADCAST, none())]);
    assert!(drain(&mut b20).is_empty());
    let t = drain(&mut tr);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].1.vlan, Some(VlanTag::new(10)));

    // Trunk → access: in-band tag 20 with priority 5 goes to b20 untagged, data without the tag.
    let r = tr.send(&tagged(B, X, (5 << 13) | 20), &none());
    assert_eq!(r.delivered, 1);
    let f = b20.recv().unwrap();
    assert_eq!(f.meta.vlan, None);
    assert_eq!(f.data.len(), 64);
    assert_eq!(&f.data[12..14], &[0x88, 0xb5]);
    // Out-of-band tag works the same; X is learned per VLAN.
    let meta10 = FrameMeta {
        vlan: Some(VlanTag::new(10)),
        ..none()
    };
    tr.send(&eth(A, Y, 60), &meta10);
    assert_eq!(drain(&mut a10).len(), 1);
    assert_eq!(sw.lookup(20, &X), Some(tr.id()));
    assert_eq!(sw.lookup(10, &X), None);

    // Access → trunk keeps the priority of a priority-tagged frame.
    a10.send(&tagged(X, A, 6 << 13), &none());
    let t = drain(&mut tr);
    assert_eq!(
        t.len(),
        1,
        "X unknown on VLAN 10: flooded to the trunk only"
    );
    assert_eq!(
        t[0].1.vlan,
        Some(VlanTag {
            vid: 10,
            pcp: 6,
            dei: false
        })
    );
    drain(&mut c10);

    // Untagged on the trunk = native VLAN 30 (no member besides the trunk); a VLAN the trunk does
    // not carry, or a foreign tag on an access port, is dropped.
    assert_eq!(tr.send(&eth(BROADCAST, X, 60), &none()).delivered, 0);
    assert_eq!(
        tr.send(&tagged(BROADCAST, X, 99), &none()).ingress_drop,
        Some(DropReason::VlanIngress)
    );
    assert_eq!(
        a10.send(&tagged(BROADCAST, A, 20), &none()).ingress_drop,
        Some(DropReason::VlanIngress)
    );
    // Frames for the native VLAN leave the trunk untagged.
    let mut n30 = sw
        .add_port(PortConfig::nic("n30", Y).with_vlan(VlanMode::Access(30)))
        .unwrap();
    n30.send(&eth(BROADCAST, Y, 60), &none());
    assert_eq!(drain(&mut tr)[0].1.vlan, None);

    // Changing a port's VLAN at run time.
    b20.set_vlan(VlanMode::Access(10)).unwrap();
    a10.send(&eth(BROADCAST, A, 60), &none());
    assert_eq!(drain(&mut b20).len(), 1);
    let _ = (drain(&mut c10), drain(&mut tr));
    assert!(b20.set_vlan(VlanMode::Access(0)).is_err());
}

/// Ethernet/IPv4/TCP frame with `payload` bytes, in the NDIS LSOv2 form.
fn lso_frame(payload: usize) -> Vec<u8> {
    let mut f = eth(B, A, 14);
    f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    f.extend_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f.extend_from_slice(&[
        0x04, 0x00, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

#[test]
fn offloads_cross_the_switch() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw.add_port(PortConfig::nic("b", B)).unwrap();
    let f = lso_frame(5000);
    let tx = TxMeta {
        gso: Some(TxGso {
            mss: 1460,
            tcp_offset: 34,
            ipv6: false,
        }),
        ..TxMeta::default()
    };
    NetBackend::send(&mut a, &f, &tx).unwrap();
    // Queued as a normalised super-frame...
    let (frames, _) = b.queued();
    assert_eq!(frames, 1);
    // ...and delivered to the guest as checksummed segments.
    let mut segs = Vec::new();
    let n = NetBackend::poll_recv(&mut b, 8, &mut |s, m| {
        assert!(m.csum.tcp_ok && m.csum.ip_ok);
        assert!(offload::verify_checksums(s).unwrap());
        segs.push(s.len());
    })
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(segs, vec![54 + 1460, 54 + 1460, 54 + 1460, 54 + 620]);

    // A wrong TCP offset in the PPI is refused on ingress.
    let bad = TxMeta {
        gso: Some(TxGso {
            mss: 1460,
            tcp_offset: 30,
            ipv6: false,
        }),
        ..TxMeta::default()
    };
    assert!(NetBackend::send(&mut a, &f, &bad).is_err());
    assert_eq!(a.stats().dropped(DropReason::BadOffload), 1);
    assert_eq!(NetBackend::mac(&a), A);
    assert!(NetBackend::link_up(&a));
}

#[test]
fn notification_fd_follows_the_queue() {
    let sw = Switch::default();
    let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
    let mut b = sw.add_port(PortConfig::nic("b", B)).unwrap();
    let readable = |p: &PortHandle| {
        crate::tap::sys::poll_readable([p.notify_fd()], Some(Duration::ZERO)).unwrap()[0]
    };
    assert!(!readable(&b));
    assert!(!b.wait(Some(Duration::from_millis(10))));
    a.send(&eth(B, A, 60), &none());
    a.send(&eth(B, A, 60), &none());
    assert!(readable(&b));
    // Budget 1 leaves a frame: the fd stays readable.
    assert_eq!(b.poll_recv(1, &mut |_, _| {}), 1);
    assert!(readable(&b));
    assert_eq!(b.poll_recv(8, &mut |_, _| {}), 1);
    assert!(!readable(&b));
    // A waiting thread wakes up when a frame arrives.
    std::thread::scope(|s| {
        let h = s.spawn(|| b.wait(Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(50));
        a.send(&eth(B, A, 60), &none());
        assert!(h.join().unwrap());
    });
}

#[test]
fn ports_forward_concurrently() {
    const PORTS: usize = 4;
    const FRAMES: usize = 20_000;
    let sw = Switch::default();
    let macs: Vec<MacAddr> = (0..PORTS).map(|i| [2, 0, 0, 0, 9, i as u8]).collect();
    let ports: Vec<PortHandle> = macs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            sw.add_port(PortConfig::nic(&format!("p{i}"), *m).with_queue(256, 1 << 20))
                .unwrap()
        })
        .collect();
    let barrier = std::sync::Barrier::new(PORTS);
    let barrier = &barrier;
    let results: Vec<(u64, u64, PortStats)> = std::thread::scope(|s| {
        let hs: Vec<_> = ports
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                let macs = macs.clone();
                s.spawn(move || {
                    let (mut sent_ok, mut got) = (0u64, 0u64);
                    for n in 0..FRAMES {
                        let dst = macs[(i + 1 + n % (PORTS - 1)) % PORTS];
                        let r = p.send(&eth(dst, macs[i], 64), &none());
                        sent_ok += u64::from(r.delivered);
                        got += p.poll_recv(64, &mut |f, _| assert_eq!(&f[..6], &macs[i])) as u64;
                    }
                    // Once everybody has finished sending, drain what is left.
                    barrier.wait();
                    got += p.poll_recv(usize::MAX, &mut |_, _| {}) as u64;
                    (sent_ok, got, p.stats())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let delivered: u64 = results.iter().map(|r| r.0).sum();
    let received: u64 = results.iter().map(|r| r.1).sum();
    let full: u64 = results
        .iter()
        .map(|r| r.2.dropped(DropReason::QueueFull))
        .sum();
    assert_eq!(
        delivered, received,
        "every queued frame is received exactly once"
    );
    assert_eq!(
        delivered + full,
        (PORTS * FRAMES) as u64,
        "every frame is delivered or counted"
    );
    assert_eq!(sw.stats().flooded, 0);
}

mod hostile {
    use proptest::prelude::*;

    use super::*;
    use crate::tap::offload::{Checksum, Gso, GsoKind, L3Proto, L4Proto};

    fn meta() -> impl Strategy<Value = FrameMeta> {
        let csum = prop_oneof![
            Just(Checksum::None),
            Just(Checksum::Valid),
            (any::<u16>(), any::<u16>())
                .prop_map(|(start, offset)| Checksum::Partial { start, offset }),
            (any::<bool>(), any::<bool>(), 0u16..80).prop_map(|(v6, udp, l4_offset)| {
                Checksum::Offload {
                    l3: if v6 { L3Proto::Ipv6 } else { L3Proto::Ipv4 },
                    l4: Some(if udp { L4Proto::Udp } else { L4Proto::Tcp }),
                    ip_header: !v6,
                    l4_offset,
                }
            }),
        ];
        let gso = prop::option::of((0u8..3, any::<u16>(), 0u16..300).prop_map(
            |(k, mss, hdr_len)| Gso {
                kind: [GsoKind::TcpV4, GsoKind::TcpV6, GsoKind::UdpL4][usize::from(k)],
                mss,
                hdr_len,
                ecn: false,
            },
        ));
        let vlan = prop::option::of(any::<u16>().prop_map(VlanTag::from_tci));
        (csum, gso, vlan).prop_map(|(csum, gso, vlan)| FrameMeta { csum, gso, vlan })
    }

    /// Frames that mostly look like Ethernet/IPv4|IPv6/TCP|UDP, with random bytes mixed in.
    fn frame() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(vec![0x0800u16, 0x86dd, 0x8100, 0x0806]),
            prop::sample::select(vec![6u8, 17, 0, 44]),
            prop::collection::vec(any::<u8>(), 0..1600),
            any::<u8>(),
        )
            .prop_map(|(et, proto, mut body, vihl)| {
                let mut f = eth(BROADCAST, A, 14);
                f[12..14].copy_from_slice(&et.to_be_bytes());
                if body.len() > 40 {
                    body[0] = if et == 0x86dd {
                        0x60
                    } else {
                        0x40 | (vihl & 0x0f)
                    };
                    body[if et == 0x86dd { 6 } else { 9 }] = proto;
                }
                f.extend_from_slice(&body);
                f
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Whatever a guest sends, the switch neither panics nor loses count, and a consumer that
        /// segments and completes checksums gets only frames it can parse.
        #[test]
        fn hostile_frames_and_metadata(frames in prop::collection::vec((frame(), meta()), 1..8)) {
            let sw = Switch::default();
            let mut a = sw.add_port(PortConfig::nic("a", A)).unwrap();
            let mut b = sw.add_port(PortConfig::nic("b", B).with_vlan(VlanMode::trunk(1..=4094))).unwrap();
            let mut up = sw.add_port(PortConfig::uplink("up")).unwrap();
            let mut accepted = 0;
            for (f, m) in &frames {
                let r = a.send(f, m);
                if r.ingress_drop.is_none() {
                    accepted += 1;
                }
            }
            let st = a.stats();
            prop_assert_eq!(st.tx_packets, accepted);
            prop_assert_eq!(st.tx_packets + st.total_drops(), frames.len() as u64);
            up.poll_recv_with(usize::MAX, true, true, &mut |f, m| {
                assert!(f.len() >= 14);
                assert!(m.gso.is_none());
            });
            let _ = NetBackend::poll_recv(&mut b, usize::MAX, &mut |f, _| assert!(f.len() >= 14));
        }
    }
}
