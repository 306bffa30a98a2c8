//! Guest RAM in a VSP process: the regions of the memory table, each mapped from its memfd.

use super::wire::{MAX_REGIONS, Region};
use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("memory table has {0} regions (1..={MAX_REGIONS} allowed)")]
    Count(usize),
    #[error(
        "region {index}: gpa {gpa:#x} size {size:#x} offset {fd_offset:#x} not page aligned or empty"
    )]
    Unaligned {
        index: usize,
        gpa: u64,
        size: u64,
        fd_offset: u64,
    },
    #[error("region {0} overlaps another")]
    Overlap(usize),
    #[error("region {index} needs {needed:#x} bytes of its file, which has {actual:#x}")]
    BeyondFile {
        index: usize,
        needed: u64,
        actual: u64,
    },
    #[error("region {0}: {1}")]
    Map(usize, io::Error),
}

struct Mapped {
    region: Region,
    file: File,
    base: NonNull<u8>,
}

/// The guest memory table, mapped.
pub struct GuestRegions {
    regions: Vec<Mapped>,
}

// SAFETY: the mappings are owned and unmapped only on drop; access is by bounded copies.
unsafe impl Send for GuestRegions {}
// SAFETY: as above; concurrent copies race only with the guest, as DMA does.
unsafe impl Sync for GuestRegions {}

impl std::fmt::Debug for GuestRegions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.regions.iter().map(|m| m.region))
            .finish()
    }
}

impl GuestRegions {
    /// Validates the table against the files (sizes from fstat) and maps every region.
    pub fn map(table: &[Region], fds: Vec<OwnedFd>) -> Result<Self, RegionError> {
        if table.is_empty() || table.len() > MAX_REGIONS || fds.len() != table.len() {
            return Err(RegionError::Count(table.len()));
        }
        for (index, r) in table.iter().enumerate() {
            let aligned = r.size > 0
                && [r.gpa, r.size, r.fd_offset]
                    .iter()
                    .all(|v| v % PAGE_SIZE == 0);
            if !aligned
                || r.gpa.checked_add(r.size).is_none()
                || r.fd_offset.checked_add(r.size).is_none()
            {
                return Err(RegionError::Unaligned {
                    index,
                    gpa: r.gpa,
                    size: r.size,
                    fd_offset: r.fd_offset,
                });
            }
            let overlaps = table.iter().enumerate().any(|(j, o)| {
                j != index
                    && r.gpa < o.gpa.saturating_add(o.size)
                    && o.gpa < r.gpa.saturating_add(r.size)
            });
            if overlaps {
                return Err(RegionError::Overlap(index));
            }
        }
        let mut regions = Vec::with_capacity(table.len());
        for (index, (r, fd)) in table.iter().zip(fds).enumerate() {
            let file = File::from(fd);
            let actual = file
                .metadata()
                .map_err(|e| RegionError::Map(index, e))?
                .len();
            let needed = r.fd_offset.saturating_add(r.size);
            if needed > actual {
                return Err(RegionError::BeyondFile {
                    index,
                    needed,
                    actual,
                });
            }
            let len = usize::try_from(r.size).map_err(|_| RegionError::Unaligned {
                index,
                gpa: r.gpa,
                size: r.size,
                fd_offset: r.fd_offset,
            })?;
            let offset = libc::off_t::try_from(r.fd_offset).map_err(|_| {
                RegionError::Map(index, io::Error::from(io::ErrorKind::InvalidInput))
            })?;
            // SAFETY: a fresh shared mapping of `len` bytes of the file at a kernel-chosen address;
            // the file holds at least `fd_offset + len` bytes (checked above).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(RegionError::Map(index, io::Error::last_os_error()));
            }
            let base = NonNull::new(p.cast())
                .ok_or_else(|| RegionError::Map(index, io::Error::last_os_error()))?;
            regions.push(Mapped {
                region: *r,
                file,
                base,
            });
        }
        Ok(GuestRegions { regions })
    }

    fn find(&self, gpa: u64, len: u64) -> Option<&Mapped> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|m| gpa >= m.region.gpa && end <= m.region.gpa.saturating_add(m.region.size))
    }

    /// Where guest page `pfn` lives: the region's file and the byte offset in it.
    pub fn page_source(&self, pfn: u64) -> Option<(BorrowedFd<'_>, u64)> {
        let gpa = pfn.checked_mul(PAGE_SIZE)?;
        let m = self.find(gpa, PAGE_SIZE)?;
        Some((
            m.file.as_fd(),
            m.region.fd_offset.saturating_add(gpa - m.region.gpa),
        ))
    }

    /// The guest's 32-bit word at `gpa` (4-byte aligned, inside one region) for atomic access —
    /// a SynIC event-flag word the device sets before it interrupts the guest.
    pub fn atomic_u32(&self, gpa: u64) -> Option<&std::sync::atomic::AtomicU32> {
        if !gpa.is_multiple_of(4) {
            return None;
        }
        let p = self.host_ptr(gpa, 4).ok()?;
        if !(p as usize).is_multiple_of(std::mem::align_of::<std::sync::atomic::AtomicU32>()) {
            return None;
        }
        // SAFETY: the 4 bytes lie inside one region mapping that lives as long as `self` (the
        // borrow is tied to it), the pointer is aligned (checked), and every host access through
        // the reference is atomic, so the guest writing the word concurrently is no data race here.
        Some(unsafe { &*(p as *const std::sync::atomic::AtomicU32) })
    }

    fn host_ptr(&self, gpa: u64, len: usize) -> Result<*mut u8, MemoryError> {
        let m = self.find(gpa, len as u64).ok_or(MemoryError::OutOfRange {
            gpa,
            len: len as u64,
        })?;
        // gpa - region.gpa < region.size, which fits usize (checked when mapping).
        let off = (gpa - m.region.gpa) as usize;
        // SAFETY: `off + len <= region.size`, the length of this region's mapping.
        Ok(unsafe { m.base.as_ptr().add(off) })
    }
}

impl GuestMemory for GuestRegions {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.host_ptr(gpa, dst.len())?;
        // SAFETY: `p..p + dst.len()` lies inside one region mapping; `dst` is private memory.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let p = self.host_ptr(gpa, src.len())?;
        // SAFETY: as in read_at.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }
}

impl Drop for GuestRegions {
    fn drop(&mut self) {
        for m in &self.regions {
            // SAFETY: unmaps exactly the mapping made in `map` (size checked to fit usize there).
            unsafe { libc::munmap(m.base.as_ptr().cast(), m.region.size as usize) };
        }
    }
}
