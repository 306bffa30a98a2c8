//! MODE SENSE(6)/(10): the caching (0x08) and control (0x0A) pages, and "all pages" (0x3F).
//! No block descriptors are returned; MODE SELECT is not supported, so nothing is changeable.

use super::cdb::{Cdb, op};
use super::sense::Sense;

/// Page codes.
pub const CACHING: u8 = 0x08;
pub const CONTROL: u8 = 0x0A;
pub const ALL_PAGES: u8 = 0x3F;

/// Device-specific parameter bits of the header.
const WP: u8 = 0x80;
const DPOFUA: u8 = 0x10;

fn caching_page(changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = CACHING;
    p[1] = 0x12;
    if !changeable {
        p[2] = 0x04; // WCE: writes are cached until SYNCHRONIZE CACHE (or FUA)
    }
    p
}

fn control_page(_changeable: bool) -> Vec<u8> {
    // D_SENSE 0 (fixed-format sense), QERR 0, TST 0; nothing changeable.
    let mut p = vec![0u8; 12];
    p[0] = CONTROL;
    p[1] = 0x0A;
    p
}

/// The MODE SENSE response for `c` (6- or 10-byte form), or the sense to fail it with.
pub fn respond(c: &Cdb, read_only: bool) -> Result<Vec<u8>, Sense> {
    let pc = c.byte(2) >> 6;
    let page = c.byte(2) & 0x3F;
    let subpage = c.byte(3);
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    let changeable = pc == 1;
    let pages = match (page, subpage) {
        (CACHING, 0) => caching_page(changeable),
        (CONTROL, 0) => control_page(changeable),
        (ALL_PAGES, 0 | 0xFF) => {
            let mut v = caching_page(changeable);
            v.extend(control_page(changeable));
            v
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let dev_specific = DPOFUA | if read_only { WP } else { 0 };
    let mut out = Vec::with_capacity(pages.len() + 8);
    if c.opcode() == op::MODE_SENSE_6 {
        // Mode data length excludes itself (1 byte).
        out.push((pages.len() + 3) as u8);
        out.extend_from_slice(&[0, dev_specific, 0]);
    } else {
        let len = (pages.len() + 6) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[0, dev_specific, 0, 0, 0, 0]);
    }
    out.extend(pages);
    Ok(out)
}
