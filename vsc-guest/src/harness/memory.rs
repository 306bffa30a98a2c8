//! Guest RAM for the harness: a memfd at GPA 0 (GPA = offset in the file), mapped once for the
//! guest side, with a page allocator for rings and data buffers.

use super::HarnessError;
use crate::storvsc::contiguous_pfns;
use ringbuf::mmap::{MappedRing, ring_memfd};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use vmbus_core::memory::{GuestMemory, MappedMemory};

/// Bytes per page.
pub const PAGE: u64 = 4096;

/// A buffer in guest RAM: `len` bytes at `gpa` (page aligned, whole pages reserved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaBuffer {
    gpa: u64,
    len: u64,
    pages: u64,
}

impl DmaBuffer {
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `(byte_offset, pfns)` of `len` bytes at `offset` into the buffer (`None` if outside it).
    pub fn pages_of(&self, offset: u64, len: u32) -> Option<(u32, Vec<u64>)> {
        let end = offset.checked_add(u64::from(len))?;
        if end > self.len || len == 0 {
            return None;
        }
        Some(contiguous_pfns(self.gpa.checked_add(offset)?, len))
    }
}

/// Guest RAM: a sparse memfd, mapped for the guest side.
pub struct GuestRam {
    file: Arc<File>,
    mem: Arc<MappedMemory>,
    pages: u64,
    /// Free page runs: first PFN → page count.
    free: BTreeMap<u64, u64>,
}

impl GuestRam {
    /// `pages` pages of RAM; the first 16 stay unused (GPA 0 is never a buffer).
    pub fn new(pages: u64) -> Result<Self, HarnessError> {
        let bytes = pages
            .checked_mul(PAGE)
            .ok_or(HarnessError::OutOfRam { pages })?;
        let file = Arc::new(ring_memfd("storvsc-guest-ram", bytes)?);
        let len = usize::try_from(bytes).map_err(|_| HarnessError::OutOfRam { pages })?;
        let mem = Arc::new(MappedMemory::map(file.as_fd(), len)?);
        let mut free = BTreeMap::new();
        if pages > 16 {
            free.insert(16, pages - 16);
        }
        Ok(GuestRam {
            file,
            mem,
            pages,
            free,
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Guest RAM as devices and the guest side access it.
    pub fn memory(&self) -> Arc<MappedMemory> {
        self.mem.clone()
    }

    /// Pages not allocated.
    pub fn free_pages(&self) -> u64 {
        self.free.values().sum()
    }

    /// `n` contiguous pages (first fit); returns the first PFN.
    pub fn alloc_pages(&mut self, n: u64) -> Result<u64, HarnessError> {
        let n = n.max(1);
        let (&start, &len) = self
            .free
            .iter()
            .find(|(_, len)| **len >= n)
            .ok_or(HarnessError::OutOfRam { pages: n })?;
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
        }
        Ok(start)
    }

    /// Returns `n` pages from `start` (coalescing with their neighbours).
    pub fn free_pages_at(&mut self, start: u64, n: u64) {
        let (mut start, mut n) = (start, n.max(1));
        if let Some((&prev, &plen)) = self.free.range(..start).next_back()
            && prev + plen == start
        {
            self.free.remove(&prev);
            start = prev;
            n += plen;
        }
        if let Some(&next_len) = self.free.get(&(start + n)) {
            self.free.remove(&(start + n));
            n += next_len;
        }
        self.free.insert(start, n);
    }

    /// A zeroed buffer of `len` bytes.
    pub fn alloc(&mut self, len: u64) -> Result<DmaBuffer, HarnessError> {
        let pages = len.div_ceil(PAGE).max(1);
        let pfn = self.alloc_pages(pages)?;
        let b = DmaBuffer {
            gpa: pfn * PAGE,
            len,
            pages,
        };
        self.zero(&b)?;
        Ok(b)
    }

    /// Gives a buffer back.
    pub fn free(&mut self, b: DmaBuffer) {
        self.free_pages_at(b.gpa / PAGE, b.pages);
    }

    /// Zeroes a buffer.
    pub fn zero(&self, b: &DmaBuffer) -> Result<(), HarnessError> {
        const Z: [u8; PAGE as usize] = [0; PAGE as usize];
        for p in 0..b.pages {
            self.mem.write_at(b.gpa + p * PAGE, &Z)?;
        }
        Ok(())
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, b: &DmaBuffer, offset: u64, data: &[u8]) -> Result<(), HarnessError> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > b.len) {
            return Err(HarnessError::BufferBounds {
                offset,
                len: data.len() as u64,
                size: b.len,
            });
        }
        Ok(self.mem.write_at(b.gpa + offset, data)?)
    }

    /// Copies bytes at `offset` of the buffer into `dst`.
    pub fn read(&self, b: &DmaBuffer, offset: u64, dst: &mut [u8]) -> Result<(), HarnessError> {
        let end = offset.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > b.len) {
            return Err(HarnessError::BufferBounds {
                offset,
                len: dst.len() as u64,
                size: b.len,
            });
        }
        Ok(self.mem.read_at(b.gpa + offset, dst)?)
    }

    /// Maps a ring (control page first) from RAM pages, as the guest sees it.
    pub fn map_ring(&self, pfns: &[u64]) -> Result<MappedRing, HarnessError> {
        map_ring(&self.file, pfns)
    }
}

/// Maps the ring pages `pfns` of the RAM file.
pub fn map_ring(file: &File, pfns: &[u64]) -> Result<MappedRing, HarnessError> {
    let offsets: Option<Vec<u64>> = pfns.iter().map(|p| p.checked_mul(PAGE)).collect();
    let offsets = offsets.ok_or(HarnessError::OutOfRam { pages: 0 })?;
    Ok(MappedRing::map_pages(file.as_fd(), &offsets)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_reuses_and_coalesces() {
        let mut ram = GuestRam::new(64).unwrap();
        assert_eq!(ram.free_pages(), 48);
        let a = ram.alloc(4096).unwrap();
        let b = ram.alloc(3 * 4096 + 1).unwrap();
        let c = ram.alloc(1).unwrap();
        assert_eq!(
            (a.gpa(), b.gpa(), c.gpa()),
            (16 * PAGE, 17 * PAGE, 21 * PAGE)
        );
        assert_eq!(ram.free_pages(), 48 - 6);
        ram.write(&b, 100, b"hello").unwrap();
        let mut back = [0u8; 5];
        ram.read(&b, 100, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert!(ram.write(&b, b.len() - 2, b"abc").is_err());
        ram.free(b);
        ram.free(a);
        ram.free(c);
        assert_eq!(ram.free_pages(), 48);
        assert_eq!(ram.free.len(), 1, "{:?}", ram.free);
        assert!(ram.alloc(49 * 4096).is_err());
        // Freed memory comes back zeroed.
        let d = ram.alloc(8192).unwrap();
        let mut x = [1u8; 8];
        ram.read(&d, 100, &mut x).unwrap();
        assert_eq!(x, [0; 8]);
        let (off, pfns) = d.pages_of(4000, 200).unwrap();
        assert_eq!((off, pfns), (4000, vec![16, 17]));
        assert!(d.pages_of(8000, 200).is_none());
    }
}
