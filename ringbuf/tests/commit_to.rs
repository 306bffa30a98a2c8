//! `RingReader::commit_to`: publishing part of what was read (a VSP releases a request's ring space
//! only once it is answered). Partial positions, re-reading after re-attaching, refusal of bad
//! positions, and the Linux signalling decision checked against a model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use ringbuf::reader::CommitError;
use ringbuf::{ControlWord, HeapRing, OutgoingPacket, RingMem, RingReader, RingWriter};
use std::sync::atomic::Ordering;

fn send(w: &mut RingWriter<&HeapRing>, id: u64, len: usize) -> u32 {
    let payload = vec![id as u8; len];
    let parts: [&[u8]; 1] = [&payload];
    let pkt = OutgoingPacket::in_band(id, true, &parts);
    let fp = pkt.footprint().unwrap();
    w.try_write(&pkt).unwrap();
    fp
}

fn stored_read_index(ring: &HeapRing) -> u32 {
    ring.control(ControlWord::ReadIndex).load(Ordering::Relaxed)
}

/// Reads every packet, returning (trans_id, start, end) of each.
fn read_all(r: &mut RingReader<&HeapRing>) -> Vec<(u64, u32, u32)> {
    let mut v = Vec::new();
    while let Some(p) = r.peek().unwrap() {
        let (id, start, end) = (p.trans_id(), p.start_position(), p.end_position());
        let info = *p.info();
        assert_eq!(start, info.start);
        p.consume();
        assert_eq!(r.position(), end);
        assert_eq!(r.position_after(&info), end);
        v.push((id, start, end));
    }
    v
}

#[test]
fn partial_commits_release_in_order_and_the_rest_is_read_again() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    let size = r.data_len();
    let fps: Vec<u32> = (0..4)
        .map(|i| send(&mut w, i, 100 + 50 * i as usize))
        .collect();
    let got = read_all(&mut r);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(got[0].1, 0);
    for i in 0..4 {
        assert_eq!(got[i].2, got[i].1 + fps[i]);
    }
    // Everything read, nothing released.
    assert_eq!(w.free_bytes().unwrap(), size - fps.iter().sum::<u32>());
    assert_eq!(r.commit_to(got[1].2), Ok(false));
    assert_eq!(r.read_index(), got[1].2);
    assert_eq!(stored_read_index(&ring), got[1].2);
    assert_eq!(w.free_bytes().unwrap(), size - fps[2] - fps[3]);
    // Committing the same position again is a no-op.
    assert_eq!(r.commit_to(got[1].2), Ok(false));
    // Reading goes on after the private position, not the published one.
    send(&mut w, 4, 8);
    let more = read_all(&mut r);
    assert_eq!(more.iter().map(|g| g.0).collect::<Vec<_>>(), [4]);
    // A reader attaching now (a restarted VSP) reads the unreleased packets again.
    let mut again = RingReader::new(&ring).unwrap();
    let reread = read_all(&mut again);
    assert_eq!(reread.iter().map(|g| g.0).collect::<Vec<_>>(), [2, 3, 4]);
    // The end of everything equals a full commit.
    assert_eq!(r.commit_to(r.position()), Ok(false));
    assert_eq!(r.read_index(), more[0].2);
    assert_eq!(r.commit(), Ok(false));
    assert_eq!(w.free_bytes().unwrap(), size);
}

#[test]
fn bad_positions_are_refused_and_change_nothing() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    let size = r.data_len();
    // Move the ring's origin so the consumed span wraps: fill and drain most of it first.
    let big = (size / 2) as usize;
    send(&mut w, 0, big);
    read_all(&mut r);
    r.commit().unwrap();
    for i in 1..=3 {
        send(&mut w, i, 1000);
    }
    let got = read_all(&mut r);
    let (ri, next) = (r.read_index(), r.position());
    assert!(next < ri, "the span wraps");
    let bad = [
        next + 8,        // beyond what was read
        ri - 8,          // behind the published read_index
        got[0].2 + 4,    // misaligned
        size,            // outside the data area
        0xFFFF_FFF8,     // far outside
        (next + ri) / 2, // in the unread gap
    ];
    for pos in bad {
        assert_eq!(
            r.commit_to(pos),
            Err(CommitError::BadPosition {
                pos,
                read_index: ri,
                next
            }),
            "pos {pos:#x}"
        );
        assert_eq!(r.read_index(), ri);
        assert_eq!(stored_read_index(&ring), ri);
    }
    // The ring is not broken: good positions still work, wrapping included.
    assert_eq!(r.commit_to(ri), Ok(false));
    assert_eq!(r.commit_to(got[1].2), Ok(false));
    assert_eq!(r.read_index(), got[1].2);
    // Now behind the new read_index.
    assert!(matches!(
        r.commit_to(got[0].2),
        Err(CommitError::BadPosition { .. })
    ));
    assert_eq!(r.commit_to(next), Ok(false));
    send(&mut w, 9, 8);
    assert_eq!(read_all(&mut r)[0].0, 9);
}

#[test]
fn broken_ring_refuses_commit_to() {
    let ring = HeapRing::new(1).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    ring.control(ControlWord::WriteIndex)
        .store(3, Ordering::Relaxed);
    assert!(r.peek().is_err());
    assert_eq!(
        r.commit_to(0),
        Err(CommitError::Ring(ringbuf::RingError::Broken))
    );
}

#[test]
fn signal_when_a_partial_commit_crosses_pending_send_sz() {
    let ring = HeapRing::new(1).unwrap();
    let mut w = RingWriter::new(&ring).unwrap();
    let mut r = RingReader::new(&ring).unwrap();
    let size = r.data_len();
    let fp = send(&mut w, 0, 1000);
    let n = (size - 8) / fp;
    for i in 1..n {
        send(&mut w, u64::from(i), 1000);
    }
    let got = read_all(&mut r);
    let free0 = size - n * fp;
    // The writer wants room for two packets: the first release is not enough, the second is.
    assert!(!w.request_space(free0 + fp + 8).unwrap());
    assert_eq!(r.commit_to(got[0].2), Ok(false));
    assert_eq!(r.commit_to(got[1].2), Ok(true));
    // Already above: no second signal.
    assert_eq!(r.commit_to(got[2].2), Ok(false));
}

fn signal_model(before: u32, after: u32, pending: u32, feature: bool) -> bool {
    feature && pending != 0 && before <= pending && after > pending
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random packets, some read, released in random partial steps with random pending_send_sz
    /// values; every step must signal exactly as the model and `commit` would.
    #[test]
    fn partial_commits_signal_like_commit(
        rounds in prop::collection::vec(
            (prop::collection::vec(0usize..900, 1..12), prop::collection::vec(0usize..12, 1..6),
             0u32..5000, any::<bool>()),
            1..12),
    ) {
        let ring = HeapRing::new(1).unwrap();
        let twin = HeapRing::new(1).unwrap();
        let mut w = RingWriter::new(&ring).unwrap();
        let mut tw = RingWriter::new(&twin).unwrap();
        let mut r = RingReader::new(&ring).unwrap();
        let mut tr = RingReader::new(&twin).unwrap();
        let size = r.data_len();
        for (lens, steps, pending, feature) in rounds {
            for (i, len) in lens.iter().enumerate() {
                let payload = vec![i as u8; *len];
                let parts: [&[u8]; 1] = [&payload];
                let pkt = OutgoingPacket::in_band(i as u64, false, &parts);
                let a = w.try_write(&pkt);
                let b = tw.try_write(&pkt);
                prop_assert_eq!(a.is_ok(), b.is_ok());
                prop_assert_eq!(w.write_index(), tw.write_index());
                if a.is_err() {
                    break;
                }
            }
            let got = read_all(&mut r);
            let tgot = read_all(&mut tr);
            prop_assert_eq!(got.len(), tgot.len());
            let feat = if feature { ringbuf::layout::control::FEAT_PENDING_SEND_SZ } else { 0 };
            for m in [&ring, &twin] {
                m.control(ControlWord::PendingSendSize).store(pending & !7, Ordering::Relaxed);
                m.control(ControlWord::FeatureBits).store(feat, Ordering::Relaxed);
            }
            // Release in steps (indices into `got`, sorted), then everything.
            let mut cuts: Vec<usize> = steps.into_iter().filter(|&s| s < got.len()).collect();
            cuts.sort_unstable();
            for c in cuts {
                let before = w.free_bytes().unwrap();
                let pos = got[c].2;
                let s = r.commit_to(pos).unwrap();
                let after = w.free_bytes().unwrap();
                prop_assert_eq!(r.read_index(), pos);
                prop_assert_eq!(s, signal_model(before, after, pending & !7, feature));
            }
            let before = w.free_bytes().unwrap();
            let s = r.commit_to(r.position()).unwrap();
            prop_assert_eq!(s, signal_model(before, size, pending & !7, feature));
            // The twin, with one plain commit: the same decision when nothing was released before.
            let tbefore = tw.free_bytes().unwrap();
            let ts = tr.commit().unwrap();
            prop_assert_eq!(ts, signal_model(tbefore, size, pending & !7, feature));
            prop_assert_eq!(r.read_index(), tr.read_index());
            prop_assert_eq!(w.free_bytes().unwrap(), size);
        }
    }
}
