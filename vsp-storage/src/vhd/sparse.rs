//! Dynamic and differencing images: BAT validation, block allocation, sector bitmaps.
//!
//! Locking: `meta` (BAT, end of data, free blocks) is a read-write lock. Reads and writes of
//! already allocated blocks hold it shared for the whole data transfer, so a block cannot be
//! deallocated or reused under them; allocation and deallocation hold it exclusively. Sector
//! bitmaps of partially filled blocks are cached and updated under the `bitmaps` mutex.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::footer::FOOTER_SIZE;
use super::header::{BAT_UNALLOCATED, DynamicHeader, HEADER_SIZE};
use super::util::{read_exact_at, round_up, write_all_at, write_zeros_at};
use super::{SECTOR, Vhd, VhdError};

const STATE_UNKNOWN: u8 = 0;
const STATE_FULL: u8 = 1;
const STATE_PARTIAL: u8 = 2;
/// Bitmaps of partially filled blocks kept in memory.
const BITMAP_CACHE_ENTRIES: usize = 1024;

pub(crate) struct Meta {
    pub(crate) bat: Vec<u32>,
    /// Where the footer is written after the last block: the next block goes here.
    pub(crate) end: u64,
    pub(crate) file_len: u64,
    /// Blocks deallocated by unmap in this session, reused before the file grows.
    pub(crate) free: Vec<u64>,
}

pub(crate) struct Sparse {
    pub(crate) file: File,
    pub(crate) header: DynamicHeader,
    /// Offset of the dynamic header (the footer's data offset).
    pub(crate) header_offset: u64,
    pub(crate) footer_bytes: [u8; FOOTER_SIZE],
    pub(crate) block_size: u64,
    pub(crate) bitmap_size: u64,
    pub(crate) differencing: bool,
    pub(crate) disk_size: u64,
    pub(crate) parent: Option<Box<Vhd>>,
    pub(crate) meta: RwLock<Meta>,
    state: Vec<AtomicU8>,
    bitmaps: Mutex<HashMap<u64, Vec<u8>>>,
}

/// What occupies a file range (for overlap errors).
#[derive(Clone, Copy)]
enum Region {
    FooterCopy,
    Header,
    Bat,
    Locator(usize),
    Block(usize),
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::FooterCopy => f.write_str("the footer copy"),
            Region::Header => f.write_str("the dynamic header"),
            Region::Bat => f.write_str("the BAT"),
            Region::Locator(i) => write!(f, "parent locator {i}"),
            Region::Block(i) => write!(f, "block {i}"),
        }
    }
}

/// A block's bitmap as seen by one request.
enum BitmapView {
    Full,
    Partial(Vec<u8>),
}

pub(crate) fn bit(bitmap: &[u8], sector: u64) -> bool {
    let byte = usize::try_from(sector / 8).unwrap_or(usize::MAX);
    bitmap
        .get(byte)
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

fn set_bit(bitmap: &mut [u8], sector: u64) {
    if let Some(b) = usize::try_from(sector / 8)
        .ok()
        .and_then(|i| bitmap.get_mut(i))
    {
        *b |= 0x80 >> (sector % 8);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sparse {
    /// Reads and validates the BAT of an image whose footer and header are already parsed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        file: File,
        header: DynamicHeader,
        header_offset: u64,
        footer_bytes: [u8; FOOTER_SIZE],
        differencing: bool,
        disk_size: u64,
        file_len: u64,
        footer_at_end: bool,
    ) -> Result<Sparse, VhdError> {
        let block_size = u64::from(header.block_size);
        let bitmap_size = header.bitmap_size();
        let stride = header.block_stride();
        let entries = u64::from(header.max_table_entries);
        if entries.saturating_mul(block_size) < disk_size {
            return Err(VhdError::Corrupt(format!(
                "the BAT's {entries} entries of {block_size} bytes do not cover the \
                 {disk_size}-byte disk"
            )));
        }
        let bat_bytes = entries * 4;
        if header.table_offset.saturating_add(bat_bytes) > file_len {
            return Err(VhdError::Corrupt(format!(
                "the BAT ({entries} entries at {:#x}) extends past the end of the {file_len}-byte \
                 file",
                header.table_offset
            )));
        }
        let mut raw = vec![0u8; usize::try_from(bat_bytes).map_err(|_| too_big())?];
        read_exact_at(&file, &mut raw, header.table_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let data_limit = if footer_at_end {
            file_len - FOOTER_SIZE as u64
        } else {
            file_len
        };
        let mut regions: Vec<(u64, u64, Region)> = vec![
            (0, FOOTER_SIZE as u64, Region::FooterCopy),
            (
                header_offset,
                header_offset.saturating_add(HEADER_SIZE as u64),
                Region::Header,
            ),
            (header.bat_extent().0, header.bat_extent().1, Region::Bat),
        ];
        if differencing {
            for (i, loc) in header.locators.iter().enumerate() {
                if loc.is_empty() || loc.data_length == 0 {
                    continue;
                }
                let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
                if end > file_len {
                    return Err(VhdError::Corrupt(format!(
                        "parent locator {i} ({} bytes at {:#x}) extends past the end of the file",
                        loc.data_length, loc.data_offset
                    )));
                }
                regions.push((loc.data_offset, end, Region::Locator(i)));
            }
        }
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            let end = start + stride;
            if end > data_limit {
                return Err(VhdError::Corrupt(format!(
                    "BAT entry {i} points to {start:#x}..{end:#x}, past the end of the block data \
                     at {data_limit:#x}"
                )));
            }
            regions.push((start, end, Region::Block(i)));
        }
        regions.sort_unstable_by_key(|r| r.0);
        let mut prev: Option<(u64, Region)> = None;
        let mut data_end = 0u64;
        for &(start, end, what) in &regions {
            if let Some((prev_end, prev_what)) = prev
                && start < prev_end
            {
                return Err(VhdError::Corrupt(format!(
                    "{what} at {start:#x} overlaps {prev_what} (which ends at {prev_end:#x})"
                )));
            }
            if prev.is_none_or(|(pe, _)| end > pe) {
                prev = Some((end, what));
            }
            data_end = data_end.max(end);
        }
        let end = round_up(data_end.max(data_limit), SECTOR).ok_or_else(too_big)?;
        let state = (0..bat.len())
            .map(|_| AtomicU8::new(STATE_UNKNOWN))
            .collect();
        Ok(Sparse {
            file,
            header,
            header_offset,
            footer_bytes,
            block_size,
            bitmap_size,
            differencing,
            disk_size,
            parent: None,
            meta: RwLock::new(Meta {
                bat,
                end,
                file_len,
                free: Vec::new(),
            }),
            state,
            bitmaps: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn meta_read(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn meta_write(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn sectors_per_block(&self) -> u64 {
        self.block_size / SECTOR
    }

    /// Splits `offset..offset+len` into per-block pieces: (block, offset in block, length).
    pub(crate) fn segments(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let bs = self.block_size;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let seg = (pos / bs, in_block, n);
            pos += n;
            Some(seg)
        })
    }

    pub(crate) fn read_bitmap_raw(&self, base: u64) -> Result<Vec<u8>, VhdError> {
        let mut bm = vec![0u8; usize::try_from(self.bitmap_size).map_err(|_| too_big())?];
        read_exact_at(&self.file, &mut bm, base)?;
        Ok(bm)
    }

    fn is_full(&self, bitmap: &[u8]) -> bool {
        let n = self.sectors_per_block();
        let whole = usize::try_from(n / 8).unwrap_or(usize::MAX);
        bitmap
            .get(..whole)
            .is_some_and(|b| b.iter().all(|&x| x == 0xFF))
            && (n / 8 * 8..n).all(|s| bit(bitmap, s))
    }

    fn state(&self, block: u64) -> &AtomicU8 {
        // Callers index with blocks inside the disk, which the BAT covers (checked at open).
        static OUTSIDE: AtomicU8 = AtomicU8::new(STATE_UNKNOWN);
        let i = usize::try_from(block).unwrap_or(usize::MAX);
        self.state.get(i).unwrap_or(&OUTSIDE)
    }

    fn bitmap_view(&self, block: u64, base: u64) -> Result<BitmapView, VhdError> {
        if self.state(block).load(Ordering::Acquire) == STATE_FULL {
            return Ok(BitmapView::Full);
        }
        let mut cache = lock(&self.bitmaps);
        if let Some(bm) = cache.get(&block) {
            return Ok(BitmapView::Partial(bm.clone()));
        }
        let bm = self.read_bitmap_raw(base)?;
        if self.is_full(&bm) {
            self.state(block).store(STATE_FULL, Ordering::Release);
            return Ok(BitmapView::Full);
        }
        self.state(block).store(STATE_PARTIAL, Ordering::Release);
        cache_insert(&mut cache, block, bm.clone());
        Ok(BitmapView::Partial(bm))
    }

    /// Reads sectors the image does not hold: from the parent, or zeros.
    fn read_absent(&self, voff: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        match &self.parent {
            Some(parent) if voff < parent.size => {
                let n = usize::try_from((parent.size - voff).min(buf.len() as u64))
                    .unwrap_or(buf.len());
                let (head, tail) = buf.split_at_mut(n);
                parent.read_inner(voff, head)?;
                tail.fill(0);
            }
            _ => buf.fill(0),
        }
        Ok(())
    }

    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        let mut pos = 0usize;
        for (block, in_block, n) in self.segments(offset, buf.len() as u64) {
            let n_usize = usize::try_from(n).map_err(|_| too_big())?;
            let seg = buf
                .get_mut(pos..pos + n_usize)
                .ok_or_else(|| VhdError::Block("segment out of buffer".into()))?;
            self.read_segment(block, in_block, seg)?;
            pos += n_usize;
        }
        Ok(())
    }

    fn read_segment(&self, block: u64, in_block: u64, seg: &mut [u8]) -> Result<(), VhdError> {
        let voff = block * self.block_size + in_block;
        let meta = self.meta_read();
        let entry = bat_entry(&meta, block);
        if entry == BAT_UNALLOCATED {
            drop(meta);
            return self.read_absent(voff, seg);
        }
        let base = u64::from(entry) * SECTOR;
        let data = base + self.bitmap_size + in_block;
        match self.bitmap_view(block, base)? {
            BitmapView::Full => read_exact_at(&self.file, seg, data),
            BitmapView::Partial(bm) => {
                let first = in_block / SECTOR;
                let count = seg.len() as u64 / SECTOR;
                let mut s = 0u64;
                while s < count {
                    let present = bit(&bm, first + s);
                    let mut e = s + 1;
                    while e < count && bit(&bm, first + e) == present {
                        e += 1;
                    }
                    let lo = usize::try_from(s * SECTOR).map_err(|_| too_big())?;
                    let hi = usize::try_from(e * SECTOR).map_err(|_| too_big())?;
                    let part = seg
                        .get_mut(lo..hi)
                        .ok_or_else(|| VhdError::Block("run out of buffer".into()))?;
                    if present {
                        read_exact_at(&self.file, part, data + s * SECTOR)?;
                    } else {
                        self.read_absent(voff + s * SECTOR, part)?;
                    }
                    s = e;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> Result<(), VhdError> {
        let mut pos = 0usize;
        for (block, in_block, n) in self.segments(offset, buf.len() as u64) {
            let n_usize = usize::try_from(n).map_err(|_| too_big())?;
            let seg = buf
                .get(pos..pos + n_usize)
                .ok_or_else(|| VhdError::Block("segment out of buffer".into()))?;
            self.write_segment(block, in_block, seg)?;
            pos += n_usize;
        }
        Ok(())
    }

    fn write_segment(&self, block: u64, in_block: u64, seg: &[u8]) -> Result<(), VhdError> {
        loop {
            {
                let meta = self.meta_read();
                let entry = bat_entry(&meta, block);
                if entry != BAT_UNALLOCATED {
                    return self.write_allocated(block, entry, in_block, seg);
                }
            }
            // Zeros over an unallocated block of a dynamic image change nothing.
            if !self.differencing && super::util::is_zero(seg) {
                return Ok(());
            }
            let mut meta = self.meta_write();
            if bat_entry(&meta, block) == BAT_UNALLOCATED {
                self.allocate(&mut meta, block)?;
            }
        }
    }

    fn write_allocated(
        &self,
        block: u64,
        entry: u32,
        in_block: u64,
        seg: &[u8],
    ) -> Result<(), VhdError> {
        let base = u64::from(entry) * SECTOR;
        write_all_at(&self.file, seg, base + self.bitmap_size + in_block)?;
        if self.state(block).load(Ordering::Acquire) != STATE_FULL {
            self.mark_present(block, base, in_block / SECTOR, seg.len() as u64 / SECTOR)?;
        }
        Ok(())
    }

    /// Sets the bitmap bits of sectors just written (after making their data durable).
    fn mark_present(&self, block: u64, base: u64, first: u64, count: u64) -> Result<(), VhdError> {
        let mut cache = lock(&self.bitmaps);
        let mut bm = match cache.remove(&block) {
            Some(bm) => bm,
            None => self.read_bitmap_raw(base)?,
        };
        if (first..first + count).any(|s| !bit(&bm, s)) {
            self.file.sync_data()?;
            (first..first + count).for_each(|s| set_bit(&mut bm, s));
            write_all_at(&self.file, &bm, base)?;
        }
        if self.is_full(&bm) {
            self.state(block).store(STATE_FULL, Ordering::Release);
        } else {
            self.state(block).store(STATE_PARTIAL, Ordering::Release);
            cache_insert(&mut cache, block, bm);
        }
        Ok(())
    }

    /// Gives `block` file space: a block freed earlier, else the space at the end of the file
    /// (the footer moves behind the new block first, then the bitmap is written and made
    /// durable, then the BAT entry).
    fn allocate(&self, meta: &mut Meta, block: u64) -> Result<(), VhdError> {
        let stride = self.bitmap_size + self.block_size;
        let (base, reused) = match meta.free.pop() {
            Some(b) => (b, true),
            None => (meta.end, false),
        };
        let sector = u32::try_from(base / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNALLOCATED)
            .ok_or_else(|| {
                VhdError::Unsupported(
                    "the image file would outgrow the BAT's 32-bit sector offsets".into(),
                )
            })?;
        let old_len = meta.file_len;
        if !reused {
            write_all_at(&self.file, &self.footer_bytes, base + stride)?;
            meta.file_len = meta.file_len.max(base + stride + FOOTER_SIZE as u64);
        }
        let fill = if self.differencing { 0 } else { 0xFF };
        let bm = vec![fill; usize::try_from(self.bitmap_size).map_err(|_| too_big())?];
        write_all_at(&self.file, &bm, base)?;
        let data = base + self.bitmap_size;
        let dirty_end = if reused {
            data + self.block_size
        } else {
            old_len.min(data + self.block_size)
        };
        if dirty_end > data {
            write_zeros_at(&self.file, data, dirty_end - data)?;
        }
        self.file.sync_data()?;
        write_all_at(
            &self.file,
            &sector.to_be_bytes(),
            self.header.table_offset + 4 * block,
        )?;
        let i = usize::try_from(block).map_err(|_| too_big())?;
        if let Some(e) = meta.bat.get_mut(i) {
            *e = sector;
        }
        if !reused {
            meta.end = base + stride;
        }
        let mut cache = lock(&self.bitmaps);
        if self.differencing {
            self.state(block).store(STATE_PARTIAL, Ordering::Release);
            cache_insert(&mut cache, block, bm);
        } else {
            self.state(block).store(STATE_FULL, Ordering::Release);
            cache.remove(&block);
        }
        Ok(())
    }

    /// Marks `block` unallocated (made durable before its space can be reused).
    pub(crate) fn deallocate(&self, meta: &mut Meta, block: u64) -> Result<(), VhdError> {
        let entry = bat_entry(meta, block);
        if entry == BAT_UNALLOCATED {
            return Ok(());
        }
        write_all_at(
            &self.file,
            &BAT_UNALLOCATED.to_be_bytes(),
            self.header.table_offset + 4 * block,
        )?;
        self.file.sync_data()?;
        let i = usize::try_from(block).map_err(|_| too_big())?;
        if let Some(e) = meta.bat.get_mut(i) {
            *e = BAT_UNALLOCATED;
        }
        meta.free.push(u64::from(entry) * SECTOR);
        self.state(block).store(STATE_UNKNOWN, Ordering::Release);
        lock(&self.bitmaps).remove(&block);
        Ok(())
    }

    /// Unmap for dynamic images: whole blocks are deallocated, partial ranges zeroed.
    pub(crate) fn unmap(&self, offset: u64, len: u64) -> Result<(), VhdError> {
        for (block, in_block, n) in self.segments(offset, len) {
            let block_start = block * self.block_size;
            let whole =
                in_block == 0 && (n == self.block_size || block_start + n >= self.disk_size);
            if whole {
                let mut meta = self.meta_write();
                self.deallocate(&mut meta, block)?;
                continue;
            }
            let meta = self.meta_read();
            let entry = bat_entry(&meta, block);
            if entry == BAT_UNALLOCATED {
                continue;
            }
            let zeros = vec![0u8; usize::try_from(n).map_err(|_| too_big())?];
            self.write_allocated(block, entry, in_block, &zeros)?;
        }
        Ok(())
    }

    /// Sectors (relative to the block) that the image holds for `block`, as runs
    /// `(first, count)`, limited to the disk size. Empty for an unallocated block.
    pub(crate) fn present_runs(&self, block: u64) -> Result<Vec<(u64, u64)>, VhdError> {
        let meta = self.meta_read();
        let entry = bat_entry(&meta, block);
        if entry == BAT_UNALLOCATED {
            return Ok(Vec::new());
        }
        let start = block * self.block_size;
        let limit = self.disk_size.saturating_sub(start).min(self.block_size) / SECTOR;
        let view = self.bitmap_view(block, u64::from(entry) * SECTOR)?;
        let present = |s: u64| match &view {
            BitmapView::Full => true,
            BitmapView::Partial(bm) => bit(bm, s),
        };
        let mut runs = Vec::new();
        let mut s = 0;
        while s < limit {
            if !present(s) {
                s += 1;
                continue;
            }
            let mut e = s + 1;
            while e < limit && present(e) {
                e += 1;
            }
            runs.push((s, e - s));
            s = e;
        }
        Ok(runs)
    }

    /// Number of blocks the disk size needs.
    pub(crate) fn used_entries(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }
}

fn cache_insert(cache: &mut HashMap<u64, Vec<u8>>, block: u64, bm: Vec<u8>) {
    if cache.len() >= BITMAP_CACHE_ENTRIES
        && !cache.contains_key(&block)
        && let Some(k) = cache.keys().next().copied()
    {
        cache.remove(&k);
    }
    cache.insert(block, bm);
}

pub(crate) fn bat_entry(meta: &Meta, block: u64) -> u32 {
    usize::try_from(block)
        .ok()
        .and_then(|i| meta.bat.get(i))
        .copied()
        .unwrap_or(BAT_UNALLOCATED)
}

pub(crate) fn too_big() -> VhdError {
    VhdError::Unsupported("size does not fit this machine's address space".into())
}
