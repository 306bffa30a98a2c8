//! An interrupt latch over an eventfd doorbell: a "pending" word (like a LAPIC IRR bit) plus an
//! "armed" word, so a raise costs a syscall only when the other side actually sleeps.
//!
//! Raise: store pending = 1, then (sequentially consistent) if armed, disarm and ring the doorbell.
//! Wait: take pending if set (spinning a while first); otherwise arm, take pending again (a raise
//! that missed the armed flag published pending before it looked), and only then sleep. Both sides'
//! store-then-load pairs are SeqCst, so either the waiter sees pending or the raiser sees armed.

use core::sync::atomic::{AtomicU32, Ordering};
use ringbuf::signal::Doorbell;
use std::io;
use std::time::Duration;

/// The latch's two words and its doorbell, wherever they live.
#[derive(Copy, Clone)]
pub(crate) struct LatchRef<'a> {
    pub pending: &'a AtomicU32,
    pub armed: &'a AtomicU32,
    pub bell: &'a Doorbell,
}

impl LatchRef<'_> {
    /// Marks the interrupt pending and wakes the waiter if it sleeps.
    pub fn raise(&self) -> io::Result<()> {
        self.pending.store(1, Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) != 0 && self.armed.swap(0, Ordering::SeqCst) != 0 {
            self.bell.ring()?;
        }
        Ok(())
    }

    fn take(&self) -> bool {
        self.pending.load(Ordering::Relaxed) != 0 && self.pending.swap(0, Ordering::SeqCst) != 0
    }

    /// Takes a pending interrupt, spinning `spins` polls and then sleeping up to `timeout`.
    /// `Ok(false)` = timed out with nothing pending. May report a stale doorbell as `true`.
    pub fn wait(&self, spins: u32, timeout: Option<Duration>) -> io::Result<bool> {
        if self.take() {
            return Ok(true);
        }
        for _ in 0..spins {
            if self.pending.load(Ordering::Relaxed) != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        if self.take() {
            return Ok(true);
        }
        self.armed.store(1, Ordering::SeqCst);
        if self.pending.swap(0, Ordering::SeqCst) != 0 {
            self.armed.store(0, Ordering::SeqCst);
            return Ok(true);
        }
        let rung = self.bell.wait(timeout);
        self.armed.store(0, Ordering::SeqCst);
        let taken = self.pending.swap(0, Ordering::SeqCst) != 0;
        Ok(rung? || taken)
    }
}

/// A latch whose words live in process memory (in-process ports).
#[derive(Debug)]
pub(crate) struct OwnedLatch {
    pending: AtomicU32,
    armed: AtomicU32,
    bell: Doorbell,
}

impl OwnedLatch {
    pub fn new() -> io::Result<Self> {
        Ok(OwnedLatch {
            pending: AtomicU32::new(0),
            armed: AtomicU32::new(0),
            bell: Doorbell::new()?,
        })
    }

    pub fn get(&self) -> LatchRef<'_> {
        LatchRef {
            pending: &self.pending,
            armed: &self.armed,
            bell: &self.bell,
        }
    }

    pub fn bell(&self) -> &Doorbell {
        &self.bell
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn no_lost_wakeups() {
        let latch = Arc::new(OwnedLatch::new().unwrap());
        let count = Arc::new(AtomicU32::new(0));
        const N: u32 = 20_000;
        let waiter = {
            let (latch, count) = (latch.clone(), count.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < N {
                    assert!(
                        latch.get().wait(0, Some(Duration::from_secs(10))).unwrap(),
                        "a raise was lost"
                    );
                    seen = count.load(Ordering::SeqCst);
                }
            })
        };
        for _ in 0..N {
            count.fetch_add(1, Ordering::SeqCst);
            latch.get().raise().unwrap();
        }
        waiter.join().unwrap();
    }

    #[test]
    fn times_out_when_idle() {
        let latch = OwnedLatch::new().unwrap();
        assert!(
            !latch
                .get()
                .wait(10, Some(Duration::from_millis(5)))
                .unwrap()
        );
        latch.get().raise().unwrap();
        assert!(latch.get().wait(0, Some(Duration::from_millis(5))).unwrap());
    }
}
