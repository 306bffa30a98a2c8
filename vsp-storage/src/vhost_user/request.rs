//! virtio-blk request parsing: a pure function of the descriptor list (already copied out of guest
//! memory once) and the 16-byte request header. Nothing here touches guest memory, so the parser
//! can be fuzzed on raw bytes (`fuzz/fuzz_targets/virtio_blk_request.rs`).
//!
//! Layout rules (virtio 1.2 §5.2.6, as Linux and QEMU lay requests out): the first descriptor is
//! the device-readable 16-byte header, the last one is the device-writable status byte, and the
//! data descriptors in between all go the direction the request type implies.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// virtio-blk sectors are always 512 bytes, whatever `blk_size` says.
pub const SECTOR: u64 = 512;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const DWZ_LEN: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// One descriptor as the device sees it (indirect tables already flattened).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

/// What the request asks for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// Device limits the parser checks requests against.
#[derive(Copy, Clone, Debug)]
pub struct Limits {
    /// Disk size in bytes (a multiple of 512).
    pub capacity: u64,
    pub read_only: bool,
    /// Largest data payload of one IN/OUT request, in bytes.
    pub max_data: u64,
    /// Most `virtio_blk_discard_write_zeroes` segments per request.
    pub max_dwz_segs: u32,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// First 512-byte sector (IN/OUT).
    pub sector: u64,
    /// Data descriptors (between header and status), in order.
    pub data: Vec<Desc>,
    /// Sum of the data descriptor lengths.
    pub data_len: u64,
    /// GPA of the status byte.
    pub status: u64,
}

/// Why a request is refused, and where (if anywhere) its status can be written.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `None`: the chain has no usable status descriptor; the request is returned with length 0.
    pub status: Option<u64>,
    /// `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.
    pub code: u8,
    pub reason: &'static str,
}

fn ioerr(status: u64, reason: &'static str) -> Rejected {
    Rejected {
        status: Some(status),
        code: VIRTIO_BLK_S_IOERR as u8,
        reason,
    }
}

/// Parses one request. `header` is the content of `descs[0]` when the caller could read it.
pub fn parse(
    descs: &[Desc],
    header: Option<[u8; 16]>,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let Some(last) = descs.last() else {
        return Err(Rejected {
            status: None,
            code: VIRTIO_BLK_S_IOERR as u8,
            reason: "empty chain",
        });
    };
    if descs.len() < 2 || !last.write || last.len < 1 {
        return Err(Rejected {
            status: None,
            code: VIRTIO_BLK_S_IOERR as u8,
            reason: "no writable status descriptor at the end",
        });
    }
    let status = last.addr;
    let head = descs[0];
    if head.write || head.len != HEADER_LEN {
        return Err(ioerr(status, "header descriptor is not 16 readable bytes"));
    }
    let Some(header) = header else {
        return Err(ioerr(status, "header not in guest memory"));
    };
    let ty = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let data = &descs[1..descs.len() - 1];
    let data_len = data.iter().map(|d| u64::from(d.len)).sum::<u64>();
    let kind = match ty {
        VIRTIO_BLK_T_IN => Kind::In,
        VIRTIO_BLK_T_OUT => Kind::Out,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD if limits.discard => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => Kind::WriteZeroes,
        _ => {
            return Err(Rejected {
                status: Some(status),
                code: VIRTIO_BLK_S_UNSUPP as u8,
                reason: "unsupported request type",
            });
        }
    };
    let device_writes = matches!(kind, Kind::In | Kind::GetId);
    if data.iter().any(|d| d.write != device_writes) {
        return Err(ioerr(
            status,
            "data descriptor direction does not match the request",
        ));
    }
    match kind {
        Kind::In | Kind::Out => {
            if kind == Kind::Out && limits.read_only {
                return Err(ioerr(status, "write to a read-only disk"));
            }
            if data_len == 0 || !data_len.is_multiple_of(SECTOR) || data_len > limits.max_data {
                return Err(ioerr(status, "data length is zero, unaligned or too large"));
            }
            let in_range = sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(data_len))
                .is_some_and(|end| end <= limits.capacity);
            if !in_range {
                return Err(ioerr(status, "sector range beyond the disk"));
            }
        }
        Kind::Flush => {
            if !data.is_empty() {
                return Err(ioerr(status, "flush with data"));
            }
        }
        Kind::GetId => {
            if data_len == 0 {
                return Err(ioerr(status, "GET_ID without a buffer"));
            }
        }
        Kind::Discard | Kind::WriteZeroes => {
            if limits.read_only {
                return Err(ioerr(status, "discard/write-zeroes on a read-only disk"));
            }
            let segs = data_len / u64::from(DWZ_LEN);
            if data_len == 0
                || !data_len.is_multiple_of(u64::from(DWZ_LEN))
                || segs > u64::from(limits.max_dwz_segs)
            {
                return Err(ioerr(status, "bad discard/write-zeroes segment list"));
            }
        }
    }
    Ok(Request {
        kind,
        sector,
        data: data.to_vec(),
        data_len,
        status,
    })
}

/// One `virtio_blk_discard_write_zeroes` entry, decoded and range-checked.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DwzSegment {
    /// Byte offset and length on the disk.
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// Decodes the segment list of a DISCARD/WRITE_ZEROES request (`bytes` copied out once).
pub fn parse_dwz(
    bytes: &[u8],
    kind: Kind,
    capacity: u64,
    max_sectors: u32,
) -> Result<Vec<DwzSegment>, &'static str> {
    let mut out = Vec::with_capacity(bytes.len() / DWZ_LEN as usize);
    for e in bytes.chunks_exact(DWZ_LEN as usize) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&e[0..8]);
        let sector = u64::from_le_bytes(s);
        let num = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        let flags = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        // Discard defines no flags; write-zeroes defines only UNMAP (bit 0).
        let allowed = if kind == Kind::WriteZeroes { 1 } else { 0 };
        if flags & !allowed != 0 {
            return Err("reserved segment flags set");
        }
        if num == 0 || num > max_sectors {
            return Err("segment sector count is zero or above the advertised maximum");
        }
        let offset = sector
            .checked_mul(SECTOR)
            .ok_or("segment sector overflows")?;
        let len = u64::from(num) * SECTOR;
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err("segment beyond the disk");
        }
        out.push(DwzSegment {
            offset,
            len,
            unmap: flags & 1 != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity: 1 << 20,
            read_only: false,
            max_data: 1 << 20,
            max_dwz_segs: 4,
            discard: true,
            write_zeroes: true,
        }
    }

    fn hdr(ty: u32, sector: u64) -> Option<[u8; 16]> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        Some(h)
    }

    fn d(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    #[test]
    fn read_request_parses() {
        let c = [
            d(0, 16, false),
            d(0x1000, 4096, true),
            d(0x2000, 512, true),
            d(0x3000, 1, true),
        ];
        let r = parse(&c, hdr(VIRTIO_BLK_T_IN, 8), &limits()).expect("valid");
        assert_eq!(r.kind, Kind::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data_len, 4608);
        assert_eq!(r.status, 0x3000);
    }

    #[test]
    fn hostile_layouts_are_refused() {
        let l = limits();
        // Status not writable: nowhere to report.
        let e = parse(
            &[d(0, 16, false), d(0x3000, 1, false)],
            hdr(VIRTIO_BLK_T_FLUSH, 0),
            &l,
        )
        .expect_err("status read-only");
        assert_eq!(e.status, None);
        // Header too short.
        let e = parse(
            &[d(0, 8, false), d(0x3000, 1, true)],
            hdr(VIRTIO_BLK_T_FLUSH, 0),
            &l,
        )
        .expect_err("short header");
        assert_eq!((e.status, e.code), (Some(0x3000), VIRTIO_BLK_S_IOERR as u8));
        // Wrong direction for a write.
        let c = [d(0, 16, false), d(0x1000, 512, true), d(0x3000, 1, true)];
        assert!(parse(&c, hdr(VIRTIO_BLK_T_OUT, 0), &l).is_err());
        // Past the end, and overflowing.
        let c = [d(0, 16, false), d(0x1000, 1024, false), d(0x3000, 1, true)];
        assert!(parse(&c, hdr(VIRTIO_BLK_T_OUT, 2047), &l).is_err());
        assert!(parse(&c, hdr(VIRTIO_BLK_T_OUT, u64::MAX / 256), &l).is_err());
        assert!(parse(&c, hdr(VIRTIO_BLK_T_OUT, 2046), &l).is_ok());
        // Unknown type.
        let e = parse(&c, hdr(99, 0), &l).expect_err("unknown");
        assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
        // Read-only disk.
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert!(parse(&c, hdr(VIRTIO_BLK_T_OUT, 0), &ro).is_err());
    }

    #[test]
    fn dwz_segments_are_checked() {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&8u64.to_le_bytes());
        e[8..12].copy_from_slice(&16u32.to_le_bytes());
        let s = parse_dwz(&e, Kind::Discard, 1 << 20, 1 << 16).expect("valid");
        assert_eq!(
            s,
            vec![DwzSegment {
                offset: 4096,
                len: 8192,
                unmap: false
            }]
        );
        e[12] = 1;
        assert!(parse_dwz(&e, Kind::Discard, 1 << 20, 1 << 16).is_err());
        assert!(parse_dwz(&e, Kind::WriteZeroes, 1 << 20, 1 << 16).is_ok());
        e[0..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse_dwz(&e, Kind::WriteZeroes, 1 << 20, 1 << 16).is_err());
    }
}
