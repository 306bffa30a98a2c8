//! Port-level tests, run against both the in-process and the shared-memory implementation.

#![cfg(feature = "std")]

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::local::{LocalConfig, LocalGuest, LocalHost};
use super::shared::{SharedGuest, SharedHost, SharedLayout, SharedSynic};
use super::*;

const MSG: u32 = 1;
const MSG4: u32 = 4;
const EVT_A: u32 = 0x2001;
const EVT_B: u32 = 0x00AB_CDEF;
const T: Option<Duration> = Some(Duration::from_secs(10));

/// What the tests need from a host end beyond the traits.
trait TestHost: HostPort + HostInbox + Send + Sync {
    /// Let the host handle EOMs (a hypervisor does this on the MSR write).
    fn service(&self);
    fn queued(&self, vp: u32, sint: Sint) -> usize;
}

impl TestHost for LocalHost {
    fn service(&self) {}
    fn queued(&self, vp: u32, sint: Sint) -> usize {
        LocalHost::queued(self, vp, sint).unwrap()
    }
}

impl TestHost for SharedHost {
    fn service(&self) {
        self.service_eom().unwrap();
    }
    fn queued(&self, vp: u32, sint: Sint) -> usize {
        SharedHost::queued(self, vp, sint).unwrap()
    }
}

type Guest = Arc<dyn GuestPort + Send + Sync>;

struct Rig {
    host: Arc<dyn TestHost>,
    guests: Vec<Guest>,
    shared: Option<SharedSynic>,
}

fn local(vps: u32, host_depth: usize) -> Rig {
    let (host, guests) = super::local::pair(LocalConfig {
        vps,
        host_queue_depth: host_depth,
        guest_queue_depth: 64,
        spins: 100,
    })
    .unwrap();
    Rig {
        host: Arc::new(host),
        guests: guests
            .into_iter()
            .map(|g: LocalGuest| Arc::new(g) as Guest)
            .collect(),
        shared: None,
    }
}

fn shared(vps: u32, host_depth: usize) -> Rig {
    let s = SharedSynic::create("synic-test", SharedLayout { vps, ring_pages: 2 }).unwrap();
    let host = s.host(host_depth).unwrap().with_spins(100);
    let guests = s.guest().unwrap();
    Rig {
        host: Arc::new(host),
        guests: guests
            .into_iter()
            .map(|g: SharedGuest| Arc::new(g.with_spins(100)) as Guest)
            .collect(),
        shared: Some(s),
    }
}

fn both(test: impl Fn(&str, Rig), vps: u32, host_depth: usize) {
    test("local", local(vps, host_depth));
    test("shared", shared(vps, host_depth));
}

fn register_all(h: &dyn TestHost) {
    h.register_port(MSG, PortKind::Message).unwrap();
    h.register_port(MSG4, PortKind::Message).unwrap();
    h.register_port(EVT_A, PortKind::Event).unwrap();
    h.register_port(EVT_B, PortKind::Event).unwrap();
}

fn tagged(seq: u32, len: usize) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((4..len).map(|i| (seq as usize * 31 + i) as u8));
    v
}

fn seq_of(p: &[u8]) -> u32 {
    u32::from_le_bytes([p[0], p[1], p[2], p[3]])
}

#[test]
fn slot_sequence_with_pending_and_eom() {
    both(
        |name, rig| {
            let (h, g) = (&rig.host, &rig.guests[0]);
            let s2 = Sint::VMBUS;
            let s5 = Sint::new(5).unwrap();
            assert_eq!(
                h.post_to_guest(0, s2, &tagged(0, 20)).unwrap(),
                Delivery::Delivered
            );
            for i in 1..5 {
                assert_eq!(
                    h.post_to_guest(0, s2, &tagged(i, 20 + i as usize)).unwrap(),
                    Delivery::SlotBusy,
                    "{name}"
                );
            }
            // Another SINT has its own slot and queue.
            assert_eq!(
                h.post_to_guest(0, s5, &tagged(100, 8)).unwrap(),
                Delivery::Delivered
            );
            assert_eq!(h.queued(0, s2), 4);
            assert!(g.wait(T).unwrap(), "{name}: interrupt raised");
            for i in 0..5 {
                let m = g.next_message(s2).expect("a message").unwrap();
                assert_eq!(m.message_type, HVMSG_CHANNEL_MESSAGE);
                assert_eq!(&m.payload[..], &tagged(i, 20 + i as usize)[..], "{name}");
                if rig.shared.is_some() {
                    // Nothing more until the host has handled the EOM (the local pair handles it
                    // synchronously, as a hypervisor handles the MSR write).
                    assert!(
                        g.next_message(s2).is_none(),
                        "{name}: slot freed, no EOM yet"
                    );
                }
                h.service();
            }
            assert_eq!(h.queued(0, s2), 0);
            let m = g.next_message(s5).unwrap().unwrap();
            assert_eq!(seq_of(&m.payload), 100);
            assert!(g.next_message(s5).is_none());
            assert!(g.next_message(s2).is_none());
        },
        1,
        16,
    );
}

#[test]
fn order_survives_posts_between_free_and_eom() {
    both(
        |name, rig| {
            let (h, g) = (&rig.host, &rig.guests[0]);
            let s = Sint::VMBUS;
            let mut next_post = 0u32;
            let mut next_take = 0u32;
            // Interleave posts, takes and EOM handling in an awkward rhythm.
            for round in 0..200u32 {
                for _ in 0..(round % 4) {
                    h.post_to_guest(0, s, &tagged(next_post, 8 + (next_post % 233) as usize))
                        .unwrap();
                    next_post += 1;
                }
                if let Some(m) = g.next_message(s) {
                    let m = m.unwrap();
                    assert_eq!(seq_of(&m.payload), next_take, "{name}");
                    assert_eq!(m.payload.len(), 8 + (next_take % 233) as usize);
                    next_take += 1;
                }
                if round % 3 == 0 {
                    h.service();
                }
            }
            while next_take < next_post {
                h.service();
                let m = g.next_message(s).expect("queued messages arrive").unwrap();
                assert_eq!(seq_of(&m.payload), next_take, "{name}");
                next_take += 1;
            }
        },
        1,
        1000,
    );
}

#[test]
fn guest_post_statuses() {
    both(
        |name, rig| {
            let (h, g) = (&rig.host, &rig.guests[0]);
            register_all(h.as_ref());
            assert_eq!(
                g.post_message(77, &[0; 8]),
                Err(HvStatus::InvalidConnectionId),
                "{name}"
            );
            assert_eq!(
                g.post_message(EVT_A, &[0; 8]),
                Err(HvStatus::InvalidConnectionId)
            );
            assert_eq!(g.signal_event(MSG, 0), Err(HvStatus::InvalidConnectionId));
            assert_eq!(g.signal_event(78, 0), Err(HvStatus::InvalidConnectionId));
            for bad in [0usize, 1, 7, 241, 4096] {
                assert_eq!(
                    g.post_message(MSG, &vec![0; bad]),
                    Err(HvStatus::InvalidParameter),
                    "{name}: {bad} bytes"
                );
            }
            g.post_message(MSG, &tagged(1, 8)).unwrap();
            g.post_message(0xFF00_0000 | MSG4, &tagged(2, 240)).unwrap();
            let a = h.recv_message().unwrap().unwrap();
            assert_eq!((a.connection_id, &a.payload[..]), (MSG, &tagged(1, 8)[..]));
            let b = h.recv_message().unwrap().unwrap();
            assert_eq!(b.connection_id, MSG4, "{name}: bits 31:24 ignored");
            assert_eq!(&b.payload[..], &tagged(2, 240)[..]);
            assert!(h.recv_message().unwrap().is_none());
            // Registration rules.
            assert!(matches!(
                h.register_port(MSG, PortKind::Event),
                Err(SynicError::PortExists(MSG))
            ));
            assert!(matches!(
                h.register_port(0, PortKind::Event),
                Err(SynicError::InvalidConnectionId(0))
            ));
            assert!(matches!(
                h.register_port(0x0100_0000, PortKind::Event),
                Err(SynicError::InvalidConnectionId(_))
            ));
            assert!(h.unregister_port(MSG4));
            assert!(!h.unregister_port(MSG4));
            assert_eq!(
                g.post_message(MSG4, &[0; 8]),
                Err(HvStatus::InvalidConnectionId)
            );
            h.register_port(MSG4, PortKind::Event).unwrap();
            assert_eq!(g.signal_event(MSG4, 0), Ok(()));
        },
        1,
        16,
    );
}

#[test]
fn flood_gets_insufficient_buffers_then_recovers() {
    both(
        |name, rig| {
            let (h, g) = (&rig.host, &rig.guests[0]);
            register_all(h.as_ref());
            for round in 0..3 {
                let mut accepted = 0u32;
                let full = loop {
                    match g.post_message(MSG, &tagged(accepted, 8 + (accepted % 200) as usize)) {
                        Ok(()) => accepted += 1,
                        Err(e) => break e,
                    }
                    assert!(accepted < 100_000, "{name}: queue never fills");
                };
                assert_eq!(full, HvStatus::InsufficientBuffers, "{name}");
                assert!(full.is_retryable());
                assert!(accepted > 0);
                for i in 0..accepted {
                    let m = h
                        .recv_message()
                        .unwrap()
                        .expect("every accepted post arrives");
                    assert_eq!(&m.payload[..], &tagged(i, 8 + (i % 200) as usize)[..]);
                }
                assert!(h.recv_message().unwrap().is_none(), "{name} round {round}");
            }
        },
        1,
        16,
    );
}

#[test]
fn host_queue_is_bounded_when_the_guest_stops_consuming() {
    both(
        |name, rig| {
            let h = &rig.host;
            h.post_to_guest(0, Sint::VMBUS, &[1; 8]).unwrap();
            for _ in 0..8 {
                assert_eq!(
                    h.post_to_guest(0, Sint::VMBUS, &[2; 8]).unwrap(),
                    Delivery::SlotBusy
                );
            }
            assert!(
                matches!(
                    h.post_to_guest(0, Sint::VMBUS, &[3; 8]),
                    Err(SynicError::QueueFull { depth: 8, .. })
                ),
                "{name}"
            );
            assert!(matches!(
                h.post_to_guest(0, Sint::VMBUS, &[0; 241]),
                Err(SynicError::PayloadTooLarge(241))
            ));
            assert!(matches!(
                h.post_to_guest(9, Sint::VMBUS, &[0; 8]),
                Err(SynicError::InvalidVp { vp: 9, .. })
            ));
        },
        2,
        8,
    );
}

#[test]
fn events_both_ways() {
    both(
        |name, rig| {
            let (h, g0, g1) = (&rig.host, &rig.guests[0], &rig.guests[1]);
            register_all(h.as_ref());
            // Guest → host: coalesced per port.
            for _ in 0..5 {
                g0.signal_event(EVT_A, 0).unwrap();
            }
            g1.signal_event(EVT_B, 3).unwrap();
            assert!(h.wait(T).unwrap());
            let mut got = Vec::new();
            assert_eq!(h.take_events(&mut |id| got.push(id)).unwrap(), 2, "{name}");
            got.sort();
            assert_eq!(got, [EVT_A, EVT_B]);
            assert_eq!(h.take_events(&mut |_| panic!("no more")).unwrap(), 0);
            // Host → guest: per VP, per SINT; interrupt only on a clear → set transition.
            assert!(h.signal_guest(1, Sint::VMBUS, 7).unwrap());
            assert!(!h.signal_guest(1, Sint::VMBUS, 7).unwrap());
            assert!(h.signal_guest(1, Sint::VMBUS, 2047).unwrap());
            assert!(matches!(
                h.signal_guest(1, Sint::VMBUS, 2048),
                Err(SynicError::InvalidFlag(2048))
            ));
            assert!(matches!(
                h.signal_guest(2, Sint::VMBUS, 1),
                Err(SynicError::InvalidVp { .. })
            ));
            assert_eq!(
                g0.take_events(Sint::VMBUS, &mut |_| panic!("VP 0 got VP 1's flag")),
                0
            );
            assert!(g1.wait(T).unwrap());
            let mut flags = Vec::new();
            assert_eq!(g1.take_events(Sint::VMBUS, &mut |f| flags.push(f)), 2);
            assert_eq!(flags, [7, 2047]);
            assert!(h.signal_guest(1, Sint::VMBUS, 7).unwrap(), "cleared again");
        },
        2,
        16,
    );
}

#[test]
fn concurrent_event_flags() {
    both(
        |name, rig| {
            const THREADS: u32 = 4;
            const PER: u32 = 2048 / THREADS;
            const ROUNDS: u32 = 60;
            let host = rig.host.clone();
            let guest = rig.guests[0].clone();
            let outstanding: Arc<Vec<AtomicBool>> =
                Arc::new((0..2048).map(|_| AtomicBool::new(false)).collect());
            let sent = Arc::new(AtomicU64::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let consumer = {
                let (outstanding, done) = (outstanding.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut taken = 0u64;
                    loop {
                        let finished = done.load(Ordering::SeqCst);
                        guest.take_events(Sint::VMBUS, &mut |f| {
                            assert!(
                                outstanding[f as usize].swap(false, Ordering::SeqCst),
                                "flag {f} reported but never set"
                            );
                            taken += 1;
                        });
                        if finished {
                            return taken;
                        }
                        guest.wait(Some(Duration::from_millis(2))).unwrap();
                    }
                })
            };
            let producers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (host, outstanding, sent) =
                        (host.clone(), outstanding.clone(), sent.clone());
                    std::thread::spawn(move || {
                        for _ in 0..ROUNDS {
                            for f in t * PER..(t + 1) * PER {
                                if !outstanding[f as usize].load(Ordering::SeqCst) {
                                    outstanding[f as usize].store(true, Ordering::SeqCst);
                                    // The consumer clears the bit before the outstanding mark,
                                    // so the flag must be clear now.
                                    assert!(host.signal_guest(0, Sint::VMBUS, f).unwrap());
                                    sent.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    })
                })
                .collect();
            for p in producers {
                p.join().unwrap();
            }
            done.store(true, Ordering::SeqCst);
            let taken = consumer.join().unwrap();
            assert_eq!(taken, sent.load(Ordering::SeqCst), "{name}");
            assert!(taken >= 2048, "{name}: every flag went round at least once");
        },
        1,
        16,
    );
}

#[test]
fn threaded_stream_both_ways() {
    both(
        |name, rig| {
            const N: u32 = 3000;
            register_all(rig.host.as_ref());
            let host = rig.host.clone();
            let guest = rig.guests[0].clone();
            let guest_side = std::thread::spawn(move || {
                let (mut rx, mut tx) = (0u32, 0u32);
                while rx < N || tx < N {
                    while let Some(m) = guest.next_message(Sint::VMBUS) {
                        let m = m.unwrap();
                        assert_eq!(&m.payload[..], &tagged(rx, 8 + (rx % 233) as usize)[..]);
                        rx += 1;
                    }
                    let mut progressed = false;
                    while tx < N {
                        match guest.post_message(MSG, &tagged(tx, 240 - (tx % 233) as usize)) {
                            Ok(()) => {
                                tx += 1;
                                progressed = true;
                            }
                            Err(HvStatus::InsufficientBuffers) => break,
                            Err(e) => panic!("post: {e}"),
                        }
                    }
                    if !progressed && rx < N {
                        guest.wait(Some(Duration::from_millis(1))).unwrap();
                    } else if !progressed {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            });
            let (mut rx, mut tx) = (0u32, 0u32);
            // Keep serving (EOMs) until the guest is done too.
            while rx < N || tx < N || !guest_side.is_finished() {
                while let Some(m) = host.recv_message().unwrap() {
                    assert_eq!(m.connection_id, MSG);
                    assert_eq!(&m.payload[..], &tagged(rx, 240 - (rx % 233) as usize)[..]);
                    rx += 1;
                }
                let mut progressed = false;
                while tx < N {
                    match host.post_to_guest(0, Sint::VMBUS, &tagged(tx, 8 + (tx % 233) as usize)) {
                        Ok(_) => {
                            tx += 1;
                            progressed = true;
                        }
                        Err(SynicError::QueueFull { .. }) => break,
                        Err(e) => panic!("post_to_guest: {e}"),
                    }
                }
                if !progressed {
                    host.wait(Some(Duration::from_millis(1))).unwrap();
                }
            }
            guest_side.join().unwrap();
            assert_eq!((rx, tx), (N, N), "{name}");
        },
        1,
        32,
    );
}

/// A guest that scribbles over its own message and event pages: the host stays within bounds
/// and never panics, and honest use works again afterwards.
#[test]
fn hostile_guest_pages() {
    let pokes = |rig: &Rig, sief: bool, offset: usize, bytes: &[u8]| {
        let s = rig.shared.as_ref().expect("a shared rig");
        let file = std::fs::File::from(s.fds().memfd.try_clone_to_owned().unwrap());
        let base = if sief {
            s.layout().sief_offset(0)
        } else {
            s.layout().simp_offset(0)
        };
        file.write_all_at(bytes, (base + offset) as u64).unwrap();
    };
    // Local: poke through the host's view of the guest pages.
    let (lh, lg) = super::local::pair(LocalConfig {
        host_queue_depth: 4,
        ..LocalConfig::default()
    })
    .unwrap();
    let lg = &lg[0];
    lh.message_page(0)
        .unwrap()
        .poke(0x200, &0xDEAD_BEEFu32.to_le_bytes());
    lh.post_to_guest(0, Sint::VMBUS, &[1; 8]).unwrap();
    for _ in 0..3 {
        lh.post_to_guest(0, Sint::VMBUS, &[2; 8]).unwrap();
    }
    assert!(matches!(
        lh.post_to_guest(0, Sint::VMBUS, &[3; 8]),
        Err(SynicError::QueueFull { .. })
    ));
    // The guest "consumes" the garbage: a message of type 0xDEADBEEF with whatever size byte.
    let first = lg.next_message(Sint::VMBUS).unwrap();
    if let Ok(m) = first {
        assert_eq!(m.message_type, 0xDEAD_BEEF);
    }
    // The pending flag was set on the garbage slot, so EOM brought the real messages.
    assert_eq!(
        &lg.next_message(Sint::VMBUS).unwrap().unwrap().payload[..],
        &[1; 8]
    );
    // Garbage everywhere, then honest use.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut junk = [0u8; 4096];
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    lh.message_page(0).unwrap().poke(0, &junk);
    lh.event_page(0).unwrap().poke(0, &junk);
    for s in Sint::all() {
        while let Some(m) = lg.next_message(s) {
            if let Ok(m) = m {
                assert!(m.payload.len() <= MAX_PAYLOAD);
            }
        }
        lg.take_events(s, &mut |f| assert!(f < EVENT_FLAGS_PER_SINT));
        let _ = lh.post_to_guest(0, s, &[4; 8]);
        let _ = lh.signal_guest(0, s, 5);
    }

    // Shared: same through the memfd.
    let rig = shared(1, 4);
    let (h, g) = (&rig.host, &rig.guests[0]);
    pokes(&rig, false, 0x200, &1u32.to_le_bytes());
    pokes(&rig, false, 0x204, &[250, 0]);
    for _ in 0..4 {
        assert_eq!(
            h.post_to_guest(0, Sint::VMBUS, &[9; 8]).unwrap(),
            Delivery::SlotBusy
        );
    }
    assert!(matches!(
        h.post_to_guest(0, Sint::VMBUS, &[9; 8]),
        Err(SynicError::QueueFull { .. })
    ));
    // payload_size 250 is rejected by the guest after the copy; the slot is freed and EOM written.
    assert_eq!(
        g.next_message(Sint::VMBUS),
        Some(Err(MessageError::PayloadSize {
            message_type: 1,
            size: 250
        }))
    );
    h.service();
    assert_eq!(
        &g.next_message(Sint::VMBUS).unwrap().unwrap().payload[..],
        &[9; 8]
    );
    pokes(&rig, false, 0, &junk);
    pokes(&rig, true, 0, &junk);
    for s in Sint::all() {
        while let Some(m) = g.next_message(s) {
            if let Ok(m) = m {
                assert!(m.payload.len() <= MAX_PAYLOAD);
            }
        }
        g.take_events(s, &mut |f| assert!(f < EVENT_FLAGS_PER_SINT));
        let _ = h.post_to_guest(0, s, &[4; 8]);
        let _ = h.signal_guest(0, s, 5);
        h.service();
    }
}

/// A guest that corrupts the shared connection table, the event bitmap, the latch words and the
/// message ring: the host reports only its registered ports, drops bad records, fails the ring
/// cleanly, and keeps serving host → guest traffic.
#[test]
fn hostile_guest_shared_state() {
    let s = SharedSynic::create("synic-hostile", SharedLayout::default()).unwrap();
    let host = s.host(8).unwrap();
    host.register_port(MSG, PortKind::Message).unwrap();
    host.register_port(EVT_A, PortKind::Event).unwrap();
    let file = std::fs::File::from(s.fds().memfd.try_clone_to_owned().unwrap());
    let layout = s.layout();

    // A forged table (every slot an event port 0x777) and every event bit set.
    let mut forged = Vec::new();
    for _ in 0..2048 {
        forged.extend_from_slice(&(0x0200_0777u32).to_le_bytes());
    }
    file.write_all_at(&forged, layout.table_offset() as u64)
        .unwrap();
    file.write_all_at(&[0xFF; 4096], layout.events_offset() as u64)
        .unwrap();
    file.write_all_at(&[0xFF; 4096], 0).unwrap(); // header: latches, EOM words, magic
    let mut got = Vec::new();
    host.take_events(&mut |id| got.push(id)).unwrap();
    assert_eq!(got, [EVT_A], "only registered event ports fire");
    assert!(host.service_eom().is_ok());
    assert!(host.wait(Some(Duration::from_millis(1))).is_ok());

    // Records written straight into the ring: unknown connection id, bad sizes, wrong type.
    {
        let ring = ringbuf::mmap::MappedRing::map(
            s.fds().memfd,
            layout.ring_offset() as u64,
            layout.ring_len(),
        )
        .unwrap();
        let mut w = ringbuf::RingWriter::new(&ring).unwrap();
        let p = [7u8; 64];
        let parts: [&[u8]; 1] = [&p];
        for trans_id in [
            (8u64 << 32) | 0x777,        // not a port
            (8u64 << 32) | EVT_A as u64, // an event port
            (4u64 << 32) | MSG as u64,   // too short
            (250u64 << 32) | MSG as u64, // too long
            (72u64 << 32) | MSG as u64,  // longer than the packet
        ] {
            w.try_write(&ringbuf::OutgoingPacket::in_band(trans_id, false, &parts))
                .unwrap();
        }
        w.try_write(&ringbuf::OutgoingPacket::completion(
            (8u64 << 32) | 1,
            &parts,
        ))
        .unwrap();
        w.try_write(&ringbuf::OutgoingPacket::in_band(
            (64u64 << 32) | 1,
            false,
            &parts,
        ))
        .unwrap();
    }
    let m = host.recv_message().unwrap().expect("the one good record");
    assert_eq!((m.connection_id, &m.payload[..]), (MSG, &[7u8; 64][..]));
    assert_eq!(host.dropped_messages(), 6);
    assert!(host.recv_message().unwrap().is_none());

    // Garbage ring indices: a clean error, repeatedly, and host → guest still works.
    file.write_all_at(&[0x13; 16], layout.ring_offset() as u64)
        .unwrap();
    assert!(matches!(
        host.recv_message(),
        Err(SynicError::GuestFault { .. })
    ));
    assert!(host.recv_message().is_err());
    host.post_to_guest(0, Sint::VMBUS, &[1; 8]).unwrap();
    host.signal_guest(0, Sint::VMBUS, 3).unwrap();
}

#[test]
fn shared_handoff_by_fds() {
    let s = SharedSynic::create(
        "synic-fds",
        SharedLayout {
            vps: 2,
            ring_pages: 1,
        },
    )
    .unwrap();
    let host = s.host(4).unwrap();
    assert!(s.host(4).is_err(), "one host end");
    host.register_port(MSG, PortKind::Message).unwrap();
    let fds = s.fds();
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
    let wrong = SharedLayout {
        vps: 2,
        ring_pages: 2,
    };
    assert!(
        SharedSynic::from_fds(
            wrong,
            dup(fds.memfd),
            dup(fds.host_doorbell),
            fds.guest_doorbells.iter().map(|&f| dup(f)).collect()
        )
        .is_err()
    );
    let other = SharedSynic::from_fds(
        s.layout(),
        dup(fds.memfd),
        dup(fds.host_doorbell),
        fds.guest_doorbells.iter().map(|&f| dup(f)).collect(),
    )
    .unwrap();
    let guests = other.guest().unwrap();
    assert!(other.guest().is_err(), "one guest end");
    guests[1].post_message(MSG, b"over fds").unwrap();
    assert!(host.wait(T).unwrap());
    assert_eq!(
        &host.recv_message().unwrap().unwrap().payload[..],
        b"over fds"
    );
    host.post_to_guest(1, Sint::VMBUS, b"back").unwrap();
    assert!(guests[1].wait(T).unwrap());
    assert_eq!(
        &guests[1]
            .next_message(Sint::VMBUS)
            .unwrap()
            .unwrap()
            .payload[..],
        b"back"
    );
    assert!(guests[0].next_message(Sint::VMBUS).is_none());
}

#[test]
fn status_codes() {
    for s in [
        HvStatus::InvalidParameter,
        HvStatus::InsufficientMemory,
        HvStatus::InvalidConnectionId,
        HvStatus::InsufficientBuffers,
        HvStatus::InvalidSynicState,
    ] {
        assert_eq!(HvStatus::from_code(s.code()), Some(s));
    }
    assert_eq!(HvStatus::InvalidConnectionId.code(), 0x12);
    assert_eq!(HvStatus::InsufficientBuffers.code(), 0x13);
    assert_eq!(HvStatus::InvalidParameter.code(), 0x5);
    assert_eq!(HvStatus::from_code(0), None);
    assert_eq!(Sint::new(16), None);
    assert_eq!(Sint::VMBUS.get(), 2);
}
