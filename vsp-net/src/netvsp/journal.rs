//! netvsp's part of the in-flight journal ([`vmbus_core::oop::InflightRegion`]): which receive
//! sections the guest holds, so a restarted VSP neither reuses a section the guest is still reading
//! nor loses one for good.
//!
//! Layout: `[0] u32 MAGIC`, `[4] u32 receive-buffer GPADL handle`, `[8] u64 next transaction id`,
//! then one u64 per section: 0 = not lent, otherwise the transaction id of the transfer-page packet
//! that lent it.
//!
//! The rule (order per receive packet):
//! 1. `next id` is bumped in the journal before the id is used, so every id a successor hands out
//!    is higher than any id its predecessors used: a guest completion a predecessor already
//!    handled but did not release from the ring (it is read again) names an unknown id and is
//!    ignored as stray — it can never free a section re-lent since.
//! 2. A packet's sections are marked with its id right before the packet is written to the
//!    host→guest ring, and unmarked if the ring is full (it waits in memory then). A packet the
//!    dead process only queued never reached the guest, so its sections are free for the
//!    successor; a marked section stays lent until the guest completes that id.
//! 3. A guest completion unmarks the packet's sections before they are reused.
//!
//! Killed between the mark and the ring write (two stores apart) a section stays marked though the
//! guest never saw it: it is quarantined for the rest of the session (counted, never reused), the
//! safe side of the choice. Without a journal a restarted netvsp starts with every section free
//! and ids from a clock-derived base (a guest completion for a pre-crash packet is then ignored,
//! but a section the guest still reads could be overwritten: VMMs must pass the journal).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use vmbus_core::oop::InflightRegion;

const MAGIC: u32 = 0x4e56_5250; // "PRVN"
const HEADER: usize = 16;

/// The journal as netvsp uses it.
#[derive(Debug, Clone)]
pub struct RxJournal {
    region: Arc<InflightRegion>,
}

impl RxJournal {
    pub fn new(region: Arc<InflightRegion>) -> Self {
        RxJournal { region }
    }

    /// Sections the journal can track.
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.region.len().saturating_sub(HEADER) / 8).unwrap_or(u32::MAX)
    }

    fn slot(section: u32) -> usize {
        HEADER + section as usize * 8
    }

    /// A fresh receive buffer (`handle`, `count` sections): nothing lent. Ids keep growing across
    /// buffers (a stray completion of an older session must not match either).
    pub fn reset(&self, handle: u32, count: u32) -> u64 {
        let next = self.next_id().unwrap_or(1);
        for s in 0..count.min(self.capacity()) {
            self.region.store_u64(Self::slot(s), 0, Ordering::Relaxed);
        }
        self.region.store_u64(8, next, Ordering::Relaxed);
        self.region.store_u32(4, handle, Ordering::Relaxed);
        self.region.store_u32(0, MAGIC, Ordering::Release);
        next
    }

    fn next_id(&self) -> Option<u64> {
        (self.region.load_u32(0, Ordering::Acquire)? == MAGIC)
            .then(|| self.region.load_u64(8, Ordering::Relaxed))
            .flatten()
            .filter(|&n| n != 0)
    }

    /// What a predecessor left for buffer `handle`: the next id and each section's lender (0 =
    /// free). `None` if the journal describes no buffer or another one.
    pub fn inherited(&self, handle: u32, count: u32) -> Option<(u64, Vec<u64>)> {
        if self.region.load_u32(4, Ordering::Relaxed)? != handle {
            return None;
        }
        let next = self.next_id()?;
        let lent = (0..count)
            .map(|s| {
                if s < self.capacity() {
                    self.region
                        .load_u64(Self::slot(s), Ordering::Relaxed)
                        .unwrap_or(0)
                } else {
                    0
                }
            })
            .collect();
        Some((next, lent))
    }

    /// Records that ids up to `next - 1` may be in use.
    pub fn set_next_id(&self, next: u64) {
        self.region.store_u64(8, next, Ordering::Release);
    }

    /// Marks `sections` as lent by packet `id` (0: free).
    pub fn mark(&self, sections: &[u32], id: u64) {
        for &s in sections {
            if s < self.capacity() {
                self.region.store_u64(Self::slot(s), id, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::buffers::ReceiveBuffer;
    use super::*;
    use vmbus_core::gpadl::{Gpadl, GpadlRange};

    fn journal() -> RxJournal {
        let f = ringbuf::mmap::ring_memfd("netvsp-journal-test", 4096).unwrap();
        RxJournal::new(Arc::new(InflightRegion::map(f.into(), 4096).unwrap()))
    }

    fn gpadl(handle: u32) -> Gpadl {
        Gpadl {
            handle,
            relid: 1,
            ranges: vec![GpadlRange {
                byte_offset: 0,
                byte_count: 4 * 4096,
                first_pfn: 0,
                pfn_count: 4,
            }],
            pfns: (100..104).collect(),
        }
    }

    #[test]
    fn a_successor_keeps_what_the_guest_holds_and_ignores_stale_completions() {
        let j = journal();
        let mut rb = ReceiveBuffer::new(&gpadl(0xe1), 0xcafe, 1806)
            .unwrap()
            .with_journal(j.clone());
        assert_eq!(rb.count, 9);
        // Packet a (sections 0, 1) reached the guest; b (2) too and was completed; c (3) only
        // waited for ring space when the process died.
        let (s0, s1, s2, s3) = (
            rb.alloc().unwrap(),
            rb.alloc().unwrap(),
            rb.alloc().unwrap(),
            rb.alloc().unwrap(),
        );
        let a = rb.lend(vec![s0, s1]);
        rb.publishing(a, true);
        let b = rb.lend(vec![s2]);
        rb.publishing(b, true);
        let c = rb.lend(vec![s3]);
        rb.publishing(c, true);
        rb.publishing(c, false); // ring full: unmarked, waits in memory
        assert!(rb.complete(b));
        drop(rb);

        let (mut next, inherited) =
            ReceiveBuffer::resume(&gpadl(0xe1), 0xcafe, 1806, Some(j.clone())).unwrap();
        assert_eq!(inherited, 2, "sections 0 and 1 are still the guest's");
        assert_eq!(next.free_sections(), 7);
        assert_eq!(next.outstanding_packets(), 1);
        // The guest's completion of `b`, read again from the ring, frees nothing; new ids are
        // above every old one, so it cannot match a re-lent section either.
        assert!(!next.complete(b));
        let fresh: Vec<u32> = (0..7).map(|_| next.alloc().unwrap()).collect();
        assert!(!fresh.contains(&s0) && !fresh.contains(&s1));
        let d = next.lend(fresh);
        assert!(d > c);
        assert!(!next.complete(c), "c never reached the guest");
        // The guest completes `a`: its sections come back, once.
        assert!(next.complete(a));
        assert!(!next.complete(a));
        assert_eq!(next.free_sections(), 2);

        // A journal describing another buffer is not trusted: everything starts free.
        let (other, n) = ReceiveBuffer::resume(&gpadl(0xe2), 1, 1806, Some(j)).unwrap();
        assert_eq!((n, other.free_sections()), (0, 9));
    }

    #[test]
    fn sections_beyond_the_journal_are_not_used() {
        let j = journal();
        let cap = j.capacity();
        assert_eq!(cap, (4096 - 16) / 8);
        let big = Gpadl {
            handle: 9,
            relid: 1,
            ranges: vec![GpadlRange {
                byte_offset: 0,
                byte_count: 256 * 4096,
                first_pfn: 0,
                pfn_count: 256,
            }],
            pfns: (1000..1256).collect(),
        };
        let rb = ReceiveBuffer::new(&big, 1, 1806).unwrap().with_journal(j);
        assert_eq!(rb.count, cap);
        assert_eq!(rb.free_sections(), cap as usize);
    }
}
