//! Parsers for the SCSI data the probe reads, with Linux's rules for lengths and odd values.
//! All of them are total: any bytes give a value or a [`ParseError`].
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;

/// Why SCSI data could not be parsed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what}: {len} bytes, at least {need} needed")]
    TooShort {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("VPD page {got:#04x} returned when {expected:#04x} was asked for")]
    WrongPage { expected: u8, got: u8 },
    #[error("unsupported logical block size {0}")]
    BlockSize(u32),
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ParseError> {
    if b.len() < n {
        return Err(ParseError::TooShort {
            what,
            len: b.len(),
            need: n,
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(&[a, c, d, e]) => u32::from_be_bytes([a, c, d, e]),
        _ => 0,
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at.saturating_add(8)) {
        x.copy_from_slice(s);
    }
    u64::from_be_bytes(x)
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Peripheral device type of a disk (direct-access block device).
pub const TYPE_DISK: u8 = 0x00;
/// Peripheral device type "unknown / no device".
pub const TYPE_NO_LUN: u8 = 0x1F;

/// Standard INQUIRY data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InquiryData {
    /// 0 = connected, 1 = not connected, 3 = no device at this LUN.
    pub qualifier: u8,
    pub device_type: u8,
    pub removable: bool,
    /// VERSION byte (5 = SPC-3, 6 = SPC-4).
    pub version: u8,
    pub response_format: u8,
    /// Byte 4.
    pub additional_length: u8,
    /// CmdQue (byte 7 bit 1): Linux then sends tagged SRBs.
    pub cmd_que: bool,
    pub vendor: [u8; 8],
    pub product: [u8; 16],
    pub revision: [u8; 4],
}

impl InquiryData {
    /// Parses up to 36 bytes (missing bytes read as zero, as in Linux's zeroed buffer); at least
    /// the 5-byte header must be there.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("standard INQUIRY data", b, 5)?;
        let mut d = [0u8; 36];
        let n = b.len().min(36);
        if let (Some(dst), Some(src)) = (d.get_mut(..n), b.get(..n)) {
            dst.copy_from_slice(src);
        }
        let mut vendor = [0u8; 8];
        let mut product = [0u8; 16];
        let mut revision = [0u8; 4];
        vendor.copy_from_slice(d.get(8..16).unwrap_or(&[0; 8]));
        product.copy_from_slice(d.get(16..32).unwrap_or(&[0; 16]));
        revision.copy_from_slice(d.get(32..36).unwrap_or(&[0; 4]));
        Ok(InquiryData {
            qualifier: d[0] >> 5,
            device_type: d[0] & 0x1F,
            removable: d[1] & 0x80 != 0,
            version: d[2],
            response_format: d[3] & 0x0F,
            additional_length: d[4],
            cmd_que: d[7] & 0x02 != 0,
            vendor,
            product,
            revision,
        })
    }

    /// Linux `scsi_probe_lun`: `additional_length + 5`, or 36 if that exceeds 255.
    pub fn response_len(&self) -> u8 {
        let n = u16::from(self.additional_length).saturating_add(5);
        u8::try_from(n).unwrap_or(36)
    }

    /// A LUN Linux attaches: qualifier 0 and a real device type.
    pub fn is_present(&self) -> bool {
        self.qualifier == 0 && self.device_type != TYPE_NO_LUN
    }

    /// Linux `scsi_level` (`SCSI_SPC_2` = 5, `SCSI_SPC_3` = 6): `version & 7`, plus one from SCSI-2 on.
    pub fn scsi_level(&self) -> u8 {
        let level = self.version & 0x07;
        if level >= 2 || (level == 1 && self.response_format == 1) {
            level.saturating_add(1)
        } else {
            level
        }
    }
}

/// Checks a VPD header and returns the page's full length (`page_length + 4`), as Linux
/// `scsi_vpd_inquiry` does (a different page code is an error).
pub fn vpd_len(b: &[u8], page: u8) -> Result<usize, ParseError> {
    need("VPD header", b, 4)?;
    let got = byte(b, 1);
    if got != page {
        return Err(ParseError::WrongPage {
            expected: page,
            got,
        });
    }
    Ok(usize::from(be16(b, 2)).saturating_add(4))
}

/// The body of a VPD page (after the 4-byte header), bounded by its page length.
pub fn vpd_body(b: &[u8], page: u8) -> Result<&[u8], ParseError> {
    let len = vpd_len(b, page)?.min(b.len());
    Ok(b.get(4..len).unwrap_or(&[]))
}

/// VPD 0xB0, Block Limits (what Linux `sd_read_block_limits` reads).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer_blocks: u32,
    pub optimal_transfer_blocks: u32,
    /// Zero unless the page is long enough (page length ≥ 0x3C, Linux `vpd->len >= 64`).
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap_granularity: u32,
    pub unmap_alignment: Option<u32>,
    pub max_write_same_blocks: u64,
    /// Bytes 20..44 were present.
    pub extended: bool,
}

impl BlockLimits {
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let len = vpd_len(b, 0xB0)?.min(b.len());
        let b = b.get(..len).unwrap_or(b);
        need("VPD 0xB0", b, 16)?;
        let mut l = BlockLimits {
            max_transfer_blocks: be32(b, 8),
            optimal_transfer_blocks: be32(b, 12),
            ..Default::default()
        };
        if b.len() >= 64 {
            l.extended = true;
            l.max_unmap_blocks = be32(b, 20);
            l.max_unmap_descriptors = be32(b, 24);
            l.unmap_granularity = be32(b, 28);
            let align = be32(b, 32);
            l.unmap_alignment = (align & 0x8000_0000 != 0).then_some(align & 0x7FFF_FFFF);
            l.max_write_same_blocks = be64(b, 36);
        }
        Ok(l)
    }
}

/// VPD 0xB1, Block Device Characteristics: rotation rate (1 = non-rotational).
pub fn rotation_rate(b: &[u8]) -> Result<u16, ParseError> {
    let len = vpd_len(b, 0xB1)?.min(b.len());
    let b = b.get(..len).unwrap_or(b);
    need("VPD 0xB1", b, 6)?;
    Ok(be16(b, 4))
}

/// VPD 0xB2, Logical Block Provisioning (Linux `sd_read_block_provisioning`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// UNMAP supported.
    pub lbpu: bool,
    /// WRITE SAME(16) with UNMAP supported.
    pub lbpws: bool,
    /// WRITE SAME(10) with UNMAP supported.
    pub lbpws10: bool,
}

impl Provisioning {
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        let len = vpd_len(b, 0xB2)?.min(b.len());
        let b = b.get(..len).unwrap_or(b);
        need("VPD 0xB2", b, 6)?;
        let f = byte(b, 5);
        Ok(Provisioning {
            lbpu: f & 0x80 != 0,
            lbpws: f & 0x40 != 0,
            lbpws10: f & 0x20 != 0,
        })
    }
}

/// One designator of VPD 0x83.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Designator {
    pub code_set: u8,
    pub association: u8,
    pub designator_type: u8,
    pub value: Vec<u8>,
}

/// VPD 0x83 designators (a truncated last one is dropped).
pub fn designators(b: &[u8]) -> Result<Vec<Designator>, ParseError> {
    let body = vpd_body(b, 0x83)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = body.get(at..at.saturating_add(4)) {
        let len = usize::from(byte(h, 3));
        let start = at.saturating_add(4);
        let Some(value) = body.get(start..start.saturating_add(len)) else {
            break;
        };
        out.push(Designator {
            code_set: byte(h, 0) & 0x0F,
            association: (byte(h, 1) >> 4) & 0x03,
            designator_type: byte(h, 1) & 0x0F,
            value: value.to_vec(),
        });
        at = start.saturating_add(len);
    }
    Ok(out)
}

/// READ CAPACITY data (from either command).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub last_lba: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Logical blocks per physical block, as a power of two.
    pub physical_exponent: u8,
    /// Logical block provisioning management enabled (thin provisioning: UNMAP may work).
    pub lbpme: bool,
    /// Unmapped blocks read as zero.
    pub lbprz: bool,
    pub protection: bool,
}

/// Linux `sd` accepts these logical block sizes (0 is read as 512).
fn check_block_size(size: u32) -> Result<u32, ParseError> {
    match size {
        0 => Ok(512),
        512 | 1024 | 2048 | 4096 => Ok(size),
        other => Err(ParseError::BlockSize(other)),
    }
}

impl Capacity {
    /// READ CAPACITY(16) data (Linux reads 32 bytes; the first 16 carry everything it uses).
    pub fn parse_16(b: &[u8]) -> Result<Self, ParseError> {
        need("READ CAPACITY(16) data", b, 12)?;
        Ok(Capacity {
            last_lba: be64(b, 0),
            block_size: check_block_size(be32(b, 8))?,
            protection: byte(b, 12) & 0x01 != 0,
            physical_exponent: byte(b, 13) & 0x0F,
            lbpme: byte(b, 14) & 0x80 != 0,
            lbprz: byte(b, 14) & 0x40 != 0,
        })
    }

    /// READ CAPACITY(10) data. A last LBA of `0xFFFFFFFF` means "ask READ CAPACITY(16)".
    pub fn parse_10(b: &[u8]) -> Result<Self, ParseError> {
        need("READ CAPACITY(10) data", b, 8)?;
        Ok(Capacity {
            last_lba: u64::from(be32(b, 0)),
            block_size: check_block_size(be32(b, 4))?,
            ..Default::default()
        })
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.last_lba.saturating_add(1)
    }

    /// Size in bytes (saturating).
    pub fn bytes(&self) -> u64 {
        self.blocks().saturating_mul(u64::from(self.block_size))
    }
}

/// MODE SENSE(6) data: the 4-byte header and a page lookup.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ModeHeader {
    /// Mode data length + 1: the whole response (Linux `data->length`).
    pub length: usize,
    pub medium_type: u8,
    /// Bit 7 WP (write protected), bit 4 DPOFUA.
    pub device_specific: u8,
    pub block_descriptor_length: u8,
}

impl ModeHeader {
    pub fn parse_6(b: &[u8]) -> Result<Self, ParseError> {
        need("MODE SENSE(6) header", b, 4)?;
        Ok(ModeHeader {
            length: usize::from(byte(b, 0)).saturating_add(1),
            medium_type: byte(b, 1),
            device_specific: byte(b, 2),
            block_descriptor_length: byte(b, 3),
        })
    }

    pub fn write_protected(&self) -> bool {
        self.device_specific & 0x80 != 0
    }

    pub fn dpofua(&self) -> bool {
        self.device_specific & 0x10 != 0
    }
}

/// Caching mode page (0x08) bits.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Caching {
    /// Write cache enabled: flushes need SYNCHRONIZE CACHE.
    pub wce: bool,
    /// Read cache disabled.
    pub rcd: bool,
}

/// Finds page `code` in MODE SENSE(6) data and returns its bytes (page header included), as
/// Linux `sd_read_cache_type` walks the pages after the header and block descriptors.
pub fn find_mode_page(b: &[u8], code: u8) -> Result<Option<&[u8]>, ParseError> {
    let h = ModeHeader::parse_6(b)?;
    let end = h.length.min(b.len());
    let mut at = 4usize.saturating_add(usize::from(h.block_descriptor_length));
    while at.saturating_add(2) <= end {
        let page = byte(b, at) & 0x3F;
        let spf = byte(b, at) & 0x40 != 0;
        let len = if spf {
            usize::from(be16(b, at.saturating_add(2))).saturating_add(4)
        } else {
            usize::from(byte(b, at.saturating_add(1))).saturating_add(2)
        };
        if page == code {
            let stop = at.saturating_add(len).min(end);
            return Ok(b.get(at..stop));
        }
        at = at.saturating_add(len);
    }
    Ok(None)
}

/// The caching page's WCE/RCD, if the page is there and long enough.
pub fn caching(b: &[u8]) -> Result<Option<Caching>, ParseError> {
    Ok(find_mode_page(b, 0x08)?
        .filter(|p| p.len() >= 3)
        .map(|p| Caching {
            wce: byte(p, 2) & 0x04 != 0,
            rcd: byte(p, 2) & 0x01 != 0,
        }))
}

/// REPORT LUNS data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunList {
    /// LUN LIST LENGTH from the header (bytes of entries the device has).
    pub list_len: u32,
    /// Entries present in the data received, as Linux `scsilun_to_int` reads them.
    pub luns: Vec<u64>,
}

impl LunList {
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("REPORT LUNS header", b, 8)?;
        let list_len = be32(b, 0);
        let avail = b.len().saturating_sub(8) / 8;
        let count = (list_len as usize / 8).min(avail);
        let luns = (0..count)
            .filter_map(|i| {
                let at = i.checked_mul(8)?.checked_add(8)?;
                b.get(at..at.checked_add(8)?).map(scsilun_to_int)
            })
            .collect();
        Ok(LunList { list_len, luns })
    }

    /// Bytes a REPORT LUNS allocation needs to receive the whole list.
    pub fn needed_alloc(&self) -> u64 {
        u64::from(self.list_len).saturating_add(8)
    }
}

/// Linux `scsilun_to_int`: 2-byte levels, first level in the low 16 bits.
pub fn scsilun_to_int(l: &[u8]) -> u64 {
    let mut lun = 0u64;
    for level in 0..4usize {
        let hi = u64::from(byte(l, level.saturating_mul(2)));
        let lo = u64::from(byte(l, level.saturating_mul(2).saturating_add(1)));
        lun |= ((hi << 8) | lo) << level.saturating_mul(16);
    }
    lun
}
