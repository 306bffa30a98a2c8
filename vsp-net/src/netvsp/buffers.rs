//! The guest's receive and send buffers, as registered by SEND_RECV_BUF / SEND_SEND_BUF.
//!
//! Both are GPADLs of one range (Linux: `vmbus_establish_gpadl` of a vmalloc'ed area). Nothing is
//! mapped: bytes are copied in and out through [`GuestMemory`], every access checked against the
//! guest's RAM, so a buffer naming pages outside RAM only fails the packets that touch it.

use super::journal::RxJournal;
use std::collections::HashMap;
use vmbus_core::gpadl::Gpadl;
use vmbus_core::memory::{GuestMemory, MemoryError, PagedRange};

/// Bytes at the start of every receive sub-allocation reserved for the RNDIS header and PPIs
/// (OpenVMM: 256; the frame follows them). Sub-allocation size = this + MTU + 36.
pub const RX_HEADER_AREA: u32 = 256;
/// Linux refuses sub-allocations and send sections smaller than this (`NETVSC_MTU_MIN`).
pub const MIN_SECTION_SIZE: u32 = 68;

/// Why a buffer GPADL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("GPADL {0:#x} does not exist")]
    UnknownGpadl(u32),
    #[error("GPADL {handle:#x} has {ranges} ranges; a buffer needs exactly one")]
    Ranges { handle: u32, ranges: usize },
    #[error("GPADL {handle:#x}: range of {len} bytes at offset {offset} is not whole pages")]
    NotPages { handle: u32, offset: u32, len: u32 },
    #[error("GPADL {handle:#x} of {len} bytes cannot hold one {section}-byte section")]
    TooSmall { handle: u32, len: u32, section: u32 },
    #[error("GPADL {handle:#x}: {e}")]
    Range { handle: u32, e: MemoryError },
}

/// A one-range GPADL as a byte buffer.
#[derive(Debug, Clone)]
pub struct GuestBuffer {
    pub id: u16,
    /// The GPADL the guest registered it as.
    pub handle: u32,
    pfns: Vec<u64>,
    len: u32,
}

impl GuestBuffer {
    fn new(g: &Gpadl, id: u16) -> Result<Self, BufferError> {
        let handle = g.handle;
        let [r] = g.ranges.as_slice() else {
            return Err(BufferError::Ranges {
                handle,
                ranges: g.ranges.len(),
            });
        };
        if r.byte_offset != 0 || r.byte_count == 0 || !r.byte_count.is_multiple_of(4096) {
            return Err(BufferError::NotPages {
                handle,
                offset: r.byte_offset,
                len: r.byte_count,
            });
        }
        let pfns = g.range_pfns(0).to_vec();
        PagedRange::new(0, r.byte_count, &pfns).map_err(|e| BufferError::Range { handle, e })?;
        Ok(GuestBuffer {
            id,
            handle,
            pfns,
            len: r.byte_count,
        })
    }

    fn range(&self) -> Result<PagedRange<'_>, MemoryError> {
        PagedRange::new(0, self.len, &self.pfns)
    }

    pub fn read(
        &self,
        mem: &dyn GuestMemory,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), MemoryError> {
        mem.read_paged(&self.range()?, offset, dst)
    }

    pub fn write(&self, mem: &dyn GuestMemory, offset: u64, src: &[u8]) -> Result<(), MemoryError> {
        mem.write_paged(&self.range()?, offset, src)
    }
}

/// The receive buffer: `count` sub-allocations of `sub_size` bytes, each lent to the guest inside
/// one transfer-page packet and returned when the guest completes that packet.
#[derive(Debug)]
pub struct ReceiveBuffer {
    pub buf: GuestBuffer,
    pub sub_size: u32,
    pub count: u32,
    free: Vec<u32>,
    /// Outstanding transfer-page packets: transaction id → their sections.
    in_flight: HashMap<u64, Vec<u32>>,
    next_id: u64,
    /// Where lent sections are recorded for a successor process (see [`super::journal`]).
    journal: Option<RxJournal>,
}

impl ReceiveBuffer {
    pub fn new(g: &Gpadl, id: u16, sub_size: u32) -> Result<Self, BufferError> {
        let buf = GuestBuffer::new(g, id)?;
        let count = buf.len / sub_size.max(MIN_SECTION_SIZE);
        if count == 0 || sub_size < MIN_SECTION_SIZE {
            return Err(BufferError::TooSmall {
                handle: g.handle,
                len: buf.len,
                section: sub_size,
            });
        }
        Ok(ReceiveBuffer {
            buf,
            sub_size,
            count,
            // Pop from the end: hand out low sections first.
            free: (0..count).rev().collect(),
            in_flight: HashMap::new(),
            next_id: 1,
            journal: None,
        })
    }

    /// Records lent sections in `journal` from now on (a buffer the guest just registered: nothing
    /// is lent). Sections the journal cannot track are not used.
    pub fn with_journal(mut self, journal: RxJournal) -> Self {
        self.count = self.count.min(journal.capacity());
        self.free = (0..self.count).rev().collect();
        self.next_id = journal.reset(self.buf.handle, self.count);
        self.journal = Some(journal);
        self
    }

    /// The buffer a predecessor process registered, with the sections it lent to the guest still
    /// lent (from the journal; the rule is in [`super::journal`]). Returns the buffer and the
    /// number of sections inherited as lent.
    pub fn resume(
        g: &Gpadl,
        id: u16,
        sub_size: u32,
        journal: Option<RxJournal>,
    ) -> Result<(Self, usize), BufferError> {
        let mut rb = Self::new(g, id, sub_size)?;
        let Some(journal) = journal else {
            // No record of what the guest holds: ids from a clock-derived base at least.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            rb.next_id = nanos.max(1);
            return Ok((rb, 0));
        };
        rb.count = rb.count.min(journal.capacity());
        let Some((next, lent)) = journal.inherited(g.handle, rb.count) else {
            tracing::warn!(
                handle = g.handle,
                "netvsp: journal does not describe the receive buffer; starting it empty"
            );
            return Ok((rb.with_journal(journal), 0));
        };
        let mut inherited = 0;
        rb.free.clear();
        for (s, &owner) in lent.iter().enumerate().rev() {
            let s = s as u32;
            if owner == 0 || owner >= next {
                rb.free.push(s);
            } else {
                rb.in_flight.entry(owner).or_default().push(s);
                inherited += 1;
            }
        }
        rb.next_id = next;
        rb.journal = Some(journal);
        Ok((rb, inherited))
    }

    pub fn free_sections(&self) -> usize {
        self.free.len()
    }

    pub fn outstanding_packets(&self) -> usize {
        self.in_flight.len()
    }

    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives sections back that were never announced to the guest.
    pub fn free_unsent(&mut self, sections: impl IntoIterator<Item = u32>) {
        self.free.extend(sections);
    }

    /// Byte offset of a section in the buffer.
    pub fn offset(&self, section: u32) -> u64 {
        u64::from(section) * u64::from(self.sub_size)
    }

    /// Writes one message at the start of a section.
    pub fn write_section(
        &self,
        mem: &dyn GuestMemory,
        section: u32,
        parts: &[&[u8]],
    ) -> Result<u32, MemoryError> {
        let mut at = self.offset(section);
        let mut total = 0u32;
        for p in parts {
            self.buf.write(mem, at, p)?;
            at += p.len() as u64;
            total = total.saturating_add(p.len() as u32);
        }
        Ok(total)
    }

    /// Records sections as lent in one packet; returns the packet's transaction id.
    pub fn lend(&mut self, sections: Vec<u32>) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if let Some(j) = &self.journal {
            j.set_next_id(self.next_id);
        }
        self.in_flight.insert(id, sections);
        id
    }

    /// Packet `trans_id` is about to be written to the guest's ring (`true`) or could not be
    /// (`false`): its sections are marked lent in the journal or unmarked.
    pub fn publishing(&self, trans_id: u64, yes: bool) {
        if let (Some(j), Some(s)) = (&self.journal, self.in_flight.get(&trans_id)) {
            j.mark(s, if yes { trans_id } else { 0 });
        }
    }

    /// The guest completed packet `trans_id`: its sections are free again. False for an id that
    /// is not outstanding (unknown, duplicate): nothing is freed twice.
    pub fn complete(&mut self, trans_id: u64) -> bool {
        match self.in_flight.remove(&trans_id) {
            Some(s) => {
                if let Some(j) = &self.journal {
                    j.mark(&s, 0);
                }
                self.free.extend(s);
                true
            }
            None => false,
        }
    }
}

/// The send buffer: sections of `section_size` bytes the guest copies small transmits into.
#[derive(Debug)]
pub struct SendBuffer {
    pub buf: GuestBuffer,
    pub section_size: u32,
    pub count: u32,
}

/// Why a send-buffer section reference is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SectionError {
    #[error("no send buffer registered")]
    NoBuffer,
    #[error("send-buffer section {index} does not exist ({count} sections)")]
    BadIndex { index: u32, count: u32 },
    #[error("{size} bytes used in a {section_size}-byte send section")]
    BadSize { size: u32, section_size: u32 },
}

impl SendBuffer {
    pub fn new(g: &Gpadl, id: u16, section_size: u32) -> Result<Self, BufferError> {
        let buf = GuestBuffer::new(g, id)?;
        let count = buf.len / section_size.max(1);
        if count == 0 || section_size < MIN_SECTION_SIZE {
            return Err(BufferError::TooSmall {
                handle: g.handle,
                len: buf.len,
                section: section_size,
            });
        }
        Ok(SendBuffer {
            buf,
            section_size,
            count,
        })
    }

    /// Checks a section reference and returns its byte offset.
    pub fn section(&self, index: u32, size: u32) -> Result<u64, SectionError> {
        if index >= self.count {
            return Err(SectionError::BadIndex {
                index,
                count: self.count,
            });
        }
        if size > self.section_size {
            return Err(SectionError::BadSize {
                size,
                section_size: self.section_size,
            });
        }
        Ok(u64::from(index) * u64::from(self.section_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus_core::gpadl::GpadlRange;

    fn gpadl(pages: u64, offset: u32, len: u32) -> Gpadl {
        Gpadl {
            handle: 7,
            relid: 1,
            ranges: vec![GpadlRange {
                byte_offset: offset,
                byte_count: len,
                first_pfn: 0,
                pfn_count: pages as usize,
            }],
            pfns: (100..100 + pages).collect(),
        }
    }

    #[test]
    fn receive_sections_are_lent_and_recycled_once() {
        let mut rb = ReceiveBuffer::new(&gpadl(4, 0, 4 * 4096), 0xCAFE, 1806).unwrap();
        assert_eq!(rb.count, 9);
        let a = rb.alloc().unwrap();
        let b = rb.alloc().unwrap();
        assert_eq!((a, b), (0, 1));
        let id = rb.lend(vec![a, b]);
        assert_eq!(rb.free_sections(), 7);
        assert!(rb.complete(id));
        assert!(!rb.complete(id), "a duplicate completion frees nothing");
        assert!(!rb.complete(12345));
        assert_eq!(rb.free_sections(), 9);
    }

    #[test]
    fn buffers_that_cannot_work_are_refused() {
        assert!(matches!(
            ReceiveBuffer::new(&gpadl(1, 0, 4096), 1, 8000),
            Err(BufferError::TooSmall { .. })
        ));
        assert!(matches!(
            ReceiveBuffer::new(&gpadl(1, 0, 4000), 1, 1806),
            Err(BufferError::NotPages { .. })
        ));
        assert!(matches!(
            SendBuffer::new(&gpadl(1, 0, 4096), 0, 6144),
            Err(BufferError::TooSmall { .. })
        ));
        let sb = SendBuffer::new(&gpadl(3, 0, 3 * 4096), 0, 6144).unwrap();
        assert_eq!(sb.count, 2);
        assert_eq!(sb.section(1, 6144), Ok(6144));
        assert!(matches!(
            sb.section(2, 10),
            Err(SectionError::BadIndex { .. })
        ));
        assert!(matches!(
            sb.section(u32::MAX, 10),
            Err(SectionError::BadIndex { .. })
        ));
        assert!(matches!(
            sb.section(0, 6145),
            Err(SectionError::BadSize { .. })
        ));
    }
}
