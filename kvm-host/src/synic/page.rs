//! The SynIC message-page slot protocol and event-flag bitmaps (vmbus-protocol.md §6.3, §6.4) over
//! a 4 KiB page seen as 1024 atomic words: a guest RAM page ([`crate::memory::GuestRam::page_words`])
//! or a heap page in tests.
//!
//! The guest may write anything at any time, so every access is atomic and the host only ever
//! writes a slot while its message type is `HVMSG_NONE`, storing the type last (release).
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU32, Ordering};

/// A SynIC page as atomic words.
pub type PageWords = [AtomicU32; 1024];

/// Size of one message slot / one SINT's event-flag area.
pub const SLOT_SIZE: usize = 256;
/// Largest message payload.
pub const MAX_PAYLOAD: usize = 240;
/// Event flags per SINT (256 bytes × 8).
pub const FLAGS_PER_SINT: u32 = 2048;
/// `hv_message.header.message_flags` bit 0: more messages are queued for this SINT.
pub const MESSAGE_FLAG_PENDING: u8 = 1;
/// Message type of a free slot.
pub const HVMSG_NONE: u32 = 0;

const SLOT_WORDS: usize = SLOT_SIZE / 4;
/// The pending flag inside the slot's second word (payload_size = byte 0, flags = byte 1).
const PENDING_BIT_IN_WORD: u32 = (MESSAGE_FLAG_PENDING as u32) << 8;

/// A message for a slot: type, sender id and up to 240 payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotMessage {
    pub message_type: u32,
    pub sender: u64,
    pub payload: Vec<u8>,
}

/// What happened to a message offered to a slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Written into the slot: raise the SINT interrupt.
    Delivered,
    /// The slot holds an unconsumed message; its pending flag is now set so the guest writes EOM.
    Busy,
}

fn word(page: &PageWords, index: usize) -> &AtomicU32 {
    // Callers pass slot-relative indices below 16 × 64 = 1024; `% 1024` keeps the access total.
    let i = index % 1024;
    #[allow(clippy::indexing_slicing)]
    &page[i]
}

fn slot_base(sint: u8) -> usize {
    usize::from(sint & 0xF) * SLOT_WORDS
}

/// Offers `msg` to `sint`'s slot (§6.3). Free slot: bytes 0x04..0x100 are written (flags = pending
/// if `more_queued`), then the type is stored last with release. Busy slot: the pending flag is set
/// first, then the type re-read; a slot freed in between is written after all. One writer per page
/// at a time (the caller holds the VP's lock).
pub fn offer(page: &PageWords, sint: u8, msg: &SlotMessage, more_queued: bool) -> Offer {
    let base = slot_base(sint);
    let ty = word(page, base);
    if ty.load(Ordering::SeqCst) != HVMSG_NONE {
        // Flag first, then look again: the guest frees the slot and then reads the flag, so one of
        // the two sides sees the other's write.
        word(page, base.wrapping_add(1)).fetch_or(PENDING_BIT_IN_WORD, Ordering::SeqCst);
        if ty.load(Ordering::SeqCst) != HVMSG_NONE {
            return Offer::Busy;
        }
    }
    let len = msg.payload.len().min(MAX_PAYLOAD);
    let flags = if more_queued { PENDING_BIT_IN_WORD } else { 0 };
    // `len` <= 240 fits the size byte.
    word(page, base.wrapping_add(1)).store(len as u32 | flags, Ordering::Relaxed);
    word(page, base.wrapping_add(2)).store(msg.sender as u32, Ordering::Relaxed);
    word(page, base.wrapping_add(3)).store((msg.sender >> 32) as u32, Ordering::Relaxed);
    let mut body = [0u8; MAX_PAYLOAD];
    if let (Some(dst), Some(src)) = (body.get_mut(..len), msg.payload.get(..len)) {
        dst.copy_from_slice(src);
    }
    for (i, chunk) in body.chunks_exact(4).enumerate() {
        let mut b = [0u8; 4];
        b.copy_from_slice(chunk);
        word(page, base.wrapping_add(4).wrapping_add(i))
            .store(u32::from_le_bytes(b), Ordering::Relaxed);
    }
    ty.store(msg.message_type, Ordering::Release);
    Offer::Delivered
}

/// Guest-side take of `sint`'s slot, as Linux does it (tests and the in-process guest): copies the
/// message, frees the slot with a compare-and-swap, then reports whether EOM is needed.
pub fn take(page: &PageWords, sint: u8) -> Option<(SlotMessage, bool)> {
    let base = slot_base(sint);
    let ty = word(page, base);
    let seen = ty.load(Ordering::Acquire);
    if seen == HVMSG_NONE {
        return None;
    }
    let head = word(page, base.wrapping_add(1)).load(Ordering::Relaxed);
    let len = ((head & 0xFF) as usize).min(MAX_PAYLOAD);
    let sender = u64::from(word(page, base.wrapping_add(2)).load(Ordering::Relaxed))
        | (u64::from(word(page, base.wrapping_add(3)).load(Ordering::Relaxed)) << 32);
    let mut payload = Vec::with_capacity(MAX_PAYLOAD);
    for i in 0..MAX_PAYLOAD / 4 {
        payload.extend_from_slice(
            &word(page, base.wrapping_add(4).wrapping_add(i))
                .load(Ordering::Relaxed)
                .to_le_bytes(),
        );
    }
    payload.truncate(len);
    ty.compare_exchange(seen, HVMSG_NONE, Ordering::SeqCst, Ordering::SeqCst)
        .ok()?;
    let pending =
        word(page, base.wrapping_add(1)).load(Ordering::SeqCst) & PENDING_BIT_IN_WORD != 0;
    Some((
        SlotMessage {
            message_type: seen,
            sender,
            payload,
        },
        pending,
    ))
}

/// Sets event flag `flag` (< 2048) of `sint` in an event-flag page. `true` if it was clear (the
/// caller then raises the SINT interrupt). `None` for a flag out of range.
pub fn set_flag(page: &PageWords, sint: u8, flag: u32) -> Option<bool> {
    if flag >= FLAGS_PER_SINT {
        return None;
    }
    let index = slot_base(sint).wrapping_add((flag / 32) as usize);
    let bit = 1u32 << (flag % 32);
    Some(word(page, index).fetch_or(bit, Ordering::SeqCst) & bit == 0)
}

/// Test-and-clears event flag `flag` of `sint` (the guest's side).
pub fn clear_flag(page: &PageWords, sint: u8, flag: u32) -> bool {
    if flag >= FLAGS_PER_SINT {
        return false;
    }
    let index = slot_base(sint).wrapping_add((flag / 32) as usize);
    let bit = 1u32 << (flag % 32);
    word(page, index).fetch_and(!bit, Ordering::SeqCst) & bit != 0
}

/// A zeroed heap page (tests).
pub fn heap_page() -> Box<PageWords> {
    Box::new(std::array::from_fn(|_| AtomicU32::new(0)))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn msg(n: u8) -> SlotMessage {
        SlotMessage {
            message_type: 1,
            sender: 0,
            payload: vec![n; 16],
        }
    }

    #[test]
    fn free_slot_gets_the_message_type_last_and_layout_matches_hv_message() {
        let page = heap_page();
        let m = SlotMessage {
            message_type: 1,
            sender: 0x1122_3344_5566_7788,
            payload: (0..240u8).collect(),
        };
        assert_eq!(offer(&page, 2, &m, true), Offer::Delivered);
        let base = 2 * 64;
        assert_eq!(page[base].load(Ordering::Relaxed), 1);
        // payload_size 240 at byte 4, flags (pending) at byte 5.
        assert_eq!(page[base + 1].load(Ordering::Relaxed), 240 | 0x100);
        assert_eq!(page[base + 2].load(Ordering::Relaxed), 0x5566_7788);
        assert_eq!(
            page[base + 4].load(Ordering::Relaxed),
            u32::from_le_bytes([0, 1, 2, 3])
        );
        // Other slots untouched.
        assert!(page[..base].iter().all(|w| w.load(Ordering::Relaxed) == 0));
        let (got, pending) = take(&page, 2).unwrap();
        assert_eq!(got, m);
        assert!(pending);
        assert!(take(&page, 2).is_none());
    }

    #[test]
    fn busy_slot_sets_pending_and_guest_sees_it_after_freeing() {
        let page = heap_page();
        assert_eq!(offer(&page, 2, &msg(1), false), Offer::Delivered);
        assert_eq!(offer(&page, 2, &msg(2), false), Offer::Busy);
        let (first, eom) = take(&page, 2).unwrap();
        assert_eq!(first.payload, vec![1; 16]);
        assert!(eom, "the busy offer must have set the pending flag");
        // On EOM the host offers again and the slot is free now.
        assert_eq!(offer(&page, 2, &msg(2), false), Offer::Delivered);
        let (second, eom) = take(&page, 2).unwrap();
        assert_eq!(second.payload, vec![2; 16]);
        assert!(!eom);
    }

    #[test]
    fn oversized_payload_is_clipped_and_flags_are_per_sint_bits() {
        let page = heap_page();
        let big = SlotMessage {
            message_type: 7,
            sender: 0,
            payload: vec![9; 300],
        };
        offer(&page, 15, &big, false);
        let (got, _) = take(&page, 15).unwrap();
        assert_eq!(got.payload.len(), 240);

        let ef = heap_page();
        assert_eq!(set_flag(&ef, 2, 5), Some(true));
        assert_eq!(set_flag(&ef, 2, 5), Some(false));
        // Flag 5 of SINT 2 = byte 0x200, bit 5.
        assert_eq!(ef[0x200 / 4].load(Ordering::Relaxed), 1 << 5);
        assert_eq!(set_flag(&ef, 2, 2047), Some(true));
        assert_eq!(ef[(0x200 + 255) / 4].load(Ordering::Relaxed), 1 << 31);
        assert_eq!(set_flag(&ef, 2, 2048), None);
        assert!(clear_flag(&ef, 2, 5));
        assert!(!clear_flag(&ef, 2, 5));
    }
}
