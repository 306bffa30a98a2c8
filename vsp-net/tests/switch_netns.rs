//! The virtual switch with real kernels on its ports: two network namespaces, each with a TAP
//! attached to the switch as an uplink, exchange TCP traffic (the kernels' TSO super-frames cross
//! the switch with their offload metadata, or are segmented by it); a guest NIC port driven
//! through the `NetBackend` trait pings a namespace. Needs root and /dev/net/tun; skips otherwise.
#![allow(clippy::unwrap_used)]

mod netns_util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use netns_util::*;
use vsp_net::backend::{NetBackend, RxMeta, TxMeta};
use vsp_net::switch::uplink::{TapUplink, UplinkOptions, UplinkStats};
use vsp_net::switch::{PortConfig, Switch, filter};
use vsp_net::tap::offload::{ETH_P_IPV4, internet_checksum, verify_checksums};
use vsp_net::tap::{Tap, TapConfig, TapStats};

const T: Duration = Duration::from_secs(20);

struct Side {
    ns: NetNs,
    uplink: TapUplink,
}

fn side(sw: &Switch, tag: &str, ip_cidr: &str, opts: UplinkOptions) -> Side {
    let ns = NetNs::new(tag).unwrap();
    let name = unique("vs");
    let tap = Tap::open(&TapConfig {
        netns: Some(ns.path()),
        up: true,
        ..TapConfig::named(&name)
    })
    .unwrap();
    ns.ip(&["addr", "add", ip_cidr, "dev", &name]);
    let port = sw.add_port(PortConfig::uplink(&name)).unwrap();
    let uplink = TapUplink::spawn(tap, port, opts).unwrap();
    Side { ns, uplink }
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Sends `len` bytes from a's namespace to b's over TCP and checks every byte.
fn tcp_transfer(a: &NetNs, b: &NetNs, server: &str, len: usize) {
    let listener = b.run(|| TcpListener::bind(server).unwrap());
    let addr: SocketAddr = server.parse().unwrap();
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(T)).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut at = 0usize;
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                for (k, &byte) in buf[..n].iter().enumerate() {
                    assert_eq!(byte, pattern(at + k), "byte {}", at + k);
                }
                at += n;
            }
            at
        });
        let mut c = a.run(|| TcpStream::connect_timeout(&addr, T).unwrap());
        c.set_write_timeout(Some(T)).unwrap();
        let chunk: Vec<u8> = (0..len).map(pattern).collect();
        for part in chunk.chunks(1 << 20) {
            c.write_all(part).unwrap();
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(rx.join().unwrap(), len);
    });
}

fn stop(s: Side) -> (TapStats, UplinkStats, NetNs) {
    let (tap, _port, st) = s.uplink.stop().unwrap();
    (tap.stats(), st, s.ns)
}

#[test]
fn tcp_super_frames_cross_the_switch() {
    require_netns!();
    let sw = Switch::default();
    let a = side(&sw, "swa", "10.78.0.1/24", UplinkOptions::default());
    let b = side(&sw, "swb", "10.78.0.2/24", UplinkOptions::default());
    // A guest NIC on the same switch sees the ARP broadcasts but none of the TCP unicast.
    let mut nic = sw
        .add_port(PortConfig::nic("guest", [2, 0, 0, 0, 0x78, 9]))
        .unwrap();

    tcp_transfer(&a.ns, &b.ns, "10.78.0.2:7000", 16 << 20);

    let (ta, ua, _nsa) = stop(a);
    let (tb, ub, _nsb) = stop(b);
    eprintln!("a: {ta:?} {ua:?}\nb: {tb:?} {ub:?}");
    assert!(
        ta.rx_gso > 0,
        "the sender's kernel handed over TSO super-frames"
    );
    assert_eq!(ta.rx_errors + tb.rx_errors + ta.tx_errors + tb.tx_errors, 0);
    assert_eq!(ua.tap_errors + ub.tap_errors, 0);
    // Each frame from a reached b unchanged in number (super-frames passed whole).
    assert!(tb.tx_packets >= ta.rx_gso);
    let mut unicast = 0;
    NetBackend::poll_recv(&mut nic, usize::MAX, &mut |f, _| {
        unicast += usize::from(f[0] & 1 == 0)
    })
    .unwrap();
    assert_eq!(unicast, 0);
    assert_eq!(
        sw.fdb_entries().len(),
        1,
        "uplink entries flushed when their ports went away"
    );
}

#[test]
fn tcp_through_software_segmentation() {
    require_netns!();
    let sw = Switch::default();
    // b's uplink gets no super-frames and no pending checksums: the switch port does the work.
    let seg = UplinkOptions {
        segment_gso: true,
        complete_csum: true,
        ..UplinkOptions::default()
    };
    let a = side(&sw, "sga", "10.78.1.1/24", UplinkOptions::default());
    let b = side(&sw, "sgb", "10.78.1.2/24", seg);
    tcp_transfer(&a.ns, &b.ns, "10.78.1.2:7001", 8 << 20);
    let (ta, _, _nsa) = stop(a);
    let (tb, ub, _nsb) = stop(b);
    eprintln!("a: {ta:?}\nb: {tb:?} {ub:?}");
    assert!(ta.rx_gso > 0);
    assert!(
        tb.tx_packets > ta.rx_packets,
        "super-frames from a were cut into more frames for b ({} > {})",
        tb.tx_packets,
        ta.rx_packets
    );
    assert_eq!(ub.tap_errors, 0);
}

#[test]
fn guest_port_pings_a_namespace_through_the_switch() {
    require_netns!();
    let sw = Switch::default();
    let a = side(&sw, "swp", "10.78.2.1/24", UplinkOptions::default());
    let g = Guest {
        mac: [0x02, 0x47, 0x55, 0x45, 0x53, 0x54],
        ip: [10, 78, 2, 9],
    };
    let mut cfg = PortConfig::nic("guest", g.mac);
    cfg.packet_filter = filter::DIRECTED | filter::BROADCAST;
    let mut nic = sw.add_port(cfg).unwrap();
    assert_eq!(NetBackend::mac(&nic), g.mac);
    assert!(NetBackend::link_up(&nic));

    let recv = |nic: &mut vsp_net::switch::PortHandle,
                want: &dyn Fn(&[u8]) -> bool|
     -> (Vec<u8>, RxMeta) {
        let deadline = std::time::Instant::now() + T;
        loop {
            assert!(std::time::Instant::now() < deadline, "timed out");
            nic.wait(Some(Duration::from_millis(100)));
            let mut got = None;
            let mut arp_replies = Vec::new();
            NetBackend::poll_recv(nic, 64, &mut |f, m| {
                if let Some(r) = g.arp_reply(f) {
                    arp_replies.push(r);
                } else if got.is_none() && want(f) {
                    got = Some((f.to_vec(), *m));
                }
            })
            .unwrap();
            for r in arp_replies {
                NetBackend::send(nic, &r, &TxMeta::default()).unwrap();
            }
            if let Some(x) = got {
                return x;
            }
        }
    };

    NetBackend::send(
        &mut nic,
        &arp(1, g.mac, g.ip, [0; 6], [10, 78, 2, 1]),
        &TxMeta::default(),
    )
    .unwrap();
    let (r, _) = recv(&mut nic, &|f| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2]
    });
    let mut host_mac = [0; 6];
    host_mac.copy_from_slice(&r[22..28]);
    let data = [0xabu8; 1000];
    for seq in 0..3 {
        let req = icmp_echo(g.mac, host_mac, g.ip, [10, 78, 2, 1], 7, seq, &data);
        NetBackend::send(&mut nic, &req, &TxMeta::default()).unwrap();
        let (r, _) = recv(&mut nic, &|f| {
            f.len() > 42 && f[12..14] == ETH_P_IPV4.to_be_bytes() && f[23] == 1 && f[34] == 0
        });
        assert!(verify_checksums(&r).unwrap());
        assert_eq!(internet_checksum(&r[34..]), 0);
        assert_eq!(u16::from_be_bytes([r[40], r[41]]), seq);
        assert_eq!(&r[42..], &data);
    }
    // Kernel → guest UDP (partial checksum on the TAP) arrives completed and marked verified.
    let sock =
        a.ns.run(|| std::net::UdpSocket::bind("10.78.2.1:0").unwrap());
    sock.send_to(b"hello guest", "10.78.2.9:9999").unwrap();
    let (f, m) = recv(&mut nic, &|f| {
        f.len() > 42 && f[23] == 17 && f[36..38] == 9999u16.to_be_bytes()
    });
    assert!(m.csum.udp_ok && m.csum.ip_ok);
    assert!(verify_checksums(&f).unwrap());
    assert_eq!(&f[42..], b"hello guest");
    let st = nic.stats();
    assert!(st.tx_packets >= 4 && st.rx_packets >= 5, "{st:?}");
    drop(a);
}
