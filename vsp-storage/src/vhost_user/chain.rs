//! Walking one split-ring descriptor chain out of guest memory into a flat [`Desc`] list.
//!
//! Each descriptor is read once; indices, the indirect table size and the chain length are all
//! bounded, so a looping or over-long chain ends in an error instead of a hang.

use super::request::Desc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Why a chain could not be walked.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} outside the table")]
    BadIndex(u16),
    #[error("descriptor table entry not in guest memory")]
    Unreadable,
    #[error("chain longer than {0} descriptors (loop?)")]
    TooLong(usize),
    #[error("bad indirect descriptor")]
    BadIndirect,
}

fn read_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    index: u16,
) -> Result<(Desc, u16, u16), ChainError> {
    let at = table
        .checked_add(u64::from(index) * 16)
        .ok_or(ChainError::Unreadable)?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(at))
        .map_err(|_| ChainError::Unreadable)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[0..8]);
    let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u16::from_le_bytes([raw[12], raw[13]]);
    let next = u16::from_le_bytes([raw[14], raw[15]]);
    let d = Desc {
        addr: u64::from_le_bytes(a),
        len,
        write: flags & F_WRITE != 0,
    };
    Ok((d, flags, next))
}

/// Reads the chain starting at `head` of the descriptor table at GPA `table` with `size` entries;
/// at most `max` descriptors (a longer chain is an error).
pub fn walk(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    if head >= size {
        return Err(ChainError::BadIndex(head));
    }
    let (mut table, mut size, mut index) = (table, size, head);
    let mut indirect = false;
    loop {
        let (d, flags, next) = read_desc(mem, table, index)?;
        if flags & F_INDIRECT != 0 {
            // Only the head of a direct chain may point at an indirect table (virtio 1.2 §2.7.5.3).
            if indirect || !out.is_empty() || flags & F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            if d.len == 0 || !d.len.is_multiple_of(16) || d.len / 16 > max as u32 {
                return Err(ChainError::BadIndirect);
            }
            indirect = true;
            table = d.addr;
            size = (d.len / 16) as u16;
            index = 0;
            continue;
        }
        if out.len() >= max {
            return Err(ChainError::TooLong(max));
        }
        out.push(d);
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        if next >= size {
            return Err(ChainError::BadIndex(next));
        }
        index = next;
    }
}
