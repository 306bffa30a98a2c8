//! SCSI command descriptor blocks, built byte for byte as Linux `scsi_scan.c`, `scsi_lib.c` and
//! `sd.c` (6.1) build them. Every builder returns a [`Cdb`] whose length is Linux's
//! `COMMAND_SIZE(opcode)`; storvsc copies that many bytes and leaves the rest of the 16 zero.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use alloc::vec::Vec;

/// Operation codes the driver sends.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    /// Service action of READ CAPACITY(16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
}

/// Bytes Linux allocates for READ CAPACITY(16) data (`RC16_LEN`).
pub const RC16_LEN: u32 = 32;
/// Bytes of READ CAPACITY(10) data.
pub const RC10_LEN: u32 = 8;
/// The REPORT LUNS allocation Linux starts with: `(511 + 1) * sizeof(struct scsi_lun)`.
pub const REPORT_LUNS_INITIAL_LEN: u32 = 4096;
/// FUA bit in byte 1 of READ/WRITE(10/16).
pub const FUA: u8 = 0x08;
/// UNMAP bit in byte 1 of WRITE SAME.
pub const WRITE_SAME_UNMAP: u8 = 0x08;
/// Bytes of the UNMAP parameter list Linux sends (8-byte header + one 16-byte descriptor).
pub const UNMAP_ONE_DESCRIPTOR_LEN: usize = 24;

/// A CDB: up to 16 bytes, the unused tail zero.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
}

/// Linux `COMMAND_SIZE()`: the CDB length by opcode group.
pub const fn command_size(opcode: u8) -> u8 {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        // Groups 3, 6, 7: Linux's table says 6 for vendor groups; the driver never builds them.
        _ => 6,
    }
}

impl Cdb {
    /// A CDB from raw bytes (at most 16; the length is how many were given).
    pub fn from_bytes(b: &[u8]) -> Option<Cdb> {
        let mut bytes = [0u8; 16];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Cdb {
            bytes,
            len: b.len() as u8,
        })
    }

    fn zeroed(opcode: u8) -> Cdb {
        let mut bytes = [0u8; 16];
        bytes[0] = opcode;
        Cdb {
            bytes,
            len: command_size(opcode),
        }
    }

    fn set(&mut self, at: usize, v: &[u8]) {
        if let Some(dst) = at
            .checked_add(v.len())
            .and_then(|end| self.bytes.get_mut(at..end))
        {
            dst.copy_from_slice(v);
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    /// Byte `i` (0 beyond the CDB).
    pub fn byte(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    /// The CDB's own bytes (`cdb_length` of them).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes
            .get(..usize::from(self.len))
            .unwrap_or(&self.bytes)
    }

    /// All 16 bytes, as they sit in the SRB.
    pub fn raw(&self) -> [u8; 16] {
        self.bytes
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub fn test_unit_ready() -> Cdb {
    Cdb::zeroed(op::TEST_UNIT_READY)
}

/// Standard INQUIRY with `alloc` bytes (Linux `scsi_probe_lun`: only byte 4 is set, ≤ 255).
pub fn inquiry(alloc: u8) -> Cdb {
    let mut c = Cdb::zeroed(op::INQUIRY);
    c.set(4, &[alloc]);
    c
}

/// INQUIRY for VPD `page` with `alloc` bytes (Linux `scsi_vpd_inquiry`).
pub fn inquiry_vpd(page: u8, alloc: u16) -> Cdb {
    let mut c = Cdb::zeroed(op::INQUIRY);
    c.set(1, &[0x01, page]);
    c.set(3, &alloc.to_be_bytes());
    c
}

/// REPORT LUNS, select report 0 (Linux `scsi_report_lun_scan`).
pub fn report_luns(alloc: u32) -> Cdb {
    let mut c = Cdb::zeroed(op::REPORT_LUNS);
    c.set(6, &alloc.to_be_bytes());
    c
}

pub fn read_capacity_10() -> Cdb {
    Cdb::zeroed(op::READ_CAPACITY_10)
}

/// READ CAPACITY(16) asking for [`RC16_LEN`] bytes (Linux `read_capacity_16`).
pub fn read_capacity_16() -> Cdb {
    let mut c = Cdb::zeroed(op::SERVICE_ACTION_IN_16);
    c.set(1, &[op::SAI_READ_CAPACITY_16]);
    c.set(10, &RC16_LEN.to_be_bytes());
    c
}

/// MODE SENSE(6), current values (Linux `scsi_mode_sense`: byte 1 = dbd, 2 = page, 3 = subpage).
pub fn mode_sense_6(dbd: bool, page: u8, subpage: u8, alloc: u8) -> Cdb {
    let mut c = Cdb::zeroed(op::MODE_SENSE_6);
    c.set(
        1,
        &[if dbd { 0x08 } else { 0 }, page & 0x3F, subpage, alloc],
    );
    c
}

/// READ(10) / WRITE(10) (Linux `sd_setup_rw10_cmnd`).
pub fn rw10(write: bool, lba: u32, blocks: u16, fua: bool) -> Cdb {
    let mut c = Cdb::zeroed(if write { op::WRITE_10 } else { op::READ_10 });
    c.set(1, &[if fua { FUA } else { 0 }]);
    c.set(2, &lba.to_be_bytes());
    c.set(7, &blocks.to_be_bytes());
    c
}

/// READ(16) / WRITE(16) (Linux `sd_setup_rw16_cmnd`).
pub fn rw16(write: bool, lba: u64, blocks: u32, fua: bool) -> Cdb {
    let mut c = Cdb::zeroed(if write { op::WRITE_16 } else { op::READ_16 });
    c.set(1, &[if fua { FUA } else { 0 }]);
    c.set(2, &lba.to_be_bytes());
    c.set(10, &blocks.to_be_bytes());
    c
}

/// SYNCHRONIZE CACHE(10) for the whole disk (Linux `sd_setup_flush_cmnd`).
pub fn synchronize_cache_10() -> Cdb {
    Cdb::zeroed(op::SYNCHRONIZE_CACHE_10)
}

/// SYNCHRONIZE CACHE(16) for the whole disk.
pub fn synchronize_cache_16() -> Cdb {
    Cdb::zeroed(op::SYNCHRONIZE_CACHE_16)
}

/// UNMAP with a parameter list of `param_len` bytes (Linux `sd_setup_unmap_cmnd`: byte 8 = 24).
pub fn unmap(param_len: u16) -> Cdb {
    let mut c = Cdb::zeroed(op::UNMAP);
    c.set(7, &param_len.to_be_bytes());
    c
}

/// The UNMAP parameter list: 8-byte header, then `{lba BE64, blocks BE32, 4 reserved}` each.
pub fn unmap_parameter_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let desc_len = ranges.len().saturating_mul(16);
    let mut v = Vec::with_capacity(desc_len.saturating_add(8));
    v.extend_from_slice(&(desc_len.saturating_add(6) as u16).to_be_bytes());
    v.extend_from_slice(&(desc_len as u16).to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&blocks.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

/// WRITE SAME(16) with the UNMAP bit (Linux `sd_setup_write_same16_cmnd(.., true)`).
pub fn write_same_16_unmap(lba: u64, blocks: u32) -> Cdb {
    let mut c = Cdb::zeroed(op::WRITE_SAME_16);
    c.set(1, &[WRITE_SAME_UNMAP]);
    c.set(2, &lba.to_be_bytes());
    c.set(10, &blocks.to_be_bytes());
    c
}

/// WRITE SAME(10) with the UNMAP bit (Linux `sd_setup_write_same10_cmnd(.., true)`).
pub fn write_same_10_unmap(lba: u32, blocks: u16) -> Cdb {
    let mut c = Cdb::zeroed(op::WRITE_SAME_10);
    c.set(1, &[WRITE_SAME_UNMAP]);
    c.set(2, &lba.to_be_bytes());
    c.set(7, &blocks.to_be_bytes());
    c
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn lengths_follow_command_size() {
        assert_eq!(test_unit_ready().as_bytes(), &[0; 6]);
        assert_eq!(inquiry(36).as_bytes(), &[0x12, 0, 0, 0, 36, 0]);
        assert_eq!(
            inquiry_vpd(0xB0, 0x40).as_bytes(),
            &[0x12, 1, 0xB0, 0, 0x40, 0]
        );
        assert_eq!(
            report_luns(4096).as_bytes(),
            &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]
        );
        assert_eq!(
            read_capacity_10().as_bytes(),
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            read_capacity_16().as_bytes(),
            &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        assert_eq!(
            mode_sense_6(false, 0x3F, 0, 4).as_bytes(),
            &[0x1A, 0, 0x3F, 0, 4, 0]
        );
        assert_eq!(
            mode_sense_6(true, 0x08, 0, 4).as_bytes(),
            &[0x1A, 8, 0x08, 0, 4, 0]
        );
        assert_eq!(
            synchronize_cache_10().as_bytes(),
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(synchronize_cache_16().len(), 16);
        assert_eq!(unmap(24).as_bytes(), &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
    }

    #[test]
    fn read_write() {
        assert_eq!(
            rw10(false, 0x0102_0304, 0x0506, false).as_bytes(),
            &[0x28, 0, 1, 2, 3, 4, 0, 5, 6, 0]
        );
        assert_eq!(
            rw10(true, 7, 8, true).as_bytes(),
            &[0x2A, 0x08, 0, 0, 0, 7, 0, 0, 8, 0]
        );
        assert_eq!(
            rw16(false, 0x0102_0304_0506_0708, 0x0A0B_0C0D, false).as_bytes(),
            &[
                0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0A, 0x0B, 0x0C, 0x0D, 0, 0
            ]
        );
        assert_eq!(rw16(true, 0, 1, true).as_bytes()[..2], [0x8A, 0x08]);
    }

    #[test]
    fn unmap_and_write_same() {
        let p = unmap_parameter_list(&[(0x1122_3344_5566_7788, 0x99AA_BBCC)]);
        assert_eq!(p.len(), UNMAP_ONE_DESCRIPTOR_LEN);
        assert_eq!(
            p,
            [
                0, 22, 0, 16, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99,
                0xAA, 0xBB, 0xCC, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            write_same_16_unmap(5, 6).as_bytes(),
            &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 6, 0, 0]
        );
        assert_eq!(
            write_same_10_unmap(5, 6).as_bytes(),
            &[0x41, 0x08, 0, 0, 0, 5, 0, 0, 6, 0]
        );
    }

    #[test]
    fn raw_cdbs() {
        assert!(Cdb::from_bytes(&[0; 17]).is_none());
        let c = Cdb::from_bytes(&[0xAB, 1]).unwrap();
        assert_eq!(
            (c.opcode(), c.len(), c.byte(1), c.byte(40)),
            (0xAB, 2, 1, 0)
        );
        assert_eq!(command_size(0xE0), 6);
    }
}
