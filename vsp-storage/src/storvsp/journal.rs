//! storvsp's part of the in-flight journal ([`vmbus_core::oop::InflightRegion`]): which requests
//! still in the guest→host ring already have their completion published.
//!
//! Layout: one slot of [`SLOT_BYTES`] per channel, indexed by sub-channel index (at most
//! [`MAX_CHANNELS`]); a slot is an array of u64 entries, 0 = free, otherwise
//! `(start offset of the packet in the ring + 1) << 32 | low 32 bits of its transaction id`.
//!
//! Order per request (see [`super::channel`]): (a) its completion is published to the host→guest
//! ring, (b) it is marked here (Release store), (c) its ring space is released (`read_index`
//! moves past it) and then its entry is cleared. A successor VSP re-reading the ring from the
//! released position consumes a packet whose entry is present without executing it again.
//! Killed between (a) and (b) — a few microseconds — a request still runs twice; killed between
//! (c) and the clearing, an entry outlives its packet and is swept when the channel next opens
//! (entries outside the unreleased part of the ring are dropped).
//! Only the channel's own thread touches its slot, so plain atomic stores suffice; a predecessor's
//! entries are read once, when the slot is opened.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vmbus_core::oop::InflightRegion;

/// Bytes of the journal per channel (2048 entries: more than the packets a guest→host ring of
/// 512 KiB holds).
pub const SLOT_BYTES: usize = 16 * 1024;
/// Channels (sub-channel indexes) that get a slot; the others run without a journal.
pub const MAX_CHANNELS: usize = 64;
const ENTRIES: usize = SLOT_BYTES / 8;

/// One channel's slot.
pub(crate) struct Journal {
    region: Arc<InflightRegion>,
    base: usize,
    /// Free entries (only this channel's thread writes the slot).
    free: Vec<u16>,
    /// Entries left by a predecessor: value → index.
    inherited: HashMap<u64, u16>,
}

fn entry(start: u32, trans_id: u64) -> u64 {
    ((u64::from(start) + 1) << 32) | (trans_id & 0xffff_ffff)
}

impl Journal {
    /// The slot of sub-channel `index`, if the journal has one.
    pub(crate) fn new(region: Arc<InflightRegion>, index: u16) -> Option<Self> {
        let index = usize::from(index);
        if index >= MAX_CHANNELS {
            return None;
        }
        let base = index.checked_mul(SLOT_BYTES)?;
        if base.checked_add(SLOT_BYTES)? > region.len() {
            return None;
        }
        let mut j = Journal {
            region,
            base,
            free: Vec::new(),
            inherited: HashMap::new(),
        };
        j.scan(|_| true);
        Some(j)
    }

    fn load(&self, i: usize) -> u64 {
        self.region
            .load_u64(self.base + i * 8, Ordering::Acquire)
            .unwrap_or(0)
    }

    fn store(&self, i: usize, v: u64) {
        let _ = self
            .region
            .store_u64(self.base + i * 8, v, Ordering::Release);
    }

    /// Rebuilds the free list and the inherited entries, dropping entries `keep` refuses.
    fn scan(&mut self, keep: impl Fn(u32) -> bool) {
        self.free.clear();
        self.inherited.clear();
        for i in (0..ENTRIES).rev() {
            let v = self.load(i);
            let start = u32::try_from((v >> 32).wrapping_sub(1)).ok();
            let Ok(idx) = u16::try_from(i) else {
                continue;
            };
            match start {
                Some(s) if v != 0 && keep(s) && !self.inherited.contains_key(&v) => {
                    self.inherited.insert(v, idx);
                }
                _ => {
                    if v != 0 {
                        self.store(i, 0);
                    }
                    self.free.push(idx);
                }
            }
        }
    }

    /// Records that the packet at `start` (transaction `trans_id`) is answered; the entry's index,
    /// or `None` when the slot is full (the request would then run again after a crash).
    pub(crate) fn mark(&mut self, start: u32, trans_id: u64) -> Option<u16> {
        let i = self.free.pop()?;
        self.store(usize::from(i), entry(start, trans_id));
        Some(i)
    }

    /// The entry a predecessor left for the packet at `start` with `trans_id`, if any.
    pub(crate) fn find(&mut self, start: u32, trans_id: u64) -> Option<u16> {
        self.inherited.remove(&entry(start, trans_id))
    }

    /// Frees an entry (its packet's ring space was released).
    pub(crate) fn clear(&mut self, i: u16) {
        if usize::from(i) < ENTRIES {
            self.store(usize::from(i), 0);
            self.free.push(i);
        }
    }

    /// Drops the entries whose packet does not start in the unreleased part of the ring,
    /// `[read_index, read_index + unread)` of a ring of `size` bytes; returns how many are kept.
    pub(crate) fn sweep(&mut self, read_index: u32, unread: u32, size: u32) -> usize {
        self.scan(|s| {
            let d = if s >= read_index {
                u64::from(s - read_index)
            } else {
                u64::from(size) + u64::from(s) - u64::from(read_index)
            };
            s < size && d < u64::from(unread)
        });
        self.inherited.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn mark_find_clear_sweep() {
        let f = ringbuf::mmap::ring_memfd("journal", 1 << 20).unwrap();
        let r = Arc::new(InflightRegion::map(OwnedFd::from(f), 1 << 20).unwrap());
        assert!(Journal::new(r.clone(), 64).is_none());
        let mut j = Journal::new(r.clone(), 3).unwrap();
        let a = j.mark(64, 7).unwrap();
        j.mark(128, 8).unwrap();
        j.mark(0, 9).unwrap();
        // What a successor sees.
        let mut k = Journal::new(r.clone(), 3).unwrap();
        assert_eq!(Journal::new(r.clone(), 4).unwrap().find(64, 7), None);
        assert_eq!(k.find(64, 8), None);
        assert_eq!(k.find(64, 7), Some(a));
        assert_eq!(k.find(64, 7), None, "inherited entries are found once");
        j.clear(a);
        // Ring of 4096 bytes, unread [100, 100 + 200): 128 is inside, 0 is not.
        let mut k = Journal::new(r.clone(), 3).unwrap();
        assert_eq!(k.sweep(100, 200, 4096), 1);
        assert_eq!(k.find(0, 9), None);
        assert!(k.find(128, 8).is_some());
        // Wrapping: unread [4000, 4000 + 200) covers 64.
        let d = k.mark(64, 1).unwrap();
        let mut k = Journal::new(r.clone(), 3).unwrap();
        assert_eq!(k.sweep(4000, 200, 4096), 1);
        assert_eq!(k.find(64, 1), Some(d));
        for _ in 0..ENTRIES - 1 {
            k.mark(8, 2).unwrap();
        }
        assert!(k.mark(8, 3).is_none());
        k.clear(d);
        assert_eq!(k.mark(8, 3), Some(d));
    }
}
