//! The block-device contract between the SCSI layer and disk backends.
//!
//! Addresses and lengths are in bytes but always whole sectors; backends check ranges themselves
//! too (a corrupt image or a racing resize must not turn into an out-of-bounds access).

use std::io;

/// Why a block operation failed; the SCSI layer maps these to sense data.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("range {offset:#x}+{len:#x} is beyond the {size:#x}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("offset {offset:#x} or length {len:#x} is not sector aligned")]
    Unaligned { offset: u64, len: u64 },
    #[error("disk is read-only")]
    ReadOnly,
    #[error("operation not supported by this backend")]
    Unsupported,
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A disk, as the SCSI emulation sees it. Implementations are shared between channel queues, so
/// every method takes `&self`.
pub trait BlockDevice: Send + Sync {
    /// Logical sector size in bytes (512 or 4096).
    fn sector_size(&self) -> u32;
    /// Size of the disk in bytes (a multiple of the sector size).
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    /// Whether [`Self::unmap`] releases space (SCSI advertises thin provisioning when it does).
    fn supports_unmap(&self) -> bool {
        false
    }
    /// Reads `buf.len()` bytes at byte `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` at byte `offset`; with `fua` the data is durable when this returns.
    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Discards a range (reads return zeros afterwards where the backend can guarantee it).
    fn unmap(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _ = (offset, len);
        Err(BlockError::Unsupported)
    }
}

/// Checks `offset..offset + len` against a disk of `size` bytes with `sector`-byte sectors.
pub fn check_range(offset: u64, len: u64, size: u64, sector: u32) -> Result<(), BlockError> {
    let sector = u64::from(sector.max(1));
    if !offset.is_multiple_of(sector) || !len.is_multiple_of(sector) {
        return Err(BlockError::Unaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
