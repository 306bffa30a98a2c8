//! Little-endian field encoding shared by the versioned save/restore formats (the bus snapshot,
//! device states such as netvsp's). Saved state comes back from a file or a restarted process, so
//! the reader treats it as untrusted: every read is bounds-checked and element counts are checked
//! against the bytes left before anything is allocated for them.

use alloc::vec::Vec;

/// The saved state ended before a field it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("saved state is truncated")]
pub struct Truncated;

/// Appends fields in little-endian order.
#[derive(Debug, Default)]
pub struct StateWriter(Vec<u8>);

impl StateWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A length or element count, stored as a u64 whatever the host's `usize`.
    pub fn len(&mut self, v: usize) {
        self.u64(v as u64);
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Reads fields written by [`StateWriter`] from untrusted bytes.
#[derive(Debug)]
pub struct StateReader<'a>(&'a [u8]);

impl<'a> StateReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }
    pub fn take<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        self.take().map(u8::from_le_bytes)
    }
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.take().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.take().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.take().map(u64::from_le_bytes)
    }
    /// A length written by [`StateWriter::len`]; `None` when it does not fit this host's `usize`.
    pub fn len(&mut self) -> Result<Option<usize>, Truncated> {
        Ok(usize::try_from(self.u64()?).ok())
    }
    /// An element count, refused when the bytes left cannot hold that many elements of at least
    /// `min_size` bytes (so a corrupt count never drives a huge allocation).
    pub fn count(&mut self, min_size: usize) -> Result<usize, Truncated> {
        let n = self.len()?.ok_or(Truncated)?;
        if n.checked_mul(min_size).is_none_or(|b| b > self.0.len()) {
            return Err(Truncated);
        }
        Ok(n)
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_little_endian() {
        let mut w = StateWriter::new();
        w.u8(1);
        w.u16(0x0203);
        w.u32(0x0405_0607);
        w.u64(0x0809_0a0b_0c0d_0e0f);
        w.len(2);
        let bytes = w.into_bytes();
        assert_eq!(&bytes[..7], &[1, 3, 2, 7, 6, 5, 4]);
        let mut r = StateReader::new(&bytes);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.u32(), Ok(0x0405_0607));
        assert_eq!(r.u64(), Ok(0x0809_0a0b_0c0d_0e0f));
        assert_eq!(r.len(), Ok(Some(2)));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), Err(Truncated));
    }

    #[test]
    fn counts_beyond_the_bytes_left_are_refused() {
        let mut w = StateWriter::new();
        w.len(3);
        w.u32(0);
        w.u32(0);
        let bytes = w.into_bytes();
        // Three 4-byte elements announced, two present.
        assert_eq!(StateReader::new(&bytes).count(4), Err(Truncated));
        assert_eq!(StateReader::new(&bytes).count(2), Ok(3));
        let mut huge = StateWriter::new();
        huge.u64(u64::MAX);
        assert_eq!(
            StateReader::new(&huge.into_bytes()).count(1),
            Err(Truncated)
        );
    }
}
