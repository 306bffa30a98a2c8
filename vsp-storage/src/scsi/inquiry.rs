//! INQUIRY: standard data and the VPD pages Linux reads (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2).

use super::cdb::Cdb;
use super::sense::Sense;
use super::{DiskInfo, Identity};

/// Peripheral byte for "no device at this LUN" (qualifier 3, type 0x1F).
pub const NO_LUN_PERIPHERAL: u8 = 0x7F;
/// Standard INQUIRY data length we return.
pub const STANDARD_LEN: usize = 36;
/// Microsoft's IEEE OUI (00-15-5D), used in the NAA designator.
const OUI: u32 = 0x00_15_5D;

/// Supported VPD pages, ascending (page 0x00 lists exactly these).
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Standard INQUIRY data for a direct-access block device.
pub fn standard(id: &Identity) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_LEN];
    d[0] = 0x00; // qualifier 0, direct-access block device
    d[1] = 0x00; // not removable
    d[2] = 0x06; // SPC-4
    d[3] = 0x02; // response data format 2
    d[4] = (STANDARD_LEN - 5) as u8;
    d[7] = 0x02; // CmdQue: Linux then sends tagged SRBs
    d[8..16].copy_from_slice(&id.vendor);
    d[16..32].copy_from_slice(&id.product);
    d[32..36].copy_from_slice(&id.revision);
    d
}

/// Standard INQUIRY data for a path/target/LUN without a disk: byte 0 = 0x7F. Vendor and product
/// stay filled for LUN 0 and are zeroed for other LUNs (as OpenVMM does).
pub fn absent(id: &Identity, lun: u8) -> Vec<u8> {
    let mut d = standard(id);
    d[0] = NO_LUN_PERIPHERAL;
    d[7] = 0;
    if lun != 0 {
        d[8..36].fill(0);
    }
    d
}

/// Builds the INQUIRY response for `c`, or the sense to fail it with.
pub fn respond(c: &Cdb, id: &Identity, info: &DiskInfo) -> Result<Vec<u8>, Sense> {
    let evpd = c.byte(1) & 0x01 != 0;
    let cmddt = c.byte(1) & 0x02 != 0;
    let page = c.byte(2);
    if cmddt {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    if !evpd {
        return if page == 0 {
            Ok(standard(id))
        } else {
            Err(Sense::INVALID_FIELD_IN_CDB)
        };
    }
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => id.serial.as_bytes().to_vec(),
        0x83 => device_identification(id),
        0xB0 => block_limits(info),
        0xB1 => block_characteristics(),
        0xB2 => provisioning(info),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    Ok(vpd(page, &body))
}

/// A VPD page: 4-byte header (peripheral 0, page code, BE page length) then `body`.
fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut d = vec![0x00, page];
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&body[..usize::from(len)]);
    d
}

/// Page 0x83: a T10 vendor-id designator and an NAA IEEE-registered designator (logical unit).
fn device_identification(id: &Identity) -> Vec<u8> {
    let mut d = Vec::new();
    // T10 vendor identification: code set 2 (ASCII), association 0 (LU), type 1.
    let mut t10 = id.vendor.to_vec();
    t10.extend_from_slice(id.serial.as_bytes());
    t10.truncate(252);
    d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    d.extend_from_slice(&t10);
    // NAA 5 (IEEE registered): 4-bit NAA, 24-bit OUI, 36-bit vendor-specific id.
    let naa = (5u64 << 60) | (u64::from(OUI) << 36) | (id.unique_id & 0xF_FFFF_FFFF);
    d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    d.extend_from_slice(&naa.to_be_bytes());
    d
}

/// Page 0xB0 (block limits), page length 0x3C.
fn block_limits(info: &DiskInfo) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // Byte offsets below are page offsets minus the 4-byte header.
    b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
    let gran = 1u16 << info.physical_exponent.min(15);
    b[2..4].copy_from_slice(&gran.to_be_bytes());
    b[4..8].copy_from_slice(&info.max_transfer_blocks.to_be_bytes());
    b[8..12].copy_from_slice(&info.max_transfer_blocks.to_be_bytes());
    if info.unmap {
        b[16..20].copy_from_slice(&info.max_unmap_blocks.to_be_bytes());
        b[20..24].copy_from_slice(&info.max_unmap_descriptors.to_be_bytes());
        b[24..28].copy_from_slice(&u32::from(gran).to_be_bytes());
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
        b[32..40].copy_from_slice(&u64::from(info.max_unmap_blocks).to_be_bytes());
    }
    b
}

/// Page 0xB1 (block device characteristics): non-rotating medium.
fn block_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b
}

/// Page 0xB2 (logical block provisioning).
fn provisioning(info: &DiskInfo) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if info.unmap {
        b[1] = 0x80 | 0x40; // LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP)
        b[2] = 0x02; // thin provisioned
    }
    b
}
