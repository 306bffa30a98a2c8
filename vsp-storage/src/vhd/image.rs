//! An open VHD image (fixed, dynamic or differencing) and its [`BlockDevice`] implementation.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::footer::{DiskType, FOOTER_SIZE, Footer};
use super::header::{DynamicHeader, HEADER_SIZE};
use super::sparse::Sparse;
use super::util::{read_exact_at, write_all_at};
use super::{MAX_CHAIN_DEPTH, SECTOR, VhdError, parent};
use crate::block::{BlockDevice, BlockError, check_range};

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Find and open the parent of a differencing image (the default). Without it the sectors
    /// the image does not hold read as zeros (for inspection and fuzzing).
    pub resolve_parent: bool,
    /// Open the immediate parent writable (for merge).
    pub(crate) parent_writable: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            resolve_parent: true,
            parent_writable: false,
        }
    }
}

impl OpenOptions {
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        }
    }

    /// Whether to find and open the parent of a differencing image (see
    /// [`OpenOptions::resolve_parent`]).
    pub fn with_parent(mut self, resolve: bool) -> Self {
        self.resolve_parent = resolve;
        self
    }
}

/// An open VHD image.
pub struct Vhd {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) read_only: bool,
    pub(crate) footer: Footer,
    /// Virtual size in bytes.
    pub(crate) size: u64,
    /// Whether the footer at the end of the file was valid when opened (else its copy at the
    /// start of a dynamic image was used).
    pub(crate) footer_at_end: bool,
    pub(crate) sparse: Option<Sparse>,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("path", &self.path)
            .field("type", &self.footer.disk_type)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Reads and verifies the footer: at the end of the file, else (for a damaged end of a dynamic
/// image) the copy at its start. Returns the footer, its bytes and whether it was at the end.
pub(crate) fn read_footer(
    file: &File,
    len: u64,
) -> Result<(Footer, [u8; FOOTER_SIZE], bool), VhdError> {
    if len < FOOTER_SIZE as u64 {
        return Err(VhdError::NotVhd(format!(
            "the file is {len} bytes, too small for a 512-byte VHD footer"
        )));
    }
    let mut end = [0u8; FOOTER_SIZE];
    read_exact_at(file, &mut end, len - FOOTER_SIZE as u64)?;
    let end_err = match Footer::parse(&end) {
        Ok(f) => return Ok((f, end, true)),
        Err(e) => e,
    };
    let mut start = [0u8; FOOTER_SIZE];
    read_exact_at(file, &mut start, 0)?;
    match Footer::parse(&start) {
        Ok(f) if f.disk_type.is_sparse() => {
            tracing::warn!(
                "VHD footer at the end is damaged ({end_err}); using the copy at offset 0"
            );
            Ok((f, start, false))
        }
        _ => Err(end_err),
    }
}

impl Vhd {
    /// Opens an image (and, for a differencing image, its parent chain, read-only).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Vhd, VhdError> {
        let mut visited = Vec::new();
        Vhd::open_chain(path.as_ref(), opts, &mut visited)
    }

    pub(crate) fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        visited: &mut Vec<PathBuf>,
    ) -> Result<Vhd, VhdError> {
        let canonical = fs::canonicalize(path)?;
        if visited.contains(&canonical) {
            return Err(VhdError::ParentCycle(canonical));
        }
        if visited.len() > MAX_CHAIN_DEPTH {
            return Err(VhdError::ChainTooDeep(canonical));
        }
        visited.push(canonical);
        let mut vhd = Vhd::open_one(path, opts.read_only)?;
        if opts.resolve_parent
            && let Some(sparse) = vhd.sparse.as_mut()
            && sparse.differencing
        {
            let parent_opts = OpenOptions {
                read_only: !opts.parent_writable,
                resolve_parent: true,
                parent_writable: false,
            };
            let p = parent::open_parent(path, &sparse.header, &sparse.file, &parent_opts, visited)?;
            sparse.parent = Some(Box::new(p));
        }
        Ok(vhd)
    }

    /// Opens one image without its parent.
    fn open_one(path: &Path, read_only: bool) -> Result<Vhd, VhdError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let len = file.metadata()?.len();
        let (footer, footer_bytes, footer_at_end) = read_footer(&file, len)?;
        let size = footer.disk_size();
        if size > super::MAX_SIZE {
            return Err(VhdError::Unsupported(format!(
                "virtual size {size} is larger than the 2040 GiB VHD maximum"
            )));
        }
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                let need = size + FOOTER_SIZE as u64;
                if len < need {
                    return Err(VhdError::Corrupt(format!(
                        "fixed image of {size} bytes needs a {need}-byte file, the file has {len} \
                         (truncated?)"
                    )));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let hoff = footer.data_offset;
                if hoff.saturating_add(HEADER_SIZE as u64) > len {
                    return Err(VhdError::Corrupt(format!(
                        "dynamic header offset {hoff:#x} is past the end of the {len}-byte file"
                    )));
                }
                let mut hb = [0u8; HEADER_SIZE];
                read_exact_at(&file, &mut hb, hoff)?;
                let header = DynamicHeader::parse(&hb)?;
                Some(Sparse::load(
                    file.try_clone()?,
                    header,
                    hoff,
                    footer_bytes,
                    footer.disk_type == DiskType::Differencing,
                    size,
                    len,
                    footer_at_end,
                )?)
            }
        };
        Ok(Vhd {
            path: path.to_path_buf(),
            file,
            read_only,
            footer,
            size,
            footer_at_end,
            sparse,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// False when the footer at the end of the file was damaged and its copy at offset 0 was
    /// used (the next block allocation or compact writes a good one).
    pub fn footer_at_end(&self) -> bool {
        self.footer_at_end
    }

    pub fn header(&self) -> Option<&DynamicHeader> {
        self.sparse.as_ref().map(|s| &s.header)
    }

    /// The opened parent of a differencing image.
    pub fn parent(&self) -> Option<&Vhd> {
        self.sparse.as_ref().and_then(|s| s.parent.as_deref())
    }

    /// Block size of a dynamic or differencing image.
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    /// Allocated blocks (of those the disk size uses) and BAT entries in use.
    pub fn allocated_blocks(&self) -> Option<(u64, u64)> {
        let s = self.sparse.as_ref()?;
        let used = s.used_entries();
        let meta = s.meta_read();
        let allocated = meta
            .bat
            .iter()
            .take(usize::try_from(used).unwrap_or(usize::MAX))
            .filter(|&&e| e != super::header::BAT_UNALLOCATED)
            .count() as u64;
        Some((allocated, used))
    }

    /// Whether the image holds data for the sector at `offset` itself (not from a parent).
    pub fn is_sector_present(&self, offset: u64) -> Result<bool, VhdError> {
        let Some(s) = &self.sparse else {
            return Ok(offset < self.size);
        };
        let block = offset / s.block_size;
        let sector = (offset % s.block_size) / SECTOR;
        Ok(s.present_runs(block)?
            .iter()
            .any(|&(first, n)| (first..first + n).contains(&sector)))
    }

    pub(crate) fn read_inner(&self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        match &self.sparse {
            None => read_exact_at(&self.file, buf, offset),
            Some(s) => s.read(offset, buf),
        }
    }

    pub(crate) fn write_inner(&self, offset: u64, buf: &[u8]) -> Result<(), VhdError> {
        if self.read_only {
            return Err(VhdError::ReadOnly);
        }
        match &self.sparse {
            None => write_all_at(&self.file, buf, offset),
            Some(s) => s.write(offset, buf),
        }
    }
}

impl BlockDevice for Vhd {
    fn sector_size(&self) -> u32 {
        512
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn supports_unmap(&self) -> bool {
        !self.read_only && self.footer.disk_type == DiskType::Dynamic
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size, 512)?;
        self.read_inner(offset, buf).map_err(Into::into)
    }

    fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size, 512)?;
        self.write_inner(offset, buf)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size, 512)?;
        match &self.sparse {
            Some(s) if !s.differencing => s.unmap(offset, len).map_err(Into::into),
            _ => Err(BlockError::Unsupported),
        }
    }
}
