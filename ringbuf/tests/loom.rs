#![cfg(loom)]
//! Loom models of one ring: a [`RingWriter`] and a [`RingReader`] on two threads.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p ringbuf --test loom --release`.
//!
//! The data area is a vector of loom `UnsafeCell`s, one per 8-byte word, so loom reports any data
//! access that is not ordered by the ring's index protocol (a reader seeing bytes the writer is still
//! writing, or a writer reusing bytes the reader is still reading). The control words are loom
//! atomics, so loom explores the stale values the fences must rule out.
//!
//! - [`packets_arrive_whole_and_in_order`]: data integrity across wrap-around and a full ring.
//! - [`no_lost_wakeup_on_data`]: the `interrupt_mask` protocol (reader sleeps, writer signals).
//! - [`no_lost_wakeup_on_space`]: the `pending_send_sz` protocol (writer sleeps on a full ring,
//!   reader signals), with the reader also sleeping on the data protocol.

use loom::cell::UnsafeCell;
use loom::sync::Notify;
use loom::sync::atomic::AtomicU32;
use loom::thread;
use ringbuf::{
    ControlWord, OutgoingPacket, PacketType, RingMem, RingReader, RingWriter, WriteError,
    init_control,
};
use std::sync::Arc;

/// A ring in loom-tracked memory: five control words and a data area of 8-byte words.
struct LoomMem {
    control: [AtomicU32; 5],
    data: Vec<UnsafeCell<[u8; 8]>>,
}

// SAFETY: the control words are atomics; every data access goes through a loom `UnsafeCell`
// (`with`/`with_mut`), which checks that concurrent accesses are ordered and fails the model if not.
unsafe impl Sync for LoomMem {}

impl LoomMem {
    fn new(data_len: u32) -> Arc<Self> {
        assert!(data_len > 0 && data_len.is_multiple_of(8));
        let mem = LoomMem {
            control: std::array::from_fn(|_| AtomicU32::new(0)),
            data: (0..data_len / 8).map(|_| UnsafeCell::new([0; 8])).collect(),
        };
        init_control(&mem);
        Arc::new(mem)
    }

    /// Calls `f(word, byte offset in the word, buffer range)` for each piece of the wrapping range
    /// `offset..offset + len`, one data word at a time.
    fn pieces(
        &self,
        offset: u32,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let size = self.data.len() * 8;
        assert!(
            (offset as usize) < size && len <= size,
            "ring half broke the RingMem contract"
        );
        let mut pos = offset as usize;
        let mut done = 0;
        while done < len {
            let within = pos % 8;
            let n = (8 - within).min(len - done);
            f(pos / 8, within, done..done + n);
            done += n;
            pos = (pos + n) % size;
        }
    }
}

impl RingMem for LoomMem {
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        &self.control[word.dense()]
    }

    fn data_len(&self) -> u32 {
        (self.data.len() * 8) as u32
    }

    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        self.pieces(offset, dst.len(), |word, within, range| {
            let n = range.len();
            self.data[word].with(|p| {
                // SAFETY: loom checked this read against every write to the word; `p` is valid.
                let bytes = unsafe { &*p };
                dst[range].copy_from_slice(&bytes[within..within + n]);
            });
        });
    }

    fn write_data(&self, offset: u32, src: &[u8]) {
        self.pieces(offset, src.len(), |word, within, range| {
            let n = range.len();
            // A partial word is a read-modify-write of the whole word, as far as loom is concerned.
            self.data[word].with_mut(|p| {
                // SAFETY: loom checked this write against every other access to the word.
                let bytes = unsafe { &mut *p };
                bytes[within..within + n].copy_from_slice(&src[range]);
            });
        });
    }
}

/// Payload lengths, cycled: 13 bytes makes a 40-byte footprint (3 bytes of padding), 5 bytes a
/// 32-byte one. In a 96-byte ring the third packet wraps (72..96 + 0..16) and only fits once the
/// reader has freed the first.
const PAYLOAD_LENS: [usize; 2] = [13, 5];

fn payload(i: usize) -> Vec<u8> {
    let len = PAYLOAD_LENS[i % PAYLOAD_LENS.len()];
    (0..len).map(|j| (i * 37 + j * 3 + 1) as u8).collect()
}

/// Checks that packet `i` arrived whole: type, transaction id, payload bytes and zero padding.
fn check_packet(i: usize, info: &ringbuf::PacketInfo, buf: &[u8]) {
    assert_eq!(info.packet_type, PacketType::InBand, "packet {i}");
    assert_eq!(info.trans_id, i as u64, "packets out of order or torn");
    let want = payload(i);
    assert_eq!(
        buf.len(),
        want.len().next_multiple_of(8),
        "packet {i} length"
    );
    assert_eq!(&buf[..want.len()], &want[..], "packet {i} payload torn");
    assert!(
        buf[want.len()..].iter().all(|&b| b == 0),
        "packet {i} padding"
    );
}

/// Packet `i` as the writer sends it.
fn send(writer: &mut RingWriter<Arc<LoomMem>>, i: usize) -> Result<bool, WriteError> {
    let data = payload(i);
    let parts: [&[u8]; 1] = [&data];
    writer.try_write(&OutgoingPacket::in_band(i as u64, false, &parts))
}

/// Runs `model` under every interleaving loom explores with at most `preemption_bound` preemptions,
/// and prints how many executions that was (visible with `--nocapture`).
fn check(name: &str, preemption_bound: usize, model: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemption_bound);
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        model();
    });
    eprintln!(
        "{name}: {} executions (preemption bound {preemption_bound})",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// Data integrity: four packets of two sizes through a 96-byte ring, so the ring fills (the writer
/// must wait for the reader), one packet wraps around the end of the data area, and the writer
/// reuses bytes the reader has just read. Both sides poll. Loom fails the model if the reader
/// touches a word before the writer's writes to it are published, or the writer overwrites a word
/// before the reader's reads of it are retired; the reader checks contents and order.
#[test]
fn packets_arrive_whole_and_in_order() {
    const N: usize = 4;
    check("integrity", 3, || {
        let mem = LoomMem::new(96);
        let mut writer = RingWriter::new(mem.clone()).expect("writer");
        let mut reader = RingReader::new(mem).expect("reader");

        let producer = thread::spawn(move || {
            for i in 0..N {
                loop {
                    match send(&mut writer, i) {
                        Ok(_) => break,
                        Err(WriteError::Full { .. }) => thread::yield_now(),
                        Err(e) => panic!("write {i}: {e}"),
                    }
                }
            }
        });

        let mut buf = Vec::new();
        let mut i = 0;
        while i < N {
            match reader.read_into(&mut buf).expect("read") {
                Some(info) => {
                    check_packet(i, &info, &buf);
                    reader.commit().expect("commit");
                    i += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().expect("producer");
        assert_eq!(reader.available().expect("available"), 0);
    });
}

/// The reader's side of the interrupt-mask protocol (Linux `hv_begin_read` / `hv_end_read`):
/// mask, drain, commit, unmask, and sleep only if nothing arrived in between. `space` is signalled
/// when `commit` says the writer is waiting for room.
fn receive_all(reader: &mut RingReader<Arc<LoomMem>>, n: usize, data: &Notify, space: &Notify) {
    let mut buf = Vec::new();
    let mut i = 0;
    loop {
        reader.mask_interrupts();
        while let Some(info) = reader.read_into(&mut buf).expect("read") {
            check_packet(i, &info, &buf);
            i += 1;
        }
        if reader.commit().expect("commit") {
            space.notify();
        }
        if i == n {
            return;
        }
        if reader.unmask_interrupts().expect("unmask") {
            continue;
        }
        // Loom reports a deadlock if this wait is never satisfied: a lost wake-up.
        data.wait();
    }
}

/// No lost wake-up on data: the ring never fills, the writer signals when it is told to and the
/// reader sleeps between drains. Packets 0 and 1 go one by one, packets 2 and 3 as one batch (one
/// signalling decision, made against the ring's state before the batch). The first packet finds
/// the reader unmasked; later ones race with the reader re-enabling interrupts after a drain, which
/// is where the writer's fence (after publishing `write_index`) and the reader's fence (after
/// clearing `interrupt_mask`) matter.
#[test]
fn no_lost_wakeup_on_data() {
    const N: usize = 4;
    check("data wake-up", 3, || {
        let mem = LoomMem::new(192);
        let mut writer = RingWriter::new(mem.clone()).expect("writer");
        let mut reader = RingReader::new(mem).expect("reader");
        let data = Arc::new(Notify::new());
        let space = Arc::new(Notify::new());

        let producer = {
            let data = data.clone();
            thread::spawn(move || {
                for i in 0..2 {
                    if send(&mut writer, i).expect("never full") {
                        data.notify();
                    }
                }
                let payloads = [payload(2), payload(3)];
                let parts: [[&[u8]; 1]; 2] = [[&payloads[0]], [&payloads[1]]];
                let mut batch = writer.batch();
                for (i, part) in parts.iter().enumerate() {
                    let pkt = OutgoingPacket::in_band(2 + i as u64, false, part);
                    batch.write(&pkt).expect("never full");
                }
                if batch.commit().expect("commit") {
                    data.notify();
                }
            })
        };

        receive_all(&mut reader, N, &data, &space);
        producer.join().expect("producer");
    });
}

/// No lost wake-up on space: a 64-byte ring holds one packet at a time, so the writer keeps
/// finding it full. It asks for room through `pending_send_sz` (`request_space`) and sleeps unless
/// the room is already there; the reader signals when `commit` says the request is satisfied. The
/// reader sleeps on the data protocol as well. The writer must get every packet through.
#[test]
fn no_lost_wakeup_on_space() {
    const N: usize = 3;
    check("space wake-up", 3, || {
        let mem = LoomMem::new(64);
        let mut writer = RingWriter::new(mem.clone()).expect("writer");
        let mut reader = RingReader::new(mem).expect("reader");
        let data = Arc::new(Notify::new());
        let space = Arc::new(Notify::new());

        let producer = {
            let (data, space) = (data.clone(), space.clone());
            thread::spawn(move || {
                for i in 0..N {
                    loop {
                        match send(&mut writer, i) {
                            Ok(signal) => {
                                if signal {
                                    data.notify();
                                }
                                break;
                            }
                            Err(WriteError::Full { needed, .. }) => {
                                if !writer.request_space(needed).expect("request_space") {
                                    // Loom reports a deadlock if the reader never signals.
                                    space.wait();
                                }
                            }
                            Err(e) => panic!("write {i}: {e}"),
                        }
                    }
                    writer.clear_space_request();
                }
            })
        };

        receive_all(&mut reader, N, &data, &space);
        producer.join().expect("producer");
    });
}
