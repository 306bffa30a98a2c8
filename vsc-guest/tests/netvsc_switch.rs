//! Two harness guests, each with the netvsc driver against its own netvsp, both netvsps on one
//! virtual switch: ARP + ping both ways, then 1 MiB over TCP with the TCP checksums left to the
//! "hardware" (checksum PPI → netvsp → switch → peer netvsp completes them) and verified by the
//! receiving stack; the same with two queues per guest (sub-channels, RSS, indirection table).
#![allow(clippy::unwrap_used)]

mod netvsc_common;

use netvsc_common::*;
use std::time::Duration;
use vsc_guest::net_harness::smol::SmolStack;
use vsc_guest::netvsc::{NetvscEvent, TxMeta};
use vsp_net::switch::{Switch, SwitchConfig};

const MAC_A: [u8; 6] = [0x00, 0x15, 0x5d, 0x10, 0x00, 0x01];
const MAC_B: [u8; 6] = [0x00, 0x15, 0x5d, 0x10, 0x00, 0x02];
const IP_A: [u8; 4] = [10, 99, 0, 1];
const IP_B: [u8; 4] = [10, 99, 0, 2];
const T: Duration = Duration::from_secs(60);

fn pair(queues: u16) -> (Switch, SmolStack, SmolStack) {
    let switch = Switch::new(SwitchConfig::default());
    let a = switch_vm(&switch, "a", MAC_A, queues);
    let b = switch_vm(&switch, "b", MAC_B, queues);
    assert_eq!(a.driver.info().mac, MAC_A);
    assert_eq!(b.driver.info().mac, MAC_B);
    (
        switch,
        SmolStack::new(a, IP_A, 24),
        SmolStack::new(b, IP_B, 24),
    )
}

#[test]
fn two_guests_ping_and_move_a_mebibyte_over_tcp() {
    let (_switch, mut a, mut b) = pair(1);
    assert!(
        a.vm.events.contains(&NetvscEvent::Link { up: true }),
        "{:?}",
        a.vm.events
    );
    let rtt = ping(&mut [&mut a, &mut b], 0, IP_B, 1, T);
    let rtt2 = ping(&mut [&mut a, &mut b], 1, IP_A, 2, T);
    eprintln!("ping a->b {rtt:?}, b->a {rtt2:?}");
    let data = pattern(1 << 20, 0xA5);
    let (got, took) = tcp_transfer(&mut [&mut a, &mut b], 0, 1, IP_B, 5001, &data, T);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "TCP payload differs");
    eprintln!(
        "1 MiB a->b in {took:?} ({:.1} Mbit/s)",
        8.0 * data.len() as f64 / took.as_secs_f64() / 1e6
    );
    let (sa, sb) = (a.vm.driver.stats(), b.vm.driver.stats());
    eprintln!("a: {sa:?}\nb: {sb:?}");
    assert!(sa.tx_frames > 700 && sb.rx_frames > 700);
    assert_eq!(
        sa.bad_packets + sb.bad_packets,
        0,
        "{:?} {:?}",
        a.vm.refused,
        b.vm.refused
    );
    assert_eq!(sb.rx_failed, 0);
    // Back the other way.
    let (got, _) = tcp_transfer(&mut [&mut a, &mut b], 1, 0, IP_A, 5002, &data[..200_000], T);
    assert!(got == data[..200_000]);
    // Removal as Linux does it: halt, revoke, close, GPADL teardown.
    a.vm.shutdown().unwrap();
    b.vm.shutdown().unwrap();
}

#[test]
fn two_queues_per_guest() {
    let (_switch, mut a, mut b) = pair(2);
    for s in [&a, &b] {
        assert_eq!(s.vm.driver.queue_count(), 2);
        assert_eq!(s.vm.channel_relids().len(), 2);
    }
    // The host sends its indirection table once both channels are open.
    a.vm.run_until(T, |vm| {
        vm.events
            .iter()
            .any(|e| matches!(e, NetvscEvent::IndirectionTable(_)))
    })
    .unwrap();
    ping(&mut [&mut a, &mut b], 0, IP_B, 7, T);
    let data = pattern(512 * 1024, 0x77);
    let (got, _) = tcp_transfer(&mut [&mut a, &mut b], 0, 1, IP_B, 5003, &data, T);
    assert!(got == data);
    // Raw TCP frames of 64 flows: A spreads them over its queues by hash, B's netvsp spreads them
    // over B's queues by the RSS parameters B set (Toeplitz over the 4-tuple).
    let (mut va, mut vb) = (a.vm, b.vm);
    for port in 0..64u16 {
        let f = ipv4_tcp_frame(MAC_B, MAC_A, IP_A, IP_B, 1000 + port, 80);
        let meta = TxMeta {
            hash: Some(u32::from(port).wrapping_mul(0x9E37_79B9)),
            ..TxMeta::default()
        };
        va.send(&f, &meta).unwrap();
    }
    let mut queues = [0u32; 2];
    while queues.iter().sum::<u32>() < 64 {
        va.service().unwrap();
        let f = vb.recv(T).unwrap().expect("frame");
        queues[usize::from(f.queue)] += 1;
        assert!(f.hash.is_some(), "RSS hash PPI");
    }
    assert!(queues[0] > 0 && queues[1] > 0, "{queues:?}");
}
