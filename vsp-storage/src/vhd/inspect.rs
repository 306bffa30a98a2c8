//! `vhd inspect`: everything about an image, with consistency checks.

use std::fs::File;
use std::path::Path;

use serde::Serialize;

use super::footer::{DiskType, FOOTER_SIZE, Footer, Geometry, checksum};
use super::header::{DynamicHeader, HEADER_SIZE};
use super::image::{OpenOptions, Vhd};
use super::parent::{decode_locator, read_locator};
use super::util::{format_timestamp, read_exact_at};
use super::{VhdError, format_uuid};

/// One consistency check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FooterReport {
    /// "end" or "start" (the copy, when the end is damaged).
    pub location: &'static str,
    pub features: u32,
    pub format_version: String,
    pub data_offset: u64,
    pub timestamp: u32,
    pub time: String,
    pub creator_app: String,
    pub creator_version: String,
    pub creator_os: String,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub chs_size: u64,
    pub disk_type: DiskType,
    pub checksum: u32,
    pub checksum_ok: bool,
    pub uuid: String,
    pub saved_state: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LocatorReport {
    pub index: usize,
    pub platform: String,
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderReport {
    pub offset: u64,
    pub table_offset: u64,
    pub header_version: String,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub bitmap_size: u64,
    pub checksum: u32,
    pub checksum_ok: bool,
    pub parent_uuid: String,
    pub parent_timestamp: u32,
    pub parent_time: String,
    pub parent_name: String,
    pub locators: Vec<LocatorReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatReport {
    /// BAT entries the virtual size needs.
    pub entries_used: u64,
    pub allocated_blocks: u64,
    /// Allocated blocks whose bitmap marks only some sectors present.
    pub partial_blocks: u64,
    pub sectors_present: u64,
    /// File bytes neither metadata nor allocated blocks (reclaimed by `vhd compact`).
    pub unused_file_bytes: u64,
}

/// Everything `vhd inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: String,
    pub file_size: u64,
    pub virtual_size: u64,
    pub footer: FooterReport,
    pub header: Option<HeaderReport>,
    pub bat: Option<BatReport>,
    /// The parent chain, nearest first.
    pub parents: Vec<String>,
    pub checks: Vec<Check>,
    pub ok: bool,
}

fn check(checks: &mut Vec<Check>, name: &str, ok: bool, detail: impl Into<String>) {
    checks.push(Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    });
}

fn version(v: u32) -> String {
    format!("{}.{}", v >> 16, v & 0xffff)
}

fn footer_report(f: &Footer, bytes: &[u8; FOOTER_SIZE], location: &'static str) -> FooterReport {
    FooterReport {
        location,
        features: f.features,
        format_version: version(f.format_version),
        data_offset: f.data_offset,
        timestamp: f.timestamp,
        time: format_timestamp(f.timestamp),
        creator_app: f.creator_app_str(),
        creator_version: version(f.creator_version),
        creator_os: String::from_utf8_lossy(&f.creator_os)
            .trim_end_matches('\0')
            .to_string(),
        original_size: f.original_size,
        current_size: f.current_size,
        geometry: f.geometry,
        chs_size: f.chs_size(),
        disk_type: f.disk_type,
        checksum: f.checksum,
        checksum_ok: checksum(bytes, 64) == f.checksum,
        uuid: format_uuid(&f.unique_id),
        saved_state: f.saved_state,
    }
}

/// Inspects the image at `path`. Fails only if the file is unreadable or has no VHD footer at
/// all; every other problem is a failed [`Check`]. With `resolve_parent` the parent chain is
/// opened and checked too.
pub fn inspect(path: impl AsRef<Path>, resolve_parent: bool) -> Result<Inspection, VhdError> {
    let path = path.as_ref();
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < FOOTER_SIZE as u64 {
        return Err(VhdError::NotVhd(format!(
            "the file is {len} bytes, too small for a 512-byte VHD footer"
        )));
    }
    let mut checks = Vec::new();
    let mut end = [0u8; FOOTER_SIZE];
    read_exact_at(&file, &mut end, len - FOOTER_SIZE as u64)?;
    let mut start = [0u8; FOOTER_SIZE];
    read_exact_at(&file, &mut start, 0)?;
    // The same choice as opening: a verified footer at the end, else a verified copy at the
    // start (dynamic / differencing), else whatever decodes, to report what is wrong with it.
    let (footer, fbytes, location) = match (Footer::parse(&end), Footer::parse(&start)) {
        (Ok(f), _) => (f, end, "end"),
        (Err(_), Ok(f)) if f.disk_type.is_sparse() => (f, start, "start"),
        _ => match Footer::decode(&end) {
            Ok(f) => (f, end, "end"),
            Err(end_err) => match Footer::decode(&start) {
                Ok(f) if f.disk_type.is_sparse() => (f, start, "start"),
                _ => return Err(end_err),
            },
        },
    };
    let end_ok = Footer::parse(&end).is_ok();
    check(
        &mut checks,
        "footer at end of file",
        end_ok,
        match (end_ok, location) {
            (true, _) => "present",
            (false, "start") => "missing or damaged; using the copy at offset 0",
            (false, _) => "damaged",
        },
    );
    let freport = footer_report(&footer, &fbytes, location);
    check(
        &mut checks,
        "footer checksum",
        freport.checksum_ok,
        format!(
            "stored {:#010x}, computed {:#010x}",
            footer.checksum,
            checksum(&fbytes, 64)
        ),
    );
    check(
        &mut checks,
        "format version",
        footer.format_version >> 16 == 1,
        freport.format_version.clone(),
    );
    if footer.disk_type.is_sparse() {
        check(
            &mut checks,
            "footer copy at offset 0",
            start == fbytes,
            if start == fbytes {
                "identical"
            } else {
                "differs from the footer in use"
            },
        );
    } else {
        let need = footer.disk_size() + FOOTER_SIZE as u64;
        check(
            &mut checks,
            "file holds the whole disk",
            len >= need,
            format!("needs {need} bytes"),
        );
    }
    if footer.geometry != Geometry::MAX && footer.chs_size() != footer.current_size {
        check(
            &mut checks,
            "geometry covers the current size",
            true,
            format!(
                "note: CHS {} covers {} bytes, current size is {} (Virtual PC and qemu \"vpc\" \
                 see the CHS size)",
                footer.geometry,
                footer.chs_size(),
                footer.current_size
            ),
        );
    }

    let mut header_report = None;
    if footer.disk_type.is_sparse() {
        let mut hb = [0u8; HEADER_SIZE];
        let hoff = footer.data_offset;
        match read_exact_at(&file, &mut hb, hoff).and_then(|()| DynamicHeader::decode(&hb)) {
            Ok(h) => {
                let ok = checksum(&hb, 36) == h.checksum;
                check(
                    &mut checks,
                    "dynamic header checksum",
                    ok,
                    format!("stored {:#010x}", h.checksum),
                );
                check(
                    &mut checks,
                    "block size",
                    h.block_size.is_power_of_two() && h.block_size >= 512,
                    h.block_size.to_string(),
                );
                let locators = h
                    .locators
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(index, l)| LocatorReport {
                        index,
                        platform: l.platform.name(),
                        data_space: l.data_space,
                        data_length: l.data_length,
                        data_offset: l.data_offset,
                        path: read_locator(&file, l)
                            .ok()
                            .and_then(|d| decode_locator(l.platform, &d)),
                    })
                    .collect();
                header_report = Some(HeaderReport {
                    offset: hoff,
                    table_offset: h.table_offset,
                    header_version: version(h.header_version),
                    max_table_entries: h.max_table_entries,
                    block_size: h.block_size,
                    bitmap_size: h.bitmap_size(),
                    checksum: h.checksum,
                    checksum_ok: ok,
                    parent_uuid: format_uuid(&h.parent_uuid),
                    parent_timestamp: h.parent_timestamp,
                    parent_time: format_timestamp(h.parent_timestamp),
                    parent_name: h.parent_name_string(),
                    locators,
                });
            }
            Err(e) => check(&mut checks, "dynamic header", false, e.to_string()),
        }
    }

    let opts = OpenOptions {
        read_only: true,
        resolve_parent,
        ..OpenOptions::default()
    };
    let mut bat = None;
    let mut parents = Vec::new();
    match Vhd::open(path, &opts) {
        Ok(vhd) => {
            check(&mut checks, "open (BAT, layout, parent chain)", true, "ok");
            if let Some(s) = vhd.sparse.as_ref() {
                bat = Some(bat_report(&vhd, s, len)?);
            }
            let mut p = vhd.parent();
            while let Some(v) = p {
                parents.push(v.path().display().to_string());
                p = v.parent();
            }
        }
        Err(e) => check(
            &mut checks,
            "open (BAT, layout, parent chain)",
            false,
            e.to_string(),
        ),
    }
    let ok = checks.iter().all(|c| c.ok);
    Ok(Inspection {
        path: path.display().to_string(),
        file_size: len,
        virtual_size: footer.disk_size(),
        footer: freport,
        header: header_report,
        bat,
        parents,
        checks,
        ok,
    })
}

fn bat_report(vhd: &Vhd, s: &super::sparse::Sparse, len: u64) -> Result<BatReport, VhdError> {
    let (allocated_blocks, entries_used) = vhd.allocated_blocks().unwrap_or((0, 0));
    let mut partial = 0;
    let mut present = 0;
    for block in 0..entries_used {
        let runs = s.present_runs(block)?;
        let n: u64 = runs.iter().map(|r| r.1).sum();
        let limit = vhd
            .size
            .saturating_sub(block * s.block_size)
            .min(s.block_size)
            / 512;
        if !runs.is_empty() && n < limit {
            partial += 1;
        }
        present += n;
    }
    let all_allocated = s
        .meta_read()
        .bat
        .iter()
        .filter(|&&e| e != super::header::BAT_UNALLOCATED)
        .count() as u64;
    let (bat_start, bat_end) = s.header.bat_extent();
    let mut used = FOOTER_SIZE as u64 * 2 + HEADER_SIZE as u64 + (bat_end - bat_start);
    used += all_allocated * s.header.block_stride();
    if s.differencing {
        used += s
            .header
            .locators
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| l.extent().1 - l.extent().0)
            .sum::<u64>();
    }
    Ok(BatReport {
        entries_used,
        allocated_blocks,
        partial_blocks: partial,
        sectors_present: present,
        unused_file_bytes: len.saturating_sub(used),
    })
}
