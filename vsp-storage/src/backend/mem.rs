//! A disk in a heap buffer: tests, fuzzing, scratch disks.

use crate::block::{BlockDevice, BlockError, check_range};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// An in-memory [`BlockDevice`]; UNMAP zeroes the range.
#[derive(Debug)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    sector: u32,
    read_only: bool,
    flushes: AtomicU64,
}

impl MemDisk {
    /// A zeroed disk of `size` bytes (rounded down to whole sectors).
    pub fn new(size: usize, sector: u32) -> Self {
        let sector = sector.max(1);
        let size = size - size % sector as usize;
        MemDisk {
            data: RwLock::new(vec![0; size]),
            sector,
            read_only: false,
            flushes: AtomicU64::new(0),
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// How many flushes were requested.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Changes the size (grows with zeros), as a resize of the backing image would.
    pub fn resize(&self, size: usize) {
        if let Ok(mut d) = self.data.write() {
            d.resize(size - size % self.sector as usize, 0);
        }
    }

    fn poisoned() -> BlockError {
        BlockError::Corrupt("memory disk lock poisoned".into())
    }
}

impl BlockDevice for MemDisk {
    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_unmap(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let d = self.data.read().map_err(|_| Self::poisoned())?;
        check_range(offset, buf.len() as u64, d.len() as u64, self.sector)?;
        // Range checked: offset + len <= d.len().
        let at = offset as usize;
        buf.copy_from_slice(&d[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8], _fua: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut d = self.data.write().map_err(|_| Self::poisoned())?;
        check_range(offset, buf.len() as u64, d.len() as u64, self.sector)?;
        let at = offset as usize;
        d[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut d = self.data.write().map_err(|_| Self::poisoned())?;
        check_range(offset, len, d.len() as u64, self.sector)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
