//! SCSI operation codes and CDB field decoding (SBC-3 / SPC-4). Every accessor works on a CDB of
//! any length: bytes past its end read as zero, so a short CDB can never be indexed out of bounds.

/// Operation codes the emulation knows.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const ATA_16: u8 = 0x85;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const ATA_12: u8 = 0xA1;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    /// SERVICE ACTION IN(16) service action: READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// Longest CDB the emulation accepts.
pub const MAX_CDB_LEN: usize = 16;

/// CDB length implied by the operation code's group (SPC-4 §4.2.5.1); `None` for the reserved and
/// vendor-specific groups (3, 6, 7).
pub fn cdb_len_for(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A CDB, zero-extended to 16 bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cdb {
    bytes: [u8; MAX_CDB_LEN],
}

impl Cdb {
    /// `None` when `cdb` is longer than 16 bytes.
    pub fn new(cdb: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_CDB_LEN];
        bytes.get_mut(..cdb.len())?.copy_from_slice(cdb);
        Some(Cdb { bytes })
    }

    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    pub fn be16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.byte(at), self.byte(at + 1)])
    }

    pub fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.byte(at),
            self.byte(at + 1),
            self.byte(at + 2),
            self.byte(at + 3),
        ])
    }

    pub fn be64(&self, at: usize) -> u64 {
        (u64::from(self.be32(at)) << 32) | u64::from(self.be32(at + 4))
    }

    pub fn bytes(&self) -> &[u8; MAX_CDB_LEN] {
        &self.bytes
    }
}

/// A decoded READ or WRITE: starting LBA, block count, FUA.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Rw {
    pub write: bool,
    pub lba: u64,
    pub blocks: u64,
    pub fua: bool,
}

/// Decodes READ/WRITE 6/10/12/16; `None` for any other opcode.
pub fn decode_rw(c: &Cdb) -> Option<Rw> {
    let fua = c.byte(1) & 0x08 != 0;
    let (write, lba, blocks, fua) = match c.opcode() {
        op::READ_6 | op::WRITE_6 => {
            let lba = (u64::from(c.byte(1) & 0x1F) << 16) | u64::from(c.be16(2));
            // A transfer length of 0 means 256 blocks for the 6-byte commands.
            let n = match c.byte(4) {
                0 => 256,
                n => u64::from(n),
            };
            (c.opcode() == op::WRITE_6, lba, n, false)
        }
        op::READ_10 | op::WRITE_10 => (
            c.opcode() == op::WRITE_10,
            u64::from(c.be32(2)),
            u64::from(c.be16(7)),
            fua,
        ),
        op::READ_12 | op::WRITE_12 => (
            c.opcode() == op::WRITE_12,
            u64::from(c.be32(2)),
            u64::from(c.be32(6)),
            fua,
        ),
        op::READ_16 | op::WRITE_16 => (
            c.opcode() == op::WRITE_16,
            c.be64(2),
            u64::from(c.be32(10)),
            fua,
        ),
        _ => return None,
    };
    Some(Rw {
        write,
        lba,
        blocks,
        fua,
    })
}

/// `lba..lba + blocks` lies within a disk of `capacity` blocks (overflow-safe).
pub fn range_ok(lba: u64, blocks: u64, capacity: u64) -> bool {
    lba.checked_add(blocks).is_some_and(|end| end <= capacity)
}

/// Allocation length of the commands that return data (`None` for others).
pub fn allocation_length(c: &Cdb) -> Option<usize> {
    let n = match c.opcode() {
        op::INQUIRY => u32::from(c.be16(3)),
        op::REQUEST_SENSE | op::MODE_SENSE_6 => u32::from(c.byte(4)),
        op::MODE_SENSE_10 => u32::from(c.be16(7)),
        op::REPORT_LUNS => c.be32(6),
        op::SERVICE_ACTION_IN_16 => c.be32(10),
        op::READ_CAPACITY_10 => 8,
        _ => return None,
    };
    usize::try_from(n).ok()
}
