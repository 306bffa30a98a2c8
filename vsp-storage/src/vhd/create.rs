//! Creating fixed, dynamic and differencing images.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::footer::{
    CREATOR_APP, CREATOR_OS, CREATOR_VERSION, DiskType, FEATURES_RESERVED, FOOTER_SIZE,
    FORMAT_VERSION, Footer, Geometry, NO_DATA_OFFSET,
};
use super::header::{DynamicHeader, HEADER_SIZE, HEADER_VERSION, LOCATOR_COUNT, ParentLocator};
use super::image::{OpenOptions, Vhd};
use super::util::{VHD_EPOCH, random_uuid, round_up, vhd_now, write_all_at};
use super::{MAX_SIZE, SECTOR, VhdError, parent};

/// Default block size of dynamic and differencing images (2 MiB, as Hyper-V and qemu).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    Fixed,
    Dynamic,
    /// A differencing image over `parent` (its size defaults to the parent's).
    Differencing {
        parent: PathBuf,
    },
}

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded, see [`rounded_size`]); for a differencing image 0 means
    /// the parent's size.
    pub size: u64,
    pub kind: DiskKind,
    /// Block size of dynamic and differencing images: a power of two of at least 512.
    pub block_size: u32,
    /// Keep `size` as given instead of rounding it up to a CHS geometry.
    pub exact_size: bool,
}

impl CreateOptions {
    pub fn new(size: u64, kind: DiskKind) -> Self {
        CreateOptions {
            size,
            kind,
            block_size: DEFAULT_BLOCK_SIZE,
            exact_size: false,
        }
    }
}

/// The size a new image of (at least) `size` bytes gets, and its geometry.
///
/// Without `exact`, like `qemu-img create -f vpc`: the smallest CHS geometry (by the spec's
/// algorithm) covering `size`, and its size; beyond the largest geometry (about 127 GiB) the size
/// is kept and the geometry is 65535/16/255. With `exact`, the size is rounded only to whole
/// sectors; the geometry is the spec's if it covers exactly that size, else 65535/16/255 (which
/// tells qemu to use the current size, as its `force_size` does).
pub fn rounded_size(size: u64, exact: bool) -> Result<(u64, Geometry), VhdError> {
    if size == 0 {
        return Err(VhdError::InvalidArgument(
            "the size must not be zero".into(),
        ));
    }
    let sectors = size.div_ceil(SECTOR);
    let too_large = || {
        VhdError::InvalidArgument(format!(
            "{size} bytes is larger than the VHD maximum of {MAX_SIZE} bytes (2040 GiB)"
        ))
    };
    if sectors > MAX_SIZE / SECTOR {
        return Err(too_large());
    }
    let max_chs = Geometry::MAX.total_sectors();
    if exact {
        let g = Geometry::for_sectors(sectors);
        let g = if g.total_sectors() == sectors {
            g
        } else {
            Geometry::MAX
        };
        return Ok((sectors * SECTOR, g));
    }
    let wanted = sectors.min(max_chs);
    let mut total = wanted;
    let mut g = Geometry::for_sectors(total);
    while g.total_sectors() < wanted {
        total += 1;
        g = Geometry::for_sectors(total);
    }
    if g == Geometry::MAX {
        Ok((sectors * SECTOR, g))
    } else {
        Ok((g.total_sectors() * SECTOR, g))
    }
}

pub(crate) fn new_footer(
    size: u64,
    geometry: Geometry,
    disk_type: DiskType,
) -> Result<Footer, VhdError> {
    Ok(Footer {
        features: FEATURES_RESERVED,
        format_version: FORMAT_VERSION,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            SECTOR
        },
        timestamp: vhd_now(),
        creator_app: CREATOR_APP,
        creator_version: CREATOR_VERSION,
        creator_os: CREATOR_OS,
        original_size: size,
        current_size: size,
        geometry,
        disk_type,
        checksum: 0,
        unique_id: random_uuid()?,
        saved_state: false,
    })
}

fn check_block_size(bs: u32) -> Result<(), VhdError> {
    if bs.is_power_of_two() && u64::from(bs) >= SECTOR {
        Ok(())
    } else {
        Err(VhdError::InvalidArgument(format!(
            "block size {bs} is not a power of two of at least 512"
        )))
    }
}

/// Modification time of `path` as a VHD timestamp.
fn mtime_vhd(path: &Path) -> u32 {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u32::try_from(d.as_secs().saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// Creates a new image at `path` (which must not exist) and opens it read-write.
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Vhd, VhdError> {
    let path = path.as_ref();
    if opts.kind != DiskKind::Fixed {
        check_block_size(opts.block_size)?;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                VhdError::InvalidArgument(format!("{} already exists", path.display()))
            }
            _ => VhdError::Io(e),
        })?;
    let write = || -> Result<(), VhdError> {
        match &opts.kind {
            DiskKind::Fixed => write_fixed(&file, opts),
            DiskKind::Dynamic => {
                let (size, g) = rounded_size(opts.size, opts.exact_size)?;
                let footer = new_footer(size, g, DiskType::Dynamic)?;
                write_sparse(&file, footer, opts.block_size, None)
            }
            DiskKind::Differencing { parent } => write_differencing(&file, path, parent, opts),
        }
    };
    let result = write()
        .and_then(|()| file.sync_all().map_err(VhdError::Io))
        .and_then(|()| Vhd::open(path, &OpenOptions::default()));
    if result.is_err() {
        drop(file);
        let _ = fs::remove_file(path);
    }
    result
}

fn write_fixed(file: &File, opts: &CreateOptions) -> Result<(), VhdError> {
    let (size, g) = rounded_size(opts.size, opts.exact_size)?;
    let mut footer = new_footer(size, g, DiskType::Fixed)?;
    file.set_len(size + FOOTER_SIZE as u64)?;
    write_all_at(file, &footer.to_bytes(), size)
}

/// Writes a dynamic or differencing image: footer copy, header, BAT, locators, footer.
pub(crate) fn write_sparse(
    file: &File,
    mut footer: Footer,
    block_size: u32,
    diff: Option<(DynamicHeader, parent::NewLocators)>,
) -> Result<(), VhdError> {
    let entries = footer.current_size.div_ceil(u64::from(block_size));
    let max_table_entries = u32::try_from(entries)
        .map_err(|_| VhdError::InvalidArgument("too many blocks for the BAT".into()))?;
    let table_offset = SECTOR + HEADER_SIZE as u64;
    let bat_len = round_up(entries * 4, SECTOR).unwrap_or(u64::MAX);
    let mut header = match &diff {
        Some((h, _)) => h.clone(),
        None => DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: Vec::new(),
            locators: [ParentLocator::EMPTY; LOCATOR_COUNT],
        },
    };
    header.table_offset = table_offset;
    header.max_table_entries = max_table_entries;
    header.block_size = block_size;
    let mut end = table_offset + bat_len;
    if let Some((_, locs)) = &diff {
        for (i, (platform, data)) in locs.entries.iter().enumerate().take(LOCATOR_COUNT) {
            let len = u32::try_from(data.len())
                .map_err(|_| VhdError::InvalidArgument("parent path too long".into()))?;
            let space = round_up(u64::from(len), SECTOR).unwrap_or(u64::MAX);
            if let Some(loc) = header.locators.get_mut(i) {
                *loc = ParentLocator {
                    platform: *platform,
                    data_space: u32::try_from(space).unwrap_or(u32::MAX),
                    data_length: len,
                    data_offset: end,
                };
            }
            write_all_at(file, data, end)?;
            end += space;
        }
    }
    let bat = vec![0xFFu8; usize::try_from(bat_len).map_err(|_| super::sparse::too_big())?];
    write_all_at(file, &bat, table_offset)?;
    write_all_at(file, &header.to_bytes(), SECTOR)?;
    let fb = footer.to_bytes();
    write_all_at(file, &fb, 0)?;
    write_all_at(file, &fb, end)?;
    file.set_len(end + FOOTER_SIZE as u64)?;
    Ok(())
}

fn write_differencing(
    file: &File,
    path: &Path,
    parent_path: &Path,
    opts: &CreateOptions,
) -> Result<(), VhdError> {
    let parent =
        Vhd::open(parent_path, &OpenOptions::read_only()).map_err(|e| VhdError::Parent {
            path: parent_path.to_path_buf(),
            source: Box::new(e),
        })?;
    let psize = parent.footer.current_size;
    let (size, geometry) = if opts.size == 0 || opts.size == psize {
        (psize, parent.footer.geometry)
    } else if opts.size < psize {
        return Err(VhdError::InvalidArgument(format!(
            "a differencing image cannot be smaller than its {psize}-byte parent"
        )));
    } else {
        rounded_size(
            opts.size,
            opts.exact_size || parent.footer.geometry == Geometry::MAX,
        )?
    };
    let mut footer = new_footer(size, geometry, DiskType::Differencing)?;
    footer.original_size = size;
    let locs = parent::new_locators(path, parent_path)?;
    let header = DynamicHeader {
        data_offset: u64::MAX,
        table_offset: 0,
        header_version: HEADER_VERSION,
        max_table_entries: 0,
        block_size: opts.block_size,
        checksum: 0,
        parent_uuid: parent.footer.unique_id,
        parent_timestamp: mtime_vhd(parent_path),
        parent_name: locs.parent_name.clone(),
        locators: [ParentLocator::EMPTY; LOCATOR_COUNT],
    };
    write_sparse(file, footer, opts.block_size, Some((header, locs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_qemu() {
        // `qemu-img create -f vpc` virtual sizes for these requests (qemu 10.0).
        let cases = [
            (10 << 20, 10_514_432u64),
            (2 << 30, 2_147_991_552),
            (127 << 30, 136_365_219_840),
            (200 << 30, 214_748_364_800),
            (1 << 20, 1_079_296),
            (3_000_000_000, 3_000_066_048),
        ];
        for (req, want) in cases {
            let (got, g) = rounded_size(req, false).unwrap();
            assert_eq!(got, want, "request {req}");
            if g != Geometry::MAX {
                assert_eq!(g.total_sectors() * SECTOR, got);
            }
        }
        assert_eq!(
            rounded_size(10 << 20, true).unwrap(),
            (10 << 20, Geometry::MAX)
        );
        assert_eq!(
            rounded_size(10_514_432, true).unwrap(),
            (
                10_514_432,
                Geometry {
                    cylinders: 302,
                    heads: 4,
                    sectors: 17
                }
            )
        );
        assert!(rounded_size(0, false).is_err());
        assert!(rounded_size(MAX_SIZE + 512, true).is_err());
        assert_eq!(rounded_size(MAX_SIZE, false).unwrap().0, MAX_SIZE);
    }
}
