//! SCSI block-device emulation over a [`BlockDevice`]: the commands Linux `sd`/`scsi_scan` send to a
//! Hyper-V disk (reference §2.10), with fixed-format sense for everything else.
//!
//! Data moves through a [`DataBuffer`] the caller provides (guest GPA ranges in storvsp, a plain
//! buffer in tests and the fuzzer), so the emulation never sees where bytes live. Commands run
//! synchronously through [`ScsiDisk::execute`]; callers with an asynchronous backend first ask
//! [`ScsiDisk::prepare`] and run the plain reads, writes and flushes it returns themselves.

pub mod cdb;
mod inquiry;
mod mode;
pub mod sense;
mod unmap;

#[cfg(test)]
mod tests;

use crate::block::{BlockDevice, BlockError};
use cdb::{Cdb, Rw, op};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use vmbus_core::memory::MemoryError;

pub use inquiry::{NO_LUN_PERIPHERAL, VPD_PAGES};
pub use sense::Sense;

/// What the disk reports about itself in INQUIRY.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub vendor: [u8; 8],
    pub product: [u8; 16],
    pub revision: [u8; 4],
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// Low 36 bits go into the NAA designator (VPD 0x83): keep it unique per disk.
    pub unique_id: u64,
}

impl Identity {
    /// OpenVMM's / Hyper-V's strings (`"Msft    " "Virtual Disk    " "1.0 "`): Linux keys quirks
    /// on the "Msft" vendor.
    pub fn msft(serial: &str, unique_id: u64) -> Self {
        let serial: String = serial
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(64)
            .collect();
        Identity {
            vendor: *b"Msft    ",
            product: *b"Virtual Disk    ",
            revision: *b"1.0 ",
            serial,
            unique_id,
        }
    }
}

/// Limits the disk advertises (VPD 0xB0) and enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiParams {
    pub identity: Identity,
    /// Largest READ/WRITE in bytes (storvsp passes the channel's max_transfer_bytes).
    pub max_transfer_bytes: u32,
    /// Largest UNMAP descriptor / WRITE SAME in blocks.
    pub max_unmap_blocks: u32,
    /// Most descriptors per UNMAP.
    pub max_unmap_descriptors: u32,
    /// Logical blocks per physical block, as a power of two (READ CAPACITY(16) byte 13).
    pub physical_exponent: u8,
}

impl ScsiParams {
    pub fn new(identity: Identity) -> Self {
        ScsiParams {
            identity,
            max_transfer_bytes: 0x40000,
            max_unmap_blocks: 0x0040_0000,
            max_unmap_descriptors: 256,
            physical_exponent: 0,
        }
    }
}

/// Derived limits, in blocks, as the VPD pages report them.
pub(crate) struct DiskInfo {
    pub max_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap: bool,
    pub physical_exponent: u8,
}

/// Why bytes could not be moved to or from the initiator's buffer.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the buffer does not allow data to flow in this direction")]
    WrongDirection,
    #[error("buffer access {offset:#x}+{len:#x} beyond its {size:#x} bytes")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// The initiator's data buffer.
pub trait DataBuffer {
    /// Bytes the initiator provided room for / sent.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Data-out: copies initiator bytes at `offset` into `dst`.
    fn read_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError>;
    /// Data-in: copies `src` to the initiator's buffer at `offset`.
    fn write_in(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError>;
}

/// A [`DataBuffer`] in local memory (tests, fuzzing, embedders).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemBuffer {
    pub data: Vec<u8>,
    /// `false` refuses data-in (like a guest write request, `data_in` 0).
    pub device_may_write: bool,
}

impl MemBuffer {
    /// A buffer the device may fill.
    pub fn data_in(len: usize) -> Self {
        MemBuffer {
            data: vec![0; len],
            device_may_write: true,
        }
    }

    /// A buffer holding data-out bytes (the device may only read it).
    pub fn data_out(data: Vec<u8>) -> Self {
        MemBuffer {
            data,
            device_may_write: false,
        }
    }
}

impl DataBuffer for MemBuffer {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn read_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        let size = self.data.len();
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.data.get(offset..end))
            .ok_or(DataError::OutOfBounds {
                offset,
                len: dst.len(),
                size,
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn write_in(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        if !self.device_may_write {
            return Err(DataError::WrongDirection);
        }
        let size = self.data.len();
        let dst = offset
            .checked_add(src.len())
            .and_then(|end| self.data.get_mut(offset..end))
            .ok_or(DataError::OutOfBounds {
                offset,
                len: src.len(),
                size,
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// How a command ended.
#[derive(Debug)]
pub enum Outcome {
    /// GOOD; `transferred` bytes moved to or from the buffer.
    Good { transferred: usize },
    /// CHECK CONDITION with this sense; nothing meaningful transferred.
    CheckCondition(Sense),
    /// The initiator's buffer could not be accessed (bad guest memory): an SRB error, no sense.
    DataFault(DataError),
}

impl Outcome {
    pub fn is_good(&self) -> bool {
        matches!(self, Outcome::Good { .. })
    }

    /// The sense of a CHECK CONDITION.
    pub fn sense(&self) -> Option<Sense> {
        match self {
            Outcome::CheckCondition(s) => Some(*s),
            _ => None,
        }
    }
}

/// What a command needs, decided before any data moves (see [`ScsiDisk::prepare`]).
#[derive(Debug)]
pub enum Prepared {
    /// Finished already (validation failed, or nothing to transfer).
    Done(Outcome),
    /// Read `len` bytes at byte `offset`, then copy the first `copy` bytes to the buffer.
    Read {
        offset: u64,
        len: usize,
        copy: usize,
    },
    /// Write the buffer's first `len` bytes at byte `offset`.
    Write { offset: u64, len: usize, fua: bool },
    /// Make completed writes durable.
    Flush,
    /// Anything else: run it with [`ScsiDisk::execute`].
    Emulate,
}

fn fail(s: Sense) -> Prepared {
    Prepared::Done(Outcome::CheckCondition(s))
}

/// Sense for a backend failure.
pub fn block_error_sense(e: &BlockError, write: bool) -> Sense {
    match e {
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        BlockError::Unaligned { .. } => Sense::INVALID_FIELD_IN_CDB,
        BlockError::ReadOnly => Sense::WRITE_PROTECTED,
        BlockError::Unsupported => Sense::INVALID_OPCODE,
        BlockError::Corrupt(_) | BlockError::Io(_) if write => Sense::WRITE_ERROR,
        BlockError::Corrupt(_) | BlockError::Io(_) => Sense::UNRECOVERED_READ,
    }
}

/// Outcome for a failed buffer access: a direction the SRB did not allow is the initiator's
/// ILLEGAL REQUEST; anything else is a transport fault.
pub fn data_fault(e: DataError) -> Outcome {
    match e {
        DataError::WrongDirection => Outcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB),
        e => Outcome::DataFault(e),
    }
}

/// One emulated disk (a LUN).
pub struct ScsiDisk {
    disk: Arc<dyn BlockDevice>,
    params: ScsiParams,
    /// A capacity change to report once (UNIT ATTENTION 0x2A/0x09).
    unit_attention: AtomicBool,
}

impl ScsiDisk {
    pub fn new(disk: Arc<dyn BlockDevice>, params: ScsiParams) -> Self {
        ScsiDisk {
            disk,
            params,
            unit_attention: AtomicBool::new(false),
        }
    }

    pub fn disk(&self) -> &Arc<dyn BlockDevice> {
        &self.disk
    }

    pub fn params(&self) -> &ScsiParams {
        &self.params
    }

    /// The backend's size changed: the next command (other than INQUIRY, REPORT LUNS and
    /// REQUEST SENSE) fails with UNIT ATTENTION / CAPACITY DATA HAS CHANGED, so Linux re-reads it.
    pub fn capacity_changed(&self) {
        self.unit_attention.store(true, Ordering::Release);
    }

    fn block_size(&self) -> u64 {
        u64::from(self.disk.sector_size().max(1))
    }

    /// Capacity in logical blocks.
    pub fn capacity_blocks(&self) -> u64 {
        self.disk.size() / self.block_size()
    }

    pub(crate) fn info(&self) -> DiskInfo {
        let bs = self.block_size();
        DiskInfo {
            max_transfer_blocks: u32::try_from(u64::from(self.params.max_transfer_bytes) / bs)
                .unwrap_or(u32::MAX),
            max_unmap_blocks: self.params.max_unmap_blocks,
            max_unmap_descriptors: self.params.max_unmap_descriptors,
            unmap: self.disk.supports_unmap() && !self.disk.read_only(),
            physical_exponent: self.params.physical_exponent,
        }
    }

    /// Validates `cdb` against the disk and a buffer of `buffer_len` bytes, and decides what it
    /// needs. Consumes a pending unit attention.
    pub fn prepare(&self, cdb: &[u8], buffer_len: usize) -> Prepared {
        let Some(c) = Cdb::new(cdb) else {
            return fail(Sense::INVALID_FIELD_IN_CDB);
        };
        if cdb.is_empty() {
            return fail(Sense::INVALID_OPCODE);
        }
        match cdb::cdb_len_for(c.opcode()) {
            None => return fail(Sense::INVALID_OPCODE),
            Some(n) if cdb.len() < n => return fail(Sense::INVALID_FIELD_IN_CDB),
            Some(_) => {}
        }
        if !matches!(
            c.opcode(),
            op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE
        ) && self.unit_attention.swap(false, Ordering::AcqRel)
        {
            return fail(Sense::CAPACITY_CHANGED);
        }
        if let Some(rw) = cdb::decode_rw(&c) {
            return self.prepare_rw(rw, buffer_len);
        }
        let sync = match c.opcode() {
            op::SYNCHRONIZE_CACHE_10 => Some((u64::from(c.be32(2)), u64::from(c.be16(7)))),
            op::SYNCHRONIZE_CACHE_16 => Some((c.be64(2), u64::from(c.be32(10)))),
            _ => None,
        };
        match sync {
            Some((lba, blocks)) if !cdb::range_ok(lba, blocks, self.capacity_blocks()) => {
                fail(Sense::LBA_OUT_OF_RANGE)
            }
            Some(_) => Prepared::Flush,
            None => Prepared::Emulate,
        }
    }

    fn prepare_rw(&self, rw: Rw, buffer_len: usize) -> Prepared {
        if rw.write && self.disk.read_only() {
            return fail(Sense::WRITE_PROTECTED);
        }
        if !cdb::range_ok(rw.lba, rw.blocks, self.capacity_blocks()) {
            return fail(Sense::LBA_OUT_OF_RANGE);
        }
        if rw.blocks == 0 {
            return Prepared::Done(Outcome::Good { transferred: 0 });
        }
        let bs = self.block_size();
        // In range, so lba * bs <= size and blocks * bs <= size: neither overflows.
        let (offset, bytes) = (rw.lba * bs, rw.blocks * bs);
        let Some(len) = usize::try_from(bytes)
            .ok()
            .filter(|&l| l <= self.params.max_transfer_bytes as usize)
        else {
            return fail(Sense::INVALID_FIELD_IN_CDB);
        };
        if rw.write {
            // A write needs every byte the CDB names.
            if buffer_len < len {
                return fail(Sense::INVALID_FIELD_IN_CDB);
            }
            return Prepared::Write {
                offset,
                len,
                fua: rw.fua,
            };
        }
        // A read into a smaller buffer moves what fits (reported as bytes moved).
        let copy = len.min(buffer_len);
        if copy == 0 {
            return Prepared::Done(Outcome::Good { transferred: 0 });
        }
        Prepared::Read {
            offset,
            len: (copy as u64).div_ceil(bs).saturating_mul(bs) as usize,
            copy,
        }
    }

    /// Runs `cdb` to completion, moving data through `buf`.
    pub fn execute(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Outcome {
        let plan = self.prepare(cdb, buf.len());
        self.run(plan, cdb, buf)
    }

    /// Carries out what [`Self::prepare`] decided for `cdb` (prepare it exactly once: it consumes a
    /// pending unit attention).
    pub fn run(&self, plan: Prepared, cdb: &[u8], buf: &mut dyn DataBuffer) -> Outcome {
        match plan {
            Prepared::Done(o) => o,
            Prepared::Read { offset, len, copy } => {
                let mut data = vec![0u8; len];
                if let Err(e) = self.disk.read_at(offset, &mut data) {
                    tracing::warn!(offset, len, error = %e, "disk read failed");
                    return Outcome::CheckCondition(block_error_sense(&e, false));
                }
                match buf.write_in(0, data.get(..copy).unwrap_or(&data)) {
                    Ok(()) => Outcome::Good { transferred: copy },
                    Err(e) => data_fault(e),
                }
            }
            Prepared::Write { offset, len, fua } => {
                let mut data = vec![0u8; len];
                if let Err(e) = buf.read_out(0, &mut data) {
                    return data_fault(e);
                }
                match self.disk.write_at(offset, &data, fua) {
                    Ok(()) => Outcome::Good { transferred: len },
                    Err(e) => {
                        tracing::warn!(offset, len, error = %e, "disk write failed");
                        Outcome::CheckCondition(block_error_sense(&e, true))
                    }
                }
            }
            Prepared::Flush => match self.disk.flush() {
                Ok(()) => Outcome::Good { transferred: 0 },
                Err(e) => {
                    tracing::warn!(error = %e, "disk flush failed");
                    Outcome::CheckCondition(block_error_sense(&e, true))
                }
            },
            Prepared::Emulate => match Cdb::new(cdb) {
                Some(c) => self.emulate(&c, buf),
                None => Outcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB),
            },
        }
    }

    fn emulate(&self, c: &Cdb, buf: &mut dyn DataBuffer) -> Outcome {
        let capacity = self.capacity_blocks();
        let response = match c.opcode() {
            op::TEST_UNIT_READY | op::START_STOP_UNIT | op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                return Outcome::Good { transferred: 0 };
            }
            op::VERIFY_10 => {
                return if cdb::range_ok(u64::from(c.be32(2)), u64::from(c.be16(7)), capacity) {
                    Outcome::Good { transferred: 0 }
                } else {
                    Outcome::CheckCondition(Sense::LBA_OUT_OF_RANGE)
                };
            }
            op::INQUIRY => inquiry::respond(c, &self.params.identity, &self.info()),
            op::REQUEST_SENSE => self.request_sense(c),
            op::READ_CAPACITY_10 => {
                let last = u32::try_from(capacity.saturating_sub(1)).unwrap_or(u32::MAX);
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&self.disk.sector_size().to_be_bytes());
                Ok(d)
            }
            op::SERVICE_ACTION_IN_16 if c.byte(1) & 0x1F == op::SA_READ_CAPACITY_16 => {
                Ok(self.read_capacity_16(capacity))
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode::respond(c, self.disk.read_only()),
            op::REPORT_LUNS => report_luns(c, &[0]),
            op::UNMAP => return unmap::unmap(self, c, buf),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => return unmap::write_same(self, c, buf),
            _ => Err(Sense::INVALID_OPCODE),
        };
        match response {
            Ok(data) => send(c, &data, buf),
            Err(s) => Outcome::CheckCondition(s),
        }
    }

    fn request_sense(&self, c: &Cdb) -> Result<Vec<u8>, Sense> {
        if c.byte(1) & 0x01 != 0 {
            // DESC: descriptor-format sense is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let pending = if self.unit_attention.swap(false, Ordering::AcqRel) {
            Sense::CAPACITY_CHANGED
        } else {
            Sense::NONE
        };
        Ok(pending.to_fixed().to_vec())
    }

    fn read_capacity_16(&self, capacity: u64) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&capacity.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.disk.sector_size().to_be_bytes());
        d[13] = self.params.physical_exponent & 0x0F;
        if self.info().unmap {
            d[14] = 0x80; // LBPME
        }
        d
    }
}

/// Sends data-in bytes: at most the allocation length and the buffer size.
fn send(c: &Cdb, data: &[u8], buf: &mut dyn DataBuffer) -> Outcome {
    let alloc = cdb::allocation_length(c).unwrap_or(data.len());
    let n = data.len().min(alloc).min(buf.len());
    if n == 0 {
        return Outcome::Good { transferred: 0 };
    }
    match buf.write_in(0, data.get(..n).unwrap_or(data)) {
        Ok(()) => Outcome::Good { transferred: n },
        Err(e) => data_fault(e),
    }
}

/// The REPORT LUNS parameter data for `luns` (peripheral addressing, LUN in byte 1).
pub fn report_luns(c: &Cdb, luns: &[u8]) -> Result<Vec<u8>, Sense> {
    // SELECT REPORT 0, 1 and 2 all list our LUNs (we have no well-known LUNs).
    if c.byte(2) > 2 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut d = vec![0u8; 8];
    let len = u32::try_from(luns.len() * 8).unwrap_or(u32::MAX);
    d[0..4].copy_from_slice(&len.to_be_bytes());
    for &lun in luns {
        d.extend_from_slice(&[0, lun, 0, 0, 0, 0, 0, 0]);
    }
    Ok(d)
}

/// Commands to a path/target/LUN with no disk: standard INQUIRY answers "no device" (byte 0 =
/// 0x7F), REPORT LUNS lists `luns` (the target's LUNs, possibly none); `None` for anything else
/// (the transport reports INVALID LUN).
pub fn absent_lun(
    cdb: &[u8],
    lun: u8,
    luns: &[u8],
    identity: &Identity,
    buf: &mut dyn DataBuffer,
) -> Option<Outcome> {
    let c = Cdb::new(cdb)?;
    if cdb.is_empty() {
        return None;
    }
    let data = match c.opcode() {
        op::INQUIRY if c.byte(1) & 0x03 == 0 && c.byte(2) == 0 => inquiry::absent(identity, lun),
        op::REPORT_LUNS => match report_luns(&c, luns) {
            Ok(d) => d,
            Err(s) => return Some(Outcome::CheckCondition(s)),
        },
        _ => return None,
    };
    Some(send(&c, &data, buf))
}
