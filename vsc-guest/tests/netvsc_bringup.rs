//! The netvsc bring-up against a scripted fake host, every guest message byte-checked against the
//! reference (§3.1–3.3, §3.6, §3.9): NVSP version fallback, NDIS config and version, both buffers,
//! RNDIS INITIALIZE, Linux's OID queries in order, offload parameters derived from the host's
//! capabilities, sub-channels, RSS parameters (disable, then enable) and the packet filter.
#![allow(clippy::unwrap_used)]

mod netvsc_fake_host;

use netvsc_fake_host::*;
use vsc_guest::netvsc::{BufferKind, DriverState, NetvscError, NetvscEvent};

#[test]
fn bring_up_is_byte_exact_with_linux() {
    let (mut h, mut drv) = FakeHost::with_config(|c| c.queues = 2);
    let events = bring_up(&mut h, &mut drv, 2);
    assert_eq!(
        events[2..],
        [
            NetvscEvent::Link { up: true },
            NetvscEvent::LinkSpeed(100_000_000),
            NetvscEvent::OpenSubchannels { count: 1 },
            NetvscEvent::Ready,
        ]
    );
    let info = drv.info();
    assert_eq!(info.nvsp_version, 0x0006_0000);
    assert_eq!(info.mac, MAC);
    assert_eq!(info.recv_section_size, SUB);
    assert_eq!(info.send_section_size, 6144);
    assert_eq!(info.send_section_count, (SEND.len / 6144) as u32);
    assert_eq!(info.packet_alignment, 8);
    assert_eq!(info.max_packets_per_message, 8);
    assert_eq!(info.host_mtu, Some(1500));
    assert_eq!(info.friendly_name.as_deref(), Some("Net"));
    assert_eq!(info.channels, 2);
    assert_eq!(drv.queue_count(), 2);
    assert_eq!(drv.gpadls(), (Some(0xE1E10), Some(0xE1E11)));
}

#[test]
fn single_queue_skips_subchannels_and_rss() {
    let (mut h, mut drv) = FakeHost::new();
    let events = bring_up(&mut h, &mut drv, 1);
    assert_eq!(events.last(), Some(&NetvscEvent::Ready));
    assert_eq!(drv.queue_count(), 1);
}

#[test]
fn nvsp_1_host_gets_no_ndis_config() {
    let (h, mut drv) = FakeHost::new();
    drv.start().unwrap();
    let mut refuse = words(&[2, 0xFFFF_FFFF, 34, 2]);
    refuse.resize(28, 0);
    for v in [
        0x0006_0001u32,
        0x0006_0000,
        0x0005_0000,
        0x0004_0000,
        0x0003_0002,
    ] {
        let p = h.take(&mut drv, 0);
        assert_eq!(p.payload, nvsp40(&[1, v, v]));
        h.complete(&mut drv, p.trans_id, &refuse).unwrap();
    }
    let p = h.take(&mut drv, 0);
    assert_eq!(p.payload, nvsp40(&[1, 2, 2]));
    let mut ok = words(&[2, 2, 34, 1]);
    ok.resize(28, 0);
    h.complete(&mut drv, p.trans_id, &ok).unwrap();
    // Straight to NDIS 6.1 (NVSP <= 4), no SEND_NDIS_CONFIG.
    let p = h.take(&mut drv, 0);
    assert_eq!(p.payload, nvsp40(&[100, 6, 1]));
    // The receive buffer is capped at 15 MiB for NVSP <= 2 (ours is smaller anyway).
    assert!(matches!(
        drv.poll_event(),
        Some(NetvscEvent::CreateGpadl {
            buffer: BufferKind::Receive,
            ..
        })
    ));
}

#[test]
fn every_version_refused_fails_the_bring_up() {
    let (h, mut drv) = FakeHost::new();
    drv.start().unwrap();
    let mut refuse = words(&[2, 0xFFFF_FFFF, 34, 2]);
    refuse.resize(28, 0);
    for _ in 0..6 {
        let p = h.take(&mut drv, 0);
        h.complete(&mut drv, p.trans_id, &refuse).unwrap();
    }
    assert_eq!(drv.state(), DriverState::Failed);
    assert_eq!(
        drv.poll_event(),
        Some(NetvscEvent::Failed(NetvscError::NoVersion))
    );
}

#[test]
fn bad_receive_buffer_completions_are_fatal() {
    for (sections, offset, size, count, why) in [
        (2, 0, SUB, 10, "section count is not 1"),
        (1, 4096, SUB, 10, "section offset is not 0"),
        (1, 0, 64, 10, "sub-allocation size below 68"),
        (1, 0, SUB, 100_000, "sub-allocations overflow the buffer"),
    ] {
        let (h, mut drv) = FakeHost::new();
        drv.start().unwrap();
        let p = h.take(&mut drv, 0);
        let mut ok = words(&[2, 0xFFFF_FFFF, 34, 1]);
        ok.resize(28, 0);
        h.complete(&mut drv, p.trans_id, &ok).unwrap();
        while drv.pop_transmit(0).is_some() {}
        while drv.poll_event().is_some() {}
        drv.gpadl_created(BufferKind::Receive, 7).unwrap();
        let p = h.take(&mut drv, 0);
        let mut c = words(&[102, 1, sections, offset, size, count, size * count]);
        c.resize(28, 0);
        assert_eq!(
            h.complete(&mut drv, p.trans_id, &c),
            Err(NetvscError::BadReceiveBuffer(why))
        );
        assert_eq!(drv.state(), DriverState::Failed);
    }
}

#[test]
fn halt_sends_rndis_halt_and_revokes_both_buffers() {
    let (mut h, mut drv) = FakeHost::new();
    bring_up(&mut h, &mut drv, 1);
    drv.halt().unwrap();
    // HALT (req 11): GPA direct from a control page, no RNDIS reply exists.
    assert_eq!(h.rndis_request(&mut drv), words(&[3, 12, 11]));
    for want in [nvsp40(&[103, 0xCAFE]), nvsp40(&[106, 0])] {
        let p = h.take(&mut drv, 0);
        assert_eq!(p.payload, want);
        assert!(!p.completion_requested);
    }
    assert_eq!(drv.state(), DriverState::Halted);
    assert!(drv.halt().is_err());
    assert_eq!(
        drv.send(0, &[0; 60], &Default::default(), false),
        Err(vsc_guest::netvsc::SendError::NotReady)
    );
}
