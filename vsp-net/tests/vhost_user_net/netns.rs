//! The virtio NIC on a TAP in a network namespace, against the namespace's kernel: ARP, ICMP
//! echo, checksum offload both ways and a 64 KiB TSO frame the kernel segments into a TCP stream.

use std::net::UdpSocket;

use super::common::*;
use super::netns_util::{self, *};
use crate::require_netns;
use vsp_net::tap::offload::{self, ETH_P_ARP, ETH_P_IPV4, internet_checksum, verify_checksums};
use vsp_net::tap::{Checksum, FrameMeta, Tap, TapConfig, TapOffloads};
use vsp_net::vhost_user::config::feat;
use vsp_net::vhost_user::{NetDeviceConfig, TapPort};

const GMAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The daemon on a new TAP `name` in `ns`; returns it with the TAP's (host-side) MAC.
fn tap_daemon(ns: &NetNs, conns: usize) -> (Daemon, String, [u8; 6]) {
    let name = unique("vu");
    let tap = Tap::open(&TapConfig {
        name: name.clone(),
        netns: Some(ns.path()),
        up: true,
        ..TapConfig::default()
    })
    .unwrap();
    let host_mac = tap.mac().unwrap();
    let cfg = NetDeviceConfig {
        mac: GMAC,
        ..NetDeviceConfig::default()
    };
    (
        Daemon::start(cfg, Box::new(TapPort(tap)), conns),
        name,
        host_mac,
    )
}

fn is_udp_to(f: &[u8], port: u16) -> bool {
    f.len() >= 42
        && f[12..14] == ETH_P_IPV4.to_be_bytes()
        && f[23] == 17
        && f[36..38] == port.to_be_bytes()
}

#[test]
fn tap_arp_icmp_and_receive_checksum_offload() {
    require_netns!();
    let ns = NetNs::new("vuicmp").unwrap();
    let (d, name, host_mac) = tap_daemon(&ns, 2);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", &name]);
    let (gip, hip) = ([10, 78, 0, 2], [10, 78, 0, 1]);
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());
    drv.send(0, &arp(1, GMAC, gip, [0; 6], hip));
    let r = drv.recv_until(0, T, |r| {
        r.frame.len() >= 42
            && r.frame[12..14] == ETH_P_ARP.to_be_bytes()
            && r.frame[20..22] == [0, 2]
    });
    assert_eq!(
        r.frame[22..28],
        host_mac,
        "the kernel answers for its address"
    );
    assert_eq!(r.frame[0..6], GMAC);
    let echo = icmp_echo(GMAC, host_mac, gip, hip, 0x77, 1, b"vhost-user-net ping");
    drv.send(0, &echo);
    let r = drv.recv_until(0, T, |r| {
        r.frame.len() > 34 && r.frame[23] == 1 && r.frame[34] == 0
    });
    assert_eq!(&r.frame[42..], b"vhost-user-net ping");
    assert!(verify_checksums(&r.frame).unwrap());

    // GUEST_CSUM: the kernel leaves the UDP checksum to the guest (NEEDS_CSUM, 34 + 6).
    ns.ip(&[
        "neigh",
        "replace",
        "10.78.0.2",
        "lladdr",
        &mac_str(GMAC),
        "dev",
        &name,
        "nud",
        "permanent",
    ]);
    let sock = ns.run(|| UdpSocket::bind("10.78.0.1:0").unwrap());
    sock.send_to(b"partial please", "10.78.0.2:4444").unwrap();
    let r = drv.recv_until(0, T, |r| is_udp_to(&r.frame, 4444));
    assert_eq!((r.flags(), r.u16_at(6), r.u16_at(8)), (1, 34, 6));
    let mut f = r.frame.clone();
    let mut m = FrameMeta {
        csum: Checksum::Partial {
            start: 34,
            offset: 6,
        },
        ..FrameMeta::default()
    };
    offload::complete_checksum(&mut f, &mut m).unwrap();
    assert!(verify_checksums(&f).unwrap());
    drop(drv);

    // Without GUEST_CSUM the TAP's offloads follow: the checksum arrives complete.
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            features: DrvCfg::default().features & !feat::GUEST_CSUM,
            ..DrvCfg::default()
        },
    );
    sock.send_to(b"complete please", "10.78.0.2:4445").unwrap();
    let r = drv.recv_until(0, T, |r| is_udp_to(&r.frame, 4445));
    assert_eq!(r.flags() & 1, 0, "no NEEDS_CSUM without GUEST_CSUM");
    assert!(verify_checksums(&r.frame).unwrap());
    assert_eq!(&r.frame[42..], b"complete please");
    drop(drv);
    d.join();
}

/// TCP/IPv4 super-frame in the form a Linux guest hands to virtio-net: real IP total length and
/// header checksum, TCP checksum field = folded pseudo-header sum (with the TCP length).
pub(super) fn tcp4_virtio_gso(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    seq: u32,
    data: &[u8],
) -> Vec<u8> {
    let mut f = eth_header(dst_mac, src_mac, ETH_P_IPV4);
    netns_util::ipv4(&mut f, 6, src, dst, 20 + data.len(), false);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0x40, 0x00, 0, 0, 0, 0]);
    let pseudo = offload::fold(offload::ones_sum(&f[26..34], 6 + (20 + data.len()) as u64));
    f[50..52].copy_from_slice(&pseudo.to_be_bytes());
    f.extend_from_slice(data);
    f
}

fn hdr(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

#[test]
fn tap_transmit_checksum_and_64k_tso_reach_the_kernel() {
    require_netns!();
    let ns = NetNs::new("vutso").unwrap();
    sysctl(&ns, "net/ipv4/ip_forward", "1");
    let (d, a_name, a_mac) = tap_daemon(&ns, 1);
    // The far side: a TAP without offloads, so the kernel finishes checksums and segments.
    let b_name = unique("vb");
    let mut out = Tap::open(&TapConfig {
        name: b_name.clone(),
        netns: Some(ns.path()),
        up: true,
        offloads: TapOffloads::none(),
        ..TapConfig::default()
    })
    .unwrap();
    const PEER: [u8; 6] = [0x02, 0x50, 0x45, 0x45, 0x52, 0x02];
    ns.ip(&["addr", "add", "10.78.6.1/24", "dev", &a_name]);
    ns.ip(&["addr", "add", "10.78.7.1/24", "dev", &b_name]);
    ns.ip(&[
        "neigh",
        "add",
        "10.78.7.2",
        "lladdr",
        &mac_str(PEER),
        "dev",
        &b_name,
        "nud",
        "permanent",
    ]);
    let (src, dst) = ([10, 78, 6, 2], [10, 78, 7, 2]);
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());
    let mut next_out = |want: &dyn Fn(&[u8]) -> bool| -> Vec<u8> {
        let deadline = std::time::Instant::now() + T;
        loop {
            assert!(std::time::Instant::now() < deadline, "nothing forwarded");
            out.wait_readable(Some(std::time::Duration::from_millis(100)))
                .unwrap();
            while let Some((f, _)) = out.recv().unwrap() {
                if want(f) {
                    return f.to_vec();
                }
            }
        }
    };

    // CSUM: a UDP frame with a partial checksum (pseudo-header sum in the field).
    let mut f = udp4(
        GMAC,
        a_mac,
        (src, 5000),
        (dst, 5001),
        b"finish my checksum",
        true,
        Some(0),
    );
    let p = udp4_pseudo(&f);
    f[40..42].copy_from_slice(&p.to_be_bytes());
    drv.send_hdr(0, &hdr(1, 0, 0, 0, 34, 6), &f);
    let r = next_out(&|f| is_udp_to(f, 5001));
    assert_eq!(r[22], 63, "routed");
    assert!(
        verify_checksums(&r).unwrap(),
        "checksum completed at the guest's offsets"
    );
    assert_eq!(&r[42..], b"finish my checksum");

    // HOST_TSO4: one 64 KiB super-frame (65495 bytes of payload, IP total length 65535).
    let data: Vec<u8> = (0..65_495u32).map(|i| (i * 31 % 253) as u8).collect();
    let f = tcp4_virtio_gso(GMAC, a_mac, src, dst, 0xffff_0000, &data);
    assert_eq!(f.len(), 14 + 65_535);
    assert_eq!(internet_checksum(&f[14..34]), 0);
    drv.send_hdr(0, &hdr(1, 1, 54, 1448, 34, 16), &f);
    let mut got = Vec::new();
    let mut seq = 0xffff_0000u32;
    let segs = data.len().div_ceil(1448);
    for i in 0..segs {
        let s = next_out(&|f| f.len() > 54 && f[23] == 6 && f[36..38] == [0, 80]);
        assert!(verify_checksums(&s).unwrap(), "segment {i}");
        assert_eq!(
            u32::from_be_bytes([s[38], s[39], s[40], s[41]]),
            seq,
            "segment {i}"
        );
        assert!(s.len() - 54 <= 1448);
        seq = seq.wrapping_add((s.len() - 54) as u32);
        got.extend_from_slice(&s[54..]);
    }
    assert_eq!(got.len(), data.len());
    assert_eq!(
        got, data,
        "the kernel cut the super-frame into one TCP stream"
    );
    let s = d.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_bad, s.tx_dropped), (2, 0, 0));
    assert_eq!(s.tx_bytes as usize, 60 + 14 + 65_535);
}

fn tcp_checksum(f: &mut [u8]) {
    f[50..52].fill(0);
    let tcp_len = (f.len() - 34) as u64;
    let acc = offload::ones_sum(&f[26..34], 6 + tcp_len);
    let c = !offload::fold(offload::ones_sum(&f[34..], acc));
    f[50..52].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn tap_guest_tso_delivers_kernel_super_frames() {
    use std::io::Write;
    require_netns!();
    let ns = NetNs::new("vugtso").unwrap();
    let (d, name, _) = tap_daemon(&ns, 1);
    ns.ip(&["addr", "add", "10.78.9.1/24", "dev", &name]);
    ns.ip(&[
        "neigh",
        "replace",
        "10.78.9.2",
        "lladdr",
        &mac_str(GMAC),
        "dev",
        &name,
        "nud",
        "permanent",
    ]);
    let mut drv = NetDrv::start(
        &d.socket,
        DrvCfg {
            features: DrvCfg::default().features | feat::GUEST_TSO4,
            ..DrvCfg::default()
        },
    );
    let data: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
    let payload = data.clone();
    let path = ns.path();
    // The kernel connects to the "guest" and writes what its window allows.
    let client = std::thread::spawn(move || {
        vsp_net::tap::netns::run_in_netns(&path, move || {
            let mut s = std::net::TcpStream::connect_timeout(&"10.78.9.2:7000".parse().unwrap(), T)
                .unwrap();
            s.set_nonblocking(true).unwrap();
            let mut sent = 0;
            while sent < payload.len() {
                match s.write(&payload[sent..]) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            (s, sent)
        })
        .unwrap()
    });
    let syn = drv.recv_until(0, T, |r| {
        let f = &r.frame;
        f.len() >= 54 && f[23] == 6 && f[36..38] == 7000u16.to_be_bytes() && f[47] & 0x12 == 0x02
    });
    let f = &syn.frame;
    let mut sa = eth_header(f[6..12].try_into().unwrap(), GMAC, ETH_P_IPV4);
    netns_util::ipv4(&mut sa, 6, [10, 78, 9, 2], [10, 78, 9, 1], 24, false);
    sa.extend_from_slice(&7000u16.to_be_bytes());
    sa.extend_from_slice(&f[34..36]);
    sa.extend_from_slice(&1000u32.to_be_bytes());
    let their_seq = u32::from_be_bytes([f[38], f[39], f[40], f[41]]);
    sa.extend_from_slice(&their_seq.wrapping_add(1).to_be_bytes());
    sa.extend_from_slice(&[0x60, 0x12, 0xff, 0xff, 0, 0, 0, 0, 2, 4, 0x05, 0xb4]);
    tcp_checksum(&mut sa);
    drv.send(0, &sa);
    let r = drv.recv_until(0, T, |r| {
        let f = &r.frame;
        f.len() > 1514 && f[23] == 6 && f[36..38] == 7000u16.to_be_bytes()
    });
    // One TCPv4 super-frame (mss 1460 from our SYN-ACK), checksum left partial.
    assert_eq!(r.gso_type(), 1, "VIRTIO_NET_HDR_GSO_TCPV4");
    assert_eq!(r.u16_at(4), 1460, "gso_size");
    assert_eq!(r.flags() & 1, 1, "NEEDS_CSUM");
    assert!(r.bufs > 1, "spread over mergeable buffers");
    let n = r.frame.len() - 54;
    assert_eq!(&r.frame[54..], &data[..n], "first bytes of the stream");
    let (_sock, sent) = client.join().unwrap();
    assert!(sent >= n);
}

#[test]
fn daemon_binary_serves_reconnects_and_exits_on_sigterm() {
    require_netns!();
    let ns = NetNs::new("vubin").unwrap();
    let ns_name = ns.path().file_name().unwrap().to_str().unwrap().to_owned();
    let name = unique("vd");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vsp-net"))
        .args(["vhost-user-net", "--socket"])
        .arg(&sock)
        .args([
            "--tap",
            &name,
            "--netns",
            &ns_name,
            "--mac",
            "52:54:00:00:00:05",
            "--queues",
            "2",
        ])
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let gmac = [0x52, 0x54, 0, 0, 0, 5];
    let cfg = DrvCfg {
        pairs: 2,
        ..DrvCfg::default()
    };
    for round in 0..2u16 {
        let mut drv = NetDrv::start(&sock, cfg.clone());
        assert_eq!(drv.config(0, 10), [0x52, 0x54, 0, 0, 0, 5, 1, 0, 2, 0]);
        if round == 0 {
            ns.ip(&["addr", "add", "10.78.10.1/24", "dev", &name]);
        }
        drv.send(0, &arp(1, gmac, [10, 78, 10, 2], [0; 6], [10, 78, 10, 1]));
        // With two pairs the reply lands on whichever worker read the TAP.
        let r = drv.recv_until_any(T, |r| {
            r.frame.len() >= 42
                && r.frame[12..14] == ETH_P_ARP.to_be_bytes()
                && r.frame[20..22] == [0, 2]
        });
        assert_eq!(r.frame[28..32], [10, 78, 10, 1], "round {round}");
    }
    let pid = child.0.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "daemon ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
        "{status:?}"
    );
}

/// Kills the daemon if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
