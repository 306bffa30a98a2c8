//! The 512-byte hard disk footer, its checksum and the CHS geometry algorithm.

use super::VhdError;
use super::util::{array, be_u16, be_u32, be_u64, put};

pub(crate) const FOOTER_SIZE: usize = 512;
pub(crate) const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// File format version 1.0.
pub(crate) const FORMAT_VERSION: u32 = 0x0001_0000;
/// Feature bit 1 is "reserved, must be set"; bit 0 marks a temporary disk.
pub(crate) const FEATURES_RESERVED: u32 = 0x2;
/// `data_offset` of a fixed disk (no further structure).
pub(crate) const NO_DATA_OFFSET: u64 = u64::MAX;
/// The creator application we write: "vsp " (this project's storage VSP tools).
pub(crate) const CREATOR_APP: [u8; 4] = *b"vsp ";
pub(crate) const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS: the spec only knows Windows ("Wi2k") and Macintosh ("Mac "); qemu writes Wi2k.
pub(crate) const CREATOR_OS: [u8; 4] = *b"Wi2k";

/// The one's complement of the byte sum of `bytes`, with the 4 bytes at `skip` (the stored
/// checksum field) counted as zero.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// The footer's disk type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn from_code(code: u32) -> Result<Self, VhdError> {
        match code {
            2 => Ok(DiskType::Fixed),
            3 => Ok(DiskType::Dynamic),
            4 => Ok(DiskType::Differencing),
            0 => Err(VhdError::Unsupported("disk type 0 (none)".into())),
            1 | 5 | 6 => Err(VhdError::Unsupported(format!(
                "disk type {code} (reserved/deprecated)"
            ))),
            other => Err(VhdError::Corrupt(format!("unknown disk type {other}"))),
        }
    }

    pub fn is_sparse(self) -> bool {
        self != DiskType::Fixed
    }
}

impl std::fmt::Display for DiskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        })
    }
}

/// Cylinder / head / sectors-per-track geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    /// 65535 × 16 × 255: the largest geometry; images with it are sized by their current size.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors: 255,
    };

    /// Total sectors covered by the geometry.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry for `total_sectors` by the algorithm in the VHD specification (appendix
    /// "CHS calculation"); it may cover fewer sectors than asked for.
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(Geometry::MAX.total_sectors());
        let (sectors, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17u64;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        Geometry {
            cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors: u8::try_from(sectors).unwrap_or(255),
        }
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.cylinders, self.heads, self.sectors)
    }
}

/// The hard disk footer (all fields as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    /// The checksum as stored (recomputed by [`Footer::to_bytes`]).
    pub checksum: u32,
    pub unique_id: [u8; 16],
    pub saved_state: bool,
}

mod off {
    pub const COOKIE: usize = 0;
    pub const FEATURES: usize = 8;
    pub const VERSION: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const CREATOR_APP: usize = 28;
    pub const CREATOR_VERSION: usize = 32;
    pub const CREATOR_OS: usize = 36;
    pub const ORIGINAL_SIZE: usize = 40;
    pub const CURRENT_SIZE: usize = 48;
    pub const CYLINDERS: usize = 56;
    pub const HEADS: usize = 58;
    pub const SECTORS: usize = 59;
    pub const DISK_TYPE: usize = 60;
    pub const CHECKSUM: usize = 64;
    pub const UNIQUE_ID: usize = 68;
    pub const SAVED_STATE: usize = 84;
}

impl Footer {
    /// Whether `bytes` start with the footer cookie.
    pub fn has_cookie(bytes: &[u8]) -> bool {
        bytes.get(..8) == Some(FOOTER_COOKIE.as_slice())
    }

    /// Decodes a footer without verifying the checksum or the version (for inspection); the
    /// cookie and the disk type must be valid.
    pub fn decode(bytes: &[u8; FOOTER_SIZE]) -> Result<Footer, VhdError> {
        if !Footer::has_cookie(bytes) {
            return Err(VhdError::NotVhd(format!(
                "no footer cookie \"conectix\" (found {:?})",
                String::from_utf8_lossy(&bytes[..8])
            )));
        }
        Ok(Footer {
            features: be_u32(bytes, off::FEATURES),
            format_version: be_u32(bytes, off::VERSION),
            data_offset: be_u64(bytes, off::DATA_OFFSET),
            timestamp: be_u32(bytes, off::TIMESTAMP),
            creator_app: array(bytes, off::CREATOR_APP),
            creator_version: be_u32(bytes, off::CREATOR_VERSION),
            creator_os: array(bytes, off::CREATOR_OS),
            original_size: be_u64(bytes, off::ORIGINAL_SIZE),
            current_size: be_u64(bytes, off::CURRENT_SIZE),
            geometry: Geometry {
                cylinders: be_u16(bytes, off::CYLINDERS),
                heads: bytes[off::HEADS],
                sectors: bytes[off::SECTORS],
            },
            disk_type: DiskType::from_code(be_u32(bytes, off::DISK_TYPE))?,
            checksum: be_u32(bytes, off::CHECKSUM),
            unique_id: array(bytes, off::UNIQUE_ID),
            saved_state: bytes[off::SAVED_STATE] != 0,
        })
    }

    /// Parses and verifies a footer: cookie, checksum, format version, disk type.
    pub fn parse(bytes: &[u8; FOOTER_SIZE]) -> Result<Footer, VhdError> {
        let footer = Footer::decode(bytes)?;
        let computed = checksum(bytes, off::CHECKSUM);
        if computed != footer.checksum {
            return Err(VhdError::BadChecksum {
                what: "footer",
                stored: footer.checksum,
                computed,
            });
        }
        if footer.format_version >> 16 != 1 {
            return Err(VhdError::Unsupported(format!(
                "file format version {:#010x} (only 1.x is known)",
                footer.format_version
            )));
        }
        Ok(footer)
    }

    /// Encodes the footer, computing the checksum (the `checksum` field is updated too).
    pub fn to_bytes(&mut self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        put(&mut b, off::COOKIE, FOOTER_COOKIE);
        put(&mut b, off::FEATURES, &self.features.to_be_bytes());
        put(&mut b, off::VERSION, &self.format_version.to_be_bytes());
        put(&mut b, off::DATA_OFFSET, &self.data_offset.to_be_bytes());
        put(&mut b, off::TIMESTAMP, &self.timestamp.to_be_bytes());
        put(&mut b, off::CREATOR_APP, &self.creator_app);
        put(
            &mut b,
            off::CREATOR_VERSION,
            &self.creator_version.to_be_bytes(),
        );
        put(&mut b, off::CREATOR_OS, &self.creator_os);
        put(
            &mut b,
            off::ORIGINAL_SIZE,
            &self.original_size.to_be_bytes(),
        );
        put(&mut b, off::CURRENT_SIZE, &self.current_size.to_be_bytes());
        put(
            &mut b,
            off::CYLINDERS,
            &self.geometry.cylinders.to_be_bytes(),
        );
        b[off::HEADS] = self.geometry.heads;
        b[off::SECTORS] = self.geometry.sectors;
        put(&mut b, off::DISK_TYPE, &self.disk_type.code().to_be_bytes());
        put(&mut b, off::UNIQUE_ID, &self.unique_id);
        b[off::SAVED_STATE] = u8::from(self.saved_state);
        self.checksum = checksum(&b, off::CHECKSUM);
        put(&mut b, off::CHECKSUM, &self.checksum.to_be_bytes());
        b
    }

    /// The virtual size in bytes: the current size, rounded down to whole sectors.
    pub fn disk_size(&self) -> u64 {
        self.current_size / super::SECTOR * super::SECTOR
    }

    /// The size Virtual PC (and qemu for images of most creators) derive from the geometry.
    pub fn chs_size(&self) -> u64 {
        self.geometry.total_sectors() * super::SECTOR
    }

    pub fn creator_app_str(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches('\0')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            format_version: FORMAT_VERSION,
            data_offset: 512,
            timestamp: 0x1234_5678,
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: 10 << 20,
            current_size: 10 << 20,
            geometry: Geometry::for_sectors(20480),
            disk_type: DiskType::Dynamic,
            checksum: 0,
            unique_id: [7; 16],
            saved_state: false,
        }
    }

    #[test]
    fn round_trip() {
        let mut f = sample();
        let bytes = f.to_bytes();
        let parsed = Footer::parse(&bytes).unwrap();
        assert_eq!(parsed, f);
        assert_eq!(&bytes[..8], b"conectix");
    }

    #[test]
    fn checksum_rejects_any_flipped_byte() {
        let bytes = sample().to_bytes();
        for i in (8..FOOTER_SIZE).filter(|i| !(64..68).contains(i)) {
            let mut b = bytes;
            b[i] ^= 0x01;
            match Footer::parse(&b) {
                Err(VhdError::BadChecksum { .. }) | Err(VhdError::Corrupt(_)) => {}
                Err(VhdError::Unsupported(_)) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_cookie() {
        let mut b = sample().to_bytes();
        b[0] = b'C';
        assert!(matches!(Footer::parse(&b), Err(VhdError::NotVhd(_))));
    }

    #[test]
    fn known_geometries() {
        // Values from the spec's algorithm, cross-checked with `qemu-img create -f vpc`.
        let g = |c, h, s| Geometry {
            cylinders: c,
            heads: h,
            sectors: s,
        };
        assert_eq!(Geometry::for_sectors(20480), g(301, 4, 17));
        assert_eq!(Geometry::for_sectors(20536), g(302, 4, 17));
        assert_eq!(Geometry::for_sectors(2 << 21), g(4161, 16, 63)); // 2 GiB
        assert_eq!(Geometry::for_sectors(127 << 21), g(65278, 16, 255)); // 127 GiB
        assert_eq!(Geometry::for_sectors(200 << 21), Geometry::MAX); // over the ATA limit
        assert_eq!(Geometry::for_sectors(u64::MAX), Geometry::MAX);
        assert_eq!(Geometry::for_sectors(0), g(0, 4, 17));
    }
}
