//! GPADLs on the host side: reassembly of GPADL_HEADER + GPADL_BODY word streams, validation of
//! every range and PFN, and the resulting page list a VSP maps.
//!
//! A GPADL is a stream of u64 words: for each range one header word (`byte_count` low, `byte_offset`
//! high) followed by `ceil((byte_offset + byte_count) / 4096)` PFNs. The header message announces the
//! stream length (`range_buflen`) and range count; bodies carry more words with only the handle.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::wire::{GpaRange, GpadlWords};
use alloc::vec::Vec;

/// Guest physical memory as far as the VMBus host cares: which page frames a guest may hand out.
pub trait GuestRam {
    /// Whether all of `count` pages starting at `pfn` are ordinary guest RAM (not MMIO, not overlay
    /// pages, not beyond the end).
    fn contains_pages(&self, pfn: u64, count: u64) -> bool;
}

/// RAM as a list of `[start_pfn, end_pfn)` ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamRanges(pub Vec<(u64, u64)>);

impl GuestRam for RamRanges {
    fn contains_pages(&self, pfn: u64, count: u64) -> bool {
        let Some(end) = pfn.checked_add(count) else {
            return false;
        };
        self.0.iter().any(|&(s, e)| pfn >= s && end <= e)
    }
}

/// Host limits on what a guest may describe.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GpadlLimits {
    /// Largest page count of one GPADL (all ranges). Linux's largest is a 31 MiB netvsc receive
    /// buffer (7936 pages); one range can describe at most 8190 pages (`range_buflen` is a u16).
    pub max_pages: u32,
    /// Most ranges in one GPADL.
    pub max_ranges: u16,
    /// Most GPADLs (complete or in progress) per connection.
    pub max_gpadls: usize,
}

impl Default for GpadlLimits {
    fn default() -> Self {
        GpadlLimits {
            max_pages: 8190,
            max_ranges: 64,
            max_gpadls: 1024,
        }
    }
}

/// Why a GPADL was refused (answered with a failed GPADL_CREATED) or a message about one dropped.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpadlError {
    #[error("GPADL handle 0 is reserved")]
    ZeroHandle,
    #[error("GPADL handle {0:#x} is already in use")]
    DuplicateHandle(u32),
    #[error("GPADL handle {0:#x} is unknown or not in progress")]
    UnknownHandle(u32),
    #[error("GPADL {handle:#x}: rangecount {rangecount} not allowed (1..={max})")]
    BadRangeCount {
        handle: u32,
        rangecount: u16,
        max: u16,
    },
    #[error("GPADL {handle:#x}: range_buflen {range_buflen} is not a multiple of 8 of at least 16")]
    BadBufLen { handle: u32, range_buflen: u16 },
    #[error(
        "GPADL {handle:#x}: range {index} (offset {byte_offset:#x}, count {byte_count:#x}) is invalid"
    )]
    BadRange {
        handle: u32,
        index: u16,
        byte_offset: u32,
        byte_count: u32,
    },
    #[error("GPADL {handle:#x}: ranges need {needed} words, the buffer holds {have}")]
    RangesDontFill { handle: u32, needed: u64, have: u64 },
    #[error("GPADL {handle:#x}: {pages} pages exceed the limit of {max}")]
    TooManyPages { handle: u32, pages: u64, max: u32 },
    #[error("GPADL {handle:#x}: PFN {pfn:#x} is not guest RAM")]
    PfnOutsideRam { handle: u32, pfn: u64 },
    #[error("too many GPADLs ({0})")]
    TooManyGpadls(usize),
}

/// One range of a complete GPADL.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GpadlRange {
    pub byte_offset: u32,
    pub byte_count: u32,
    /// Index of this range's first PFN in [`Gpadl::pfns`].
    pub first_pfn: usize,
    pub pfn_count: usize,
}

/// A complete, validated GPADL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpadl {
    pub handle: u32,
    /// The channel named in the header (bodies carry no relid).
    pub relid: u32,
    pub ranges: Vec<GpadlRange>,
    /// Every range's PFNs, in order.
    pub pfns: Vec<u64>,
}

impl Gpadl {
    /// The PFNs of range `index`.
    pub fn range_pfns(&self, index: usize) -> &[u64] {
        self.ranges
            .get(index)
            .and_then(|r| {
                self.pfns
                    .get(r.first_pfn..r.first_pfn.checked_add(r.pfn_count)?)
            })
            .unwrap_or_default()
    }

    /// The page list of a ring GPADL: exactly one range, starting at offset 0, whole pages.
    pub fn as_ring_pages(&self) -> Option<&[u64]> {
        match self.ranges.as_slice() {
            [r] if r.byte_offset == 0 && r.byte_count.is_multiple_of(4096) => {
                Some(self.range_pfns(0))
            }
            _ => None,
        }
    }
}

/// A GPADL whose words are still arriving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpadlBuilder {
    pub handle: u32,
    pub relid: u32,
    rangecount: u16,
    /// Words the header announced (`range_buflen / 8`).
    expected: usize,
    words: Vec<u64>,
}

impl GpadlBuilder {
    /// Starts from a GPADL_HEADER. Header-level values are checked here; ranges once all words are in.
    pub fn start(
        relid: u32,
        handle: u32,
        range_buflen: u16,
        rangecount: u16,
        words: GpadlWords<'_>,
        limits: &GpadlLimits,
    ) -> Result<Self, GpadlError> {
        if handle == 0 {
            return Err(GpadlError::ZeroHandle);
        }
        if rangecount == 0 || rangecount > limits.max_ranges {
            return Err(GpadlError::BadRangeCount {
                handle,
                rangecount,
                max: limits.max_ranges,
            });
        }
        if !range_buflen.is_multiple_of(8) || range_buflen < 16 {
            return Err(GpadlError::BadBufLen {
                handle,
                range_buflen,
            });
        }
        let expected = usize::from(range_buflen / 8);
        let mut b = GpadlBuilder {
            handle,
            relid,
            rangecount,
            expected,
            words: Vec::with_capacity(expected),
        };
        b.append(words);
        Ok(b)
    }

    /// Adds a GPADL_BODY's words; padding beyond the announced length is ignored.
    pub fn append(&mut self, words: GpadlWords<'_>) {
        let room = self.expected.saturating_sub(self.words.len());
        self.words.extend(words.iter().take(room));
    }

    /// `(rangecount, expected words, words so far)`, for snapshots.
    pub(crate) fn parts(&self) -> (u16, usize, &[u64]) {
        (self.rangecount, self.expected, &self.words)
    }

    /// Rebuilds a builder from [`Self::parts`], checking what [`Self::start`] would have.
    pub(crate) fn from_parts(
        relid: u32,
        handle: u32,
        rangecount: u16,
        expected: usize,
        words: Vec<u64>,
    ) -> Option<Self> {
        let plausible = handle != 0
            && rangecount != 0
            && (2..=usize::from(u16::MAX / 8)).contains(&expected)
            && words.len() < expected;
        plausible.then_some(GpadlBuilder {
            handle,
            relid,
            rangecount,
            expected,
            words,
        })
    }

    pub fn is_complete(&self) -> bool {
        self.words.len() >= self.expected
    }

    /// Validates the complete word stream against the limits and guest RAM.
    pub fn finish(self, limits: &GpadlLimits, ram: &dyn GuestRam) -> Result<Gpadl, GpadlError> {
        let handle = self.handle;
        let have = self.words.len() as u64;
        let mut ranges = Vec::with_capacity(usize::from(self.rangecount));
        let mut pfns = Vec::with_capacity(self.words.len());
        let mut at = 0usize;
        for index in 0..self.rangecount {
            let Some(&word) = self.words.get(at) else {
                return Err(GpadlError::RangesDontFill {
                    handle,
                    needed: (at as u64).saturating_add(1),
                    have,
                });
            };
            let r = GpaRange::from_word(word);
            let bad = GpadlError::BadRange {
                handle,
                index,
                byte_offset: r.byte_offset,
                byte_count: r.byte_count,
            };
            if r.byte_count == 0 || r.byte_offset >= 4096 {
                return Err(bad);
            }
            let n = r.pfn_count();
            let total = (pfns.len() as u64).saturating_add(n);
            if total > u64::from(limits.max_pages) {
                return Err(GpadlError::TooManyPages {
                    handle,
                    pages: total,
                    max: limits.max_pages,
                });
            }
            // n <= max_pages, so these fit usize.
            let n = n as usize;
            let start = at.saturating_add(1);
            let Some(list) = self.words.get(start..start.saturating_add(n)) else {
                return Err(GpadlError::RangesDontFill {
                    handle,
                    needed: (start as u64).saturating_add(n as u64),
                    have,
                });
            };
            ranges.push(GpadlRange {
                byte_offset: r.byte_offset,
                byte_count: r.byte_count,
                first_pfn: pfns.len(),
                pfn_count: n,
            });
            pfns.extend_from_slice(list);
            at = start.saturating_add(n);
        }
        if at != self.words.len() {
            return Err(GpadlError::RangesDontFill {
                handle,
                needed: at as u64,
                have,
            });
        }
        if let Some(&pfn) = pfns.iter().find(|&&p| !ram.contains_pages(p, 1)) {
            return Err(GpadlError::PfnOutsideRam { handle, pfn });
        }
        Ok(Gpadl {
            handle,
            relid: self.relid,
            ranges,
            pfns,
        })
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn ram() -> RamRanges {
        RamRanges(alloc::vec![(0, 0x10000)])
    }

    fn words(w: &[u64]) -> GpadlWords<'_> {
        GpadlWords::from_u64s(w)
    }

    #[test]
    fn single_range_in_header_and_bodies() {
        let limits = GpadlLimits::default();
        let pages: Vec<u64> = (100..160).collect();
        let mut stream = alloc::vec![
            GpaRange {
                byte_count: 60 * 4096,
                byte_offset: 0
            }
            .to_word()
        ];
        stream.extend(&pages);
        let buflen = (stream.len() * 8) as u16;
        let mut b =
            GpadlBuilder::start(7, 0xE1E10, buflen, 1, words(&stream[..27]), &limits).unwrap();
        assert!(!b.is_complete());
        b.append(words(&stream[27..55]));
        assert!(!b.is_complete());
        // Padding after the last word (some guests pad to 240 bytes) is ignored.
        let mut last = stream[55..].to_vec();
        last.extend([0xdead, 0xbeef]);
        b.append(words(&last));
        assert!(b.is_complete());
        let g = b.finish(&limits, &ram()).unwrap();
        assert_eq!(g.relid, 7);
        assert_eq!(g.as_ring_pages().unwrap(), &pages[..]);
    }

    #[test]
    fn multi_range() {
        let limits = GpadlLimits::default();
        let stream = [
            GpaRange {
                byte_count: 100,
                byte_offset: 4000,
            }
            .to_word(),
            1,
            2,
            GpaRange {
                byte_count: 4096,
                byte_offset: 0,
            }
            .to_word(),
            9,
        ];
        let b = GpadlBuilder::start(1, 5, 40, 2, words(&stream), &limits).unwrap();
        let g = b.finish(&limits, &ram()).unwrap();
        assert_eq!(g.range_pfns(0), &[1, 2]);
        assert_eq!(g.range_pfns(1), &[9]);
        assert!(g.as_ring_pages().is_none());
    }

    #[test]
    fn refusals() {
        let limits = GpadlLimits::default();
        let w = |c, o| {
            GpaRange {
                byte_count: c,
                byte_offset: o,
            }
            .to_word()
        };
        let start =
            |buflen, count, s: &[u64]| GpadlBuilder::start(1, 9, buflen, count, words(s), &limits);
        assert_eq!(
            GpadlBuilder::start(1, 0, 16, 1, words(&[]), &limits),
            Err(GpadlError::ZeroHandle)
        );
        assert!(matches!(
            start(16, 0, &[]),
            Err(GpadlError::BadRangeCount { .. })
        ));
        assert!(matches!(
            start(12, 1, &[]),
            Err(GpadlError::BadBufLen { .. })
        ));
        assert!(matches!(
            start(8, 1, &[]),
            Err(GpadlError::BadBufLen { .. })
        ));
        let fin =
            |buflen, count, s: &[u64]| start(buflen, count, s).unwrap().finish(&limits, &ram());
        assert!(matches!(
            fin(16, 1, &[w(0, 0), 1]),
            Err(GpadlError::BadRange { .. })
        ));
        assert!(matches!(
            fin(16, 1, &[w(1, 4096), 1]),
            Err(GpadlError::BadRange { .. })
        ));
        // Range needs 2 PFNs, buffer has 1.
        assert!(matches!(
            fin(16, 1, &[w(8192, 0), 1]),
            Err(GpadlError::RangesDontFill { .. })
        ));
        // Buffer longer than the ranges.
        assert!(matches!(
            fin(24, 1, &[w(4096, 0), 1, 2]),
            Err(GpadlError::RangesDontFill { .. })
        ));
        // Short stream (bodies never came).
        assert!(matches!(
            fin(32, 1, &[w(8192, 0), 1]),
            Err(GpadlError::RangesDontFill { .. })
        ));
        assert_eq!(
            fin(16, 1, &[w(4096, 0), 0x10000]),
            Err(GpadlError::PfnOutsideRam {
                handle: 9,
                pfn: 0x10000
            })
        );
        // u32::MAX bytes = 1M+1 pages: over the limit, refused before reading PFNs.
        assert!(matches!(
            fin(16, 1, &[w(u32::MAX, 4095), 1]),
            Err(GpadlError::TooManyPages { .. })
        ));
    }
}
