//! What a ring needs from the memory under it, and the in-process implementation.
//!
//! A ring is a control page plus a data area of `D` bytes. Implementations decide how the bytes are
//! reached: a heap buffer (tests, in-process channels), a memfd mapping shared with another process
//! ([`crate::mmap::MappedRing`]), or guest pages described by a GPADL (later crates, by mapping each
//! page of the guest memfd). Implementations that map the data area twice back-to-back copy a wrapping
//! range in one piece; the others copy it in two.
//!
//! The peer can change the memory at any time, so nothing here ever hands out a reference into the data
//! area: bytes are copied in and out, and the ring halves validate every value they copy out.

use crate::layout::ControlWord;
use crate::sync::AtomicU32;

/// Memory holding one ring (one direction of a channel).
///
/// Callers (the ring halves) guarantee `offset < data_len()` and `len <= data_len()` on every data
/// access; implementations wrap at `data_len()`.
pub trait RingMem {
    /// The atomic word of the control page named by `word`.
    fn control(&self, word: ControlWord) -> &AtomicU32;
    /// Size `D` of the data area in bytes; a non-zero multiple of 8.
    fn data_len(&self) -> u32;
    /// Copy `dst.len()` bytes starting at data offset `offset`, wrapping at the end of the area.
    fn read_data(&self, offset: u32, dst: &mut [u8]);
    /// Copy `src` to data offset `offset`, wrapping at the end of the area.
    fn write_data(&self, offset: u32, src: &[u8]);
}

impl<T: RingMem + ?Sized> RingMem for &T {
    #[inline]
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        (**self).control(word)
    }
    #[inline]
    fn data_len(&self) -> u32 {
        (**self).data_len()
    }
    #[inline]
    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        (**self).read_data(offset, dst)
    }
    #[inline]
    fn write_data(&self, offset: u32, src: &[u8]) {
        (**self).write_data(offset, src)
    }
}

impl<T: RingMem + ?Sized> RingMem for alloc::sync::Arc<T> {
    #[inline]
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        (**self).control(word)
    }
    #[inline]
    fn data_len(&self) -> u32 {
        (**self).data_len()
    }
    #[inline]
    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        (**self).read_data(offset, dst)
    }
    #[inline]
    fn write_data(&self, offset: u32, src: &[u8]) {
        (**self).write_data(offset, src)
    }
}

/// Sets a fresh ring's control page the way Linux does before OPENCHANNEL: indices 0, mask 0,
/// nothing pending, `feat_pending_send_sz` set.
pub fn init_control<M: RingMem + ?Sized>(mem: &M) {
    use crate::sync::Ordering::Relaxed;
    mem.control(ControlWord::WriteIndex).store(0, Relaxed);
    mem.control(ControlWord::ReadIndex).store(0, Relaxed);
    mem.control(ControlWord::InterruptMask).store(0, Relaxed);
    mem.control(ControlWord::PendingSendSize).store(0, Relaxed);
    mem.control(ControlWord::FeatureBits)
        .store(crate::layout::control::FEAT_PENDING_SEND_SZ, Relaxed);
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// Copies between a raw data area and a buffer, wrapping at `data_len`.
///
/// With `linear == true` the area is mapped twice back-to-back, so `base..base + 2 * data_len` is
/// readable and writable and every range is one copy.
///
/// # Safety
/// `base` must be valid for reads and writes of `data_len` bytes (`2 * data_len` if `linear`) for the
/// duration of the call; `offset < data_len` and `len <= data_len`; `buf` must not overlap the area.
#[cfg(not(loom))]
#[inline(always)]
pub(crate) unsafe fn copy_wrapping(
    base: *mut u8,
    data_len: usize,
    linear: bool,
    offset: usize,
    buf: *mut u8,
    len: usize,
    to_ring: bool,
) {
    debug_assert!(offset < data_len && len <= data_len);
    let first = if linear {
        len
    } else {
        len.min(data_len - offset)
    };
    // SAFETY: `offset + first <= data_len` (or `<= 2 * data_len` when linear), within the mapping the
    // caller vouches for; `buf` holds `len >= first` bytes and does not overlap the ring.
    unsafe {
        let ring = base.add(offset);
        if to_ring {
            core::ptr::copy_nonoverlapping(buf, ring, first);
        } else {
            core::ptr::copy_nonoverlapping(ring, buf, first);
        }
    }
    if first < len {
        // SAFETY: the rest wraps to the start of the area: `len - first <= offset < data_len`.
        unsafe {
            let rest = len - first;
            if to_ring {
                core::ptr::copy_nonoverlapping(buf.add(first), base, rest);
            } else {
                core::ptr::copy_nonoverlapping(base, buf.add(first), rest);
            }
        }
    }
}

#[cfg(not(loom))]
pub use heap::HeapRing;

#[cfg(not(loom))]
mod heap {
    use super::{RingMem, copy_wrapping};
    use crate::layout::{CONTROL_PAGE_SIZE, ControlWord, PAGE_SIZE};
    use crate::sync::AtomicU32;
    use alloc::alloc::{Layout, alloc_zeroed, dealloc};
    use core::ptr::NonNull;

    /// A ring in ordinary heap memory (one control page + data pages), for in-process channels and
    /// tests. The data area is mapped once, so a wrapping range is copied in two pieces.
    pub struct HeapRing {
        base: NonNull<u8>,
        data_len: u32,
    }

    // SAFETY: the buffer is owned by this object; shared access goes through atomics (control) or
    // byte copies the ring protocol orders with acquire/release (data), exactly as for shared memory.
    unsafe impl Send for HeapRing {}
    // SAFETY: see above.
    unsafe impl Sync for HeapRing {}

    impl HeapRing {
        /// A zeroed ring with `data_pages` data pages, its control page set as Linux sets it.
        /// Returns `None` for zero pages or a size that does not fit a u32 index.
        pub fn new(data_pages: usize) -> Option<Self> {
            let data_len = data_pages.checked_mul(PAGE_SIZE).filter(|&d| d > 0)?;
            let data_len32 = u32::try_from(data_len).ok()?;
            let layout = Self::layout(data_len)?;
            // SAFETY: the layout has a non-zero size.
            let base = NonNull::new(unsafe { alloc_zeroed(layout) })?;
            let ring = HeapRing {
                base,
                data_len: data_len32,
            };
            super::init_control(&ring);
            Some(ring)
        }

        fn layout(data_len: usize) -> Option<Layout> {
            Layout::from_size_align(CONTROL_PAGE_SIZE.checked_add(data_len)?, PAGE_SIZE).ok()
        }

        fn data_ptr(&self) -> *mut u8 {
            // SAFETY: the allocation is CONTROL_PAGE_SIZE + data_len bytes.
            unsafe { self.base.as_ptr().add(CONTROL_PAGE_SIZE) }
        }

        /// Overwrites raw bytes of the ring (control page at 0, data at 4096) without any of the
        /// ring's rules: how tests play a hostile peer. `false` if the range is outside the ring.
        pub fn poke(&self, offset: usize, bytes: &[u8]) -> bool {
            let total = CONTROL_PAGE_SIZE + self.data_len as usize;
            if offset
                .checked_add(bytes.len())
                .is_none_or(|end| end > total)
            {
                return false;
            }
            // SAFETY: the range lies inside the allocation (checked above); the ring's shared bytes
            // are only ever accessed by copies and atomics, as a peer process would access them.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.base.as_ptr().add(offset),
                    bytes.len(),
                );
            }
            true
        }
    }

    impl Drop for HeapRing {
        fn drop(&mut self) {
            if let Some(layout) = Self::layout(self.data_len as usize) {
                // SAFETY: allocated in `new` with this same layout.
                unsafe { dealloc(self.base.as_ptr(), layout) }
            }
        }
    }

    impl RingMem for HeapRing {
        #[inline]
        fn control(&self, word: ControlWord) -> &AtomicU32 {
            // SAFETY: the control page is 4096-byte aligned and every word offset is a multiple of 4
            // inside it; AtomicU32 has the layout of u32; the page lives as long as `self`.
            unsafe { &*(self.base.as_ptr().add(word.offset()) as *const AtomicU32) }
        }
        #[inline]
        fn data_len(&self) -> u32 {
            self.data_len
        }
        #[inline]
        fn read_data(&self, offset: u32, dst: &mut [u8]) {
            // SAFETY: the data area holds data_len bytes; the ring halves keep offset/len in range.
            unsafe {
                copy_wrapping(
                    self.data_ptr(),
                    self.data_len as usize,
                    false,
                    offset as usize,
                    dst.as_mut_ptr(),
                    dst.len(),
                    false,
                )
            }
        }
        #[inline]
        fn write_data(&self, offset: u32, src: &[u8]) {
            // SAFETY: as in read_data; `src` is only read from.
            unsafe {
                copy_wrapping(
                    self.data_ptr(),
                    self.data_len as usize,
                    false,
                    offset as usize,
                    src.as_ptr().cast_mut(),
                    src.len(),
                    true,
                )
            }
        }
    }
}
