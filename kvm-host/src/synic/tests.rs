#![allow(clippy::indexing_slicing)]

use std::sync::Mutex;

use vmbus_core::synic::SlotReader;

use super::*;

const S2: Sint = Sint::VMBUS;

/// Records raised interrupts instead of signalling KVM.
#[derive(Default)]
pub(crate) struct Recorder(pub Mutex<Vec<(u32, u8)>>);

impl InterruptSink for Recorder {
    fn raise(&self, vp: u32, vector: u8) {
        self.0.lock().unwrap().push((vp, vector));
    }
}

impl Recorder {
    pub(crate) fn take(&self) -> Vec<(u32, u8)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const SIMP: u64 = 0x10_000;
const SIEFP: u64 = 0x11_000;

pub(crate) fn synic(vps: u32, depth: usize) -> (Arc<GuestRam>, Arc<Recorder>, Synic) {
    let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
    let rec = Arc::new(Recorder::default());
    let s = Synic::new(ram.clone(), vps, rec.clone(), depth);
    (ram, rec, s)
}

fn enable(s: &Synic, vp: u32, vector: u64) {
    s.write_msr(vp, msr::SIMP, SIMP | 1).unwrap();
    s.write_msr(vp, msr::SIEFP, SIEFP | 1).unwrap();
    s.write_msr(vp, msr::SINT0 + 2, vector).unwrap();
    s.write_msr(vp, msr::SCONTROL, 1).unwrap();
}

/// The guest's side of a slot (vmbus-core's reader, as Linux does it): copy, free, EOM if flagged.
fn guest_take(ram: &GuestRam, s: &Synic, vp: u32) -> Option<Vec<u8>> {
    let taken = SlotReader::new(ram.page_words(SIMP).unwrap()).take(S2)?;
    if taken.eom_needed {
        s.write_msr(vp, msr::EOM, 0).unwrap();
    }
    Some(taken.message.unwrap().payload.to_vec())
}

fn flags(ram: &GuestRam) -> EventFlags<&[AtomicU32; 1024]> {
    EventFlags::new(ram.page_words(SIEFP).unwrap())
}

#[test]
fn messages_wait_for_the_synic_then_flow_through_pending_and_eom() {
    let (ram, rec, s) = synic(1, 8);
    assert_eq!(
        s.post_to_guest(0, S2, b"first message").unwrap(),
        Delivery::SlotBusy
    );
    assert_eq!(
        s.post_to_guest(0, S2, b"second message").unwrap(),
        Delivery::SlotBusy
    );
    assert_eq!(s.queued(0, S2), 2);
    // Nothing is written before the guest enables SIMP + SINT2 + SCONTROL.
    s.write_msr(0, msr::SIMP, SIMP | 1).unwrap();
    s.write_msr(0, msr::SINT0 + 2, 0x50).unwrap();
    assert!(rec.take().is_empty());
    s.write_msr(0, msr::SCONTROL, 1).unwrap();
    assert_eq!(rec.take(), vec![(0, 0x50)]);
    assert_eq!(s.queued(0, S2), 1);
    // The first carries the pending flag, so taking it writes EOM, which delivers the second.
    assert_eq!(guest_take(&ram, &s, 0).unwrap(), b"first message");
    assert_eq!(rec.take(), vec![(0, 0x50)]);
    assert_eq!(guest_take(&ram, &s, 0).unwrap(), b"second message");
    assert!(guest_take(&ram, &s, 0).is_none());
    assert_eq!(s.queued(0, S2), 0);
    // A free slot takes a new message at once.
    assert_eq!(
        s.post_to_guest(0, S2, b"third").unwrap(),
        Delivery::Delivered
    );
    assert_eq!(rec.take(), vec![(0, 0x50)]);
}

#[test]
fn busy_slot_queues_and_queue_is_bounded() {
    let (ram, _rec, s) = synic(2, 3);
    enable(&s, 1, 0x60);
    assert_eq!(s.post_to_guest(1, S2, b"a").unwrap(), Delivery::Delivered);
    for _ in 0..3 {
        assert_eq!(s.post_to_guest(1, S2, b"b").unwrap(), Delivery::SlotBusy);
    }
    assert!(matches!(
        s.post_to_guest(1, S2, b"c"),
        Err(SynicError::QueueFull {
            vp: 1,
            sint: 2,
            depth: 3
        })
    ));
    let mut got = 0;
    while guest_take(&ram, &s, 1).is_some() {
        got += 1;
    }
    assert_eq!(got, 4);
    // VP 0 was never enabled: its messages queue.
    assert_eq!(s.post_to_guest(0, S2, b"x").unwrap(), Delivery::SlotBusy);
}

#[test]
fn bad_targets_and_payloads_are_refused() {
    let (_ram, _rec, s) = synic(1, 8);
    assert!(matches!(
        s.post_to_guest(1, S2, b"x"),
        Err(SynicError::InvalidVp { vp: 1, vps: 1 })
    ));
    assert!(matches!(
        s.send_message(0, S2, 0, b"x"),
        Err(SynicError::NoneMessageType)
    ));
    assert!(matches!(
        s.post_to_guest(0, S2, &[0; 241]),
        Err(SynicError::PayloadTooLarge(241))
    ));
    assert!(matches!(
        s.signal_guest(0, S2, 5),
        Err(SynicError::GuestFault { what: "SIEFP", .. })
    ));
    enable(&s, 0, 0x50);
    assert!(matches!(
        s.signal_guest(0, S2, 2048),
        Err(SynicError::InvalidFlag(2048))
    ));
}

#[test]
fn events_set_bits_and_interrupt_only_on_a_clear_to_set_edge() {
    let (ram, rec, s) = synic(1, 8);
    enable(&s, 0, 0x50);
    assert!(s.signal_guest(0, S2, 7).unwrap());
    assert!(!s.signal_guest(0, S2, 7).unwrap());
    assert_eq!(rec.take(), vec![(0, 0x50)]);
    assert!(flags(&ram).test_and_clear(S2, 7));
    // Masked SINT: flag set, no interrupt. Polling: likewise.
    s.write_msr(0, msr::SINT0 + 2, SINT_MASKED | 0x50).unwrap();
    assert!(s.signal_guest(0, S2, 8).unwrap());
    s.write_msr(0, msr::SINT0 + 2, SINT_POLLING | 0x50).unwrap();
    assert!(s.signal_guest(0, S2, 9).unwrap());
    assert!(rec.take().is_empty());
    let f = flags(&ram);
    assert!(f.test_and_clear(S2, 8) && f.test_and_clear(S2, 9));
    // Flag 9 of SINT 2 is byte 0x201 bit 1 of the guest page.
    assert!(s.signal_guest(0, S2, 9).unwrap());
    let mut b = [0u8; 2];
    ram.read(SIEFP + 0x200, &mut b).unwrap();
    assert_eq!(b, [0, 0b10]);
}

#[test]
fn synic_msrs_validate_and_refuse_without_changing_state() {
    let (ram, _rec, s) = synic(1, 8);
    assert_eq!(s.read_msr(0, msr::SVERSION), Ok(1));
    assert_eq!(
        s.write_msr(0, msr::SVERSION, 1),
        Err(MsrError::ReadOnly(msr::SVERSION))
    );
    assert_eq!(s.read_msr(0, msr::SINT0 + 5), Ok(SINT_MASKED));
    // Unmasked vector < 16.
    assert!(matches!(
        s.write_msr(0, msr::SINT0, 0x0F),
        Err(MsrError::BadVector { .. })
    ));
    // Masked with a small vector is fine.
    s.write_msr(0, msr::SINT0, SINT_MASKED | 0x0F).unwrap();
    // Reserved bits (proxy, bit 20).
    assert!(matches!(
        s.write_msr(0, msr::SINT0, 0x50 | 1 << 20),
        Err(MsrError::Reserved { .. })
    ));
    assert!(matches!(
        s.write_msr(0, msr::SCONTROL, 2),
        Err(MsrError::Reserved { .. })
    ));
    assert!(matches!(
        s.write_msr(0, msr::SIMP, SIMP | 0x10 | 1),
        Err(MsrError::Reserved { .. })
    ));
    // Outside RAM (1 MiB here): refused, old value kept.
    s.write_msr(0, msr::SIMP, SIMP | 1).unwrap();
    assert_eq!(
        s.write_msr(0, msr::SIMP, (1 << 20) | 1),
        Err(MsrError::OutsideRam {
            index: msr::SIMP,
            gpa: 1 << 20
        })
    );
    assert_eq!(s.read_msr(0, msr::SIMP), Ok(SIMP | 1));
    assert!(s.write_msr(0, msr::SIEFP, 0xFFFF_F000 | 1).is_err());
    // Disabled with any address is accepted (Linux writes the base back with enable clear).
    s.write_msr(0, msr::SIEFP, 0xFFFF_F000).unwrap();
    // Enabling zeroes the page.
    ram.write(SIEFP, &[0xAB; 16]).unwrap();
    s.write_msr(0, msr::SIEFP, SIEFP | 1).unwrap();
    let mut b = [0xFFu8; 16];
    ram.read(SIEFP, &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(s.read_msr(0, msr::EOM), Ok(0));
    assert_eq!(
        s.read_msr(0, 0x4000_00A0),
        Err(MsrError::Unknown(0x4000_00A0))
    );
}

#[test]
fn concurrent_host_posts_and_guest_eoms_lose_nothing_and_keep_order() {
    let (ram, rec, s) = synic(1, 1024);
    let s = Arc::new(s);
    enable(&s, 0, 0x50);
    const N: u32 = 2000;
    let host = {
        let s = s.clone();
        std::thread::spawn(move || {
            for i in 0..N {
                loop {
                    match s.post_to_guest(0, S2, &i.to_le_bytes().repeat(2)) {
                        Ok(_) => break,
                        Err(SynicError::QueueFull { .. }) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        })
    };
    let mut next = 0u32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while next < N {
        assert!(std::time::Instant::now() < deadline, "stalled at {next}");
        match guest_take(&ram, &s, 0) {
            Some(p) => {
                assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), next);
                next += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    host.join().unwrap();
    assert_eq!(s.queued(0, S2), 0);
    assert!(!rec.take().is_empty());
}

/// Where a device may set a channel's flag itself: only while SCONTROL, SIEFP and the unmasked,
/// non-polling SINT allow delivery; the word is the flag's in the SINT's 256-byte area.
#[test]
fn event_target_follows_the_synic_state() {
    let (_ram, rec, s) = synic(2, 8);
    assert_eq!(s.event_target(0, S2, 5), None);
    enable(&s, 0, 0x93);
    let t = s.event_target(0, S2, 37).unwrap();
    assert_eq!(
        t,
        EventTarget {
            word_gpa: SIEFP + 2 * 256 + 4,
            bit: 5,
            vector: 0x93
        }
    );
    assert_eq!(s.event_target(1, S2, 37), None, "VP 1 has no SynIC yet");
    assert_eq!(s.event_target(0, S2, 2048), None, "beyond the SINT's flags");
    s.write_msr(0, msr::SINT0 + 2, 0x93 | SINT_POLLING).unwrap();
    assert_eq!(s.event_target(0, S2, 37), None);
    s.write_msr(0, msr::SINT0 + 2, 0x93 | SINT_MASKED).unwrap();
    assert_eq!(s.event_target(0, S2, 37), None);
    // raise_sint respects the mask.
    rec.take();
    s.raise_sint(0, S2);
    assert!(rec.take().is_empty());
    s.write_msr(0, msr::SINT0 + 2, 0x94).unwrap();
    s.raise_sint(0, S2);
    assert_eq!(rec.take(), [(0, 0x94)]);
    assert_eq!(s.event_target(0, S2, 37).map(|t| t.vector), Some(0x94));
    s.write_msr(0, msr::SIEFP, 0).unwrap();
    assert_eq!(s.event_target(0, S2, 37), None);
}
