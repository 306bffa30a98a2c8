//! VHD (Microsoft "Virtual Hard Disk Image Format Specification") disk images: fixed, dynamic and
//! differencing images as a [`BlockDevice`](crate::block::BlockDevice), and the offline tools
//! behind the `vhd` command (create, inspect, expand, compact, convert, merge).
//!
//! # File layout
//! - fixed: `data (current size) | footer (512)`;
//! - dynamic / differencing: `footer copy (512) | dynamic header (1024) | BAT | [parent locator
//!   data] | blocks… | footer (512)`, every block being its sector bitmap (padded to 512 bytes)
//!   followed by the block's data.
//!
//! All fields are big-endian; the footer and the dynamic header carry a one's-complement byte-sum
//! checksum, verified on open (a bad checksum is an error, as in qemu ≥ 2.x).
//!
//! # Size and geometry
//! The virtual size is the footer's *current size* (as Hyper-V reads it). New images get the CHS
//! geometry of the spec's algorithm, and by default their size is rounded **up** to that geometry
//! (`cylinders × heads × sectors × 512`), exactly like `qemu-img create -f vpc`, so that qemu, Virtual
//! PC and Hyper-V agree on the size. With `exact_size` the size is kept as given and the geometry is
//! set to the maximum 65535/16/255, the convention of qemu's `force_size` that makes qemu use the
//! current size too.
//!
//! # Sector bitmaps
//! Reads honour the per-sector bitmap of every allocated block: a clear bit reads as zeros in a
//! dynamic image and from the parent in a differencing image. Blocks whose bitmap is all ones (the
//! normal case, and what we write when a dynamic image allocates a block, like qemu) are read
//! directly without looking at the bitmap again.
//!
//! # Unmap
//! Dynamic images support unmap: a request covering a whole block deallocates it (its BAT entry
//! becomes `0xFFFFFFFF`; the space is reused by the next allocation in the same session and given
//! back to the file system by [`compact`]); a partial block range is overwritten with
//! zeros (clearing bitmap bits instead would be cheaper, but qemu ignores bitmaps and would show the
//! stale data). Fixed and differencing images report [`BlockError::Unsupported`]: a fixed image
//! cannot release space, and in a differencing image "unmapped" would have to mean "zeros over the
//! parent", which costs space instead of releasing it.
//!
//! [`BlockError::Unsupported`]: crate::block::BlockError::Unsupported

mod create;
mod footer;
mod header;
mod image;
mod inspect;
mod ops;
mod parent;
mod resize;
mod sparse;
#[cfg(test)]
mod tests;
mod util;

use std::io;
use std::path::PathBuf;

pub use create::{CreateOptions, DEFAULT_BLOCK_SIZE, DiskKind, create, rounded_size};
pub use footer::{DiskType, Footer, Geometry, checksum};
pub use header::{DynamicHeader, ParentLocator, PlatformCode};
pub use image::{OpenOptions, Vhd};
pub use inspect::{Check, Inspection, inspect};
pub use ops::{
    CompactReport, ConvertOptions, Format, MergeReport, Progress, compact, convert, merge,
};
pub use resize::expand;

/// Sector size of every VHD image.
pub const SECTOR: u64 = 512;
/// Largest virtual size of a VHD: 2040 GiB (qemu's limit, and the spec's).
pub const MAX_SIZE: u64 = 0xff00_0000 * SECTOR;
/// How many parents a differencing chain may have.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Why a VHD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("not a VHD image: {0}")]
    NotVhd(String),
    #[error("bad {what} checksum: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("corrupt VHD image: {0}")]
    Corrupt(String),
    #[error("unsupported VHD image: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("parent of {child} not found (tried: {tried})")]
    ParentNotFound { child: PathBuf, tried: String },
    #[error("parent {parent} of {child} has UUID {found}, the child expects {expected}")]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("differencing chain loops back to {0}")]
    ParentCycle(PathBuf),
    #[error("differencing chain is deeper than {MAX_CHAIN_DEPTH} images (at {0})")]
    ChainTooDeep(PathBuf),
    #[error("{path}: {source}")]
    Parent {
        path: PathBuf,
        #[source]
        source: Box<VhdError>,
    },
    #[error("disk is read-only")]
    ReadOnly,
    #[error("block I/O: {0}")]
    Block(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<crate::block::BlockError> for VhdError {
    fn from(e: crate::block::BlockError) -> Self {
        match e {
            crate::block::BlockError::Io(e) => VhdError::Io(e),
            crate::block::BlockError::ReadOnly => VhdError::ReadOnly,
            other => VhdError::Block(other.to_string()),
        }
    }
}

impl From<VhdError> for crate::block::BlockError {
    fn from(e: VhdError) -> Self {
        match e {
            VhdError::Io(e) => crate::block::BlockError::Io(e),
            VhdError::ReadOnly => crate::block::BlockError::ReadOnly,
            other => crate::block::BlockError::Corrupt(other.to_string()),
        }
    }
}

/// A 16-byte VHD unique id, shown in the usual 8-4-4-4-12 form (bytes in file order).
pub fn format_uuid(id: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}
