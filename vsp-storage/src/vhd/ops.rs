//! Offline tools: compact, convert, merge.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::create::{CreateOptions, DEFAULT_BLOCK_SIZE, DiskKind, create};
use super::footer::{FOOTER_SIZE, Footer};
use super::header::{BAT_UNALLOCATED, HEADER_SIZE};
use super::image::{OpenOptions, Vhd};
use super::sparse::{Sparse, bat_entry, too_big};
use super::util::{is_zero, read_exact_at, round_up, write_all_at};
use super::{SECTOR, VhdError};

/// Progress callback: `(done, total)` in units of work (bytes or blocks).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

const COPY_CHUNK: u64 = 1 << 20;

/// What [`compact`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactReport {
    pub blocks_before: u64,
    pub blocks_dropped: u64,
    pub blocks_moved: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
}

fn usize_of(v: u64) -> Result<usize, VhdError> {
    usize::try_from(v).map_err(|_| too_big())
}

/// Whether block `i` holds nothing the image needs: all zeros (dynamic), or exactly what the
/// parent supplies (differencing), or beyond the disk size.
fn block_is_redundant(vhd: &Vhd, s: &Sparse, i: u64, buf: &mut Vec<u8>) -> Result<bool, VhdError> {
    let start = i * s.block_size;
    if start >= vhd.size {
        return Ok(true);
    }
    let len = usize_of(s.block_size.min(vhd.size - start))?;
    buf.resize(len, 0);
    vhd.read_inner(start, buf)?;
    if !s.differencing {
        return Ok(is_zero(buf));
    }
    if s.present_runs(i)?.is_empty() {
        return Ok(true);
    }
    let mut under = vec![0u8; len];
    match vhd.parent() {
        Some(p) if start < p.size => {
            let n = usize_of((p.size - start).min(len as u64))?;
            let head = under.get_mut(..n).ok_or_else(too_big)?;
            p.read_inner(start, head)?;
        }
        Some(_) => {}
        None => {
            return Err(VhdError::InvalidArgument(
                "compacting a differencing image needs its parent".into(),
            ));
        }
    }
    Ok(*buf == under)
}

/// Drops blocks that hold only zeros (dynamic) or only what the parent already has
/// (differencing), and blocks unmapped earlier, then moves the remaining blocks down into the
/// gaps and truncates the file. Every moved block is copied and made durable before its BAT entry
/// changes, so an interrupted compact leaves a consistent image.
pub fn compact(path: impl AsRef<Path>, progress: Progress<'_>) -> Result<CompactReport, VhdError> {
    let vhd = Vhd::open(path.as_ref(), &OpenOptions::default())?;
    let Some(s) = vhd.sparse.as_ref() else {
        return Err(VhdError::InvalidArgument(
            "a fixed image has no blocks to drop; convert it to a dynamic image instead".into(),
        ));
    };
    let mut report = CompactReport {
        file_size_before: vhd.file.metadata()?.len(),
        ..CompactReport::default()
    };
    let allocated: Vec<u64> = {
        let meta = s.meta_read();
        (0..meta.bat.len() as u64)
            .filter(|&i| bat_entry(&meta, i) != BAT_UNALLOCATED)
            .collect()
    };
    report.blocks_before = allocated.len() as u64;
    let total = 2 * report.blocks_before;
    let mut done = 0;
    let mut buf = Vec::new();
    for &i in &allocated {
        if block_is_redundant(&vhd, s, i, &mut buf)? {
            let mut meta = s.meta_write();
            write_all_at(
                &s.file,
                &BAT_UNALLOCATED.to_be_bytes(),
                s.header.table_offset + 4 * i,
            )?;
            if let Some(e) = meta.bat.get_mut(usize_of(i)?) {
                *e = BAT_UNALLOCATED;
            }
            report.blocks_dropped += 1;
        }
        done += 1;
        progress(done, total);
    }
    s.file.sync_data()?;

    // Pack the remaining blocks towards the start, around the fixed metadata.
    let stride = s.header.block_stride();
    let mut obstacles: Vec<(u64, u64)> = vec![
        (0, FOOTER_SIZE as u64),
        (s.header_offset, s.header_offset + HEADER_SIZE as u64),
        s.header.bat_extent(),
    ];
    if s.differencing {
        for loc in s
            .header
            .locators
            .iter()
            .filter(|l| !l.is_empty() && l.data_length > 0)
        {
            obstacles.push(loc.extent());
        }
    }
    let fit = |mut pos: u64, len: u64| -> Option<u64> {
        loop {
            let hit = obstacles.iter().find(|&&(a, b)| a < pos + len && pos < b)?;
            pos = round_up(hit.1, SECTOR)?;
            if obstacles.iter().all(|&(a, b)| !(a < pos + len && pos < b)) {
                return Some(pos);
            }
        }
    };
    let fit = |pos: u64, len: u64| fit(pos, len).unwrap_or(pos);
    let mut meta = s.meta_write();
    let mut kept: Vec<(u64, u64)> = (0..meta.bat.len() as u64)
        .filter_map(|i| {
            let e = bat_entry(&meta, i);
            (e != BAT_UNALLOCATED).then_some((u64::from(e) * SECTOR, i))
        })
        .collect();
    kept.sort_unstable();
    let mut cursor = 0u64;
    let mut copy = vec![0u8; usize_of(stride.min(COPY_CHUNK))?];
    for &(off, i) in &kept {
        let target = fit(cursor, stride);
        if target < off && target + stride <= off {
            let mut k = 0;
            while k < stride {
                let n = usize_of((stride - k).min(copy.len() as u64))?;
                let chunk = copy.get_mut(..n).ok_or_else(too_big)?;
                read_exact_at(&s.file, chunk, off + k)?;
                write_all_at(&s.file, chunk, target + k)?;
                k += n as u64;
            }
            s.file.sync_data()?;
            let sector = u32::try_from(target / SECTOR).map_err(|_| too_big())?;
            write_all_at(
                &s.file,
                &sector.to_be_bytes(),
                s.header.table_offset + 4 * i,
            )?;
            s.file.sync_data()?;
            if let Some(e) = meta.bat.get_mut(usize_of(i)?) {
                *e = sector;
            }
            report.blocks_moved += 1;
            cursor = target + stride;
        } else {
            cursor = off + stride;
        }
        done += 1;
        progress(done, total);
    }
    let end = obstacles.iter().map(|o| o.1).fold(cursor, u64::max);
    let end = round_up(end, SECTOR).ok_or_else(too_big)?;
    write_all_at(&s.file, &s.footer_bytes, end)?;
    s.file.sync_data()?;
    s.file.set_len(end + FOOTER_SIZE as u64)?;
    s.file.sync_all()?;
    meta.end = end;
    meta.file_len = end + FOOTER_SIZE as u64;
    meta.free.clear();
    report.file_size_after = meta.file_len;
    progress(total, total);
    Ok(report)
}

/// Target format of [`convert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Fixed,
    Dynamic,
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub to: Format,
    /// Block size of a dynamic target.
    pub block_size: u32,
    /// Keep the source size for a VHD target instead of rounding it up to a CHS geometry.
    pub exact_size: bool,
}

impl ConvertOptions {
    pub fn new(to: Format) -> Self {
        ConvertOptions {
            to,
            block_size: DEFAULT_BLOCK_SIZE,
            exact_size: false,
        }
    }
}

/// A conversion source: a VHD (any type; a differencing chain is flattened) or a raw file.
enum Source {
    Vhd(Box<Vhd>),
    Raw(File, u64),
}

impl Source {
    fn open(path: &Path) -> Result<Source, VhdError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut cookie = [0u8; 8];
        let looks_vhd = len >= FOOTER_SIZE as u64
            && ((file
                .read_exact_at(&mut cookie, len - FOOTER_SIZE as u64)
                .is_ok()
                && Footer::has_cookie(&cookie))
                || (file.read_exact_at(&mut cookie, 0).is_ok() && Footer::has_cookie(&cookie)));
        if looks_vhd {
            Ok(Source::Vhd(Box::new(Vhd::open(
                path,
                &OpenOptions::read_only(),
            )?)))
        } else {
            Ok(Source::Raw(file, len))
        }
    }

    fn size(&self) -> u64 {
        match self {
            Source::Vhd(v) => v.size,
            Source::Raw(_, len) => len.div_ceil(SECTOR) * SECTOR,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        match self {
            Source::Vhd(v) => v.read_inner(offset, buf),
            Source::Raw(f, len) => {
                let avail = usize_of(len.saturating_sub(offset).min(buf.len() as u64))?;
                let (head, tail) = buf.split_at_mut(avail);
                read_exact_at(f, head, offset)?;
                tail.fill(0);
                Ok(())
            }
        }
    }
}

/// Converts between raw images and fixed / dynamic VHDs (any VHD source, including a
/// differencing chain, which is flattened). The target must not exist. Zero ranges are not
/// written: a raw or fixed target stays sparse, a dynamic one leaves those blocks unallocated.
pub fn convert(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<u64, VhdError> {
    let (src, dst) = (src.as_ref(), dst.as_ref());
    if dst.exists() {
        return Err(VhdError::InvalidArgument(format!(
            "{} already exists",
            dst.display()
        )));
    }
    let source = Source::open(src)?;
    let size = source.size();
    if size == 0 {
        return Err(VhdError::InvalidArgument(format!(
            "{} is empty",
            src.display()
        )));
    }
    let result = convert_into(&source, size, dst, opts, progress);
    if result.is_err() {
        let _ = fs::remove_file(dst);
    }
    result
}

enum Target {
    Raw(File),
    Vhd(Box<Vhd>),
}

fn convert_into(
    source: &Source,
    size: u64,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<u64, VhdError> {
    let (target, dst_size) = match opts.to {
        Format::Raw => {
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)?;
            f.set_len(size)?;
            (Target::Raw(f), size)
        }
        Format::Fixed | Format::Dynamic => {
            let kind = if opts.to == Format::Fixed {
                DiskKind::Fixed
            } else {
                DiskKind::Dynamic
            };
            let v = create(
                dst,
                &CreateOptions {
                    size,
                    kind,
                    block_size: opts.block_size,
                    exact_size: opts.exact_size,
                },
            )?;
            let s = v.size;
            (Target::Vhd(Box::new(v)), s)
        }
    };
    let mut buf = vec![0u8; usize_of(COPY_CHUNK)?];
    let mut off = 0;
    while off < size {
        let n = usize_of((size - off).min(COPY_CHUNK))?;
        let chunk = buf.get_mut(..n).ok_or_else(too_big)?;
        source.read(off, chunk)?;
        if !is_zero(chunk) {
            match &target {
                Target::Raw(f) => write_all_at(f, chunk, off)?,
                Target::Vhd(v) => v.write_inner(off, chunk)?,
            }
        }
        off += n as u64;
        progress(off, size);
    }
    match &target {
        Target::Raw(f) => f.sync_all()?,
        Target::Vhd(v) => v.file.sync_all()?,
    }
    Ok(dst_size)
}

/// What [`merge`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub parent: PathBuf,
    pub sectors_merged: u64,
}

/// Writes every sector a differencing image holds into its parent. The child stays valid (it
/// still reads the same); other children of the parent do not, as with any merge.
pub fn merge(child: impl AsRef<Path>, progress: Progress<'_>) -> Result<MergeReport, VhdError> {
    let opts = OpenOptions {
        read_only: true,
        resolve_parent: true,
        parent_writable: true,
    };
    let vhd = Vhd::open(child.as_ref(), &opts)?;
    let s = match vhd.sparse.as_ref() {
        Some(s) if s.differencing => s,
        _ => {
            return Err(VhdError::InvalidArgument(format!(
                "{} is a {} image, not a differencing one",
                child.as_ref().display(),
                vhd.footer.disk_type
            )));
        }
    };
    let parent = s.parent.as_deref().ok_or_else(|| {
        VhdError::InvalidArgument("the parent of the differencing image is not open".into())
    })?;
    if parent.size < vhd.size {
        return Err(VhdError::InvalidArgument(format!(
            "the child ({} bytes) is larger than its parent ({} bytes); expand the parent first",
            vhd.size, parent.size
        )));
    }
    let blocks = s.used_entries();
    let mut sectors = 0;
    let mut buf = Vec::new();
    for block in 0..blocks {
        for (first, count) in s.present_runs(block)? {
            let voff = block * s.block_size + first * SECTOR;
            buf.resize(usize_of(count * SECTOR)?, 0);
            vhd.read_inner(voff, &mut buf)?;
            parent.write_inner(voff, &buf)?;
            sectors += count;
        }
        progress(block + 1, blocks);
    }
    parent.file.sync_all()?;
    Ok(MergeReport {
        parent: parent.path.clone(),
        sectors_merged: sectors,
    })
}
