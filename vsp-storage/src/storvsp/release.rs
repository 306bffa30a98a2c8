//! When guest→host ring space goes back to the guest.
//!
//! A request's bytes stay in the ring (the published `read_index` stays before them) until its
//! completion has been published to the host→guest ring. If the VSP dies meanwhile, its successor
//! attaches to the same ring, starts at that `read_index` and reads the request again, so a request
//! the guest wrote is always either answered or still in the ring. Packets are released in ring
//! order: the published position is the end of the longest prefix of answered packets.

use std::collections::VecDeque;

/// Packets read and not released yet, oldest first.
#[derive(Default)]
pub(crate) struct Held {
    /// Sequence number of the first entry of `slots`.
    base: u64,
    /// (ring position after the packet, completion published).
    slots: VecDeque<(u32, bool)>,
}

impl Held {
    /// Records a packet just consumed (ending at ring position `end`); returns its sequence number.
    pub(crate) fn push(&mut self, end: u32) -> u64 {
        let seq = self.base.wrapping_add(self.slots.len() as u64);
        self.slots.push_back((end, false));
        seq
    }

    /// The packet's completion is published (or it needs none). Unknown numbers are ignored.
    pub(crate) fn done(&mut self, seq: u64) {
        let idx = seq.wrapping_sub(self.base);
        if let Some(slot) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        {
            slot.1 = true;
        }
    }

    /// Forgets the longest prefix of finished packets and returns the ring position after it.
    pub(crate) fn release(&mut self) -> Option<u32> {
        let mut end = None;
        while let Some(&(e, true)) = self.slots.front() {
            self.slots.pop_front();
            self.base = self.base.wrapping_add(1);
            end = Some(e);
        }
        end
    }

    /// Packets read and not released.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Held;

    #[test]
    fn releases_only_the_finished_prefix() {
        let mut h = Held::default();
        let a = h.push(64);
        let b = h.push(128);
        let c = h.push(8);
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
        let d = h.push(16);
        assert_eq!(d, 3);
        h.done(d);
        assert_eq!(h.release(), Some(16));
    }
}
