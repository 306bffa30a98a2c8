//! Fuzzes both ring halves against a hostile peer.
//!
//! The input chooses a ring (1–4 data pages), the peer's control words (write_index, read_index,
//! interrupt_mask, pending_send_sz, feature bits) and raw data bytes, then a bounded sequence of
//! operations: reader calls (peek / read_into / copy_payload / read_obj / gpa_ranges /
//! transfer_ranges / consume / commit / available / mask / unmask), writer calls (try_write, batches,
//! free_bytes, request_space) and raw pokes of the control page or data area between and during them
//! (e.g. after a packet was validated and before its payload is copied).
//!
//! The harness itself never panics; every `assert!` below is a property of `ringbuf`:
//! - no panic, overflow or out-of-bounds access on any ring contents;
//! - a validated packet fits the published bytes, its header info matches the ranges handed out,
//!   `copy_payload` succeeds exactly when the request lies inside the payload;
//! - the first peer-caused error breaks the half, after which every call returns `Broken`;
//! - indices stay inside the data area and 8-byte aligned; nothing loops (bounded steps).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use ringbuf::layout::{CONTROL_PAGE_SIZE, control, gpa_range_pfn_count};
use ringbuf::{
    HeaderInfo, HeapRing, OutgoingPacket, PacketType, RingError, RingMem, RingReader, RingWriter,
    WriteError,
};

/// Upper bound on operations (and on packets drained at the end) per input.
const MAX_STEPS: usize = 10_000;

/// A peer-written 32-bit index: raw (mostly invalid) or an aligned in-range one (reaches the parser).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Index {
    Raw(u32),
    Aligned(u16),
}

impl Index {
    fn value(self, size: u32) -> u32 {
        match self {
            Index::Raw(v) => v,
            Index::Aligned(v) => (u32::from(v) * 8) % size,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Setup {
    pages: u8,
    write_index: Index,
    read_index: Index,
    interrupt_mask: u32,
    pending_send_sz: u32,
    feature_bits: u32,
    /// Raw bytes the peer put in the data area, at `data_at * 8`.
    data_at: u16,
    data: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    WriteIndex,
    ReadIndex,
    InterruptMask,
    PendingSendSize,
    FeatureBits,
    /// Any other 32-bit word of the control page (reserved words included).
    Other(u16),
}

impl Word {
    fn offset(self) -> usize {
        match self {
            Word::WriteIndex => control::WRITE_INDEX,
            Word::ReadIndex => control::READ_INDEX,
            Word::InterruptMask => control::INTERRUPT_MASK,
            Word::PendingSendSize => control::PENDING_SEND_SZ,
            Word::FeatureBits => control::FEATURE_BITS,
            Word::Other(w) => (usize::from(w) * 4) % CONTROL_PAGE_SIZE,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Poke {
    at: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct PeekOp {
    copy_off: u16,
    copy_len: u16,
    obj_off: u16,
    /// Peer rewrite of the ring after validation, before the payload is read.
    mid_poke: Option<Poke>,
    consume: bool,
}

#[derive(Arbitrary, Debug)]
enum HeaderSpec {
    None,
    Raw(Vec<u8>),
    /// (byte_count, byte_offset) ranges; PFN lists are sized to match (or one PFN when the range is
    /// invalid), so most of these pass validation and reach the range iterator.
    Gpa(Vec<(u32, u16)>),
    /// Set id and ranges; `extra` claims more ranges than are present.
    Xfer {
        set_id: u16,
        ranges: Vec<(u32, u32)>,
        extra: u8,
    },
}

impl HeaderSpec {
    /// Encodes the header as the wire layout (`GpaDirectHeader` + `GpaRangeHeader`s + PFNs, or
    /// `TransferPageHeader` + `TransferPageRange`s), little-endian.
    fn bytes(&self) -> Vec<u8> {
        fn u32le(v: &mut Vec<u8>, x: u32) {
            v.extend_from_slice(&x.to_le_bytes());
        }
        match self {
            HeaderSpec::None => Vec::new(),
            HeaderSpec::Raw(v) => v.clone(),
            HeaderSpec::Gpa(ranges) => {
                let ranges = &ranges[..ranges.len().min(64)];
                let mut v = Vec::new();
                u32le(&mut v, 0); // reserved
                u32le(&mut v, ranges.len() as u32);
                for &(byte_count, byte_offset) in ranges {
                    u32le(&mut v, byte_count);
                    u32le(&mut v, u32::from(byte_offset));
                    let n = gpa_range_pfn_count(u32::from(byte_offset), byte_count)
                        .filter(|&n| n <= 64)
                        .unwrap_or(1);
                    for pfn in 0..n as u64 {
                        v.extend_from_slice(&(0x1000 + pfn).to_le_bytes());
                    }
                }
                v
            }
            HeaderSpec::Xfer {
                set_id,
                ranges,
                extra,
            } => {
                let ranges = &ranges[..ranges.len().min(64)];
                let mut v = Vec::new();
                v.extend_from_slice(&set_id.to_le_bytes());
                v.push(1); // sender_owns_set
                v.push(0); // reserved
                u32le(&mut v, ranges.len() as u32 + u32::from(*extra % 4));
                for &(byte_count, byte_offset) in ranges {
                    u32le(&mut v, byte_count);
                    u32le(&mut v, byte_offset);
                }
                v
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Pkt {
    kind: u8,
    completion: bool,
    trans_id: u64,
    header: HeaderSpec,
    payload: Vec<u8>,
    /// Gather-list split points.
    split: (u16, u16),
}

impl Pkt {
    fn packet_type(&self) -> PacketType {
        match self.kind % 4 {
            0 => PacketType::InBand,
            1 => PacketType::Completion,
            2 => PacketType::GpaDirect,
            _ => PacketType::TransferPages,
        }
    }

    /// Calls `f` with the packet as an `OutgoingPacket` (payload split into up to three slices).
    fn with<R>(&self, f: impl FnOnce(&OutgoingPacket<'_>) -> R) -> R {
        let headers = self.header.bytes();
        let len = self.payload.len();
        let a = usize::from(self.split.0).min(len);
        let b = usize::from(self.split.1).clamp(a, len);
        let parts: [&[u8]; 3] = [&self.payload[..a], &self.payload[a..b], &self.payload[b..]];
        let pkt = OutgoingPacket {
            packet_type: self.packet_type(),
            completion_requested: self.completion,
            trans_id: self.trans_id,
            headers: &headers,
            payload: &parts,
        };
        f(&pkt)
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Peek(PeekOp),
    ReadInto,
    Commit,
    Available,
    Mask,
    Unmask,
    /// Drain: peek + consume until empty or broken (bounded).
    Drain,
    PokeData(Poke),
    PokeControl {
        word: Word,
        value: Index,
    },
    Write(Pkt),
    /// A batch; `mid_poke` rewrites a control word before the packet with that index.
    Batch {
        pkts: Vec<Pkt>,
        mid_poke: Option<(u8, Word, Index)>,
        commit: bool,
    },
    FreeBytes,
    RequestSpace(u32),
    ClearSpaceRequest,
    /// Attach a new reader / writer to whatever the control page holds now.
    ReattachReader,
    ReattachWriter,
}

/// Tracks the "first peer error breaks the half, then only `Broken`" rule for one half.
#[derive(Default)]
struct BreakState {
    broken: bool,
}

impl BreakState {
    fn ring<T>(&mut self, r: &Result<T, RingError>) {
        match r {
            Ok(_) => assert!(!self.broken, "call succeeded on a broken half"),
            Err(RingError::Broken) => assert!(self.broken, "Broken before any peer error"),
            Err(e) => {
                assert!(!self.broken, "{e:?} from a half that was already broken");
                assert!(
                    matches!(e, RingError::BadIndex { .. } | RingError::BadPacket { .. }),
                    "unexpected error {e:?}"
                );
                self.broken = true;
            }
        }
    }

    fn write<T>(&mut self, r: &Result<T, WriteError>) {
        match r {
            Err(WriteError::Ring(e)) => self.ring::<()>(&Err(*e)),
            Ok(_) => self.ring::<()>(&Ok(())),
            // Local misuse / no space: never on a broken half (that reports Broken first).
            Err(e) => assert!(!self.broken, "{e:?} from a broken writer"),
        }
    }
}

struct Harness<'r> {
    ring: &'r HeapRing,
    size: u32,
    reader: Option<(RingReader<&'r HeapRing>, BreakState)>,
    writer: Option<(RingWriter<&'r HeapRing>, BreakState)>,
    buf: Vec<u8>,
}

fn check_index(i: u32, size: u32) {
    assert!(
        i < size && i.is_multiple_of(8),
        "index {i:#x} in a {size:#x} ring"
    );
}

fn poke_data(ring: &HeapRing, size: u32, at: u32, bytes: &[u8]) {
    let size = size as usize;
    let bytes = &bytes[..bytes.len().min(size)];
    let at = at as usize % size;
    let first = bytes.len().min(size - at);
    assert!(ring.poke(CONTROL_PAGE_SIZE + at, &bytes[..first]));
    assert!(ring.poke(CONTROL_PAGE_SIZE, &bytes[first..]));
}

impl<'r> Harness<'r> {
    fn new(ring: &'r HeapRing, setup: &Setup) -> Self {
        let size = ring.data_len();
        let words = [
            (control::WRITE_INDEX, setup.write_index.value(size)),
            (control::READ_INDEX, setup.read_index.value(size)),
            (control::INTERRUPT_MASK, setup.interrupt_mask),
            (control::PENDING_SEND_SZ, setup.pending_send_sz),
            (control::FEATURE_BITS, setup.feature_bits),
        ];
        for (off, v) in words {
            assert!(ring.poke(off, &v.to_le_bytes()));
        }
        poke_data(ring, size, u32::from(setup.data_at) * 8, &setup.data);
        let mut h = Harness {
            ring,
            size,
            reader: None,
            writer: None,
            buf: Vec::new(),
        };
        h.reattach_reader();
        h.reattach_writer();
        h
    }

    fn reattach_reader(&mut self) {
        match RingReader::new(self.ring) {
            Ok(r) => {
                check_index(r.read_index(), self.size);
                self.reader = Some((r, BreakState::default()));
            }
            Err(e) => assert!(
                matches!(
                    e,
                    RingError::BadIndex {
                        field: "read_index",
                        ..
                    }
                ),
                "{e:?}"
            ),
        }
    }

    fn reattach_writer(&mut self) {
        match RingWriter::new(self.ring) {
            Ok(w) => {
                check_index(w.write_index(), self.size);
                self.writer = Some((w, BreakState::default()));
            }
            Err(e) => assert!(
                matches!(
                    e,
                    RingError::BadIndex {
                        field: "write_index",
                        ..
                    }
                ),
                "{e:?}"
            ),
        }
    }

    fn run(&mut self, op: Op) {
        let (size, ring) = (self.size, self.ring);
        match op {
            Op::Peek(p) => {
                if let Some((r, st)) = &mut self.reader {
                    peek_op(r, st, ring, size, &p);
                }
            }
            Op::ReadInto => {
                if let Some((r, st)) = &mut self.reader {
                    let res = r.read_into(&mut self.buf);
                    st.ring(&res);
                    if let Ok(Some(info)) = res {
                        assert_eq!(self.buf.len(), info.payload_len());
                        assert!(info.footprint() <= size - 8);
                    }
                }
            }
            Op::Commit => {
                if let Some((r, st)) = &mut self.reader {
                    let res = r.commit();
                    st.ring(&res);
                    check_index(r.read_index(), size);
                }
            }
            Op::Available => {
                if let Some((r, st)) = &mut self.reader {
                    let res = r.available();
                    st.ring(&res);
                    if let Ok(a) = res {
                        assert!(a < size);
                    }
                }
            }
            Op::Mask => {
                if let Some((r, _)) = &self.reader {
                    r.mask_interrupts();
                }
            }
            Op::Unmask => {
                if let Some((r, st)) = &mut self.reader {
                    let res = r.unmask_interrupts();
                    st.ring(&res);
                }
            }
            Op::Drain => self.drain(),
            Op::PokeData(p) => poke_data(ring, size, u32::from(p.at) * 8, &p.bytes),
            Op::PokeControl { word, value } => {
                assert!(ring.poke(word.offset(), &value.value(size).to_le_bytes()));
            }
            Op::Write(pkt) => {
                if let Some((w, st)) = &mut self.writer {
                    let before = w.write_index();
                    let res = pkt.with(|p| w.try_write(p));
                    st.write(&res);
                    if res.is_err() {
                        assert_eq!(w.write_index(), before, "failed write moved write_index");
                    }
                    check_index(w.write_index(), size);
                }
            }
            Op::Batch {
                pkts,
                mid_poke,
                commit,
            } => {
                if let Some((w, st)) = &mut self.writer {
                    let mut batch = w.batch();
                    for (i, pkt) in pkts.iter().take(64).enumerate() {
                        if let Some((at, word, value)) = mid_poke
                            && usize::from(at) == i
                        {
                            assert!(ring.poke(word.offset(), &value.value(size).to_le_bytes()));
                        }
                        let res = pkt.with(|p| batch.write(p));
                        st.write(&res);
                    }
                    if commit {
                        let n = batch.len();
                        let res = batch.commit();
                        if n > 0 || res.is_err() {
                            st.ring(&res);
                        }
                    }
                    check_index(w.write_index(), size);
                }
            }
            Op::FreeBytes => {
                if let Some((w, st)) = &mut self.writer {
                    let res = w.free_bytes();
                    st.ring(&res);
                    if let Ok(f) = res {
                        assert!(f > 0 && f <= size && f.is_multiple_of(8), "free {f}");
                    }
                }
            }
            Op::RequestSpace(n) => {
                if let Some((w, st)) = &mut self.writer {
                    let res = w.request_space(n);
                    st.ring(&res);
                }
            }
            Op::ClearSpaceRequest => {
                if let Some((w, _)) = &self.writer {
                    w.clear_space_request();
                    let _ = w.peer_supports_pending_send();
                }
            }
            Op::ReattachReader => self.reattach_reader(),
            Op::ReattachWriter => self.reattach_writer(),
        }
    }

    fn drain(&mut self) {
        let size = self.size;
        let Some((r, st)) = &mut self.reader else {
            return;
        };
        for _ in 0..MAX_STEPS {
            let res = r.peek();
            match res {
                Ok(Some(pkt)) => {
                    check_packet(&pkt, size);
                    pkt.consume();
                    st.ring::<()>(&Ok(()));
                }
                Ok(None) => {
                    st.ring::<()>(&Ok(()));
                    break;
                }
                Err(e) => {
                    st.ring::<()>(&Err(e));
                    break;
                }
            }
        }
        let res = r.commit();
        st.ring(&res);
    }
}

/// Properties of a packet the reader validated.
fn check_packet(pkt: &ringbuf::IncomingPacket<'_, &HeapRing>, size: u32) {
    let info = *pkt.info();
    assert!(info.start < size && info.start.is_multiple_of(8));
    assert!(info.payload_offset >= 16 && info.payload_offset <= info.len);
    assert!(info.footprint() <= size - 8, "{info:?}");
    assert_eq!(pkt.payload_len(), info.payload_len());
    match info.header {
        HeaderInfo::None => {
            assert!(matches!(
                info.packet_type,
                PacketType::InBand | PacketType::Completion
            ));
            assert!(pkt.gpa_ranges().is_none());
            assert!(pkt.transfer_ranges().is_none());
        }
        HeaderInfo::GpaDirect { range_count } => {
            assert_eq!(info.packet_type, PacketType::GpaDirect);
            assert!(range_count > 0);
            let ranges = pkt.gpa_ranges().expect("validated GPA header");
            let mut n = 0u32;
            for range in ranges {
                let pfns = gpa_range_pfn_count(range.byte_offset, range.byte_count)
                    .expect("validated range");
                assert_eq!(range.pfns.len(), pfns);
                n += 1;
            }
            assert_eq!(n, range_count);
            assert!(pkt.transfer_ranges().is_none());
        }
        HeaderInfo::TransferPages { range_count, .. } => {
            assert_eq!(info.packet_type, PacketType::TransferPages);
            let ranges = pkt
                .transfer_ranges()
                .expect("validated transfer-page header");
            assert_eq!(ranges.len(), range_count as usize);
            assert!(pkt.gpa_ranges().is_none());
        }
    }
}

fn peek_op(
    r: &mut RingReader<&HeapRing>,
    st: &mut BreakState,
    ring: &HeapRing,
    size: u32,
    p: &PeekOp,
) {
    let res = r.peek();
    let pkt = match res {
        Ok(Some(pkt)) => pkt,
        Ok(None) => {
            st.ring::<()>(&Ok(()));
            return;
        }
        Err(e) => {
            st.ring::<()>(&Err(e));
            return;
        }
    };
    check_packet(&pkt, size);
    if let Some(poke) = &p.mid_poke {
        poke_data(ring, size, u32::from(poke.at) * 8, &poke.bytes);
    }
    // The packet's view does not change with the ring under it.
    check_packet(&pkt, size);
    let payload_len = pkt.payload_len();
    let (off, len) = (usize::from(p.copy_off), usize::from(p.copy_len));
    let mut dst = vec![0u8; len];
    let fits = off <= payload_len && len <= payload_len - off;
    assert_eq!(pkt.copy_payload(off, &mut dst).is_ok(), fits);
    let obj_off = usize::from(p.obj_off);
    let fits = obj_off <= payload_len && 8 <= payload_len - obj_off;
    assert_eq!(pkt.read_obj::<[u8; 8]>(obj_off).is_ok(), fits);
    let fits = obj_off <= payload_len && 64 <= payload_len - obj_off;
    assert_eq!(pkt.read_obj::<[u64; 8]>(obj_off).is_ok(), fits);
    if p.consume {
        pkt.consume();
    }
    st.ring::<()>(&Ok(()));
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let setup = Setup::arbitrary(&mut u)?;
    let pages = 1 + usize::from(setup.pages % 4);
    let Some(ring) = HeapRing::new(pages) else {
        return Ok(());
    };
    let mut h = Harness::new(&ring, &setup);
    let mut steps = 0;
    while !u.is_empty() && steps < MAX_STEPS {
        let op = Op::arbitrary(&mut u)?;
        h.run(op);
        steps += 1;
    }
    h.drain();
    // A last writer pass against whatever the peer left in the control page.
    if let Some((w, st)) = &mut h.writer {
        let res = w.free_bytes();
        st.ring(&res);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
