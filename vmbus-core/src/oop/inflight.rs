//! The in-flight request journal: a small shared memory region the VMM side creates once per
//! supervised VSP and hands to every process it (re)starts (vhost-user's "inflight I/O tracking").
//! It outlives VSP processes, so a device can note there which requests it has already answered;
//! a successor re-reading them from the ring then skips them instead of executing them again.
//!
//! The layout is the device's business; this module maps the file and offers bounds-checked atomic
//! word access.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Size of the journal the supervisor creates.
pub const DEFAULT_SIZE: u64 = 1024 * 1024;
/// Largest journal a VSP accepts.
pub const MAX_SIZE: u64 = 1024 * 1024;
const PAGE: u64 = 4096;

/// Why a journal was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("journal size {0:#x} must be a non-zero page multiple of at most {MAX_SIZE:#x}")]
    Size(u64),
    #[error("journal file has {actual:#x} bytes, message says {size:#x}")]
    FileSize { size: u64, actual: u64 },
    #[error("mapping the journal: {0}")]
    Map(io::Error),
}

/// The mapped journal.
pub struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is owned and unmapped only on drop; all access is by atomic word operations.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; concurrent atomic access from threads (and other processes) is well defined.
unsafe impl Sync for InflightRegion {}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.len)
            .finish()
    }
}

impl InflightRegion {
    /// Maps `size` bytes of `fd`, which must hold exactly that many (fstat).
    pub fn map(fd: OwnedFd, size: u64) -> Result<Self, InflightError> {
        if size == 0 || size > MAX_SIZE || !size.is_multiple_of(PAGE) {
            return Err(InflightError::Size(size));
        }
        let file = File::from(fd);
        let actual = file.metadata().map_err(InflightError::Map)?.len();
        if actual != size {
            return Err(InflightError::FileSize { size, actual });
        }
        let len = usize::try_from(size).map_err(|_| InflightError::Size(size))?;
        // SAFETY: a fresh shared mapping of `len` bytes at a kernel-chosen address; the file holds
        // exactly `len` bytes (checked above).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        let base =
            NonNull::new(p.cast()).ok_or_else(|| InflightError::Map(io::Error::last_os_error()))?;
        Ok(InflightRegion {
            base,
            len,
            _file: file,
        })
    }

    /// Bytes in the journal.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The aligned word at byte `offset`, if it lies inside the journal.
    fn word<T>(&self, offset: usize) -> Option<*mut T> {
        let size = std::mem::size_of::<T>();
        if !offset.is_multiple_of(size) || offset.checked_add(size)? > self.len {
            return None;
        }
        // SAFETY: `offset + size <= len`: inside the mapping.
        Some(unsafe { self.base.as_ptr().add(offset) }.cast())
    }

    fn u32_at(&self, offset: usize) -> Option<&AtomicU32> {
        // SAFETY: in bounds and aligned (the mapping is page aligned, `offset` a multiple of 4);
        // the memory lives as long as `self` and is only ever accessed atomically.
        self.word::<u32>(offset)
            .map(|p| unsafe { AtomicU32::from_ptr(p) })
    }

    fn u64_at(&self, offset: usize) -> Option<&AtomicU64> {
        // SAFETY: as in u32_at, with 8-byte alignment.
        self.word::<u64>(offset)
            .map(|p| unsafe { AtomicU64::from_ptr(p) })
    }

    /// Loads the u32 at byte `offset` (a multiple of 4); `None` out of bounds.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Option<u32> {
        self.u32_at(offset).map(|a| a.load(order))
    }

    /// Stores the u32 at byte `offset`; `false` out of bounds.
    pub fn store_u32(&self, offset: usize, v: u32, order: Ordering) -> bool {
        self.u32_at(offset).map(|a| a.store(v, order)).is_some()
    }

    /// Loads the u64 at byte `offset` (a multiple of 8); `None` out of bounds.
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Option<u64> {
        self.u64_at(offset).map(|a| a.load(order))
    }

    /// Stores the u64 at byte `offset`; `false` out of bounds.
    pub fn store_u64(&self, offset: usize, v: u64, order: Ordering) -> bool {
        self.u64_at(offset).map(|a| a.store(v, order)).is_some()
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_checks_and_bounds() {
        let f = ringbuf::mmap::ring_memfd("inflight-test", DEFAULT_SIZE).unwrap();
        let r = InflightRegion::map(OwnedFd::from(f.try_clone().unwrap()), DEFAULT_SIZE).unwrap();
        assert!(r.store_u64(8, 7, Ordering::Release));
        assert_eq!(r.load_u64(8, Ordering::Acquire), Some(7));
        assert_eq!(r.load_u32(8, Ordering::Relaxed), Some(7));
        assert_eq!(r.load_u64(4, Ordering::Relaxed), None);
        assert_eq!(
            r.load_u64(DEFAULT_SIZE as usize - 4, Ordering::Relaxed),
            None
        );
        assert!(!r.store_u32(DEFAULT_SIZE as usize, 1, Ordering::Relaxed));
        // Another mapping of the same file sees the store.
        let r2 = InflightRegion::map(OwnedFd::from(f.try_clone().unwrap()), DEFAULT_SIZE).unwrap();
        assert_eq!(r2.load_u64(8, Ordering::Acquire), Some(7));
        for bad in [0, 100, MAX_SIZE * 2, 4096, DEFAULT_SIZE * 2] {
            assert!(InflightRegion::map(OwnedFd::from(f.try_clone().unwrap()), bad).is_err());
        }
    }
}
