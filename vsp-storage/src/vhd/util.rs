//! Small helpers: positioned I/O with clear errors, big-endian field access, ids, time.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::VhdError;

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub(crate) const VHD_EPOCH: u64 = 946_684_800;

/// Reads exactly `buf.len()` bytes at `offset`; a short file is reported as a truncated image.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(VhdError::Corrupt(format!(
            "file ends inside the {}-byte range at offset {offset:#x} (truncated image?)",
            buf.len()
        ))),
        Err(e) => Err(VhdError::Io(e)),
    }
}

pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> Result<(), VhdError> {
    file.write_all_at(buf, offset).map_err(VhdError::Io)
}

/// Writes `len` zero bytes at `offset`, in bounded chunks.
pub(crate) fn write_zeros_at(file: &File, offset: u64, len: u64) -> Result<(), VhdError> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        // n <= zeros.len(), which is a usize.
        let n_usize = usize::try_from(n).unwrap_or(zeros.len());
        write_all_at(file, zeros.get(..n_usize).unwrap_or(&zeros), offset + done)?;
        done += n;
    }
    Ok(())
}

pub(crate) fn be_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

pub(crate) fn array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(off..off + N) {
        a.copy_from_slice(s);
    }
    a
}

pub(crate) fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Now as a VHD timestamp (seconds since 2000-01-01 UTC; 0 if the clock is before that).
pub(crate) fn vhd_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// A VHD timestamp as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn format_timestamp(ts: u32) -> String {
    let secs = VHD_EPOCH + u64::from(ts);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A random (version 4) UUID from the kernel's random source.
pub(crate) fn random_uuid() -> Result<[u8; 16], VhdError> {
    use std::io::Read;
    let mut id = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut id)?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}
