//! When guest→host ring space goes back to the guest.
//!
//! A request's bytes stay in the ring (the published `read_index` stays before them) until its
//! completion has been published to the host→guest ring. If the VSP dies meanwhile, its successor
//! attaches to the same ring, starts at that `read_index` and reads the request again, so a request
//! the guest wrote is always either answered or still in the ring. Packets are released in ring
//! order: the published position is the end of the longest prefix of answered packets.
//!
//! Answered packets behind an unanswered one stay in the ring too; with an in-flight journal
//! ([`super::journal`]) they are marked answered there, and the successor skips them.

use super::journal::Journal;
use std::collections::VecDeque;

struct Slot {
    /// Ring position of the packet and just after it.
    start: u32,
    end: u32,
    trans_id: u64,
    /// Completion published (or none needed).
    done: bool,
    /// Its journal entry.
    entry: Option<u16>,
}

/// Packets read and not released yet, oldest first.
#[derive(Default)]
pub(crate) struct Held {
    /// Sequence number of the first entry of `slots`.
    base: u64,
    slots: VecDeque<Slot>,
    journal: Option<Journal>,
    /// Journal entries of released packets, cleared by [`Held::released`].
    to_clear: Vec<u16>,
}

impl Held {
    pub(crate) fn new(journal: Option<Journal>) -> Self {
        Held {
            journal,
            ..Held::default()
        }
    }

    #[cfg(test)]
    pub(crate) fn journal(&mut self) -> Option<&mut Journal> {
        self.journal.as_mut()
    }

    /// Records a packet just consumed (at ring positions `start..end`); returns its sequence number
    /// and whether the journal says it was answered already (by a predecessor), in which case it
    /// counts as finished and must not be executed.
    pub(crate) fn push(&mut self, start: u32, end: u32, trans_id: u64) -> (u64, bool) {
        let seq = self.base.wrapping_add(self.slots.len() as u64);
        let entry = self.journal.as_mut().and_then(|j| j.find(start, trans_id));
        self.slots.push_back(Slot {
            start,
            end,
            trans_id,
            done: entry.is_some(),
            entry,
        });
        (seq, entry.is_some())
    }

    /// The packet's completion is published (or it needs none): marks it in the journal. Unknown
    /// numbers are ignored.
    pub(crate) fn done(&mut self, seq: u64) {
        let idx = seq.wrapping_sub(self.base);
        let Some(slot) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            return;
        };
        if slot.done {
            return;
        }
        slot.done = true;
        if let Some(j) = &mut self.journal {
            slot.entry = j.mark(slot.start, slot.trans_id);
        }
    }

    /// Forgets the longest prefix of finished packets and returns the ring position after it.
    /// Call [`Held::released`] once that position is published.
    pub(crate) fn release(&mut self) -> Option<u32> {
        let mut end = None;
        while self.slots.front().is_some_and(|s| s.done) {
            if let Some(s) = self.slots.pop_front() {
                self.base = self.base.wrapping_add(1);
                end = Some(s.end);
                self.to_clear.extend(s.entry);
            }
        }
        end
    }

    /// The released packets' space is back with the guest: their journal entries go.
    pub(crate) fn released(&mut self) {
        for e in self.to_clear.drain(..) {
            if let Some(j) = &mut self.journal {
                j.clear(e);
            }
        }
    }

    /// Packets read and not released.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Held;
    use super::Journal;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use vmbus_core::oop::InflightRegion;

    #[test]
    fn releases_only_the_finished_prefix() {
        let mut h = Held::default();
        let (a, _) = h.push(0, 64, 1);
        let (b, _) = h.push(64, 128, 2);
        let (c, _) = h.push(128, 8, 3);
        assert_eq!(h.release(), None);
        h.done(b);
        assert_eq!(h.release(), None);
        h.done(a);
        assert_eq!(h.release(), Some(128));
        assert_eq!(h.len(), 1);
        h.done(a); // already released: ignored
        h.done(99); // unknown: ignored
        assert_eq!(h.release(), None);
        h.done(c);
        assert_eq!(h.release(), Some(8));
        assert_eq!(h.len(), 0);
        let (d, _) = h.push(8, 16, 4);
        assert_eq!(d, 3);
        h.done(d);
        assert_eq!(h.release(), Some(16));
    }

    #[test]
    fn journal_survives_the_holder() {
        let f = ringbuf::mmap::ring_memfd("held", 64 * 1024).unwrap();
        let r = Arc::new(InflightRegion::map(OwnedFd::from(f), 64 * 1024).unwrap());
        let mut h = Held::new(Journal::new(r.clone(), 0));
        let (_a, skip_a) = h.push(0, 64, 1);
        let (b, skip_b) = h.push(64, 128, 2);
        assert!(!skip_a && !skip_b);
        h.done(b);
        assert_eq!(h.release(), None);
        drop(h); // the VSP dies with `a` unanswered and `b` answered
        let mut h = Held::new(Journal::new(r.clone(), 0));
        let (a, skip_a) = h.push(0, 64, 1);
        let (_, skip_b) = h.push(64, 128, 2);
        assert!(!skip_a && skip_b);
        h.done(a);
        assert_eq!(h.release(), Some(128));
        h.released();
        let mut h = Held::new(Journal::new(r, 0));
        assert!(h.journal().is_some_and(|j| j.find(64, 2).is_none()));
    }
}
