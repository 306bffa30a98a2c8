//! SynIC message page (SIMP) slot protocol and event-flag page (SIEF) bitmaps over an abstract page
//! of memory (reference §6.3, §6.4).
//!
//! The page is shared with the other side, which may write anything at any time, so every access is
//! an atomic operation on a 32-bit word (relaxed for byte copies, ordered where the protocol needs it)
//! and everything read is copied out before it is looked at.

use core::sync::atomic::{AtomicU32, Ordering};

use alloc::boxed::Box;
use zerocopy::{FromZeros, IntoBytes};

use super::message::{
    HV_MESSAGE_SIZE, HVMSG_NONE, HvMessage, MAX_PAYLOAD, MESSAGE_FLAG_PENDING, MessageError,
    SynicMessage,
};
use super::{SINT_COUNT, Sint, SynicError};

/// Size of a SynIC page.
pub const PAGE_SIZE: usize = 4096;
/// 32-bit words in a page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 4;
/// Size of one message slot (and of one SINT's event-flag area).
pub const SLOT_SIZE: usize = HV_MESSAGE_SIZE;
/// Event flags per SINT: 256 bytes × 8.
pub const EVENT_FLAGS_PER_SINT: u32 = (SLOT_SIZE * 8) as u32;

const SLOT_WORDS: usize = SLOT_SIZE / 4;
/// The pending flag inside the slot's second word (payload_size = byte 0, flags = byte 1).
const PENDING_BIT_IN_WORD: u32 = (MESSAGE_FLAG_PENDING as u32) << 8;

/// One 4 KiB page shared with the other side (a message page or an event-flag page).
///
/// Implementations hand out the page as 1024 atomic words: a heap page ([`HeapPage`]), a page of a
/// shared mapping, or a guest RAM page (page-aligned in the host mapping, so the cast is sound).
/// Byte copies are provided on top of the words; callers keep `offset + len <= 4096`.
pub trait PageMem {
    /// The page as 32-bit words (little-endian byte order inside each word).
    fn words(&self) -> &[AtomicU32; PAGE_WORDS];

    /// Copies `dst.len()` bytes starting at byte `offset` (relaxed loads).
    fn read(&self, offset: usize, dst: &mut [u8]) {
        read_bytes(self.words(), offset, dst);
    }

    /// Copies `src` to byte `offset` (relaxed stores; bytes outside the range are preserved).
    fn write(&self, offset: usize, src: &[u8]) {
        write_bytes(self.words(), offset, src);
    }
}

impl<T: PageMem + ?Sized> PageMem for &T {
    fn words(&self) -> &[AtomicU32; PAGE_WORDS] {
        (**self).words()
    }
}

impl<T: PageMem + ?Sized> PageMem for alloc::sync::Arc<T> {
    fn words(&self) -> &[AtomicU32; PAGE_WORDS] {
        (**self).words()
    }
}

impl PageMem for [AtomicU32; PAGE_WORDS] {
    fn words(&self) -> &[AtomicU32; PAGE_WORDS] {
        self
    }
}

fn read_bytes(words: &[AtomicU32; PAGE_WORDS], offset: usize, dst: &mut [u8]) {
    let mut done = 0;
    while done < dst.len() {
        let at = offset + done;
        let (word, skip) = (at / 4, at % 4);
        let n = (4 - skip).min(dst.len() - done);
        let bytes = words[word].load(Ordering::Relaxed).to_le_bytes();
        dst[done..done + n].copy_from_slice(&bytes[skip..skip + n]);
        done += n;
    }
}

fn write_bytes(words: &[AtomicU32; PAGE_WORDS], offset: usize, src: &[u8]) {
    let mut done = 0;
    while done < src.len() {
        let at = offset + done;
        let (word, skip) = (at / 4, at % 4);
        let n = (4 - skip).min(src.len() - done);
        if n == 4 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&src[done..done + 4]);
            words[word].store(u32::from_le_bytes(b), Ordering::Relaxed);
        } else {
            let (mut mask, mut val) = ([0u8; 4], [0u8; 4]);
            mask[skip..skip + n].fill(0xFF);
            val[skip..skip + n].copy_from_slice(&src[done..done + n]);
            let (mask, val) = (u32::from_le_bytes(mask), u32::from_le_bytes(val));
            let mut old = words[word].load(Ordering::Relaxed);
            loop {
                match words[word].compare_exchange_weak(
                    old,
                    (old & !mask) | val,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => old = now,
                }
            }
        }
        done += n;
    }
}

/// A zeroed page on the heap (in-process ports and tests).
pub struct HeapPage {
    words: Box<[AtomicU32; PAGE_WORDS]>,
}

impl HeapPage {
    /// A zeroed page.
    pub fn new() -> HeapPage {
        HeapPage {
            words: Box::new([const { AtomicU32::new(0) }; PAGE_WORDS]),
        }
    }

    /// Overwrites raw bytes without any protocol: how tests play a hostile peer. `false` (and no
    /// change) if the range is outside the page.
    pub fn poke(&self, offset: usize, bytes: &[u8]) -> bool {
        if offset
            .checked_add(bytes.len())
            .is_none_or(|end| end > PAGE_SIZE)
        {
            return false;
        }
        self.write(offset, bytes);
        true
    }

    /// A copy of the whole page.
    pub fn snapshot(&self) -> [u8; PAGE_SIZE] {
        let mut out = [0u8; PAGE_SIZE];
        self.read(0, &mut out);
        out
    }
}

impl Default for HeapPage {
    fn default() -> Self {
        HeapPage::new()
    }
}

impl PageMem for HeapPage {
    fn words(&self) -> &[AtomicU32; PAGE_WORDS] {
        &self.words
    }
}

/// What happened to a message offered to a slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written into the slot; raise the SINT interrupt.
    Delivered,
    /// The slot holds an unconsumed message; the pending flag is now set, so the guest writes EOM
    /// after freeing it. Keep the message queued and offer it again on EOM.
    SlotBusy,
}

fn slot_word(sint: Sint) -> usize {
    sint.index() * SLOT_WORDS
}

/// Host side of a message page: writes messages into free slots.
pub struct SlotWriter<M> {
    mem: M,
}

impl<M: PageMem> SlotWriter<M> {
    pub fn new(mem: M) -> Self {
        SlotWriter { mem }
    }

    /// The page under the writer.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Whether `sint`'s slot is free (message type 0) right now.
    pub fn is_free(&self, sint: Sint) -> bool {
        self.mem.words()[slot_word(sint)].load(Ordering::Acquire) == HVMSG_NONE
    }

    /// Offers `msg` to `sint`'s slot (§6.3). Free slot: bytes 0x04–0xFF are written (flags =
    /// pending if `more_queued`, reserved 0), then the type is stored last with release. Busy slot:
    /// the pending flag is set first, then the type re-read; a slot freed in between is written
    /// after all. Only one thread may deliver to a given page at a time.
    pub fn deliver(
        &self,
        sint: Sint,
        msg: &HvMessage,
        more_queued: bool,
    ) -> Result<Delivery, SynicError> {
        if msg.header.message_type == HVMSG_NONE {
            return Err(SynicError::NoneMessageType);
        }
        if msg.header.payload_size as usize > MAX_PAYLOAD {
            return Err(SynicError::PayloadTooLarge(
                msg.header.payload_size as usize,
            ));
        }
        let words = self.mem.words();
        let base = slot_word(sint);
        if words[base].load(Ordering::SeqCst) != HVMSG_NONE {
            // Flag first, then look again: the guest frees the slot and then reads the flag, so one
            // of the two sides sees the other's write (both are sequentially consistent).
            words[base + 1].fetch_or(PENDING_BIT_IN_WORD, Ordering::SeqCst);
            if words[base].load(Ordering::SeqCst) != HVMSG_NONE {
                return Ok(Delivery::SlotBusy);
            }
        }
        let mut copy = *msg;
        copy.header.message_flags = if more_queued { MESSAGE_FLAG_PENDING } else { 0 };
        copy.header.reserved = 0;
        self.mem.write(base * 4 + 4, &copy.as_bytes()[4..]);
        words[base].store(msg.header.message_type, Ordering::Release);
        Ok(Delivery::Delivered)
    }
}

/// A message taken from a slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The host flagged more messages for this SINT: write EOM (the slot is already free).
    pub eom_needed: bool,
    /// The validated copy, or why the copy was malformed (the slot is freed either way).
    pub message: Result<SynicMessage, MessageError>,
}

/// Guest side of a message page: copies messages out and frees slots (Linux `vmbus_on_msg_dpc` +
/// `vmbus_signal_eom`).
pub struct SlotReader<M> {
    mem: M,
}

/// Attempts before giving up on a slot whose type keeps changing under the reader (only a
/// misbehaving host does that).
const TAKE_ATTEMPTS: usize = 4;

impl<M: PageMem> SlotReader<M> {
    pub fn new(mem: M) -> Self {
        SlotReader { mem }
    }

    /// The page under the reader.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Whether `sint`'s slot holds a message.
    pub fn has_message(&self, sint: Sint) -> bool {
        self.mem.words()[slot_word(sint)].load(Ordering::Relaxed) != HVMSG_NONE
    }

    /// Takes the message in `sint`'s slot: loads the type (acquire), copies the slot once, frees it
    /// with a compare-and-swap from the seen type to 0, reads the pending flag after that full
    /// barrier, and validates the private copy. `None` if the slot is free.
    pub fn take(&self, sint: Sint) -> Option<Taken> {
        let words = self.mem.words();
        let base = slot_word(sint);
        for _ in 0..TAKE_ATTEMPTS {
            let seen = words[base].load(Ordering::Acquire);
            if seen == HVMSG_NONE {
                return None;
            }
            let mut copy = HvMessage::new_zeroed();
            self.mem.read(base * 4, copy.as_mut_bytes());
            copy.header.message_type = seen;
            if words[base]
                .compare_exchange(seen, HVMSG_NONE, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            let flags = words[base + 1].load(Ordering::SeqCst);
            return Some(Taken {
                eom_needed: flags & PENDING_BIT_IN_WORD != 0,
                message: SynicMessage::from_slot(&copy),
            });
        }
        Some(Taken {
            eom_needed: false,
            message: Err(MessageError::Unstable { sint: sint.get() }),
        })
    }
}

/// An event-flag page (SIEF): SINT `s` owns 2048 flags at bytes `s × 0x100 ..`; flag `k` is bit
/// `k % 8` of byte `k / 8` (= bit `k % 32` of little-endian word `k / 32`).
pub struct EventFlags<M> {
    mem: M,
}

fn flag_word(sint: Sint, flag: u32) -> Result<(usize, u32), SynicError> {
    if flag >= EVENT_FLAGS_PER_SINT {
        return Err(SynicError::InvalidFlag(flag));
    }
    Ok((
        sint.index() * SLOT_WORDS + (flag / 32) as usize,
        1u32 << (flag % 32),
    ))
}

impl<M: PageMem> EventFlags<M> {
    pub fn new(mem: M) -> Self {
        EventFlags { mem }
    }

    /// The page under the flags.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Host: sets `flag` (atomic OR, sequentially consistent). `Ok(true)` if it was clear, i.e. the
    /// SINT interrupt must be raised; `Ok(false)` if it is still pending from before.
    pub fn set(&self, sint: Sint, flag: u32) -> Result<bool, SynicError> {
        let (word, bit) = flag_word(sint, flag)?;
        Ok(self.mem.words()[word].fetch_or(bit, Ordering::SeqCst) & bit == 0)
    }

    /// Whether `flag` is set (`false` for flags ≥ 2048).
    pub fn is_set(&self, sint: Sint, flag: u32) -> bool {
        flag_word(sint, flag)
            .is_ok_and(|(word, bit)| self.mem.words()[word].load(Ordering::Acquire) & bit != 0)
    }

    /// Guest: clears one flag, returning whether it was set (Linux `sync_test_and_clear_bit`).
    pub fn test_and_clear(&self, sint: Sint, flag: u32) -> bool {
        flag_word(sint, flag).is_ok_and(|(word, bit)| {
            self.mem.words()[word].fetch_and(!bit, Ordering::AcqRel) & bit != 0
        })
    }

    /// Whether any flag of `sint` is set.
    pub fn any(&self, sint: Sint) -> bool {
        let base = sint.index() * SLOT_WORDS;
        self.mem.words()[base..base + SLOT_WORDS]
            .iter()
            .any(|w| w.load(Ordering::Relaxed) != 0)
    }

    /// Guest: takes every set flag of `sint` (each non-zero word is swapped to 0 atomically) and calls
    /// `f` for each, in ascending order. Returns how many. A flag set again while `f` runs is seen by
    /// the next call.
    pub fn take_all(&self, sint: Sint, mut f: impl FnMut(u32)) -> usize {
        let base = sint.index() * SLOT_WORDS;
        let mut count = 0;
        for (i, w) in self.mem.words()[base..base + SLOT_WORDS].iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                f(i as u32 * 32 + b);
                count += 1;
            }
        }
        count
    }
}

/// Offsets of a SINT's slot and flag area inside their pages, for tests and tools.
pub const fn slot_offset(sint: Sint) -> usize {
    sint.index() * SLOT_SIZE
}

const _: () = assert!(SINT_COUNT * SLOT_SIZE == PAGE_SIZE);

#[cfg(test)]
mod tests {
    use super::super::message::{HVMSG_CHANNEL_MESSAGE, HvMessageHeader};
    use super::*;

    fn sint(n: u8) -> Sint {
        Sint::new(n).unwrap()
    }

    fn msg(tag: u8, len: usize) -> HvMessage {
        HvMessage::new(HVMSG_CHANNEL_MESSAGE, &alloc::vec![tag; len]).unwrap()
    }

    #[test]
    fn byte_copies_handle_unaligned_ranges() {
        let p = HeapPage::new();
        p.write(0, &[0xFF; 16]);
        p.write(5, &[1, 2, 3]);
        let mut out = [0u8; 10];
        p.read(3, &mut out);
        assert_eq!(out, [0xFF, 0xFF, 1, 2, 3, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(p.poke(4094, &[9, 9]));
        assert!(!p.poke(4095, &[9, 9]));
        assert!(!p.poke(usize::MAX, &[9]));
        assert_eq!(&p.snapshot()[4094..], &[9, 9]);
    }

    #[test]
    fn deliver_take_free() {
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        let r = SlotReader::new(&page);
        assert!(r.take(Sint::VMBUS).is_none());
        assert_eq!(
            w.deliver(Sint::VMBUS, &msg(7, 40), false).unwrap(),
            Delivery::Delivered
        );
        // Landed at 0x200 with the TLFS header.
        let raw = page.snapshot();
        assert_eq!(&raw[0x200..0x204], &1u32.to_le_bytes());
        assert_eq!(raw[0x204], 40);
        assert_eq!(raw[0x205], 0);
        assert_eq!(&raw[0x210..0x238], &[7u8; 40]);
        assert!(!w.is_free(Sint::VMBUS));
        assert!(w.is_free(sint(3)));
        let t = r.take(Sint::VMBUS).unwrap();
        assert!(!t.eom_needed);
        let m = t.message.unwrap();
        assert_eq!(m.message_type, HVMSG_CHANNEL_MESSAGE);
        assert_eq!(&m.payload[..], &[7u8; 40][..]);
        assert!(w.is_free(Sint::VMBUS));
        assert!(r.take(Sint::VMBUS).is_none());
    }

    #[test]
    fn busy_slot_sets_pending_then_eom() {
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        let r = SlotReader::new(&page);
        assert_eq!(
            w.deliver(sint(5), &msg(1, 8), false).unwrap(),
            Delivery::Delivered
        );
        assert_eq!(
            w.deliver(sint(5), &msg(2, 8), false).unwrap(),
            Delivery::SlotBusy
        );
        // The busy slot still holds message 1, now flagged pending.
        assert_eq!(page.snapshot()[5 * 256 + 5], MESSAGE_FLAG_PENDING);
        let t = r.take(sint(5)).unwrap();
        assert!(t.eom_needed);
        assert_eq!(t.message.unwrap().payload[0], 1);
        // "EOM": the host offers the queued message again.
        assert_eq!(
            w.deliver(sint(5), &msg(2, 8), false).unwrap(),
            Delivery::Delivered
        );
        let t = r.take(sint(5)).unwrap();
        assert!(!t.eom_needed, "a fresh delivery clears the flag");
        assert_eq!(t.message.unwrap().payload[0], 2);
    }

    #[test]
    fn more_queued_sets_pending_on_delivery() {
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        w.deliver(sint(0), &msg(1, 8), true).unwrap();
        assert!(SlotReader::new(&page).take(sint(0)).unwrap().eom_needed);
    }

    #[test]
    fn writer_refuses_bad_messages() {
        let page = HeapPage::new();
        let w = SlotWriter::new(&page);
        let none = HvMessage::new(HVMSG_NONE, &[]).unwrap();
        assert!(matches!(
            w.deliver(sint(0), &none, false),
            Err(SynicError::NoneMessageType)
        ));
        let mut big = msg(1, 8);
        big.header.payload_size = 241;
        assert!(matches!(
            w.deliver(sint(0), &big, false),
            Err(SynicError::PayloadTooLarge(241))
        ));
        assert!(w.is_free(sint(0)));
    }

    #[test]
    fn reader_rejects_oversized_payload_and_still_frees() {
        let page = HeapPage::new();
        let hdr = HvMessageHeader {
            message_type: 1,
            payload_size: 250,
            message_flags: MESSAGE_FLAG_PENDING | 0xF0,
            reserved: 0xFFFF,
            sender: u64::MAX,
        };
        page.poke(2 * 256, hdr.as_bytes());
        let r = SlotReader::new(&page);
        let t = r.take(Sint::VMBUS).unwrap();
        assert!(t.eom_needed);
        assert_eq!(
            t.message,
            Err(MessageError::PayloadSize {
                message_type: 1,
                size: 250
            })
        );
        assert!(!r.has_message(Sint::VMBUS));
    }

    #[test]
    fn garbage_page_never_panics() {
        let page = HeapPage::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for round in 0..200 {
            let mut junk = [0u8; PAGE_SIZE];
            for b in junk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            page.poke(0, &junk);
            let r = SlotReader::new(&page);
            let w = SlotWriter::new(&page);
            let f = EventFlags::new(&page);
            for s in Sint::all() {
                let _ = w.deliver(s, &msg(round as u8, round % 241), round % 2 == 0);
                if let Some(t) = r.take(s)
                    && let Ok(m) = t.message
                {
                    assert!(m.payload.len() <= MAX_PAYLOAD);
                }
                f.take_all(s, |flag| assert!(flag < EVENT_FLAGS_PER_SINT));
            }
        }
    }

    #[test]
    fn event_flags_bits_and_scan() {
        let page = HeapPage::new();
        let f = EventFlags::new(&page);
        assert!(f.set(Sint::VMBUS, 5).unwrap());
        assert!(!f.set(Sint::VMBUS, 5).unwrap(), "already pending");
        assert!(f.set(Sint::VMBUS, 2047).unwrap());
        assert!(f.set(sint(0), 0).unwrap());
        assert!(matches!(
            f.set(Sint::VMBUS, 2048),
            Err(SynicError::InvalidFlag(2048))
        ));
        // Bit k of SINT 2 = byte 0x200 + k/8, bit k%8.
        let raw = page.snapshot();
        assert_eq!(raw[0x200], 1 << 5);
        assert_eq!(raw[0x200 + 255], 0x80);
        assert_eq!(raw[0], 1);
        assert!(f.is_set(Sint::VMBUS, 2047));
        assert!(!f.is_set(Sint::VMBUS, 4096));
        let mut seen = alloc::vec::Vec::new();
        assert_eq!(f.take_all(Sint::VMBUS, |k| seen.push(k)), 2);
        assert_eq!(seen, [5, 2047]);
        assert!(!f.any(Sint::VMBUS));
        assert!(f.any(sint(0)));
        assert!(f.test_and_clear(sint(0), 0));
        assert!(!f.test_and_clear(sint(0), 0));
        assert!(!f.test_and_clear(sint(0), 9999));
    }
}
