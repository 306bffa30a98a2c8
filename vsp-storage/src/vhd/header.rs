//! The 1024-byte dynamic disk header and its parent locator entries.

use super::VhdError;
use super::footer::checksum;
use super::util::{array, be_u32, be_u64, put};

pub(crate) const HEADER_SIZE: usize = 1024;
pub(crate) const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub(crate) const HEADER_VERSION: u32 = 0x0001_0000;
/// Bytes of the parent unicode name field (256 UTF-16 code units).
pub(crate) const PARENT_NAME_BYTES: usize = 512;
pub(crate) const LOCATOR_COUNT: usize = 8;
/// BAT value of an unallocated block.
pub const BAT_UNALLOCATED: u32 = 0xFFFF_FFFF;

/// A parent locator's platform code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformCode {
    None,
    /// Deprecated: relative path, ANSI.
    Wi2r,
    /// Deprecated: absolute path, ANSI.
    Wi2k,
    /// Relative Windows path, UTF-16LE.
    W2ru,
    /// Absolute Windows path, UTF-16LE.
    W2ku,
    /// Mac OS alias blob.
    Mac,
    /// Mac OS X file URL, UTF-8.
    MacX,
    Unknown(u32),
}

impl PlatformCode {
    pub fn from_code(code: u32) -> PlatformCode {
        match code {
            0 => PlatformCode::None,
            0x5769_3272 => PlatformCode::Wi2r,
            0x5769_326B => PlatformCode::Wi2k,
            0x5732_7275 => PlatformCode::W2ru,
            0x5732_6B75 => PlatformCode::W2ku,
            // VirtualBox writes 0x4D163220 / 0x4D163258 for "Mac " / "MacX"; accept both.
            0x4D61_6320 | 0x4D16_3220 => PlatformCode::Mac,
            0x4D61_6358 | 0x4D16_3258 => PlatformCode::MacX,
            other => PlatformCode::Unknown(other),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            PlatformCode::None => 0,
            PlatformCode::Wi2r => 0x5769_3272,
            PlatformCode::Wi2k => 0x5769_326B,
            PlatformCode::W2ru => 0x5732_7275,
            PlatformCode::W2ku => 0x5732_6B75,
            PlatformCode::Mac => 0x4D61_6320,
            PlatformCode::MacX => 0x4D61_6358,
            PlatformCode::Unknown(c) => c,
        }
    }

    pub fn name(self) -> String {
        match self {
            PlatformCode::None => "none".into(),
            PlatformCode::Wi2r => "Wi2r".into(),
            PlatformCode::Wi2k => "Wi2k".into(),
            PlatformCode::W2ru => "W2ru".into(),
            PlatformCode::W2ku => "W2ku".into(),
            PlatformCode::Mac => "Mac".into(),
            PlatformCode::MacX => "MacX".into(),
            PlatformCode::Unknown(c) => format!("{c:#010x}"),
        }
    }
}

/// One parent locator entry (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentLocator {
    pub platform: PlatformCode,
    /// Space reserved for the locator data. The spec says sectors; Virtual PC and Hyper-V store
    /// bytes. We write bytes and read either (see [`ParentLocator::space_bytes`]).
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

impl ParentLocator {
    pub const EMPTY: ParentLocator = ParentLocator {
        platform: PlatformCode::None,
        data_space: 0,
        data_length: 0,
        data_offset: 0,
    };

    pub fn is_empty(&self) -> bool {
        self.platform == PlatformCode::None
    }

    /// The reserved space in bytes: `data_space` taken as bytes when that holds the data, else
    /// as sectors.
    pub fn space_bytes(&self) -> u64 {
        if self.data_space >= self.data_length {
            u64::from(self.data_space)
        } else {
            u64::from(self.data_space) * super::SECTOR
        }
    }

    /// The file range the locator occupies (at least its data).
    pub fn extent(&self) -> (u64, u64) {
        let len = self.space_bytes().max(u64::from(self.data_length));
        (self.data_offset, self.data_offset.saturating_add(len))
    }
}

/// The dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    /// As stored (recomputed by [`DynamicHeader::to_bytes`]).
    pub checksum: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name as UTF-16 code units (big-endian on disk), without the padding.
    pub parent_name: Vec<u16>,
    pub locators: [ParentLocator; LOCATOR_COUNT],
}

mod off {
    pub const COOKIE: usize = 0;
    pub const DATA_OFFSET: usize = 8;
    pub const TABLE_OFFSET: usize = 16;
    pub const VERSION: usize = 24;
    pub const MAX_TABLE_ENTRIES: usize = 28;
    pub const BLOCK_SIZE: usize = 32;
    pub const CHECKSUM: usize = 36;
    pub const PARENT_UUID: usize = 40;
    pub const PARENT_TIMESTAMP: usize = 56;
    pub const PARENT_NAME: usize = 64;
    pub const LOCATORS: usize = 576;
    pub const LOCATOR_SIZE: usize = 24;
}

impl DynamicHeader {
    /// Decodes without verifying the checksum (for inspection); the cookie must be valid.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<DynamicHeader, VhdError> {
        if b.get(..8) != Some(HEADER_COOKIE.as_slice()) {
            return Err(VhdError::Corrupt(format!(
                "no dynamic header cookie \"cxsparse\" (found {:?})",
                String::from_utf8_lossy(&b[..8])
            )));
        }
        let name_bytes = &b[off::PARENT_NAME..off::PARENT_NAME + PARENT_NAME_BYTES];
        let parent_name: Vec<u16> = name_bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = [ParentLocator::EMPTY; LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let o = off::LOCATORS + i * off::LOCATOR_SIZE;
            *loc = ParentLocator {
                platform: PlatformCode::from_code(be_u32(b, o)),
                data_space: be_u32(b, o + 4),
                data_length: be_u32(b, o + 8),
                data_offset: be_u64(b, o + 16),
            };
        }
        Ok(DynamicHeader {
            data_offset: be_u64(b, off::DATA_OFFSET),
            table_offset: be_u64(b, off::TABLE_OFFSET),
            header_version: be_u32(b, off::VERSION),
            max_table_entries: be_u32(b, off::MAX_TABLE_ENTRIES),
            block_size: be_u32(b, off::BLOCK_SIZE),
            checksum: be_u32(b, off::CHECKSUM),
            parent_uuid: array(b, off::PARENT_UUID),
            parent_timestamp: be_u32(b, off::PARENT_TIMESTAMP),
            parent_name,
            locators,
        })
    }

    /// Parses and verifies: cookie, checksum, version, block size.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<DynamicHeader, VhdError> {
        let h = DynamicHeader::decode(b)?;
        let computed = checksum(b, off::CHECKSUM);
        if computed != h.checksum {
            return Err(VhdError::BadChecksum {
                what: "dynamic header",
                stored: h.checksum,
                computed,
            });
        }
        if h.header_version >> 16 != 1 {
            return Err(VhdError::Unsupported(format!(
                "dynamic header version {:#010x}",
                h.header_version
            )));
        }
        if !h.block_size.is_power_of_two() || u64::from(h.block_size) < super::SECTOR {
            return Err(VhdError::Corrupt(format!(
                "block size {} is not a power of two of at least 512",
                h.block_size
            )));
        }
        Ok(h)
    }

    /// Encodes, computing the checksum (the `checksum` field is updated too).
    pub fn to_bytes(&mut self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        put(&mut b, off::COOKIE, HEADER_COOKIE);
        put(&mut b, off::DATA_OFFSET, &self.data_offset.to_be_bytes());
        put(&mut b, off::TABLE_OFFSET, &self.table_offset.to_be_bytes());
        put(&mut b, off::VERSION, &self.header_version.to_be_bytes());
        put(
            &mut b,
            off::MAX_TABLE_ENTRIES,
            &self.max_table_entries.to_be_bytes(),
        );
        put(&mut b, off::BLOCK_SIZE, &self.block_size.to_be_bytes());
        put(&mut b, off::PARENT_UUID, &self.parent_uuid);
        put(
            &mut b,
            off::PARENT_TIMESTAMP,
            &self.parent_timestamp.to_be_bytes(),
        );
        for (i, u) in self
            .parent_name
            .iter()
            .take(PARENT_NAME_BYTES / 2)
            .enumerate()
        {
            put(&mut b, off::PARENT_NAME + 2 * i, &u.to_be_bytes());
        }
        for (i, loc) in self.locators.iter().enumerate() {
            let o = off::LOCATORS + i * off::LOCATOR_SIZE;
            put(&mut b, o, &loc.platform.code().to_be_bytes());
            put(&mut b, o + 4, &loc.data_space.to_be_bytes());
            put(&mut b, o + 8, &loc.data_length.to_be_bytes());
            put(&mut b, o + 16, &loc.data_offset.to_be_bytes());
        }
        self.checksum = checksum(&b, off::CHECKSUM);
        put(&mut b, off::CHECKSUM, &self.checksum.to_be_bytes());
        b
    }

    pub fn parent_name_string(&self) -> String {
        String::from_utf16_lossy(&self.parent_name)
    }

    /// Bytes of one block's sector bitmap, padded to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        let bits = u64::from(self.block_size) / super::SECTOR;
        bits.div_ceil(8).div_ceil(super::SECTOR) * super::SECTOR
    }

    /// File bytes of one block (bitmap + data).
    pub fn block_stride(&self) -> u64 {
        self.bitmap_size() + u64::from(self.block_size)
    }

    /// The file range of the BAT, padded to whole sectors.
    pub fn bat_extent(&self) -> (u64, u64) {
        let len = (u64::from(self.max_table_entries) * 4).div_ceil(super::SECTOR) * super::SECTOR;
        (self.table_offset, self.table_offset.saturating_add(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        let mut locators = [ParentLocator::EMPTY; LOCATOR_COUNT];
        locators[0] = ParentLocator {
            platform: PlatformCode::W2ru,
            data_space: 512,
            data_length: 22,
            data_offset: 0x1000,
        };
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            header_version: HEADER_VERSION,
            max_table_entries: 5,
            block_size: 2 << 20,
            checksum: 0,
            parent_uuid: [3; 16],
            parent_timestamp: 99,
            parent_name: "parent.vhd".encode_utf16().collect(),
            locators,
        }
    }

    #[test]
    fn round_trip() {
        let mut h = sample();
        let b = h.to_bytes();
        assert_eq!(DynamicHeader::parse(&b).unwrap(), h);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(h.block_stride(), (2 << 20) + 512);
        assert_eq!(h.parent_name_string(), "parent.vhd");
    }

    #[test]
    fn rejects_bad_checksum_and_block_size() {
        let mut h = sample();
        let mut b = h.to_bytes();
        b[100] ^= 0x40;
        assert!(matches!(
            DynamicHeader::parse(&b),
            Err(VhdError::BadChecksum { .. })
        ));
        h.block_size = 3 << 20;
        let b = h.to_bytes();
        assert!(matches!(
            DynamicHeader::parse(&b),
            Err(VhdError::Corrupt(_))
        ));
        h.block_size = 256;
        let b = h.to_bytes();
        assert!(matches!(
            DynamicHeader::parse(&b),
            Err(VhdError::Corrupt(_))
        ));
    }

    #[test]
    fn bitmap_sizes() {
        let mut h = sample();
        h.block_size = 512;
        assert_eq!(h.bitmap_size(), 512);
        h.block_size = 4 << 20;
        assert_eq!(h.bitmap_size(), 1024);
        h.block_size = 1 << 31;
        assert_eq!(h.bitmap_size(), 512 * 1024);
    }

    #[test]
    fn locator_space_units() {
        let mut l = ParentLocator {
            platform: PlatformCode::W2ku,
            data_space: 2,
            data_length: 600,
            data_offset: 4096,
        };
        assert_eq!(l.space_bytes(), 1024);
        l.data_space = 1024;
        assert_eq!(l.space_bytes(), 1024);
        assert_eq!(PlatformCode::from_code(0x4D16_3258), PlatformCode::MacX);
    }
}
