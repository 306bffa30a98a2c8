//! Offload metadata end to end against the real netvsp: checksum, LSO v2 and 802.1Q PPIs reach
//! the backend as metadata, receive metadata comes back as PPIs; an LSO super-frame sent by one
//! guest arrives at the other through the switch as MSS-sized segments with valid IPv4 and TCP
//! checksums; link down / up on the backend becomes MEDIA_DISCONNECT / MEDIA_CONNECT.
#![allow(clippy::unwrap_used)]

mod netvsc_common;

use netvsc_common::*;
use std::time::Duration;
use vmbus_core::wire::Guid;
use vsc_guest::net_harness::{NetVm, VmConfig};
use vsc_guest::netvsc::{LsoInfo, NetvscEvent, TxChecksum, TxMeta};
use vsp_net::backend::{
    BackendCaps, MemoryBackend, MemoryHandle, RxChecksum, RxMeta, TxChecksum as HostCsum, TxGso,
};
use vsp_net::netvsp::NetvspConfig;
use vsp_net::switch::{Switch, SwitchConfig};

const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x20, 0x00, 0x01];
const PEER: [u8; 6] = [0x00, 0x15, 0x5d, 0x20, 0x00, 0x02];
const T: Duration = Duration::from_secs(20);

fn memory_vm() -> (NetVm, MemoryHandle) {
    let (backend, handle) = MemoryBackend::new(MAC, 256);
    let backend = backend.with_caps(BackendCaps {
        tx_csum: true,
        tx_gso: true,
        max_gso_size: 65536,
        tx_vlan: true,
    });
    let mut vm = NetVm::in_process(VmConfig::default(), move |res| {
        let cfg = NetvspConfig {
            instance: Guid::from_u128(0x00ff_10ad),
            ..NetvspConfig::default()
        };
        netvsp(res, cfg, Box::new(backend))
    })
    .unwrap();
    vm.bring_up().unwrap();
    (vm, handle)
}

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

/// Ethernet + IPv4 + TCP frame; `lso` leaves IP length/checksum 0 and the pseudo-header sum
/// without length in the TCP checksum, as Linux does for LSO.
fn tcp_frame(dst: [u8; 6], src: [u8; 6], seq: u32, payload: &[u8], lso: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = if lso { 0 } else { 40 + payload.len() as u16 };
    f.extend_from_slice(&[
        0x45,
        0,
        (tot >> 8) as u8,
        tot as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&[10, 1, 0, 1, 10, 1, 0, 2]);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&80u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    if lso {
        let pseudo = fold(sum16(&f[26..34], 6));
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

/// Checks a received IPv4/TCP frame's checksums; returns (seq, payload).
fn check_tcp(frame: &[u8]) -> (u32, Vec<u8>) {
    assert_eq!(frame[12..14], [0x08, 0x00]);
    let ip = &frame[14..34];
    assert_eq!(fold(sum16(ip, 0)), 0xFFFF, "IPv4 header checksum");
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = &frame[34..14 + tot];
    let pseudo = sum16(&ip[12..20], 6 + tcp.len() as u64);
    assert_eq!(fold(sum16(tcp, pseudo)), 0xFFFF, "TCP checksum");
    (
        u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
        tcp[20..].to_vec(),
    )
}

#[test]
fn offload_metadata_round_trip_through_netvsp() {
    let (mut vm, h) = memory_vm();
    let frame = tcp_frame(PEER, MAC, 1, &[0x42; 200], false);
    let csum = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            tcp: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        vlan_tci: Some(0x6007),
        ..TxMeta::default()
    };
    vm.send(&frame, &csum).unwrap();
    let big = tcp_frame(PEER, MAC, 1, &pattern(30_000, 3), true);
    let lso = TxMeta {
        lso: Some(LsoInfo {
            mss: 1460,
            tcp_offset: 34,
            ipv6: false,
        }),
        ..TxMeta::default()
    };
    vm.send(&big, &lso).unwrap();
    let mut sent = Vec::new();
    vm.run_until(T, |_| {
        sent.extend(h.take_sent());
        sent.len() >= 2
    })
    .unwrap();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        sent[0].meta.csum,
        Some(HostCsum {
            ipv4: true,
            tcp: true,
            transport_offset: 34,
            ..HostCsum::default()
        })
    );
    assert_eq!(sent[0].meta.vlan_tci, Some(0x6007));
    assert_eq!(sent[0].frame[14..], frame[14..]);
    assert_eq!(
        sent[1].meta.gso,
        Some(TxGso {
            mss: 1460,
            tcp_offset: 34,
            ipv6: false
        })
    );
    assert_eq!(sent[1].frame.len(), big.len());
    assert_eq!(vm.driver.stats().tx_gpa_direct, 1);
    // Receive metadata → PPIs.
    let rx = tcp_frame(MAC, PEER, 9, &[7; 100], false);
    h.inject(
        &rx,
        RxMeta {
            csum: RxChecksum {
                ip_ok: true,
                tcp_ok: true,
                udp_ok: false,
            },
            vlan_tci: Some(0x3007),
            hash: None,
        },
    );
    let f = vm.recv(T).unwrap().unwrap();
    assert_eq!(f.data, rx);
    assert_eq!(f.vlan_tci, Some(0x3007));
    assert!(f.l4_checksum_ok());
    // Linux sets IPv4 header checksum offload to "disabled" (TCP_OFFLOAD_PARAMETERS), so the host
    // reports only the TCP result.
    assert_eq!(
        f.csum.unwrap() & (1 << 5),
        0,
        "IP checksum result not reported"
    );
}

#[test]
fn link_down_and_up_reach_the_guest() {
    let (mut vm, h) = memory_vm();
    assert!(vm.driver.info().link_up);
    h.set_link(false);
    vm.run_until(T, |vm| vm.events.contains(&NetvscEvent::Link { up: false }))
        .unwrap();
    assert!(!vm.driver.info().link_up);
    h.set_link(true);
    assert!(
        vm.run_until(T, |vm| vm.events.last()
            == Some(&NetvscEvent::Link { up: true }))
            .unwrap()
    );
    assert!(vm.driver.info().link_up);
    assert!(vm.driver.stats().link_events >= 2);
}

#[test]
fn lso_super_frame_arrives_segmented_with_valid_checksums() {
    let switch = Switch::new(SwitchConfig::default());
    let mut a = switch_vm(&switch, "a", MAC, 1);
    let mut b = switch_vm(&switch, "b", PEER, 1);
    let payload = pattern(40_000, 11);
    let big = tcp_frame(PEER, MAC, 1000, &payload, true);
    let lso = TxMeta {
        lso: Some(LsoInfo {
            mss: 1448,
            tcp_offset: 34,
            ipv6: false,
        }),
        ..TxMeta::default()
    };
    a.send(&big, &lso).unwrap();
    let mut got = Vec::new();
    let mut next_seq = 1000u32;
    while got.len() < payload.len() {
        a.service().unwrap();
        let Some(f) = b.recv(Duration::from_millis(50)).unwrap() else {
            continue;
        };
        let (seq, data) = check_tcp(&f.data);
        assert_eq!(seq, next_seq);
        assert!(data.len() <= 1448);
        next_seq += data.len() as u32;
        got.extend(data);
    }
    assert_eq!(got, payload);
    // A plain frame with a checksum request (checksum field garbage) is completed on the way.
    let mut frame = tcp_frame(PEER, MAC, 7, &[1, 2, 3], false);
    frame[50] = 0xAA;
    let meta = TxMeta {
        csum: Some(TxChecksum {
            ipv4: true,
            tcp: true,
            ip_header: true,
            transport_offset: 34,
            ..TxChecksum::default()
        }),
        ..TxMeta::default()
    };
    a.send(&frame, &meta).unwrap();
    let f = loop {
        a.service().unwrap();
        if let Some(f) = b.recv(Duration::from_millis(50)).unwrap() {
            break f;
        }
    };
    assert_eq!(check_tcp(&f.data), (7, vec![1, 2, 3]));
}
