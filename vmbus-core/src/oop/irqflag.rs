//! Device → guest interrupts without a VMM thread: the device sets the channel's SynIC event flag in
//! guest memory itself and then writes its *call* eventfd, which the VMM registered as a KVM irqfd
//! routed to the SINT vector of the channel's target VP.
//!
//! The VMM owns the decision: it hands the device a [`FlagTarget`] (the guest physical address of
//! the 32-bit flag word and the bit) while the guest's SynIC allows the fast path (event-flag page
//! enabled, SINT unmasked and not polling) and clears it otherwise; with no target the device only
//! writes the eventfd and the VMM's bus thread delivers the interrupt as before. [`FlagSetter`] is
//! the hook the device's call [`Doorbell`](ringbuf::signal::Doorbell) runs before every ring.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ringbuf::signal::RingHook;

use super::GuestRegions;

/// Highest flag-word address a target can carry.
const MAX_GPA: u64 = 1 << 52;

/// Where a channel's event flag lives, or nowhere (the VMM delivers). Packed in one atomic:
/// `gpa << 6 | bit << 1 | 1`, 0 = none.
#[derive(Debug, Default)]
pub struct FlagTarget(AtomicU64);

impl FlagTarget {
    /// No target yet.
    pub const fn none() -> Self {
        FlagTarget(AtomicU64::new(0))
    }

    /// Sets (`Some((gpa of the u32 word, bit))`) or clears the target. `false` (and the target
    /// cleared) when the word is misaligned, beyond 2^52 or the bit is not 0..=31.
    pub fn set(&self, target: Option<(u64, u32)>) -> bool {
        let (v, ok) = match target {
            None => (0, true),
            Some((gpa, bit)) if gpa.is_multiple_of(4) && gpa < MAX_GPA && bit < 32 => {
                ((gpa << 6) | (u64::from(bit) << 1) | 1, true)
            }
            Some(_) => (0, false),
        };
        self.0.store(v, Ordering::SeqCst);
        ok
    }

    /// The current target.
    pub fn get(&self) -> Option<(u64, u32)> {
        let v = self.0.load(Ordering::SeqCst);
        (v & 1 != 0).then_some((v >> 6, ((v >> 1) & 31) as u32))
    }
}

/// The call doorbell's hook: sets the target flag (atomic OR) before the eventfd is written, and
/// skips the write when the flag was already set (its interrupt is still pending, as the SynIC
/// raises a SINT only for a flag that was clear).
#[derive(Debug)]
pub struct FlagSetter {
    pub target: Arc<FlagTarget>,
    pub memory: Arc<GuestRegions>,
}

impl RingHook for FlagSetter {
    fn before_ring(&self) -> bool {
        let Some((gpa, bit)) = self.target.get() else {
            return true;
        };
        let Some(word) = self.memory.atomic_u32(gpa) else {
            return true;
        };
        let mask = 1u32 << bit;
        word.fetch_or(mask, Ordering::SeqCst) & mask == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_round_trips_and_refuses_bad_words() {
        let t = FlagTarget::none();
        assert_eq!(t.get(), None);
        assert!(t.set(Some((0x1234_5678_9ABC, 31))));
        assert_eq!(t.get(), Some((0x1234_5678_9ABC, 31)));
        assert!(!t.set(Some((0x1001, 3))));
        assert_eq!(t.get(), None);
        assert!(!t.set(Some((0x1000, 32))));
        assert!(!t.set(Some((MAX_GPA, 0))));
        assert!(t.set(Some((0, 0))));
        assert_eq!(t.get(), Some((0, 0)));
        assert!(t.set(None));
        assert_eq!(t.get(), None);
    }
}
