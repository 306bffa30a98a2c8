//! A probed disk and the commands Linux `sd` would send it: READ/WRITE(10) or (16), SYNCHRONIZE
//! CACHE(10) when the write cache is on, and discard by UNMAP or WRITE SAME with UNMAP as
//! `sd_read_block_limits` picks (reference §2.10).
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::cdb::{self, Cdb};
use super::driver::ScsiAddress;
use super::probe::LunInfo;
use alloc::vec::Vec;
use vmbus_core::devices::vstor::ProtocolVersion;

/// Linux `SD_MAX_WS16_BLOCKS`.
pub const SD_MAX_WS16_BLOCKS: u32 = 0x007F_FFFF;
/// Linux `SD_MAX_WS10_BLOCKS`.
pub const SD_MAX_WS10_BLOCKS: u32 = 0xFFFF;

/// How discards are sent (Linux `provisioning_mode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DiscardMode {
    Disabled,
    /// UNMAP with one descriptor.
    Unmap,
    /// WRITE SAME(16) with the UNMAP bit and one zeroed block.
    WriteSame16,
    /// WRITE SAME(10) with the UNMAP bit and one zeroed block.
    WriteSame10,
}

/// Why a disk command cannot be built.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("LUN is not a disk with a known capacity")]
    NoCapacity,
    #[error("blocks {lba}+{blocks} are beyond the disk's {capacity} blocks")]
    OutOfRange {
        lba: u64,
        blocks: u64,
        capacity: u64,
    },
    #[error("{blocks} blocks exceed the per-request limit of {max}")]
    TooLarge { blocks: u64, max: u32 },
    #[error("zero-length request")]
    Empty,
    #[error("buffer of {len} bytes is not a whole number of {block_size}-byte blocks")]
    Unaligned { len: u64, block_size: u32 },
    #[error("disk does not support discard")]
    DiscardUnsupported,
}

/// The data a discard command carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscardData {
    /// UNMAP parameter list.
    UnmapList(Vec<u8>),
    /// WRITE SAME: one logical block of zeros of this many bytes.
    ZeroBlock(u32),
}

/// One discard command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscardCommand {
    pub cdb: Cdb,
    pub data: DiscardData,
    pub lba: u64,
    pub blocks: u32,
}

/// A disk ready for I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub addr: ScsiAddress,
    pub block_size: u32,
    pub blocks: u64,
    /// READ/WRITE(16) always (capacity above 2³² blocks, Linux `use_16_for_rw`).
    pub use_16: bool,
    pub tagged: bool,
    /// Write cache enabled: flush sends SYNCHRONIZE CACHE.
    pub write_cache: bool,
    /// FUA writes honoured (DPOFUA).
    pub fua: bool,
    pub write_protected: bool,
    /// Most blocks per READ/WRITE.
    pub max_blocks: u32,
    pub discard: DiscardMode,
    /// Most blocks per discard command.
    pub max_discard_blocks: u32,
    pub unmap_granularity: u32,
}

fn min_not_zero(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

impl Disk {
    /// The disk Linux would set up from this probe result; `max_transfer_bytes` is the channel
    /// limit from QUERY_PROPERTIES.
    pub fn from_lun(
        lun: &LunInfo,
        max_transfer_bytes: u32,
        version: ProtocolVersion,
    ) -> Result<Disk, DiskError> {
        let cap = lun
            .capacity
            .filter(|c| lun.is_disk() && lun.media_present && c.block_size > 0)
            .ok_or(DiskError::NoCapacity)?;
        let blocks = cap.blocks();
        let use_16 = blocks > u64::from(u32::MAX);
        // Host limit (max_sectors) and device limit (VPD 0xB0), as sd_revalidate_disk combines them.
        let host_max = max_transfer_bytes.checked_div(cap.block_size).unwrap_or(0);
        let dev_max = if use_16 { u32::MAX } else { 0xFFFF };
        let vpd_max = lun.block_limits.map_or(0, |b| b.max_transfer_blocks);
        let max_blocks = host_max.min(min_not_zero(dev_max, vpd_max)).max(1);

        // Discard (sd_read_capacity → WS16 when LBPME; sd_read_block_limits refines it).
        let mut discard = DiscardMode::Disabled;
        let mut max_unmap = 0u32;
        let mut max_ws = 0u32;
        let mut granularity = 0u32;
        if cap.lbpme {
            discard = DiscardMode::WriteSame16;
            if let Some(bl) = lun.block_limits.filter(|b| b.extended) {
                max_ws = bl.max_write_same_blocks.min(u64::from(u32::MAX)) as u32;
                if bl.max_unmap_blocks != 0 && bl.max_unmap_descriptors != 0 {
                    max_unmap = bl.max_unmap_blocks;
                }
                granularity = bl.unmap_granularity;
                discard = match lun.provisioning {
                    None if max_unmap != 0 => DiscardMode::Unmap,
                    None => DiscardMode::WriteSame16,
                    Some(p) if p.lbpu && max_unmap != 0 => DiscardMode::Unmap,
                    Some(p) if p.lbpws => DiscardMode::WriteSame16,
                    Some(p) if p.lbpws10 => DiscardMode::WriteSame10,
                    Some(_) => DiscardMode::Disabled,
                };
            }
        }
        // storvsc fails WRITE SAME(10) itself on WIN8 and older hosts.
        if discard == DiscardMode::WriteSame10 && version <= ProtocolVersion::Win8 {
            discard = DiscardMode::Disabled;
        }
        let max_discard_blocks = match discard {
            DiscardMode::Disabled => 0,
            DiscardMode::Unmap => min_not_zero(max_unmap, SD_MAX_WS16_BLOCKS),
            DiscardMode::WriteSame16 => min_not_zero(max_ws, SD_MAX_WS16_BLOCKS),
            DiscardMode::WriteSame10 => min_not_zero(max_ws, SD_MAX_WS10_BLOCKS),
        };
        Ok(Disk {
            addr: lun.addr,
            block_size: cap.block_size,
            blocks,
            use_16,
            tagged: lun.tagged(),
            write_cache: lun.caching.is_some_and(|c| c.wce),
            fua: lun.dpofua,
            write_protected: lun.write_protected,
            max_blocks,
            discard,
            max_discard_blocks,
            unmap_granularity: granularity,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Most bytes per READ/WRITE.
    pub fn max_io_bytes(&self) -> u64 {
        u64::from(self.max_blocks).saturating_mul(u64::from(self.block_size))
    }

    fn check(&self, lba: u64, blocks: u64, max: u32) -> Result<(), DiskError> {
        if blocks == 0 {
            return Err(DiskError::Empty);
        }
        if blocks > u64::from(max) {
            return Err(DiskError::TooLarge { blocks, max });
        }
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(DiskError::OutOfRange {
                lba,
                blocks,
                capacity: self.blocks,
            }),
        }
    }

    /// Blocks in a buffer of `len` bytes.
    pub fn blocks_in(&self, len: u64) -> Result<u64, DiskError> {
        let bs = u64::from(self.block_size.max(1));
        if !len.is_multiple_of(bs) {
            return Err(DiskError::Unaligned {
                len,
                block_size: self.block_size,
            });
        }
        Ok(len.checked_div(bs).unwrap_or(0))
    }

    fn rw(&self, write: bool, lba: u64, blocks: u64, fua: bool) -> Result<Cdb, DiskError> {
        self.check(lba, blocks, self.max_blocks)?;
        let fua = fua && self.fua && write;
        // sd_setup_read_write_cmnd: 16-byte commands for big disks or > 0xFFFF blocks.
        if self.use_16 || blocks > 0xFFFF || lba > u64::from(u32::MAX) {
            return Ok(cdb::rw16(write, lba, blocks as u32, fua));
        }
        Ok(cdb::rw10(write, lba as u32, blocks as u16, fua))
    }

    /// READ of `blocks` at `lba` (data-in `blocks × block_size` bytes).
    pub fn read(&self, lba: u64, blocks: u64) -> Result<Cdb, DiskError> {
        self.rw(false, lba, blocks, false)
    }

    /// WRITE of `blocks` at `lba`; `fua` is kept only if the disk honours it.
    pub fn write(&self, lba: u64, blocks: u64, fua: bool) -> Result<Cdb, DiskError> {
        self.rw(true, lba, blocks, fua)
    }

    /// SYNCHRONIZE CACHE(10), or `None` when the write cache is off (Linux sends no flush then).
    pub fn flush(&self) -> Option<Cdb> {
        self.write_cache.then(cdb::synchronize_cache_10)
    }

    /// The discard commands for `blocks` at `lba`, split at the per-command limit.
    pub fn discard(&self, lba: u64, blocks: u64) -> Result<Vec<DiscardCommand>, DiskError> {
        if self.discard == DiscardMode::Disabled || self.max_discard_blocks == 0 {
            return Err(DiskError::DiscardUnsupported);
        }
        if blocks == 0 {
            return Err(DiskError::Empty);
        }
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => {}
            _ => {
                return Err(DiskError::OutOfRange {
                    lba,
                    blocks,
                    capacity: self.blocks,
                });
            }
        }
        let mut out = Vec::new();
        let mut at = lba;
        let mut left = blocks;
        while left > 0 {
            let n = left.min(u64::from(self.max_discard_blocks)) as u32;
            let (cdb, data) = match self.discard {
                DiscardMode::Unmap => (
                    cdb::unmap(cdb::UNMAP_ONE_DESCRIPTOR_LEN as u16),
                    DiscardData::UnmapList(cdb::unmap_parameter_list(&[(at, n)])),
                ),
                DiscardMode::WriteSame16 => (
                    cdb::write_same_16_unmap(at, n),
                    DiscardData::ZeroBlock(self.block_size),
                ),
                DiscardMode::WriteSame10 | DiscardMode::Disabled => (
                    cdb::write_same_10_unmap(at as u32, n as u16),
                    DiscardData::ZeroBlock(self.block_size),
                ),
            };
            out.push(DiscardCommand {
                cdb,
                data,
                lba: at,
                blocks: n,
            });
            at = at.saturating_add(u64::from(n));
            left = left.saturating_sub(u64::from(n));
        }
        Ok(out)
    }
}
