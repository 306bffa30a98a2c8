//! UNMAP and WRITE SAME(16): thin-provisioning commands. Every descriptor is validated before any
//! block is released.

use super::cdb::{self, Cdb};
use super::sense::Sense;
use super::{DataBuffer, Outcome, ScsiDisk, block_error_sense, data_fault};

/// Size of the UNMAP parameter list header and of one block descriptor.
const HEADER: usize = 8;
const DESCRIPTOR: usize = 16;

pub(super) fn unmap(disk: &ScsiDisk, c: &Cdb, buf: &mut dyn DataBuffer) -> Outcome {
    let info = disk.info();
    if !disk.disk().supports_unmap() {
        return Outcome::CheckCondition(Sense::INVALID_OPCODE);
    }
    if disk.disk().read_only() {
        return Outcome::CheckCondition(Sense::WRITE_PROTECTED);
    }
    let plen = usize::from(c.be16(7));
    if plen == 0 {
        return Outcome::Good { transferred: 0 };
    }
    if plen < HEADER || plen > buf.len() {
        return Outcome::CheckCondition(Sense::PARAMETER_LIST_LENGTH);
    }
    let mut list = vec![0u8; plen];
    if let Err(e) = buf.read_out(0, &mut list) {
        return data_fault(e);
    }
    let desc_len = usize::from(u16::from_be_bytes([list[2], list[3]]));
    if desc_len > plen - HEADER {
        return Outcome::CheckCondition(Sense::PARAMETER_LIST_LENGTH);
    }
    let count = desc_len / DESCRIPTOR;
    if count > info.max_unmap_descriptors as usize {
        return Outcome::CheckCondition(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let capacity = disk.capacity_blocks();
    let mut ranges = Vec::with_capacity(count);
    for d in list[HEADER..HEADER + count * DESCRIPTOR].chunks_exact(DESCRIPTOR) {
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&d[0..8]);
        let lba = u64::from_be_bytes(lba);
        let blocks = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        if blocks > info.max_unmap_blocks {
            return Outcome::CheckCondition(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        if !cdb::range_ok(lba, u64::from(blocks), capacity) {
            return Outcome::CheckCondition(Sense::LBA_OUT_OF_RANGE);
        }
        if blocks > 0 {
            ranges.push((lba, u64::from(blocks)));
        }
    }
    let bs = u64::from(disk.disk().sector_size().max(1));
    for (lba, blocks) in ranges {
        // In range: both products are at most the disk size.
        if let Err(e) = disk.disk().unmap(lba * bs, blocks * bs) {
            tracing::warn!(lba, blocks, error = %e, "unmap failed");
            return Outcome::CheckCondition(block_error_sense(&e, true));
        }
    }
    Outcome::Good { transferred: plen }
}

/// Largest chunk WRITE SAME writes at once.
const CHUNK: usize = 1 << 20;

/// WRITE SAME(10) and (16): with UNMAP and an all-zero block the range is unmapped, otherwise the
/// block is written over the whole range.
pub(super) fn write_same(disk: &ScsiDisk, c: &Cdb, buf: &mut dyn DataBuffer) -> Outcome {
    let info = disk.info();
    let unmap_bit = c.byte(1) & 0x08 != 0;
    let (ndob, lba, blocks) = if c.opcode() == super::cdb::op::WRITE_SAME_16 {
        (c.byte(1) & 0x01 != 0, c.be64(2), u64::from(c.be32(10)))
    } else {
        (false, u64::from(c.be32(2)), u64::from(c.be16(7)))
    };
    if disk.disk().read_only() {
        return Outcome::CheckCondition(Sense::WRITE_PROTECTED);
    }
    if blocks == 0 || blocks > u64::from(info.max_unmap_blocks) {
        return Outcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB);
    }
    if !cdb::range_ok(lba, blocks, disk.capacity_blocks()) {
        return Outcome::CheckCondition(Sense::LBA_OUT_OF_RANGE);
    }
    let bs = disk.disk().sector_size().max(1) as usize;
    let mut block = vec![0u8; bs];
    let mut transferred = 0;
    if !ndob {
        if buf.len() < bs {
            return Outcome::CheckCondition(Sense::PARAMETER_LIST_LENGTH);
        }
        if let Err(e) = buf.read_out(0, &mut block) {
            return data_fault(e);
        }
        transferred = bs;
    }
    let (offset, len) = (lba * bs as u64, blocks * bs as u64);
    if unmap_bit && info.unmap && block.iter().all(|&b| b == 0) {
        return match disk.disk().unmap(offset, len) {
            Ok(()) => Outcome::Good { transferred },
            Err(e) => Outcome::CheckCondition(block_error_sense(&e, true)),
        };
    }
    // Write the block over and over, a chunk at a time.
    let chunk: Vec<u8> = block
        .iter()
        .copied()
        .cycle()
        .take(CHUNK.max(bs) / bs * bs)
        .collect();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        if let Err(e) = disk.disk().write_at(offset + at, &chunk[..n], false) {
            return Outcome::CheckCondition(block_error_sense(&e, true));
        }
        at += n as u64;
    }
    Outcome::Good { transferred }
}
