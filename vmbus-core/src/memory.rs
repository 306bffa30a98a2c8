//! Guest memory as VSPs see it: copy bytes in and out by guest physical address, every access
//! checked against the guest's RAM.
//!
//! Devices never hold references into guest memory (the guest can change it at any time): they copy
//! out, validate, use; or fill a private buffer and copy in. GPA-direct packets name data by page
//! lists ([`PagedRange`]); [`GuestMemory::read_paged`] / [`GuestMemory::write_paged`] walk them.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;

/// Size of a guest page (Hyper-V pages are always 4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// A guest memory access the guest was not allowed to ask for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("guest range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error(
        "paged range: byte_offset {byte_offset:#x} / byte_count {byte_count:#x} does not fit its {pages} pages"
    )]
    BadPagedRange {
        byte_offset: u32,
        byte_count: u32,
        pages: usize,
    },
    #[error("paged range access at {offset:#x}+{len:#x} beyond its {byte_count:#x} bytes")]
    BeyondRange {
        offset: u64,
        len: u64,
        byte_count: u32,
    },
}

/// Byte access to guest RAM.
pub trait GuestMemory: Send + Sync {
    /// Copies guest bytes at `gpa` into `dst`.
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError>;
    /// Copies `src` into guest memory at `gpa`.
    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError>;

    /// Reads `dst.len()` bytes starting `offset` bytes into a paged range.
    fn read_paged(
        &self,
        range: &PagedRange<'_>,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (gpa, len) in range.segments(offset, dst.len() as u64)? {
            let chunk =
                dst.get_mut(done..done.saturating_add(len))
                    .ok_or(MemoryError::OutOfRange {
                        gpa,
                        len: len as u64,
                    })?;
            self.read_at(gpa, chunk)?;
            done = done.saturating_add(len);
        }
        Ok(())
    }

    /// Writes `src` starting `offset` bytes into a paged range.
    fn write_paged(
        &self,
        range: &PagedRange<'_>,
        offset: u64,
        src: &[u8],
    ) -> Result<(), MemoryError> {
        let mut done = 0usize;
        for (gpa, len) in range.segments(offset, src.len() as u64)? {
            let chunk = src
                .get(done..done.saturating_add(len))
                .ok_or(MemoryError::OutOfRange {
                    gpa,
                    len: len as u64,
                })?;
            self.write_at(gpa, chunk)?;
            done = done.saturating_add(len);
        }
        Ok(())
    }
}

/// `byte_count` bytes starting `byte_offset` into the first of `pfns` (a GPA-direct range, or a
/// GPADL range), validated on construction.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PagedRange<'a> {
    byte_offset: u32,
    byte_count: u32,
    pfns: &'a [u64],
}

impl<'a> PagedRange<'a> {
    /// Checks that the pages cover exactly `byte_offset + byte_count` bytes' worth of pages.
    pub fn new(byte_offset: u32, byte_count: u32, pfns: &'a [u64]) -> Result<Self, MemoryError> {
        let end = u64::from(byte_offset).saturating_add(u64::from(byte_count));
        let needed = end.div_ceil(PAGE_SIZE);
        if u64::from(byte_offset) >= PAGE_SIZE || needed != pfns.len() as u64 {
            return Err(MemoryError::BadPagedRange {
                byte_offset,
                byte_count,
                pages: pfns.len(),
            });
        }
        Ok(PagedRange {
            byte_offset,
            byte_count,
            pfns,
        })
    }

    pub fn len(&self) -> u32 {
        self.byte_count
    }

    pub fn is_empty(&self) -> bool {
        self.byte_count == 0
    }

    pub fn pfns(&self) -> &'a [u64] {
        self.pfns
    }

    /// The `(gpa, len)` pieces (each within one page) covering `len` bytes at `offset`.
    pub fn segments(&self, offset: u64, len: u64) -> Result<Vec<(u64, usize)>, MemoryError> {
        let beyond = MemoryError::BeyondRange {
            offset,
            len,
            byte_count: self.byte_count,
        };
        let end = offset.checked_add(len).ok_or(beyond)?;
        if end > u64::from(self.byte_count) {
            return Err(beyond);
        }
        let mut out = Vec::new();
        let mut at = u64::from(self.byte_offset).saturating_add(offset);
        let mut left = len;
        while left > 0 {
            let page = usize::try_from(at / PAGE_SIZE).map_err(|_| beyond)?;
            let pfn = *self.pfns.get(page).ok_or(beyond)?;
            let in_page = at % PAGE_SIZE;
            let n = left.min(PAGE_SIZE.saturating_sub(in_page));
            let gpa = pfn
                .checked_mul(PAGE_SIZE)
                .and_then(|b| b.checked_add(in_page))
                .ok_or(MemoryError::OutOfRange {
                    gpa: u64::MAX,
                    len: n,
                })?;
            // n <= PAGE_SIZE, so it fits usize.
            out.push((gpa, n as usize));
            at = at.saturating_add(n);
            left = left.saturating_sub(n);
        }
        Ok(out)
    }
}

/// Guest RAM in one heap buffer starting at GPA 0 (tests, sans-OS use).
#[derive(Debug)]
pub struct VecMemory {
    bytes: spin_free::Bytes,
}

impl VecMemory {
    pub fn new(len: usize) -> Self {
        VecMemory {
            bytes: spin_free::Bytes::new(len),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() == 0
    }
}

impl GuestMemory for VecMemory {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.bytes.read(gpa, dst)
    }

    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.bytes.write(gpa, src)
    }
}

/// Shared byte storage written through `&self` (several device queues write guest memory at once,
/// as real DMA does): per-byte atomics, so concurrent access is defined behaviour without `unsafe`.
mod spin_free {
    use super::MemoryError;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicU8, Ordering};

    #[derive(Debug)]
    pub struct Bytes(Vec<AtomicU8>);

    impl Bytes {
        pub fn new(len: usize) -> Self {
            Bytes((0..len).map(|_| AtomicU8::new(0)).collect())
        }

        pub fn len(&self) -> usize {
            self.0.len()
        }

        fn slice(&self, gpa: u64, len: usize) -> Result<&[AtomicU8], MemoryError> {
            let err = MemoryError::OutOfRange {
                gpa,
                len: len as u64,
            };
            let start = usize::try_from(gpa).map_err(|_| err)?;
            self.0
                .get(start..start.checked_add(len).ok_or(err)?)
                .ok_or(err)
        }

        pub fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
            let src = self.slice(gpa, dst.len())?;
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.load(Ordering::Relaxed);
            }
            Ok(())
        }

        pub fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
            for (d, s) in self.slice(gpa, src.len())?.iter().zip(src) {
                d.store(*s, Ordering::Relaxed);
            }
            Ok(())
        }
    }
}

#[cfg(feature = "std")]
pub use mapped::MappedMemory;

#[cfg(feature = "std")]
mod mapped {
    use super::{GuestMemory, MemoryError};
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::ptr::NonNull;

    /// Guest RAM shared by fd (a memfd the VMM created), mapped whole: GPA `g` is byte `g` of the
    /// file for `g < len`. What a VSP process maps after receiving the memory table.
    #[derive(Debug)]
    pub struct MappedMemory {
        base: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the mapping is owned and unmapped only on drop; all access is by bounded copies.
    unsafe impl Send for MappedMemory {}
    // SAFETY: as above; concurrent copies race only with the guest, as DMA does.
    unsafe impl Sync for MappedMemory {}

    impl MappedMemory {
        pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
            if len == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "empty guest memory",
                ));
            }
            // SAFETY: a fresh shared mapping of `len` bytes of the caller's fd at a kernel-chosen address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let base = NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
            Ok(MappedMemory { base, len })
        }

        fn check(&self, gpa: u64, len: usize) -> Result<usize, MemoryError> {
            let err = MemoryError::OutOfRange {
                gpa,
                len: len as u64,
            };
            let start = usize::try_from(gpa).map_err(|_| err)?;
            match start.checked_add(len) {
                Some(end) if end <= self.len => Ok(start),
                _ => Err(err),
            }
        }
    }

    impl GuestMemory for MappedMemory {
        fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
            let start = self.check(gpa, dst.len())?;
            // SAFETY: `start + dst.len() <= len` (checked); `dst` is private memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.base.as_ptr().add(start),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
            Ok(())
        }

        fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
            let start = self.check(gpa, src.len())?;
            // SAFETY: as in read_at.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    self.base.as_ptr().add(start),
                    src.len(),
                )
            };
            Ok(())
        }
    }

    impl Drop for MappedMemory {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made in `map`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn paged_ranges_split_at_pages_and_refuse_overruns() {
        let mem = VecMemory::new(16 * 4096);
        let pfns = [3u64, 9, 5];
        let r = PagedRange::new(4000, 5000, &pfns).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        mem.write_paged(&r, 0, &data).unwrap();
        assert_eq!(
            r.segments(0, 5000).unwrap(),
            [(3 * 4096 + 4000, 96), (9 * 4096, 4096), (5 * 4096, 808)]
        );
        let mut back = vec![0u8; 5000];
        mem.read_paged(&r, 0, &mut back).unwrap();
        assert_eq!(back, data);
        let mut one = [0u8; 1];
        mem.read_at(9 * 4096 + 5, &mut one).unwrap();
        assert_eq!(one[0], data[96 + 5]);
        assert!(mem.read_paged(&r, 4999, &mut [0u8; 2]).is_err());
        assert!(mem.read_paged(&r, u64::MAX, &mut [0u8; 2]).is_err());
        assert!(PagedRange::new(0, 4097, &[1]).is_err());
        assert!(PagedRange::new(4096, 1, &[1]).is_err());
        assert!(PagedRange::new(0, 4096, &[1, 2]).is_err());
        // A page past the end of RAM.
        let far = [16u64];
        let r = PagedRange::new(0, 10, &far).unwrap();
        assert!(mem.read_paged(&r, 0, &mut [0u8; 10]).is_err());
    }
}
