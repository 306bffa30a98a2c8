//! Growing an image's virtual size.

use std::path::Path;

use super::create::rounded_size;
use super::footer::{FOOTER_SIZE, Geometry};
use super::header::{BAT_UNALLOCATED, HEADER_SIZE};
use super::image::{OpenOptions, Vhd};
use super::sparse::{Meta, Sparse, too_big};
use super::util::{read_exact_at, round_up, write_all_at, write_zeros_at};
use super::{SECTOR, VhdError};

/// Grows the virtual size of the image at `path` to (at least) `new_size` bytes and returns the
/// new size. The size is rounded up to a CHS geometry like at creation, unless `exact_size` is
/// given or the image already uses the maximum geometry (a "current size" image). New space
/// reads as zeros; a differencing image reads zeros beyond its parent's end.
///
/// A dynamic image whose BAT has no room for the new blocks gets a longer BAT; blocks and parent
/// locators in the way are moved to the end of the file first.
pub fn expand(path: impl AsRef<Path>, new_size: u64, exact_size: bool) -> Result<u64, VhdError> {
    let opts = OpenOptions {
        read_only: false,
        resolve_parent: false,
        ..OpenOptions::default()
    };
    let mut vhd = Vhd::open(path.as_ref(), &opts)?;
    let old = vhd.size;
    let exact = exact_size || vhd.footer.geometry == Geometry::MAX;
    let (size, geometry) = rounded_size(new_size, exact)?;
    if size < old {
        return Err(VhdError::InvalidArgument(format!(
            "shrinking is not supported: the disk has {old} bytes, {size} were requested"
        )));
    }
    if size == old {
        return Ok(size);
    }
    let mut footer = vhd.footer.clone();
    footer.current_size = size;
    footer.geometry = geometry;
    let fb = footer.to_bytes();
    match vhd.sparse.as_mut() {
        None => {
            let file_len = vhd.file.metadata()?.len();
            write_all_at(&vhd.file, &fb, size)?;
            let zero_end = size.min(file_len);
            if zero_end > old {
                write_zeros_at(&vhd.file, old, zero_end - old)?;
            }
            vhd.file.set_len(size + FOOTER_SIZE as u64)?;
        }
        Some(s) => {
            let needed = size.div_ceil(s.block_size);
            grow_bat(s, needed)?;
            let end = s.meta_read().end;
            write_all_at(&s.file, &fb, end)?;
            s.file.sync_data()?;
            write_all_at(&s.file, &fb, 0)?;
            s.file.set_len(end + FOOTER_SIZE as u64)?;
        }
    }
    vhd.file.sync_all()?;
    Ok(size)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Moves `len` bytes at `from` to the end of the data (the footer moving behind them first) and
/// returns their new offset.
fn append_copy(s: &Sparse, meta: &mut Meta, from: u64, len: u64) -> Result<u64, VhdError> {
    let to = meta.end;
    write_all_at(&s.file, &s.footer_bytes, to + len)?;
    let mut buf = vec![0u8; usize::try_from(len.min(1 << 20)).map_err(|_| too_big())?];
    let mut done = 0;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).map_err(|_| too_big())?;
        let chunk = buf.get_mut(..n).ok_or_else(too_big)?;
        read_exact_at(&s.file, chunk, from + done)?;
        write_all_at(&s.file, chunk, to + done)?;
        done += n as u64;
    }
    s.file.sync_data()?;
    meta.end = to + len;
    meta.file_len = meta.file_len.max(meta.end + FOOTER_SIZE as u64);
    Ok(to)
}

fn grow_bat(s: &mut Sparse, needed: u64) -> Result<(), VhdError> {
    let old_entries = u64::from(s.header.max_table_entries);
    if needed <= old_entries {
        return Ok(());
    }
    let new_entries = u32::try_from(needed)
        .map_err(|_| VhdError::InvalidArgument("too many blocks for the BAT".into()))?;
    let bat_start = s.header.table_offset;
    let new_bat_end = bat_start + round_up(needed * 4, SECTOR).ok_or_else(too_big)?;
    let span = (bat_start, new_bat_end);
    let header_span = (s.header_offset, s.header_offset + HEADER_SIZE as u64);
    if overlaps(span, header_span) || overlaps(span, (0, FOOTER_SIZE as u64)) {
        return Err(VhdError::Unsupported(
            "the BAT cannot grow: the dynamic header follows it".into(),
        ));
    }
    let stride = s.header.block_stride();
    let mut meta = s.meta.write().unwrap_or_else(|e| e.into_inner());
    meta.end = meta.end.max(new_bat_end);
    // Blocks in the way.
    let in_way: Vec<(usize, u64)> = meta
        .bat
        .iter()
        .enumerate()
        .filter(|&(_, &e)| e != BAT_UNALLOCATED)
        .map(|(i, &e)| (i, u64::from(e) * SECTOR))
        .filter(|&(_, off)| overlaps(span, (off, off + stride)))
        .collect();
    for (i, off) in in_way {
        let to = append_copy(s, &mut meta, off, stride)?;
        let sector = u32::try_from(to / SECTOR)
            .ok()
            .filter(|&v| v != BAT_UNALLOCATED)
            .ok_or_else(|| VhdError::Unsupported("the image file would be too large".into()))?;
        write_all_at(&s.file, &sector.to_be_bytes(), bat_start + 4 * i as u64)?;
        s.file.sync_data()?;
        if let Some(e) = meta.bat.get_mut(i) {
            *e = sector;
        }
    }
    // Parent locators in the way.
    let mut moved_locator = false;
    for i in 0..s.header.locators.len() {
        let Some(loc) = s.header.locators.get(i).copied() else {
            continue;
        };
        if loc.is_empty() || loc.data_length == 0 || !overlaps(span, loc.extent()) {
            continue;
        }
        let len = round_up(u64::from(loc.data_length), SECTOR).ok_or_else(too_big)?;
        let to = append_copy(s, &mut meta, loc.data_offset, len)?;
        if let Some(l) = s.header.locators.get_mut(i) {
            l.data_offset = to;
            l.data_space = u32::try_from(len).unwrap_or(u32::MAX);
        }
        moved_locator = true;
    }
    if moved_locator {
        write_all_at(&s.file, &s.header.to_bytes(), s.header_offset)?;
        s.file.sync_data()?;
    }
    // Footer behind everything, then the new BAT entries, then the header.
    write_all_at(&s.file, &s.footer_bytes, meta.end)?;
    let tail_start = bat_start + old_entries * 4;
    let fill = vec![0xFFu8; usize::try_from(new_bat_end - tail_start).map_err(|_| too_big())?];
    write_all_at(&s.file, &fill, tail_start)?;
    s.file.sync_data()?;
    s.header.max_table_entries = new_entries;
    write_all_at(&s.file, &s.header.to_bytes(), s.header_offset)?;
    s.file.sync_data()?;
    let n = usize::try_from(needed).map_err(|_| too_big())?;
    meta.bat.resize(n, BAT_UNALLOCATED);
    Ok(())
}
